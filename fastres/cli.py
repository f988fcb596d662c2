"""fastres command line: train, eval, predict, summary, sweep, leaderboard, compare, env. `fastres COMMAND --help` explains each."""
from __future__ import annotations

import argparse
import shlex
import sys

from .config import DEFAULT_PRESET, PRESETS, ConfigError, help_text, make_config, parse_overrides
from .errors import Interrupted, OutputError, cli_main

TRAIN_EPILOG = """\
settings (any of them as --key value; booleans and auto|on|off switches also as a bare --key (true/on) or
--no-key (false/off); defaults are the 'paper' preset's):
{settings}

presets: {presets}
  paper       the ResNet-68 recipe of "Optimizing ResNet Architecture for CIFAR-10 Classification"
              (Chen and Ge, NYU): SGD 0.9, lr 0.01, batch 64, cosine, 50 epochs; reported 90.14%
  smoke       resnet20 on a 10,000-image class-balanced slice, 3 epochs: about a minute on a CPU
  tuned       ResNet-68, 50 epochs, Nesterov + label smoothing + warm-up + EMA + flip TTA
  throughput  ResNet-68, 50 epochs at batch 512 with linear lr scaling, for wall time on a GPU

examples:
  fastres train                                   # the paper's run (converts the data first if needed)
  fastres train --preset smoke                    # about a minute on a CPU, into runs/smoke/DATE-TIME
  fastres train --preset paper --lr 0.02 --epochs 30
  fastres train --preset smoke --resume           # continue the run runs/latest points at
  fastres compare runs/smoke/* --png smoke.png    # runs side by side
  fastres summary --blocks 2,2,2,2 --widths 64,128,256,512 --pool 4   # a design's size before training it
  fastres train --optimizer adamw --lr 0.002 --weight-decay 0.05 --cutout 16 --max-params 5M
  torchrun --nproc_per_node 4 -m fastres train --preset throughput

exit status: 0 done, 2 bad input or usage, 3 diverged, 4 output cannot be written, 5 run folder in
use by another training, 130 interrupted (Ctrl-C; the last checkpoint resumes)
"""


def add_checkpoints(p: argparse.ArgumentParser, data: str) -> None:
    """What eval and predict share: one checkpoint or several (an ensemble), TTA, device, data."""
    p.add_argument("checkpoint", nargs="+", help="last.pt files written by 'fastres train' (several: an ensemble)")
    p.add_argument("--tta", action="store_true", help="(also) average the logits of each image and its mirror")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", default=None, help=data)


def add_train(sub) -> None:
    from . import runtime  # what each switch's auto resolves to, for --help

    t = sub.add_parser("train", allow_abbrev=False, help="train a model (default: the paper preset)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a CIFAR-10 ResNet. Prints the resolved config, an estimate of the "
                                   "duration, progress (a bar on a terminal, a line every --progress-s "
                                   "seconds in a log) and one table row per epoch; writes "
                                   "RUN_DIR/record.json, metrics.csv, curves.png and last.pt (RUN_DIR: "
                                   "--out, else a new runs/PRESET/DATE-TIME, linked as runs/latest).",
                       epilog=TRAIN_EPILOG.format(settings=help_text(runtime.AUTO), presets=", ".join(PRESETS)))
    t.add_argument("--preset", default=DEFAULT_PRESET, help=f"named recipe (default: {DEFAULT_PRESET})")
    t.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/last.pt (without --out: the run runs/latest points at)")
    t.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="one run per seed, in RUN_DIR/seed<S> (RUN_DIR: --out, else a new runs/PRESET/DATE-TIME)")
    t.add_argument("--pack", type=int, default=1, metavar="K",
                   help="with --seeds: train K runs at once in this process, advanced in turn (one CUDA "
                        "stream each on a GPU); default 1: one after another")


def add_eval(sub) -> None:
    e = sub.add_parser("eval", allow_abbrev=False, help="test accuracy of checkpoints, alone and as an ensemble",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Test loss and accuracy of each checkpoint and, for several, of their ensemble "
                                   "(the mean of their softmax); with --tta also with flip TTA. Writes per-class "
                                   "accuracy and the confusion matrix (confusion.csv, confusion.png) and the most "
                                   "confidently misclassified test images (mistakes.png) of the last result into "
                                   "--out.",
                       epilog="examples:\n"
                              "  fastres eval runs/latest/last.pt\n"
                              "  fastres eval runs/sweep-x/trials/*/seed*/last.pt --tta --out ensemble/")
    add_checkpoints(e, data="folder with the .beton files (default: the first run's)")
    e.add_argument("--out", default=None, help="where the per-class results go (default: RUN_DIR/eval for one "
                                               "checkpoint, ./eval-ensemble for several)")


