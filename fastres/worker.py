"""A sweep's worker: trials until the sweep has what it asked for, one at a time through
study.optimize, or several runs at once (pack > 1) through study.ask / study.tell.

    work(spec, study, out)            # one worker; any number share the study

A worker that dies (SIGKILL, a preempted job) stops its heartbeat: its trial is failed and queued
again by the next worker that looks (at once on the same machine, where the dead process id
tells; after 2 x heartbeat_s elsewhere), and the new attempt resumes the same folders' last.pt.
Ctrl-C or SIGTERM stops a worker at the next safe point and queues its trial again likewise.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from .errors import Diverged, FastresError, Interrupted
from .objective import Objective, Plan, TrialError, folder_number, frozen, host, stopped_why, to_file
from .progress import duration
from .signals import StopRequest
from .study import import_optuna, retry_callback
from .sweepfile import SweepSpec


def requeue(study, number: int, why: str, failed: bool = False) -> bool:
    """Fail running trial `number`, which will not finish where it runs, and queue it again with the
    same choices and folder. Of several processes that try at once, one succeeds (the storage
    changes a trial's state from running once); `failed`: Optuna has already marked it failed (the
    trial of a worker that was stopped)."""
    optuna = import_optuna()
    if not failed:
        # Optuna sets user attributes only through the Trial object its worker holds, and this
        # trial's worker is gone or stopping: no public way but the storage
        storage = study._storage
        try:
            trial_id = frozen(study, number, optuna.trial.TrialState.RUNNING)._trial_id
            storage.set_trial_user_attr(trial_id, "status", "requeued")
            storage.set_trial_user_attr(trial_id, "why", why)
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        except (StopIteration, optuna.exceptions.UpdateFinishedTrialError, ValueError):  # another process was first
            return False
    retry_callback()(study, frozen(study, number, optuna.trial.TrialState.FAIL))  # failed just now
    return True


def reclaim_local(study, log=print) -> int:
    """Trials left running by a worker process of this machine that no longer exists (killed):
    failed and queued again now, rather than after the heartbeat's grace period."""
    optuna = import_optuna()
    here, n = host(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == here and pid and pid != os.getpid() and not _alive(pid):
            if requeue(study, t.number, f"its worker (pid {pid}) is gone"):
                log(f"trial {folder_number(t):04d}: its worker (pid {pid}) is gone; queued again, to resume "
                    f"from {t.user_attrs.get('folder')}")
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
    optuna = import_optuna()
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
    optuna = import_optuna()
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
                    requeue(study, objective.current.number, "", failed=True)
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
    from .packed import Pack

    with Heartbeats(objective.study) as beats, contextlib.ExitStack() as files:
        flight = InFlight(objective, may_start, beats, files)
        try:
            with contextlib.ExitStack() as held:
                Pack(slots, True, log, held, objective.stop).train(flight.next_member)
        except BaseException as e:
            for plan, _ in list(flight.plans.values()):
                requeue(objective.study, plan.trial.number, stopped_why(e))
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("stopped at once; the trials resume from their last checkpoints") from None
            raise
    return len(flight.told)


class InFlight:
    """A packed worker's trials in flight: their plans and the seeds not yet ended, the seeds
    waiting for a slot, and what was told to the study."""

    def __init__(self, objective: Objective, may_start, beats: "Heartbeats", files: contextlib.ExitStack):
        from collections import deque

        self.objective, self.study, self.may_start, self.beats, self.files = \
            objective, objective.study, may_start, beats, files
        self.plans: dict[int, tuple[Plan, set]] = {}  # trial number -> (its plan, its seeds not yet ended)
        self.queue: deque = deque()                   # (plan, seed index) not yet given a slot
        self.told: list[int] = []

    def tell(self, trial, **kw) -> None:
        self.study.tell(trial, skip_if_finished=True, **kw)  # skipped if another worker failed it meanwhile
        self.beats.discard(trial)
        self.plans.pop(trial.number, None)
        if trial.user_attrs.get("status") != "grid_done":
            self.told.append(trial.number)

    def finish(self, plan: Plan) -> None:
        state = import_optuna().trial.TrialState
        try:
            self.tell(plan.trial, values=self.objective.conclude(plan))
        except TrialError:
            self.tell(plan.trial, state=state.FAIL)
        except import_optuna().TrialPruned:
            self.tell(plan.trial, state=state.PRUNED)

    def ended(self, plan: Plan, i: int) -> None:
        left = self.plans[plan.trial.number][1]
        left.discard(i)
        if not left:
            self.finish(plan)

    def member(self, plan: Plan, i: int):
        from .packed import Member

        self.objective.starting(plan, i)
        f = self.files.enter_context(open(Path(plan.cfgs[i].out) / "train.log", "a"))

        def on_end(result):
            f.close()
            if isinstance(result, Interrupted):  # stays in flight: queued again by _work_packed
                return
            if isinstance(result, FastresError) and not isinstance(result, Diverged):
                raise result  # not the trial's fault (disk, data): the worker stops, trials queued again
            plan.records[i] = result
            self.ended(plan, i)
        return Member(plan.cfgs[i], f"{plan.number:04d}/seed{plan.cfgs[i].seed}", to_file(f),
                      self.objective.on_epoch(plan, i), on_end)

    def next_member(self):
        """The next run for a freed slot: a waiting seed, else the first seed of a new trial."""
        optuna = import_optuna()
        while True:
            while self.queue:
                plan, i = self.queue.popleft()
                if self.objective.decided(plan):  # pruned or failed while this seed waited: never started
                    self.ended(plan, i)
                    continue
                return self.member(plan, i)
            if not self.may_start():
                return None
            trial = self.study.ask()
            self.beats.add(trial)
            try:
                plan = self.objective.plan(trial)
            except TrialError:  # not a valid configuration
                self.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            except optuna.TrialPruned:  # over the budget, or the grid is done
                self.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            except BaseException as e:  # not the trial's fault: queued again, the worker stops
                requeue(self.study, trial.number, stopped_why(e))
                raise
            self.plans[trial.number] = (plan, set(plan.todo))
            if not plan.todo:  # every seed finished in an earlier attempt: read, not rerun
                self.finish(plan)
            self.queue.extend((plan, i) for i in plan.todo)


class Heartbeats:
    """Optuna's heartbeat for every trial a packed worker has in flight (study.optimize keeps one
    for its one trial): a thread records each trial's every heartbeat_interval seconds, so that
    other workers never take a live trial for a dead worker's."""

    def __init__(self, study):
        import threading

        # Optuna beats only for the one trial study.optimize runs; recording beats for several
        # trials has no public call, so the storage and each trial's id are used directly
        self.storage = study._storage
        get = getattr(self.storage, "get_heartbeat_interval", None)
        self.interval = get() if get else None  # s; None: a storage without heartbeats
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

    def add(self, trial) -> None:
        with self.lock:
            self.ids.add(trial._trial_id)  # see __init__
        self._record(trial._trial_id)

    def discard(self, trial) -> None:
        with self.lock:
            self.ids.discard(trial._trial_id)

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
