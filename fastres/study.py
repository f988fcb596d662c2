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


class Objective:
    """The study's objective: one configuration, trained once per seed. Small on purpose: the
    study, its storage and the retry callback carry the bookkeeping."""

    def __init__(self, spec: SweepSpec, study, out: Path, stop: StopRequest, log=print, pack: int = 1):
        self.spec, self.study, self.out, self.stop, self.log, self.pack = spec, study, out, stop, log, max(1, pack)
        self.current = None  # the trial being run, for queuing it again if the worker is stopped

    def __call__(self, trial) -> float:
        self.current = trial
        try:
            return self._run(trial)
        except (TrialError, _optuna().TrialPruned):
            raise
        except BaseException as e:  # not the trial's fault (stopped, data, disk, a bug): the worker
            # stops and queues the trial again (work()); marked now, while it can still be changed
            trial.set_user_attr("status", "requeued")
            trial.set_user_attr("why", "its worker was stopped" if isinstance(e, (Interrupted, KeyboardInterrupt))
                                else f"its worker stopped: {e}")
            raise

    def _run(self, trial) -> float:
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
        records = {i: _finished(cfg) for i, cfg in enumerate(cfgs)}  # finished runs are read, not rerun
        todo = [i for i, rec in records.items() if rec is None]
        if todo:  # the trial's unfinished seeds: one after another, or `pack` at a time
            if self.stop.signum:
                raise Interrupted("stopped before the next run", self.stop.signum)
            group = todo
            # the first seed's epochs are reported to the pruner
            records.update(self._train([cfgs[i] for i in group], [trial if i == 0 else None for i in group], number,
                                       what))
            for i in group:
                rec = records[i]
                if rec is not None and rec["status"] == "pruned":
                    trial.set_user_attr("status", "pruned")
                    trial.set_user_attr("pruned_at_epoch", len(rec["epochs"]))
                    self.log(f"trial {number:04d} ({what}): pruned after epoch {len(rec['epochs'])} "
                             f"(test accuracy {rec['epochs'][-1]['test_acc']:.2%})")
                    raise optuna.TrialPruned(f"pruned after epoch {len(rec['epochs'])}")
        records = [records[i] for i in range(len(cfgs))]
        s = trial_summary(records)
        for k, v in {**s, "status": "complete"}.items():
            trial.set_user_attr(k, v)
        self.log(f"trial {number:04d} ({what}): {s['acc_mean']:.2%} ± {s['acc_std']:.2%} over seeds "
                 f"{list(self.spec.seeds)}, {s['parameters']:,} parameters, {duration(s['train_s'])} of training")
        return s["acc_mean"]

    def _train(self, cfgs: list, trials: list, number: int, what: str) -> dict:
        """Train these runs of the trial (alone, or packed when several): {seed index: record}.
        Each run's own output goes to its folder's train.log; trials[k] (or None) gets run k's
        epochs for the pruner. Every run resumes what its folder holds."""
        from .packed import train_packed
        from .train import train

        with contextlib.ExitStack() as files:
            logs = []
            for cfg in cfgs:
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
                f = files.enter_context(open(Path(cfg.out) / "train.log", "a"))
                logs.append(lambda *a, f=f, **k: print(*a, **k, file=f, flush=True))

            def on_epoch(cfg, trial):
                def report(h):
                    self.log(f"trial {number:04d} seed {cfg.seed}: epoch {h['epoch']}/{cfg.epochs} test "
                             f"{h['test_acc']:.2%} ({h['train_s']:.1f} s)")
                    if trial is None:
                        return None
                    trial.report(h["test_acc"], h["epoch"])
                    return "pruned" if trial.should_prune() else None
                return report

            def starting(cfg):
                resume = any((Path(cfg.out) / f).exists() for f in RUN_FILES)
                self.log(f"trial {number:04d} seed {cfg.seed} ({what}): {'resuming' if resume else 'training'} "
                         f"in {cfg.out}")

            hooks = [on_epoch(c, t) for c, t in zip(cfgs, trials)]
            if len(cfgs) == 1 or self.pack == 1:  # one after another
                got = []
                for cfg, log, hook in zip(cfgs, logs, hooks):
                    starting(cfg)
                    try:
                        got.append(train(cfg, resume=True, log=log, on_epoch=hook))
                    except Diverged as e:
                        got.append(e)
                        break
                    if self.stop.signum:
                        raise Interrupted("stopped before the next run", self.stop.signum)
                    if got[-1]["status"] == "pruned":
                        break
            else:
                for cfg in cfgs:
                    starting(cfg)
                got = train_packed(cfgs, True, self.log, names=[f"seed{c.seed}" for c in cfgs], logs=logs,
                                   on_epochs=hooks, slots=self.pack)
        index = {c.seed: self.spec.seeds.index(c.seed) for c in cfgs}
        for cfg, r in zip(cfgs, got):
            if isinstance(r, Diverged):  # this configuration fails; the sweep goes on
                self.current.set_user_attr("status", "diverged")
                self.current.set_user_attr("error", str(r))
                self.log(f"trial {number:04d} seed {cfg.seed}: diverged: {r}")
                raise TrialError(str(r))
            if not isinstance(r, dict):
                raise r
        return {index[c.seed]: r for c, r in zip(cfgs, got)}


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
    number of trials this worker ran."""
    optuna = _optuna()
    t0, ran, said = time.monotonic(), 0, False
    with StopRequest(log) as stop:
        objective = Objective(spec, study, out, stop, log, pack)
        while True:
            optuna.storages.fail_stale_trials(study)  # other machines' dead workers (heartbeat)
            reclaim_local(study, log)                  # this machine's (their pid is gone)
            if stop.signum:
                raise Interrupted("stopped between trials; every trial resumes", stop.signum)
            if spec.time_limit_s and time.monotonic() - t0 > spec.time_limit_s:
                log(f"time limit ({duration(spec.time_limit_s)}) reached: no new trial starts here")
                break
            c = counts(study)
            started = c["complete"] + c["pruned"] + c["running"]
            # a grid runs what is queued (retries included); a sampled sweep asks for new
            # configurations until `trials` have started, then runs what is still queued
            nothing = (c["waiting"] == 0 and (spec.is_grid or started >= spec.n_trials())) or \
                (spec.is_grid and started >= spec.n_trials())
            if nothing:
                if c["running"] == 0:
                    break
                if not said:
                    log(f"waiting for {c['running']} trial(s) running in other workers (taken up here if "
                        "their worker dies)")
                    said = True
                _sleep(min(spec.heartbeat_s, 5), stop)
                continue
            said = False
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


def _sleep(seconds: float, stop: StopRequest) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.signum:
        time.sleep(0.25)