def add_predict(sub) -> None:
    pr = sub.add_parser("predict", allow_abbrev=False, help="label images without labels (a hidden test set) as a CSV",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Labels for images with one checkpoint or an ensemble of several (the mean of "
                                    "their softmax), optionally with flip TTA, batched on the device in the runs' "
                                    "precision. --images: a pickle in the course format (a dict with 'data', N x "
                                    "3072 channel-major or N x 32 x 32 x 3 uint8, and 'ids'; str or bytes keys), an "
                                    ".npz ('images', optional 'ids'), a folder of 32x32 RGB PNG/JPEG files (ids: "
                                    "their names), or a converted .beton. Writes the CSV (and --probs) only once "
                                    "everything has been predicted.",
                        epilog="examples:\n"
                               "  fastres predict runs/latest/last.pt --images cifar_test_nolabel.pkl --out submission.csv\n"
                               "  fastres predict a/last.pt b/last.pt c/last.pt --images test.pkl --out sub.csv --tta \\\n"
                               "      --probs probs.npy\n\n"
                               "exit status: 0, or 2 for bad images or ids, unreadable input or checkpoints, or "
                               "checkpoints of different class counts (no CSV is left)")
    add_checkpoints(pr, data="the runs' .beton folder, for checkpoints that do not keep their normalization "
                             "(written by earlier versions)")
    pr.add_argument("--images", required=True, metavar="PATH", help="the images to label (see above)")
    pr.add_argument("--out", required=True, metavar="CSV", help="the labels: a header, then ID,LABEL per image")
    pr.add_argument("--probs", default=None, metavar="FILE", help="also the probabilities: .npy (N x classes) or "
                                                                  ".csv (ID and a column per class)")
    pr.add_argument("--names", action="store_true", help="class names (airplane, ...) instead of indices 0-9")
    pr.add_argument("--header", default="ID,Labels", help="the CSV's two column names (default: ID,Labels)")


def add_summary(sub) -> None:
    m = sub.add_parser("summary", allow_abbrev=False, help="the model's layer table, parameters, multiply-adds and sizes (no data needed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The model a preset and settings describe, as torchinfo's layer table (layer, "
                                   "output shape, parameters) for one 32x32 image, with the totals: trainable "
                                   "parameters, multiply-adds per image, forward/backward activation size and "
                                   "parameter size in MB. Takes every model setting of 'fastres train' (--blocks, "
                                   "--widths, --kernel, --stem-kernel, --shortcut-kernel, --pool, --depth).",
                       epilog="examples:\n"
                              "  fastres summary --preset paper                 # 1,050,202 parameters\n"
                              "  fastres summary --blocks 2,2,2,2 --widths 64,128,256,512 --pool 4 --max-params 5M\n\n"
                              "exit status: 0, or 2 for a bad setting or a model over --max-params (by how much)")
    m.add_argument("--preset", default=DEFAULT_PRESET, help=f"named recipe whose model to start from (default: {DEFAULT_PRESET})")
    m.add_argument("--depth-of-table", type=int, default=2, metavar="D",
                   help="nesting depth of the layer table (1: stages only, 2: blocks, 3: every layer; default 2)")


def add_sweep(sub) -> None:
    s = sub.add_parser("sweep", allow_abbrev=False, help="a study on Optuna from a sweep file (or one preset's seeds): trials, "
                                     "workers, leaderboard",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="With a sweep FILE (TOML: the base preset, fixed settings, the space, seeds, "
                                   "budget, sampler, pruner; see docs/sweeps.md): the study lives in DIR/study.db (or "
                                   "--storage); each trial trains its configuration once per seed in "
                                   "DIR/trials/NNNN/seedS; the leaderboard is printed at the end and saved as "
                                   "DIR/leaderboard.csv, accuracy_vs_params.png and accuracy_vs_time.png. The "
                                   "same command again continues the study; on another machine, with the same "
                                   "--storage, it adds a worker. Without FILE: --preset P --seeds S... runs "
                                   "one preset's seeds into OUT/seed<N> and writes OUT/summary.json.",
                       epilog="examples:\n"
                              "  fastres sweep study.toml                         # runs/sweep-study, SQLite\n"
                              "  fastres sweep study.toml --workers 4             # 4 processes (a GPU each if 4)\n"
                              "  fastres sweep study.toml --storage postgresql://me@dbhost/sweeps   # many machines\n"
                              "  fastres sweep study.toml --storage journal:/shared/study.journal\n"
                              "  fastres sweep study.toml --report                # the leaderboard so far\n"
                              "  fastres sweep --preset tuned --seeds 0 1 2       # one preset, three seeds\n\n"
                              "Other --key value settings (seed-only form) are passed to every run. exit status: "
                              "0 done, 2 bad sweep file or storage (unreachable, locked, another sweep's), "
                              "4 folder not writable, 130/143 stopped (every trial resumes)")
    s.add_argument("file", nargs="?", default=None, help="sweep file (TOML); omit for the seed-only form")
    s.add_argument("--preset", default=None, help=f"seed-only form: the preset (default: {DEFAULT_PRESET})")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="seed-only form: seeds (default: 0 1 2)")
    s.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-FILE or runs/sweep-PRESET)")
    s.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage shared by the workers: an SQLAlchemy URL (sqlite:///PATH, "
                        "postgresql://USER@HOST/DB) or journal:PATH (default: sqlite:///DIR/study.db)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on this machine (default 1: this process)")
    s.add_argument("--report", action="store_true", help="print and save the leaderboard; train nothing")
    s.add_argument("--pack", type=int, default=1, metavar="K",
                   help="train K runs at once in each worker, advanced in turn, one CUDA stream each on a GPU: "
                        "a trial's seeds, and the next trials' as slots free (the seed-only form: its seeds)")
    s.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one of --workers N's processes


