"""A sweep file: the study a user wants, in TOML, read and checked before anything runs.

    spec = load_sweep("study.toml")     # SweepError (exit 2) with one line for anything wrong
    spec.is_grid, spec.grid()           # every configuration, when every entry is a list
    params = spec.suggest(trial)        # an Optuna trial's choices (names as in the file)
    cfg = spec.config(params, seed, out)  # the fastres Config of one run of it

The file (every key but [space] optional):

    name = "depth-vs-width"      # the study's name in its storage (default: the file's name)
    preset = "paper"             # the base recipe every trial starts from
    seeds = [0, 1, 2]            # each configuration runs once per seed; its value is the mean
                                 # final test accuracy over them (the std is kept beside it)
    max_params = "1.1M"          # parameter budget: a configuration over it is recorded as
                                 # over budget and never trained
    trials = 40                  # configurations to try (default: the whole grid; sampled: 20)
    time_limit = "3h"            # no trial starts after this long (s, min, h); a running one ends
    sampler = "tpe"              # grid | random | tpe (default: grid if every entry is a list)
    sampler_seed = 0
    pruner = "median"            # none | median | halving, on each epoch's test accuracy
    heartbeat_s = 60             # a worker's trial is taken up again by another worker once it
                                 # has not been heard of for twice this (database storages)
    storage_timeout_s = 60       # how long a worker waits for a locked SQLite file or to connect
                                 # to a database server before it stops with one line

    [fixed]                      # settings every trial shares (any `fastres train --KEY`)
    epochs = 30

    [space]                      # what varies: any setting as a list of choices, or a range
    optimizer = ["sgd", "adam"]
    lr = { low = 0.001, high = 0.1, log = true }
    epochs = { low = 10, high = 50, step = 10 }
    model = [                    # settings that only make sense together: a list of tables
      { blocks = [11, 11, 11], widths = [16, 32, 64] },
      { blocks = [4, 4, 4, 4], widths = [16, 32, 64, 128] },
    ]
"""
from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .config import _TYPES, Config, ConfigError, make_config, parse_count, parse_value, unknown_setting
from .errors import BadInput

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")
TOP_KEYS = {"name", "preset", "seeds", "max_params", "trials", "time_limit", "sampler", "sampler_seed", "pruner",
            "heartbeat_s", "storage_timeout_s", "fixed", "space"}
# Settings a sweep sets itself, or that cannot differ between the runs of one study.
NOT_SWEPT = {"out": "each run's folder is DIR/trials/NNNN/seedS",
             "seed": "list the seeds with seeds = [...]",
             "preset": "set the base recipe with preset = \"...\"",
             "max_params": "set the budget with max_params = ... at the top"}
DEFAULT_SAMPLED_TRIALS = 20


class SweepError(BadInput):
    """A sweep file that cannot be run as written (exit status 2)."""


def parse_duration(raw) -> float:
    """Seconds from 5400, "90min", "1.5h", "45 s"."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|sec|min|m|h)?\s*", str(raw))
    if not m:
        raise ValueError(raw)
    return float(m.group(1)) * {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, None: 1}[m.group(2)]


def _label(value) -> str | int | float | bool:
    """A choice as Optuna stores it: scalars as they are, lists as '16,32,64', tables as
    'blocks=4,4,4,4 widths=16,32,64,128' (readable in the dashboard and the leaderboard)."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_label(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


