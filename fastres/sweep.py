"""`fastres sweep`: a sweep file's study on Optuna (fastres/study.py), or one preset's seeds.

    run_sweep_file("study.toml", out, storage, workers)   # plan, estimate, workers, leaderboard
    sweep("paper", [0, 1, 2], {})                         # the seed-only form: OUT/seed<N>

Seed-only: `fastres train --seeds` (fastres/seeds.py) in OUT/seed<N>, where a seed whose
record.json says 'finished' is read, not rerun, and an unfinished one resumes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import make_config
from .errors import BadInput, Interrupted
from .progress import duration
from .rundir import CHECKPOINT


def sweep(preset: str, seeds: list[int], overrides: dict, out: str | None = None, log=print, pack: int = 1) -> dict:
    """The seed-only form: `fastres train --seeds` into OUT (default runs/sweep-PRESET) that reads
    the seeds that finished before and resumes the others; their summary (OUT/summary.json)."""
    from .seeds import finished_record, holds_a_run, report, seed_configs, train_each

    out = Path(out or f"runs/sweep-{preset}")
    cfgs = seed_configs(make_config(preset, {**overrides, "out": str(out)}), seeds, out)
    records = {c.seed: finished_record(c) for c in cfgs}
    todo = [c for c in cfgs if records[c.seed] is None]
    for cfg in cfgs:
        doing = "finished run found in {}, reading it" if records[cfg.seed] else \
            "resuming in {}" if (Path(cfg.out) / CHECKPOINT).is_file() else "training in {}"
        log(f"seed {cfg.seed}: " + doing.format(cfg.out))
    # an unfinished run of this sweep continues (from scratch if it wrote no checkpoint yet)
    for c, r in zip(todo, train_each(todo, pack, [holds_a_run(c) for c in todo], log)):
        if not isinstance(r, dict):
            raise r
        records[c.seed] = r
    return report(cfgs, [records[s] for s in seeds], out, log, preset=preset, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Sweep files
# ---------------------------------------------------------------------------------------------
def run_sweep_file(path: str, out: str | None = None, storage: str | None = None, workers: int = 1,
                   report_only: bool = False, worker: int | None = None, log=print, pack: int = 1) -> int:
    """`fastres sweep FILE`: open (or join) the study, say what will run and for about how long,
    run the trials in `workers` processes (this one when 1), then print and save the leaderboard."""
    from .study import check_folder, claim_folder, default_url, open_storage, open_study, storage_errors
    from .worker import work
    from .sweepfile import load_sweep

    spec = load_sweep(path)
    out = Path(out or f"runs/sweep-{Path(path).stem}")
    url = storage or default_url(out)
    if report_only:
        with storage_errors(url):
            return report(spec.name, url, out, log)
    if workers < 1:
        raise BadInput(f"--workers: at least 1; got {workers}")
    created = check_folder(out, spec)  # first: the default SQLite file lives in this folder
    with storage_errors(url):
        try:
            study = open_study(spec, open_storage(url, spec.heartbeat_s, spec.storage_timeout_s), url, log)
        except BaseException:
            if created:  # a start that failed leaves no folder behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        claim_folder(out, spec, url)
        if worker is not None:  # one of --workers N's processes: trials only, the parent reports
            work(spec, study, out, log, pack)
            return 0
        log(plan_text(spec, out, url, workers))
        log(estimate_text(spec, workers, pack))
        if workers == 1:
            work(spec, study, out, log, pack)
        else:
            status = spawn_workers(path, out, url, workers, spec, log, pack)
            if status:
                return status
        return report(spec.name, url, out, log, study)


def report(name: str, url: str, out: Path, log=print, study=None) -> int:
    from .leaderboard import board_text, leaderboard, write_board
    from .study import open_storage, shown_url

    if study is None:
        import optuna

        db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
        if db and not Path(db).is_file():  # opening it would make an empty database
            raise BadInput(f"no study at {shown_url(url)} (run the sweep first, or name its --storage)")
        storage = open_storage(url)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise BadInput(f"--storage {shown_url(url)}: no study {name!r} there yet (run the sweep first)") from None
    board = leaderboard(study)
    log(board_text(board))
    files = write_board(board, out)
    log("wrote " + ", ".join(map(str, files)))
    return 0


def leaderboard_of(folder: str, storage: str | None = None, log=print) -> int:
    """`fastres leaderboard DIR`: the study that DIR/sweep.json names, from its storage."""
    from .study import SWEEP_JSON

    path = Path(folder) / SWEEP_JSON
    try:
        info = json.loads(path.read_text())
        name, url = info["name"], storage or info["storage"]
    except FileNotFoundError:
        raise BadInput(f"{folder}: not a sweep folder (no {SWEEP_JSON}; 'fastres sweep FILE --out DIR' makes one)") from None
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{path}: not readable as a sweep's record ({e})") from None
    return report(name, url, Path(folder), log)


def plan_text(spec, out: Path, url: str, workers: int) -> str:
    from .study import shown_url

    kind = (f"a grid of {len(spec.grid())} configurations" + (f" (the first {spec.n_trials()})"
            if spec.n_trials() < len(spec.grid()) else "") if spec.is_grid else
            f"{spec.n_trials()} configurations chosen by the {spec.sampler} sampler (seed {spec.sampler_seed})")
    lines = [f"sweep {spec.name!r} ({spec.path}): {kind}, each trained with seeds {list(spec.seeds)} from the "
             f"{spec.preset!r} preset"]
    if spec.fixed:
        lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in spec.fixed.items()))
    for e in spec.space:
        lines.append(f"  {e.name}: " + (f"{'log-' if e.log else ''}range {e.low:g} to {e.high:g}" +
                                        (f" step {e.step:g}" if e.step else "") if e.is_range else
                                        " | ".join(map(str, e.labels()))))
    extra = [f"pruner {spec.pruner}"] if spec.pruner != "none" else []
    if spec.max_params:
        extra.append(f"budget {spec.max_params:,} parameters (larger models are recorded, not trained)")
    if spec.time_limit_s:
        extra.append(f"no trial starts after {duration(spec.time_limit_s)}")
    if extra:
        lines.append("  " + "; ".join(extra))
    lines.append(f"  study in {shown_url(url)}; runs in {out / 'trials'}/NNNN/seedS; {workers} worker(s) here")
    return "\n".join(lines)


def _sample_configs(spec, k: int = 16) -> list[dict]:
    """The grid, or k configurations drawn at random from the space (for an estimate)."""
    import math
    import random

    if spec.is_grid:
        return spec.grid()[:spec.n_trials()]
    rng = random.Random(spec.sampler_seed)
    out = []
    for _ in range(k):
        p = {}
        for e in spec.space:
            if not e.is_range:
                p[e.name] = rng.choice(e.labels())
            elif e.log:
                p[e.name] = math.exp(rng.uniform(math.log(e.low), math.log(e.high)))
            elif e.step:
                p[e.name] = e.low + e.step * rng.randrange(int((e.high - e.low) // e.step) + 1)
            else:
                p[e.name] = rng.uniform(e.low, e.high)
        out.append(p)
    return out


def measure_step_s(cfg) -> tuple[float, str]:
    """Seconds per training step of cfg's model at its batch size on the device a run would use:
    the run's own usual step (TrainStep: its optimizer, schedule, EMA and loss scaling), eager (no
    compilation), the median of 3 after three warm-up steps (the first steps on a CPU also build
    oneDNN's kernels: several times slower); and the device's name."""
    import statistics as st
    import time

    import torch

    from . import runtime
    from .design import build_model
    from .optim import EMA, lr_factor, make_criterion, make_optimizer
    from .step import TrainStep

    rt = runtime.resolve(cfg)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, rt).train()
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, 1000))
        step = TrainStep(model, opt, sched, EMA(model, cfg.ema), make_criterion(cfg), rt)
        x = torch.randn(cfg.batch_size, 3, 32, 32, device=rt.device).to(memory_format=rt.memory_format)
        y = torch.randint(0, 10, (cfg.batch_size,), device=rt.device)
        sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            step(x, y)
            sync()
            times.append(time.perf_counter() - t0)
    return st.median(times[3:]), rt.summary.get("device_name", str(rt.device))


def _model(c) -> tuple:
    """The settings that make a model (configurations sharing them share its multiply-adds)."""
    return (c.blocks, c.widths, c.kernel, c.stem_kernel, c.shortcut_kernel, c.pool)


def estimate_s(spec) -> dict:
    """An estimate of the sweep's training time on one worker: one step of the first configuration
    measured now, scaled to every configuration by its multiply-adds, batch size, steps and epochs
    (evaluation counted as a third of a training step per image). Pruning can only shorten it."""
    from .design import summarize

    configs = _sample_configs(spec)
    cfgs = [spec.config(p, spec.seeds[0]) for p in configs]
    macs = {}
    for c in cfgs:
        if _model(c) not in macs:
            macs[_model(c)] = summarize(c)["macs"]
    base = cfgs[0]
    step_s, device = measure_step_s(base)
    s_per_image_mac = step_s / (base.batch_size * macs[_model(base)])
    total = 0.0
    for c in cfgs:
        m = macs[_model(c)]
        n_train, n_test = _counts(c)
        train = (n_train // c.batch_size) * c.batch_size * m * s_per_image_mac
        evaluate = n_test * m * s_per_image_mac / 3 * (2 if c.tta else 1)
        total += c.epochs * (train + evaluate) * len(spec.seeds)
    total *= spec.n_trials() / len(cfgs)
    return {"total_s": total, "step_s": step_s, "device": device, "batch": base.batch_size, "trials": spec.n_trials()}


def _counts(cfg) -> tuple[int, int]:
    """Training and test images a run of cfg will see: its limits, else the converted data's
    counts (CIFAR-10's 50,000 / 10,000 before conversion)."""
    try:
        counts = json.loads((Path(cfg.data) / "cifar10_manifest.json").read_text())["counts"]
    except (OSError, ValueError, KeyError):
        counts = {"train": 50_000, "test": 10_000}
    return (min(cfg.train_limit or counts["train"], counts["train"]),
            min(cfg.test_limit or counts["test"], counts["test"]))


def estimate_text(spec, workers: int, pack: int = 1) -> str:
    import torch

    e = estimate_s(spec)
    par = ""
    if workers > 1 and torch.cuda.device_count() >= workers:
        par = f"; {workers} workers on {workers} GPUs: about {duration(e['total_s'] / workers)}"
    if pack > 1:  # what overlapping buys depends on the GPU and the model: not guessed here
        par += f"; runs one after another (--pack {pack} overlaps them on a GPU, by an amount not estimated)"
    return (f"estimate: about {duration(e['total_s'])} of training and evaluation for {e['trials']} trials x "
            f"{len(spec.seeds)} seed(s) on one worker ({e['device']}){par}; from {e['step_s'] * 1000:.0f} ms per "
            f"step measured now for the first configuration at batch {e['batch']} (eager), scaled by each "
            f"configuration's multiply-adds, batch and epochs (compiled runs go faster, pruned ones end early)")


def spawn_workers(path: str, out: Path, url: str, n: int, spec, log=print, pack: int = 1) -> int:
    """`--workers N`: N processes of `fastres sweep FILE --worker K`, each with its own GPU where
    there are several, else sharing the CPU's cores (OMP_NUM_THREADS = cores / N); their output
    goes to DIR/logs/worker-K.log and is echoed here line by line, prefixed with the worker. Ctrl-C
    (or SIGTERM) is passed on once: every worker stops at a safe point."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from .data import ensure_data
    from .distributed import Dist
    from .signals import StopRequest

    ensure_data(spec.config(_sample_configs(spec, 1)[0], spec.seeds[0]), Dist(), log)  # converted once, not by N
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())])
    procs, files, offsets = [], [], []
    for k in range(n):
        env = dict(os.environ)
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        elif not gpus:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        f = open(logs / f"worker-{k}.log", "ab")
        files.append(f)
        offsets.append(f.tell())
        cmd = [sys.executable, "-m", "fastres", "sweep", str(path), "--out", str(out), "--storage", url,
               "--worker", str(k), "--pack", str(pack)]
        # a session of its own: a Ctrl-C on the terminal reaches this process only, which passes it on once
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    where = ", ".join(f"worker {k}: GPU {gpus[k % len(gpus)]}" for k in range(n)) if len(gpus) > 1 else \
        f"{os.environ.get('OMP_NUM_THREADS') or max(1, (os.cpu_count() or 1) // n)} CPU thread(s) each" if not gpus else "one GPU shared"
    log(f"started {n} workers ({where}); their logs: {logs}/worker-K.log")

    def echo():
        for k in range(n):
            with open(logs / f"worker-{k}.log", "rb") as r:
                r.seek(offsets[k])
                data = r.read()
            cut = data.rfind(b"\n") + 1
            offsets[k] += cut
            for line in data[:cut].decode(errors="replace").splitlines():
                log(f"[worker {k}] {line}")

    forwarded = False
    with StopRequest(lambda *a: None) as stop:
        while any(p.poll() is None for p in procs):
            if stop.signum and not forwarded:
                log(f"{signal.Signals(stop.signum).name}: asking the {n} workers to stop at a safe point")
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(stop.signum)
                forwarded = True
            echo()
            time.sleep(0.5)
    echo()
    for f in files:
        f.close()
    codes = [p.returncode for p in procs]
    if stop.signum:
        raise Interrupted("stopped; every trial resumes (run the same command again)", stop.signum)
    bad = [c for c in codes if c]
    if bad:
        log(f"{len(bad)} of {n} workers ended with an error (exit status {', '.join(map(str, bad))}); see {logs}")
        return bad[0]
    return 0