def add_leaderboard(sub) -> None:
    lb = sub.add_parser("leaderboard", allow_abbrev=False, help="a sweep folder's ranked trials, CSV and plots",
                        description="The leaderboard of the sweep whose folder is DIR (its sweep.json names the "
                                    "study and its storage): printed, and saved as DIR/leaderboard.csv, "
                                    "accuracy_vs_params.png and accuracy_vs_time.png.")
    lb.add_argument("dir", metavar="DIR", help="a folder written by 'fastres sweep FILE'")
    lb.add_argument("--storage", default=None, metavar="URL", help="the study's storage, if not the one in sweep.json "
                                                                    "(a URL with a password is stored without it)")


def add_compare(sub) -> None:
    c = sub.add_parser("compare", allow_abbrev=False, help="runs side by side: a table of speed and accuracy, and a PNG",
                       description="One row per run (preset, switches, device, mean epoch seconds, total "
                                   "training seconds, final and best test accuracy) and a plot of test "
                                   "accuracy against cumulative training seconds, one line per run.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by 'fastres train'")
    c.add_argument("--png", default="compare.png", help="where to write the plot (default: compare.png)")


def add_env(sub) -> None:
    v = sub.add_parser("env", allow_abbrev=False, help="this machine and what a run would use on it (no data needed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Python, torch and the CUDA version it was built for, the NVIDIA driver, each "
                                   "GPU's name, capability and memory, the Triton, FFCV, numba and Optuna versions, "
                                   "the CPU's capability; then what precision, compilation, whole step, fused "
                                   "kernels and data placement a run of the preset (and settings) would resolve to "
                                   "here, and why. A torch that cannot use this machine's GPU is named with its fix.",
                       epilog="examples:\n"
                              "  fastres env                                # the paper preset here\n"
                              "  fastres env --preset throughput --amp fp16\n"
                              "  fastres env --json > env.json              # for a bug report")
    v.add_argument("--preset", default=DEFAULT_PRESET, help=f"named recipe to resolve (default: {DEFAULT_PRESET})")
    v.add_argument("--json", action="store_true", help="the facts and the resolution as JSON")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: settings are parsed by fastres (--seed), so argparse must not take a
    # prefix of one of its own options for it (--seed would be read as --seeds)
    p = argparse.ArgumentParser(prog="fastres", allow_abbrev=False, description="Train and evaluate CIFAR-10 ResNets "
                                "fast: by default the ResNet-68 of 'Optimizing ResNet Architecture for CIFAR-10 "
                                "Classification' (Chen and Ge, NYU).")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_train, add_eval, add_predict, add_summary, add_sweep, add_leaderboard, add_compare, add_env):
        add(sub)
    return p


def seed_only_settings(args: list[str]) -> list[str]:
    """The settings of `fastres sweep --preset P --seeds ...`: its arguments without the sweep
    command's own options (and their values)."""
    own = {"--preset": 1, "--out": 1, "--pack": 1, "--workers": 1, "--storage": 1, "--seeds": None}
    out, i = [], 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        if key in own:
            i += 1
            if "=" in a:
                continue
            if own[key] is None:  # --seeds takes every value up to the next option
                while i < len(args) and not args[i].startswith("--"):
                    i += 1
            else:
                i += own[key]
            continue
        out.append(a)
        i += 1
    return out


def continuable(e) -> bool:
    """Work under way that the same command continues (stopped, or a write that failed midway),
    not a refusal before it started (a folder that cannot be made: another --out is the fix)."""
    return isinstance(e, Interrupted) or getattr(e, "continuable", False)