@dataclass(frozen=True)
class Entry:
    """One name in [space]: a list of choices (each a value, or a table of settings), or a range."""
    name: str
    choices: tuple = ()          # values, or dicts of settings (a joint choice)
    low: float | None = None     # a range: low..high, log scale or steps of `step`
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def labels(self) -> list:
        return [_label(c) for c in self.choices]

    def settings(self, picked) -> dict:
        """The config overrides that choosing `picked` (a label or a number) means."""
        if self.is_range:
            return {self.name: int(round(picked)) if self.integer else float(picked)}
        choice = self.choices[self.labels().index(picked)]
        return dict(choice) if isinstance(choice, dict) else {self.name: choice}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: str
    preset: str = "paper"
    seeds: tuple[int, ...] = (0,)
    max_params: int = 0
    trials: int = 0              # 0: the whole grid (grid), DEFAULT_SAMPLED_TRIALS (others)
    time_limit_s: float = 0.0    # 0: no limit
    sampler: str = "tpe"
    sampler_seed: int = 0
    pruner: str = "none"
    heartbeat_s: int = 60
    storage_timeout_s: float = 60.0
    fixed: dict = field(default_factory=dict)
    space: tuple[Entry, ...] = ()

    @property
    def is_grid(self) -> bool:
        return self.sampler == "grid"

    def grid(self) -> list[dict]:
        """Every configuration of a grid, as {name: label}, in the file's order (last entry fastest)."""
        names = [e.name for e in self.space]
        return [dict(zip(names, combo)) for combo in itertools.product(*(e.labels() for e in self.space))]

    def n_trials(self) -> int:
        if self.is_grid:
            return min(self.trials or math.inf, len(self.grid()))
        return self.trials or DEFAULT_SAMPLED_TRIALS

    def suggest(self, trial) -> dict:
        """The trial's choices, asked of Optuna (a queued or retried trial gets its own back)."""
        out = {}
        for e in self.space:
            if not e.is_range:
                out[e.name] = trial.suggest_categorical(e.name, e.labels())
            elif e.integer:
                out[e.name] = trial.suggest_int(e.name, int(e.low), int(e.high), step=int(e.step or 1), log=e.log)
            else:
                out[e.name] = trial.suggest_float(e.name, e.low, e.high, step=e.step, log=e.log)
        return out

    def overrides(self, params: dict) -> dict:
        """fixed settings, then the choices' settings (a choice wins over [fixed])."""
        o = dict(self.fixed)
        for e in self.space:
            o.update(e.settings(params[e.name]))
        return o

    def config(self, params: dict, seed: int, out: str = "") -> Config:
        o = {**self.overrides(params), "seed": seed, "out": out}
        if self.max_params:
            o["max_params"] = self.max_params
        return make_config(self.preset, o)

    def definition(self) -> dict:
        """What makes two sweep files the same study: the base, the fixed settings, the space, the
        seeds and the budget (trials, time limit, sampler and pruner may change between runs)."""
        return json.loads(json.dumps({
            "preset": self.preset, "seeds": list(self.seeds), "max_params": self.max_params, "fixed": self.fixed,
            "space": {e.name: ({"choices": list(e.choices)} if not e.is_range else
                               {"low": e.low, "high": e.high, "log": e.log, "step": e.step, "int": e.integer})
                      for e in self.space}}, default=list))


def load_sweep(path) -> SweepSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: sweep file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML ({e})") from None
    try:
        return _parse(raw, path)
    except ConfigError as e:
        raise SweepError(f"{path}: {e}") from None


