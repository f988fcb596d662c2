"""Sweeps on Optuna: the study and its storage are the shared state, each trial is fastres runs.

    storage = open_storage(url, out, spec.heartbeat_s)   # SQLite in the sweep folder by default
    study = open_study(spec, storage, url)               # created, or joined if the same sweep file
    work(spec, study, out)                               # one worker: trials until none are left

One trial is one configuration of the sweep file's space, trained once per seed in
DIR/trials/NNNN/seedS (each a normal run folder); its value is the mean final test accuracy over
the seeds, and the study keeps its parameters, MACs, std, best epoch, training seconds and device
as user attributes. Any number of workers, on this machine or others, share one study:

- a grid is queued once, by the process that creates the study, and each queued trial is taken by
  exactly one worker (Optuna's queue marks it running in one database update);
- a worker that dies (SIGKILL, a preempted job) stops its heartbeat: its trial is failed and queued
  again by the next worker that looks (at once on the same machine, where the dead process id
  tells; after 2 x heartbeat_s elsewhere), and the new attempt resumes the same folders' last.pt;
- Ctrl-C or SIGTERM stops a worker at the next safe point and queues its trial again likewise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import statistics
import time
import warnings
from pathlib import Path

from .config import ConfigError, from_dict
from .design import check_budget
from .errors import BadInput, Diverged, FastresError, Interrupted, OutputError, describe_os_error
from .progress import duration
from .rundir import RECORD, RUN_FILES, StopRequest, atomic_write
from .sweepfile import SweepError, SweepSpec

SWEEP_JSON = "sweep.json"  # DIR/sweep.json: which study the folder's trials belong to
ATTR = "fastres_sweep"     # the study's user attribute holding the sweep file's definition


class TrialError(FastresError):
    """A trial that cannot give a value (an invalid combination, a diverged run): it is recorded as
    failed, and the sweep goes on with the next."""


def _optuna():
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
    optuna = _optuna()
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
                heartbeat_stale_trial_callback=_retry())
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


def _retry():
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
    optuna = _optuna()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    # grid: every configuration is queued up front, so the sampler never has a choice to make
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def make_pruner(spec: SweepSpec):
    optuna = _optuna()
    return {"none": optuna.pruners.NopPruner,
            # steps are epochs (1, 2, ...): judged from the second epoch on, once 2 trials have ended
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2)}[spec.pruner]()


def open_study(spec: SweepSpec, storage, url: str, log=print, wait_s: float = 60.0):
    """The sweep file's study in `storage`: created (and, for a grid, every configuration queued)
    by the first process to ask; joined by every later one if its sweep file defines the same
    study, refused with one line otherwise."""
    optuna = _optuna()
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


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------
def _host() -> str:
    """This machine, for telling whether a trial's worker process still lives here: the hostname
    and boot id, or $FASTRES_WORKER_HOST where those do not tell machines apart (containers
    started from one image may share a hostname)."""
    if os.environ.get("FASTRES_WORKER_HOST"):
        return os.environ["FASTRES_WORKER_HOST"]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def folder_number(number: int, system_attrs: dict) -> int:
    """A retried trial works in its first attempt's folder, so it resumes that run's last.pt."""
    return system_attrs.get("failed_trial", number)


def _finished(cfg) -> dict | None:
    """The record of a run of exactly cfg that finished (read, not rerun), else None."""
    path = Path(cfg.out) / RECORD
    try:
        rec = json.loads(path.read_text())
        return rec if rec.get("status") == "finished" and from_dict(rec["config"]) == cfg else None
    except (OSError, ValueError, KeyError, BadInput, TypeError):
        return None


def trial_summary(records: list[dict]) -> dict:
    """A trial's figures from its runs' records (one per seed)."""
    acc = [r["final_test_acc"] for r in records]
    first = records[0]
    best_epoch = max(first["epochs"], key=lambda h: h["test_acc"])["epoch"]
    return {"acc_mean": statistics.fmean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accs": acc, "best_acc_mean": statistics.fmean(r["best_test_acc"] for r in records),
            "best_epoch": best_epoch, "train_s": round(sum(r["train_s_total"] for r in records), 3),
            "parameters": first["parameters"], "macs": first["macs"],
            "device": first["environment"]["device_name"], "epochs": first["config"]["epochs"]}


@dataclasses.dataclass
class Plan:
    """A trial's runs: its folder number, its choices in words, a config per seed, and per seed its
    record (read where that run finished before; the Diverged error of a run that diverged)."""
    trial: object
    number: int
    what: str
    cfgs: list
    records: dict

    @property
    def todo(self) -> list[int]:
        return [i for i, rec in self.records.items() if rec is None]


class Objective:
    """The study's objective: one configuration, trained once per seed. Small on purpose: the
    study, its storage and the retry callback carry the bookkeeping. plan() and conclude() are its
    two halves, so that a packed worker (work(..., pack=K)) can train several trials' runs at once."""

    def __init__(self, spec: SweepSpec, study, out: Path, stop: StopRequest, log=print):
        self.spec, self.study, self.out, self.stop, self.log = spec, study, out, stop, log
        self.current = None  # the trial being run, for queuing it again if the worker is stopped

    def __call__(self, trial) -> float:
        from .train import train

        self.current = trial
        try:
            plan = self.plan(trial)
            for i in plan.todo:  # the trial's unfinished seeds, one after another
                if self.stop.signum:
                    raise Interrupted("stopped before the next run", self.stop.signum)
                self.starting(plan, i)
                with open(Path(plan.cfgs[i].out) / "train.log", "a") as f:
                    try:
                        plan.records[i] = train(plan.cfgs[i], resume=True, log=_to(f),
                                                on_epoch=self.on_epoch(plan, i))
                    except Diverged as e:
                        plan.records[i] = e
                if self.decided(plan):
                    break
            return self.conclude(plan)
        except (TrialError, _optuna().TrialPruned):
            raise
        except BaseException as e:  # not the trial's fault (stopped, data, disk, a bug): the worker
            # stops and queues the trial again (work()); marked now, while it can still be changed
            trial.set_user_attr("status", "requeued")
            trial.set_user_attr("why", stopped_why(e))
            raise

    def plan(self, trial) -> Plan:
        """The trial's configuration per seed, its folder, and what its folder already holds;
        TrialError (invalid) or TrialPruned (over budget, or the grid done) if it is not trained."""
        optuna = _optuna()
        system = self.study._storage.get_trial_system_attrs(trial._trial_id)
        if self.spec.is_grid and "fixed_params" not in system and "failed_trial" not in system:
            # another worker took the last queued configuration between our look and our ask
            trial.set_user_attr("status", "grid_done")
            raise optuna.TrialPruned("the grid is done")
        params = self.spec.suggest(trial)
        number = folder_number(trial.number, system)
        folder = self.out / "trials" / f"{number:04d}"
        for k, v in {"folder": str(folder.relative_to(self.out)), "host": _host(), "pid": os.getpid(),
                     "status": "running"}.items():
            trial.set_user_attr(k, v)
        what = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        try:
            cfgs = [self.spec.config(params, s, str(folder / f"seed{s}")) for s in self.spec.seeds]
        except ConfigError as e:
            trial.set_user_attr("status", "invalid")
            trial.set_user_attr("error", str(e))
            self.log(f"trial {number:04d} ({what}): not a valid configuration: {e}")
            raise TrialError(str(e)) from None
        n = check_budget(dataclasses.replace(cfgs[0], max_params=0))  # counted on the meta device: ms
        trial.set_user_attr("parameters", n)
        trial.set_user_attr("config", {k: v for k, v in cfgs[0].to_dict().items() if k not in ("seed", "out")})
        if self.spec.max_params and n > self.spec.max_params:
            trial.set_user_attr("status", "over_budget")
            self.log(f"trial {number:04d} ({what}): {n:,} parameters, over the budget of {self.spec.max_params:,}; "
                     "not trained")
            raise optuna.TrialPruned("over budget")
        for cfg in cfgs:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        # finished runs are read, not rerun
        return Plan(trial, number, what, cfgs, {i: _finished(cfg) for i, cfg in enumerate(cfgs)})

    def starting(self, plan: Plan, i: int) -> None:
        cfg = plan.cfgs[i]
        resume = any((Path(cfg.out) / f).exists() for f in RUN_FILES)
        self.log(f"trial {plan.number:04d} seed {cfg.seed} ({plan.what}): {'resuming' if resume else 'training'} "
                 f"in {cfg.out}")

    def on_epoch(self, plan: Plan, i: int):
        """train()'s on_epoch for seed i: a line per epoch; the first seed's test accuracy goes to
        the pruner. A seed still training when its trial is decided (pruned, or another seed
        diverged: packed runs) ends at its epoch's end with the trial's status."""
        cfg = plan.cfgs[i]

        def report(h):
            self.log(f"trial {plan.number:04d} seed {cfg.seed}: epoch {h['epoch']}/{cfg.epochs} test "
                     f"{h['test_acc']:.2%} ({h['train_s']:.1f} s)")
            if i == 0:
                plan.trial.report(h["test_acc"], h["epoch"])
                if plan.trial.should_prune():
                    return "pruned"
            # a packed sibling's outcome: pruned with it, or abandoned when another seed diverged
            return {"pruned": "pruned", "diverged": "abandoned"}.get(self.decided(plan))
        return report

    @staticmethod
    def decided(plan: Plan) -> str | None:
        """The trial's outcome before all its seeds have run: "diverged" or "pruned", else None."""
        recs = list(plan.records.values())
        if any(isinstance(r, Diverged) for r in recs):
            return "diverged"
        if any(isinstance(r, dict) and r.get("status") == "pruned" for r in recs):
            return "pruned"
        return None

    def conclude(self, plan: Plan) -> float:
        """The trial's value from its runs' records; TrialError if one diverged, TrialPruned if its
        first seed was pruned."""
        trial, number, what = plan.trial, plan.number, plan.what
        for cfg, r in zip(plan.cfgs, plan.records.values()):
            if isinstance(r, Diverged):  # this configuration fails; the sweep goes on
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("error", str(r))
                self.log(f"trial {number:04d} seed {cfg.seed}: diverged: {r}")
                raise TrialError(str(r))
        first = plan.records[0]
        if first is not None and first["status"] == "pruned":
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("pruned_at_epoch", len(first["epochs"]))
            self.log(f"trial {number:04d} ({what}): pruned after epoch {len(first['epochs'])} "
                     f"(test accuracy {first['epochs'][-1]['test_acc']:.2%})")
            raise _optuna().TrialPruned(f"pruned after epoch {len(first['epochs'])}")
        s = trial_summary([plan.records[i] for i in range(len(plan.cfgs))])
        for k, v in {**s, "status": "complete"}.items():
            trial.set_user_attr(k, v)
        self.log(f"trial {number:04d} ({what}): {s['acc_mean']:.2%} ± {s['acc_std']:.2%} over seeds "
                 f"{list(self.spec.seeds)}, {s['parameters']:,} parameters, {duration(s['train_s'])} of training")
        return s["acc_mean"]


