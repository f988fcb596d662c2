"""A sweep's trial: one configuration of the sweep file's space, trained once per seed.

    objective = Objective(spec, study, out, stop)
    study.optimize(objective, n_trials=1)      # a one-trial worker (fastres/worker.py)
    plan = objective.plan(study.ask())         # a packed worker trains plan.cfgs as slots free,
    study.tell(plan.trial, objective.conclude(plan))   # then tells the study

Each run is DIR/trials/NNNN/seedS (a normal run folder); the trial's value is the mean final test
accuracy over its seeds, and the study keeps its parameters, MACs, std, best epoch, training
seconds and device as user attributes.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

from .config import ConfigError
from .design import check_budget
from .errors import Diverged, FastresError, Interrupted
from .progress import duration
from .signals import StopRequest
from .seeds import finished_record, holds_a_run, seed_summary
from .study import import_optuna
from .sweepfile import SweepSpec


class TrialError(FastresError):
    """A trial that cannot give a value (an invalid combination, a diverged run): it is recorded as
    failed, and the sweep goes on with the next."""


def host() -> str:
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


def frozen(study, number: int, state=None):
    """The study's FrozenTrial of trial `number` (what Optuna's public helpers take), looked for
    among the trials in `state` only (RUNNING, FAIL, ...): not the whole study per trial."""
    states = None if state is None else (state,)
    return next(t for t in study.get_trials(deepcopy=False, states=states) if t.number == number)


def folder_number(trial) -> int:
    """A retried trial works in its first attempt's folder, so it resumes that run's last.pt.
    trial: a FrozenTrial."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if first is None else first


TRIAL_ATTRS = ("acc_mean", "acc_std", "best_acc_mean", "train_s", "device")  # of the seeds' summary


def trial_summary(records: list[dict]) -> dict:
    """A trial's figures from its runs' records (one per seed): the seeds' summary, each seed's
    accuracy (as `accs`), and the first seed's best epoch, parameters and MACs."""
    s, first = seed_summary(records), records[0]
    return {**{k: s[k] for k in TRIAL_ATTRS}, "accs": s["final_test_acc"],
            "best_epoch": max(first["epochs"], key=lambda h: h["test_acc"])["epoch"],
            "parameters": first["parameters"], "macs": first["macs"], "epochs": first["config"]["epochs"]}


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
                        plan.records[i] = train(plan.cfgs[i], resume=True, log=to_file(f),
                                                on_epoch=self.on_epoch(plan, i))
                    except Diverged as e:
                        plan.records[i] = e
                if self.decided(plan):
                    break
            return self.conclude(plan)
        except (TrialError, import_optuna().TrialPruned):
            raise
        except BaseException as e:  # not the trial's fault (stopped, data, disk, a bug): the worker
            # stops and queues the trial again (work()); marked now, while it can still be changed
            trial.set_user_attr("status", "requeued")
            trial.set_user_attr("why", stopped_why(e))
            raise

    def plan(self, trial) -> Plan:
        """The trial's configuration per seed, its folder, and what its folder already holds;
        TrialError (invalid) or TrialPruned (over budget, or the grid done) if it is not trained."""
        optuna = import_optuna()
        attempt = frozen(self.study, trial.number, optuna.trial.TrialState.RUNNING)  # asked: running
        # enqueue_trial keeps a queued trial's choices in system_attrs["fixed_params"]; Optuna has
        # no other way to tell a queued trial (a grid's, a retry) from one the sampler just made
        queued = "fixed_params" in attempt.system_attrs or folder_number(attempt) != trial.number
        if self.spec.is_grid and not queued:
            # another worker took the last queued configuration between our look and our ask
            trial.set_user_attr("status", "grid_done")
            raise optuna.TrialPruned("the grid is done")
        params = self.spec.suggest(trial)
        number = folder_number(attempt)
        folder = self.out / "trials" / f"{number:04d}"
        for k, v in {"folder": str(folder.relative_to(self.out)), "host": host(), "pid": os.getpid(),
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
        return Plan(trial, number, what, cfgs, {i: finished_record(cfg) for i, cfg in enumerate(cfgs)})

    def starting(self, plan: Plan, i: int) -> None:
        cfg = plan.cfgs[i]
        self.log(f"trial {plan.number:04d} seed {cfg.seed} ({plan.what}): {'resuming' if holds_a_run(cfg) else 'training'} "
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
            raise import_optuna().TrialPruned(f"pruned after epoch {len(first['epochs'])}")
        s = trial_summary([plan.records[i] for i in range(len(plan.cfgs))])
        for k, v in {**s, "status": "complete"}.items():
            trial.set_user_attr(k, v)
        self.log(f"trial {number:04d} ({what}): {s['acc_mean']:.2%} ± {s['acc_std']:.2%} over seeds "
                 f"{list(self.spec.seeds)}, {s['parameters']:,} parameters, {duration(s['train_s'])} of training")
        return s["acc_mean"]


def to_file(f):
    """A log function writing to the open file f (a run's train.log in its folder)."""
    return lambda *a, **k: print(*a, **k, file=f, flush=True)


def stopped_why(e: BaseException) -> str:
    """Why a trial was queued again: its worker was stopped, or stopped by an error of its own."""
    return "its worker was stopped" if isinstance(e, (Interrupted, KeyboardInterrupt)) else f"its worker stopped: {e}"


