"""fastres-prep: convert CIFAR-10 once into FFCV .beton files (see --help)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fastres.errors import BadInput, OutputError, cli_main, describe_os_error
from fastres.rundir import remove_stale_temporaries
from . import convert as cv
from .sources import load

ENV_SOURCE = "FASTRES_CIFAR10"


def default_source() -> str:
    return os.environ.get(ENV_SOURCE) or "torchvision"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres-prep",
        description="Convert CIFAR-10 into FFCV .beton files (raw, lossless 32x32 RGB + label) and a "
                    "JSON manifest (counts, per-class counts, train mean/std, content hash). Run once; "
                    "a rerun on up-to-date output does nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=None,
                   help="'torchvision' (download into --download-dir), a folder holding the official "
                        "cifar-10-batches-py pickles (or that folder itself), or a folder holding train.npz "
                        f"and test.npz. Default: ${ENV_SOURCE} if set, else 'torchvision'.")
    p.add_argument("--out", default="./data", help="output folder")
    p.add_argument("--download-dir", default=None,
                   help="where --source torchvision downloads to (default: OUT/downloads, as 'fastres train' uses)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="write a class-balanced subset of N training images")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="write a class-balanced subset of N test images")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.add_argument("--workers", type=int, default=-1, help="writer processes (-1: all cores, at most 8)")
    return p


def prepare(source: str | None, out: str, download_dir: str | None = None, limit_train: int | None = None,
            limit_test: int | None = None, force: bool = False, workers: int = -1, log=print) -> dict:
    """Convert unless up to date; returns the manifest.

    Raises BadInput (SourceError, a bad limit, an --out that is a file) or OutputError (--out
    cannot be written), each with a one-line message.
    """
    source = source or default_source()
    for name, v in (("--limit-train", limit_train), ("--limit-test", limit_test)):
        if v is not None and v <= 0:
            raise BadInput(f"{name} must be a positive number of images, got {v}")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise BadInput(f"--out {out}: is a file, not a folder; name a folder for the .beton files")
    t0 = time.perf_counter()
    train, test = load(source, download_dir or out_path / "downloads")
    try:
        train, test = cv.subset(train, limit_train), cv.subset(test, limit_test)
    except ValueError as e:
        raise BadInput(str(e)) from None
    digest = cv.content_hash(train, test)
    # what a conversion killed mid-write left (its pid gone): removed whether or not this one writes
    remove_stale_temporaries(out_path, log, "fastres-prep")
    if not force and cv.is_up_to_date(out, digest):
        log(f"fastres-prep: {out} is up to date ({len(train.labels)} train, {len(test.labels)} test images); "
            "nothing to do (--force rebuilds)")
        return cv.read_manifest(out)
    log(f"fastres-prep: writing {len(train.labels)} train and {len(test.labels)} test images from {source} to {out}")
    try:
        manifest = cv.convert(train, test, out, source_desc=str(source), num_workers=workers,
                              extra={"limit_train": limit_train, "limit_test": limit_test}, log=log)
    except OSError as e:
        raise OutputError(f"cannot write {e.filename or out}: {describe_os_error(e)}; the previous files in "
                          f"{out} (if any) are kept. Free space or choose another --out") from None
    log(f"fastres-prep: done in {time.perf_counter() - t0:.1f} s; mean {[round(m, 4) for m in manifest['mean']]} "
        f"std {[round(s, 4) for s in manifest['std']]}")
    return manifest


def main(argv=None) -> int:
    """Exit statuses as for `fastres` (fastres/errors.py): 2 bad input or usage, 4 cannot write,
    130 interrupted."""
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log as they are printed
    return cli_main("fastres-prep", lambda: prepare(args.source, args.out, args.download_dir, args.limit_train,
                                                    args.limit_test, args.force, args.workers) and 0)


if __name__ == "__main__":
    sys.exit(main())
