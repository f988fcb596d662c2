"""Sweeps on Optuna: the study and its storage are the shared state; a trial (fastres/objective.py)
is fastres runs, and workers (fastres/worker.py) take trials until the sweep is done.

    storage = open_storage(url, out, spec.heartbeat_s)   # SQLite in the sweep folder by default
    study = open_study(spec, storage, url)               # created, or joined if the same sweep file
    work(spec, study, out)                               # one worker: trials until none are left

Any number of workers, on this machine or others, share one study:

- a grid is queued once, by the process that creates the study, and each queued trial is taken by
  exactly one worker (Optuna's queue marks it running in one database update);
- a worker that dies (SIGKILL, a preempted job) stops its heartbeat: its trial is failed and queued
  again by the next worker that looks (at once on the same machine, where the dead process id
  tells; after 2 x heartbeat_s elsewhere), and the new attempt resumes the same folders' last.pt;
- Ctrl-C or SIGTERM stops a worker at the next safe point and queues its trial again likewise.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

from .errors import OutputError, describe_os_error
from .rundir import atomic_write
from .sweepfile import SweepError, SweepSpec

SWEEP_JSON = "sweep.json"  # DIR/sweep.json: which study the folder's trials belong to
ATTR = "fastres_sweep"     # the study's user attribute holding the sweep file's definition


def import_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # fastres prints its own line per trial
    # heartbeats and retries are marked experimental in Optuna (since 2.8); they are what makes a
    # killed worker's trial resumable, and fastres's tests check them
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # a packed worker asks for trials itself (study.ask) and keeps their heartbeats (Heartbeats)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


# ---------------------------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------------------------
def default_url(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'study.db'}"


def shown_url(url: str) -> str:
    """The URL without its password, for messages and sweep.json."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, heartbeat_s: int = 60, timeout_s: float = 60.0):
    """An Optuna storage for `url`: an SQLAlchemy URL (sqlite:///PATH, postgresql://USER@HOST/DB,
    mysql://...) or journal:PATH (Optuna's journal file, for a shared filesystem). One line and exit
    status 2 if it cannot be opened or reached."""
    optuna = import_optuna()
    shown = shown_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise SweepError(f"--storage {shown}: cannot open the journal file ({describe_os_error(e)})") from None
    import sqlalchemy.exc

    if url.startswith("sqlite:"):
        connect = {"timeout": timeout_s}  # s: a writer waits this long for another's lock, then gives up
    elif url.startswith(("postgresql", "mysql")):
        connect = {"connect_timeout": max(1, round(timeout_s))}  # s: an unreachable server fails in that time
    else:
        connect = {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": connect, "pool_pre_ping": True},
                heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=retry_callback())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # workers started together on a new database all create Optuna's tables; all but one
            # collide (PostgreSQL: duplicate key in pg_type) and find the tables there a moment later
            if attempt == 4:
                raise SweepError(f"--storage {shown}: cannot open the study storage ({_first_line(e)})") from None
            time.sleep(0.5 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            raise SweepError(f"--storage {shown}: cannot open the study storage ({_first_line(e)})") from None


@contextlib.contextmanager
def storage_errors(url: str):
    """A storage that fails mid-sweep (locked past the timeout, the server gone): one line, exit
    status 2, rather than SQLAlchemy's traceback; the trial in hand was queued again if it could be."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise SweepError(f"--storage {shown_url(url)}: {_first_line(e)} (the sweep stopped; run it again to "
                         "continue)") from None


def _first_line(e: BaseException) -> str:
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:200]


def retry_callback():
    """Optuna's retry callback (a failed trial queued again with its choices and its reports, so a
    pruner judges the whole curve), minus the old attempt's worker: a retry taken by a new worker
    must never look like a trial of a dead process before that worker has named itself."""
    import copy

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    class Retry(RetryHeartbeatStaleTrialCallback):
        def __call__(self, study, trial):
            trial = copy.deepcopy(trial)
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("pid", "host", "status", "why")}
            super().__call__(study, trial)

    return Retry(inherit_intermediate_values=True)


def make_sampler(spec: SweepSpec):
    optuna = import_optuna()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    # grid: every configuration is queued up front, so the sampler never has a choice to make
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def make_pruner(spec: SweepSpec):
    optuna = import_optuna()
    return {"none": optuna.pruners.NopPruner,
            # steps are epochs (1, 2, ...): judged from the second epoch on, once 2 trials have ended
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2)}[spec.pruner]()


def open_study(spec: SweepSpec, storage, url: str, log=print, wait_s: float = 60.0):
    """The sweep file's study in `storage`: created (and, for a grid, every configuration queued)
    by the first process to ask; joined by every later one if its sweep file defines the same
    study, refused with one line otherwise."""
    optuna = import_optuna()
    import sqlalchemy.exc

    kw = dict(study_name=spec.name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec))
    try:
        try:
            study = optuna.create_study(direction="maximize", **kw)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(**kw)
        else:  # this process made it: only it queues the grid, so no configuration is queued twice
            study.set_user_attr(ATTR, spec.definition())
            if spec.is_grid:
                for i, params in enumerate(spec.grid()):
                    study.enqueue_trial(params, user_attrs={"grid_index": i})
            study.set_user_attr("queued", len(spec.grid()) if spec.is_grid else 0)
            return study
        # joined: wait for its creator to have written the definition and queued the grid
        t0 = time.monotonic()
        while "queued" not in study.user_attrs:
            if time.monotonic() - t0 > wait_s:
                raise SweepError(f"--storage {shown_url(url)}: study {spec.name!r} exists but was never set up by "
                                 "fastres (no definition after a minute); give the sweep another name")
            time.sleep(0.5)
        theirs = study.user_attrs.get(ATTR)
        if theirs != spec.definition():
            raise SweepError(f"--storage {shown_url(url)}: study {spec.name!r} belongs to another sweep file "
                             f"({_difference(theirs or {}, spec.definition())}); give this one another name = "
                             f"\"...\", or another --out/--storage")
        return study
    except sqlalchemy.exc.OperationalError as e:
        raise SweepError(f"--storage {shown_url(url)}: {_first_line(e)}") from None


def _difference(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            sub = [s for s in sorted(set(a[k]) | set(b[k])) if a[k].get(s) != b[k].get(s)]
            parts.append(f"{k}: {', '.join(sub)} differ")
        else:
            parts.append(f"{k}: {json.dumps(a.get(k))} there, {json.dumps(b.get(k))} here")
    return "; ".join(parts) or "it has no fastres definition"


def check_folder(out: Path, spec: SweepSpec) -> bool:
    """Refuse a sweep folder that holds another study's trials (DIR/sweep.json names it: its
    trials/NNNN would be mixed with this one's); create DIR if needed (OutputError, exit 4, if it
    cannot be). Returns whether DIR was created now (so that a failed start can remove it)."""
    path = out / SWEEP_JSON
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError):
            theirs = None
        if not theirs or theirs.get("name") != spec.name or theirs.get("definition") != spec.definition():
            what = _difference((theirs or {}).get("definition") or {}, spec.definition())
            raise SweepError(f"--out {out} holds the trials of another sweep "
                             f"({(theirs or {}).get('name')!r}: {what}); choose another --out")
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the sweep folder {out}: {describe_os_error(e)}; choose another --out") from None
    return created


def claim_folder(out: Path, spec: SweepSpec, url: str) -> None:
    """DIR/sweep.json: the study whose trials DIR holds (name, storage without its password, the
    sweep file's definition), written once the study is open."""
    (out / "trials").mkdir(exist_ok=True)
    mine = {"name": spec.name, "storage": shown_url(url), "definition": spec.definition(), "file": spec.path}
    if not (out / SWEEP_JSON).is_file():
        atomic_write(out / SWEEP_JSON, lambda p: p.write_text(json.dumps(mine, indent=2)))