def continuing(e, how: str, command: list[str]):
    """The same error, saying which command continues the work once the cause is fixed."""
    if isinstance(e, Interrupted):
        return Interrupted(f"{e}\n{how}: {shlex.join(command)}", e.exit_status - 128)
    return OutputError(f"{e}\n{how}: {shlex.join(command)}")


def without_option(args: list[str], option: str) -> list[str]:
    """args without `option` and its value (given as two arguments or as option=value)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def no_settings(rest: list[str]) -> None:
    if rest:
        raise ConfigError(f"unexpected arguments {' '.join(rest)}")


def cmd_train(args, rest: list[str], argv: list[str]) -> int:
    from .train import train
    cfg = make_config(args.preset, parse_overrides(rest))
    if args.pack != 1 and not args.seeds:
        raise ConfigError("--pack K packs the runs of --seeds S1 S2 ...: give the seeds")
    try:
        if args.seeds:
            from .packed import train_seeds
            return train_seeds(cfg, args.seeds, args.pack, args.resume)
        train(cfg, resume=args.resume)
        return 0
    except (Interrupted, OutputError) as e:  # say how to continue: the same command with --resume
        if not continuable(e):
            raise
        out = [] if cfg.out or getattr(e, "run_dir", None) is None else ["--out", str(e.run_dir)]
        again = ["fastres", *argv, *out] + ([] if args.resume else ["--resume"])
        raise continuing(e, "resume with", again) from None


def cmd_eval(args, rest: list[str], argv: list[str]) -> int:
    no_settings(rest)
    from .evaluate import evaluate_checkpoints
    evaluate_checkpoints(args.checkpoint, args.data, args.tta, args.device, args.out)
    return 0


def cmd_predict(args, rest: list[str], argv: list[str]) -> int:
    no_settings(rest)
    from .predict import predict
    predict(args.checkpoint, args.images, args.out, args.tta, args.probs, args.names, args.header, args.device,
            args.data)
    return 0


def cmd_compare(args, rest: list[str], argv: list[str]) -> int:
    no_settings(rest)
    from .compare import compare
    compare(args.runs, args.png)
    return 0


def cmd_summary(args, rest: list[str], argv: list[str]) -> int:
    from .design import check_budget, summarize, summary_text
    cfg = make_config(args.preset, parse_overrides(rest))
    print(summary_text(summarize(cfg, args.depth_of_table), cfg.max_params))
    check_budget(cfg)  # over --max-params: exit 2, saying by how much
    return 0


def cmd_sweep(args, rest: list[str], argv: list[str]) -> int:
    if args.file is not None and (args.preset or args.seeds):
        # seed-only: what looked like a sweep file was the value of a setting (--data DIR)
        args.file, rest = None, seed_only_settings(argv[1:])
    if args.file is None:
        if args.storage or args.report or args.workers != 1:
            raise ConfigError("--storage, --workers and --report need a sweep file: fastres sweep FILE ...")
        from .sweep import sweep
        try:
            sweep(args.preset or DEFAULT_PRESET, args.seeds or [0, 1, 2], parse_overrides(rest), args.out,
                  pack=args.pack)
            return 0
        except OutputError as e:
            if not continuable(e):
                raise
            raise continuing(e, "then continue with", ["fastres", *argv]) from None
    if rest or args.preset or args.seeds:
        raise ConfigError("with a sweep file, settings go in the file ([fixed] or [space]), not on the "
                          f"command line: {' '.join(rest) or '--preset/--seeds'}")
    from .sweep import run_sweep_file
    try:
        return run_sweep_file(args.file, args.out, args.storage, args.workers, args.report, args.worker,
                              pack=args.pack)
    except OutputError as e:  # the same command (a worker's: its parent's) continues the sweep
        if not continuable(e):
            raise
        raise continuing(e, "then continue the sweep with", ["fastres", *without_option(argv, "--worker")]) from None


def cmd_env(args, rest: list[str], argv: list[str]) -> int:
    from .env import show
    show(make_config(args.preset, parse_overrides(rest)), args.json)
    return 0


def cmd_leaderboard(args, rest: list[str], argv: list[str]) -> int:
    no_settings(rest)
    from .sweep import leaderboard_of
    return leaderboard_of(args.dir, args.storage)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "compare": cmd_compare,
            "summary": cmd_summary, "sweep": cmd_sweep, "env": cmd_env, "leaderboard": cmd_leaderboard}


def main(argv=None) -> int:
    """Exit statuses: see fastres/errors.py (0 done, 2 bad input, 3 diverged, 4 cannot write output,
    5 run folder in use, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.reconfigure(line_buffering=True)  # table rows reach a log or `tee` as they are printed
    args, rest = build_parser().parse_known_args(argv)
    return cli_main("fastres", lambda: COMMANDS[args.command](args, rest, argv))


if __name__ == "__main__":
    sys.exit(main())