def _parse(raw: dict, path: Path) -> SweepSpec:
    def bad(msg):
        raise SweepError(f"{path}: {msg}")

    extra = sorted(set(raw) - TOP_KEYS)
    if extra:
        bad(f"unknown key {extra[0]!r} (a sweep file has {', '.join(sorted(TOP_KEYS))}; settings go under "
            "[fixed] or [space])")
    preset = raw.get("preset", "paper")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        bad(f"seeds: a list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        bad(f"seeds: each seed once; got {seeds}")
    try:
        max_params = parse_count(raw.get("max_params", 0))
        time_limit = parse_duration(raw.get("time_limit", 0))
    except ValueError:
        bad(f"max_params is a parameter count (1050202, 1.05e6, \"5M\") and time_limit a duration (5400, "
            f"\"90min\", \"1.5h\"); got {raw.get('max_params')!r}, {raw.get('time_limit')!r}")
    trials = raw.get("trials", 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 0:
        bad(f"trials: a whole number of configurations; got {trials!r}")
    heartbeat = raw.get("heartbeat_s", 60)
    if not isinstance(heartbeat, int) or isinstance(heartbeat, bool) or heartbeat < 1:
        bad(f"heartbeat_s: whole seconds >= 1; got {heartbeat!r}")
    storage_timeout = raw.get("storage_timeout_s", 60)
    if not isinstance(storage_timeout, (int, float)) or isinstance(storage_timeout, bool) or storage_timeout <= 0:
        bad(f"storage_timeout_s: seconds > 0; got {storage_timeout!r}")
    pruner = raw.get("pruner", "none")
    if pruner not in PRUNERS:
        bad(f"pruner: one of {', '.join(PRUNERS)}; got {pruner!r}")

    fixed = raw.get("fixed", {})
    if not isinstance(fixed, dict):
        bad("[fixed] is a table of settings")
    for key in fixed:
        _check_key(key, path)
    fixed = {k.replace("-", "_"): v for k, v in fixed.items()}
    make_config(preset, fixed)  # a bad preset or fixed value: one line, naming the setting

    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        bad("[space] is missing or empty: name at least one setting to vary, e.g. lr = [0.01, 0.05]")
    entries = tuple(_entry(name, value, path) for name, value in space_raw.items())
    all_lists = all(not e.is_range for e in entries)
    sampler = raw.get("sampler", "grid" if all_lists else "tpe")
    if sampler not in SAMPLERS:
        bad(f"sampler: one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if sampler == "grid" and not all_lists:
        rng = next(e.name for e in entries if e.is_range)
        bad(f"sampler = \"grid\" needs every [space] entry as a list of choices; {rng} is a range")
    sampler_seed = raw.get("sampler_seed", 0)
    if not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool):
        bad(f"sampler_seed: an integer; got {sampler_seed!r}")
    spec = SweepSpec(name=str(raw.get("name", path.stem)), path=str(path), preset=preset, seeds=tuple(seeds),
                     max_params=max_params, trials=trials, time_limit_s=time_limit, sampler=sampler,
                     sampler_seed=sampler_seed, pruner=pruner, heartbeat_s=heartbeat,
                     storage_timeout_s=float(storage_timeout), fixed=fixed, space=entries)
    # Each choice (and each end of a range) is checked with the fixed settings now, so that a typo
    # stops the sweep before its first trial rather than failing one trial in the middle of it.
    for e in entries:
        for picked in ((e.low, e.high) if e.is_range else e.labels()):
            try:
                make_config(preset, {**fixed, **e.settings(picked)})
            except ConfigError as err:
                bad(f"[space] {e.name} = {picked!r}: {err}")
    if spec.is_grid:  # a grid is small enough to check whole: settings that clash only together
        for params in spec.grid():
            try:
                spec.config(params, seeds[0])
            except ConfigError as err:
                if "max-params" not in str(err):
                    bad(f"the grid point {params} is not a valid configuration: {err}")
    return spec


def _check_key(key: str, path: Path) -> None:
    k = key.replace("-", "_")
    if k in NOT_SWEPT:
        raise SweepError(f"{path}: {key} cannot be set per trial: {NOT_SWEPT[k]}")
    if k not in _TYPES:
        raise SweepError(f"{path}: {unknown_setting(k)}")


def _entry(name: str, value, path: Path) -> Entry:
    def bad(msg):
        raise SweepError(f"{path}: [space] {name}: {msg}")

    if isinstance(value, dict):  # a range
        _check_key(name, path)
        key = name.replace("-", "_")
        typ = _TYPES[key]
        if typ not in (int, float):
            bad(f"a range needs a numeric setting; {name} is {getattr(typ, '__name__', typ)}: give a list of choices")
        extra = sorted(set(value) - {"low", "high", "log", "step"})
        if extra or "low" not in value or "high" not in value:
            bad("a range is { low = ..., high = ... } with optional log = true or step = ...")
        low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            bad(f"low < high, both numbers; got low = {low!r}, high = {high!r}")
        if log and (low <= 0 or step is not None):
            bad("log = true needs low > 0 and no step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            bad(f"step must be a positive number; got {step!r}")
        if typ is int and not all(float(v).is_integer() for v in (low, high, step or 1)):
            bad(f"{name} is a whole number: low, high and step must be too")
        return Entry(name=key, low=float(low), high=float(high), log=bool(log),
                     step=None if step is None else float(step), integer=typ is int)
    if not isinstance(value, list) or not value:
        bad("a list of choices ([a, b, ...]) or a range ({ low = ..., high = ... })")
    tables = [isinstance(c, dict) for c in value]
    if any(tables) and not all(tables):
        bad("choices are either all values or all tables of settings")
    if all(tables):  # a joint choice: any name, settings inside
        for c in value:
            if not c:
                bad("an empty table chooses nothing")
            for k in c:
                _check_key(k, path)
        choices = tuple({k.replace("-", "_"): v for k, v in c.items()} for c in value)
    else:
        _check_key(name, path)
        key = name.replace("-", "_")
        for c in value:
            parse_value(key, c)  # one line naming the setting and the bad value
        choices = tuple(value)
        name = key
    labels = [_label(c) for c in choices]
    if len(set(map(str, labels))) != len(labels):
        bad(f"each choice once; got {labels}")
    return Entry(name=name, choices=choices)