def _to(f):
    """A log function writing to the open file f (a run's train.log in its folder)."""
    return lambda *a, **k: print(*a, **k, file=f, flush=True)


def stopped_why(e: BaseException) -> str:
    """Why a trial was queued again: its worker was stopped, or stopped by an error of its own."""
    return "its worker was stopped" if isinstance(e, (Interrupted, KeyboardInterrupt)) else f"its worker stopped: {e}"


# ---------------------------------------------------------------------------------------------
# A worker
# ---------------------------------------------------------------------------------------------
def requeue(study, trial_id: int, why: str, failed: bool = False) -> bool:
    """Fail a running trial that will not finish where it runs and queue it again, with the same
    choices and folder. Of several processes that try at once, one succeeds (the storage changes a
    trial's state from running once); `failed`: Optuna has already marked it failed (the trial of
    a worker that was stopped)."""
    optuna = _optuna()
    storage = study._storage
    if not failed:
        try:
            storage.set_trial_user_attr(trial_id, "status", "requeued")
            storage.set_trial_user_attr(trial_id, "why", why)
            if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    _retry()(study, storage.get_trial(trial_id))
    return True


def reclaim_local(study, log=print) -> int:
    """Trials left running by a worker process of this machine that no longer exists (killed):
    failed and queued again now, rather than after the heartbeat's grace period."""
    optuna = _optuna()
    host, n = _host(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid and pid != os.getpid() and not _alive(pid):
            if requeue(study, t._trial_id, f"its worker (pid {pid}) is gone"):
                log(f"trial {folder_number(t.number, t.system_attrs):04d}: its worker (pid {pid}) is gone; queued again, to resume from "
                    f"{t.user_attrs.get('folder')}")
                n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counts(study) -> dict:
    optuna = _optuna()
    c = {s.name.lower(): 0 for s in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("status") != "grid_done":
            c[t.state.name.lower()] += 1
    return c


def work(spec: SweepSpec, study, out: Path, log=print, pack: int = 1) -> int:
    """Run trials until the sweep has what it asked for (or its time limit, or a stop request),
    then wait while other workers still run trials, taking up any whose worker dies. Returns the
    number of trials this worker ran. pack > 1: `pack` runs at a time in this process (the seeds
    of a trial and the next trials' as slots free: _work_packed)."""
    optuna = _optuna()
    t0, ran, said = time.monotonic(), 0, False
    with StopRequest(log) as stop:
        timed_out = []

        def next_step() -> str:
            """What this worker may do now: "start" a trial, "wait" for other workers' running
            trials (taken up here if their worker dies), or it is "done"."""
            optuna.storages.fail_stale_trials(study)  # other machines' dead workers (heartbeat)
            reclaim_local(study, log)                  # this machine's (their pid is gone)
            if stop.signum:
                raise Interrupted("stopped between trials; every trial resumes", stop.signum)
            if timed_out or (spec.time_limit_s and time.monotonic() - t0 > spec.time_limit_s):
                if not timed_out:
                    log(f"time limit ({duration(spec.time_limit_s)}) reached: no new trial starts here")
                    timed_out.append(True)
                return "done"
            c = counts(study)
            started = c["complete"] + c["pruned"] + c["running"]
            # a grid runs what is queued (retries included); a sampled sweep asks for new
            # configurations until `trials` have started, then runs what is still queued
            nothing = (c["waiting"] == 0 and (spec.is_grid or started >= spec.n_trials())) or \
                (spec.is_grid and started >= spec.n_trials())
            return "start" if not nothing else "wait" if c["running"] else "done"

        objective = Objective(spec, study, out, stop, log)
        while True:
            what = next_step()
            if what == "done":
                break
            if what == "wait":
                if not said:
                    log(f"waiting for {counts(study)['running']} trial(s) running in other workers (taken up here "
                        "if their worker dies)")
                    said = True
                _sleep(min(spec.heartbeat_s, 5), stop)
                continue
            said = False
            if pack > 1:
                def may_start() -> bool:  # asked while runs train: a stop request lets them stop first
                    try:
                        return next_step() == "start"
                    except Interrupted:
                        return False
                ran += _work_packed(objective, pack, may_start, log)
                continue
            try:
                study.optimize(objective, n_trials=1, catch=(TrialError,), gc_after_trial=True)
            except (Interrupted, KeyboardInterrupt, Exception) as e:
                # stopped, or a problem no trial can get past (data, disk, a bug): the trial was
                # not at fault, so it is queued again for when a worker runs
                if objective.current is not None:
                    requeue(study, objective.current._trial_id, "", failed=True)
                if isinstance(e, KeyboardInterrupt):
                    raise Interrupted("stopped at once; the trial resumes from its last checkpoint") from None
                raise
            ran += 1
            objective.current = None
    return ran


def _work_packed(objective: Objective, slots: int, may_start, log) -> int:
    """`slots` runs at a time in one Pack: a trial's seeds, and, as a slot frees, the next seed or
    the next trial (asked of the study when may_start() says the sweep has more), so a worker keeps
    its device busy with several trials. Each trial is told to the study once all its seeds have
    ended; a stop or an error no trial can get past queues every trial still in flight again.
    Returns the number of trials told."""
    from collections import deque

    from .packed import Member, Pack

    optuna = _optuna()
    study, told = objective.study, []
    plans: dict[int, tuple[Plan, set]] = {}  # in flight: trial id -> (its plan, its seeds not yet ended)
    queue: deque = deque()                   # (plan, seed index) not yet given a slot

    def tell(trial, **kw):
        study.tell(trial, skip_if_finished=True, **kw)  # skipped if another worker failed it meanwhile
        beats.discard(trial._trial_id)
        plans.pop(trial._trial_id, None)
        if trial.user_attrs.get("status") != "grid_done":
            told.append(trial.number)

    def finish(plan: Plan):
        try:
            tell(plan.trial, values=objective.conclude(plan))
        except TrialError:
            tell(plan.trial, state=optuna.trial.TrialState.FAIL)
        except optuna.TrialPruned:
            tell(plan.trial, state=optuna.trial.TrialState.PRUNED)

    def ended(plan: Plan, i: int):
        left = plans[plan.trial._trial_id][1]
        left.discard(i)
        if not left:
            finish(plan)

    def member(plan: Plan, i: int) -> Member:
        objective.starting(plan, i)
        f = files.enter_context(open(Path(plan.cfgs[i].out) / "train.log", "a"))

        def on_end(result):
            f.close()
            if isinstance(result, Interrupted):  # stays in flight: queued again below
                return
            if isinstance(result, FastresError) and not isinstance(result, Diverged):
                raise result  # not the trial's fault (disk, data): the worker stops, trials queued again
            plan.records[i] = result
            ended(plan, i)
        return Member(plan.cfgs[i], f"{plan.number:04d}/seed{plan.cfgs[i].seed}", _to(f),
                      objective.on_epoch(plan, i), on_end)

    def next_member() -> Member | None:
        while True:
            while queue:
                plan, i = queue.popleft()
                if objective.decided(plan):  # pruned or failed while this seed waited: never started
                    ended(plan, i)
                    continue
                return member(plan, i)
            if not may_start():
                return None
            trial = study.ask()
            beats.add(trial._trial_id)
            try:
                plan = objective.plan(trial)
            except TrialError:  # not a valid configuration
                tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            except optuna.TrialPruned:  # over the budget, or the grid is done
                tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            except BaseException as e:  # not the trial's fault: queued again, the worker stops
                requeue(study, trial._trial_id, stopped_why(e))
                raise
            plans[trial._trial_id] = (plan, set(plan.todo))
            if not plan.todo:  # every seed finished in an earlier attempt: read, not rerun
                finish(plan)
            queue.extend((plan, i) for i in plan.todo)

    with Heartbeats(study._storage) as beats, contextlib.ExitStack() as files:
        try:
            with contextlib.ExitStack() as held:
                Pack(slots, True, log, held, objective.stop).run(next_member)
        except BaseException as e:
            for plan, _ in list(plans.values()):
                requeue(study, plan.trial._trial_id, stopped_why(e))
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("stopped at once; the trials resume from their last checkpoints") from None
            raise
    return len(told)


class Heartbeats:
    """Optuna's heartbeat for every trial a packed worker has in flight (study.optimize keeps one
    for its one trial): a thread records each trial's every heartbeat_interval seconds, so that
    other workers never take a live trial for a dead worker's."""

    def __init__(self, storage):
        import threading

        get = getattr(storage, "get_heartbeat_interval", None)
        self.storage, self.interval = storage, get() if get else None  # s; None: a storage without heartbeats
        self.ids: set[int] = set()
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="fastres-heartbeats")

    def __enter__(self):
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)
        self._record(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def _beat(self):
        while not self.done.wait(self.interval):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                self._record(trial_id)

    def _record(self, trial_id: int) -> None:
        import sqlalchemy.exc

        if self.interval:
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # a storage hiccup: the next beat retries
                self.storage.record_heartbeat(trial_id)


def _sleep(seconds: float, stop: StopRequest) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.signum:
        time.sleep(0.25)
