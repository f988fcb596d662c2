"""Fixtures of the benchmark suite; helpers and environment variables are in bench/common.py."""
import os
import sys
from pathlib import Path

import pytest

from bench.common import REPO


@pytest.fixture(scope="session")
def bench_data() -> Path:
    from fastres.data import has_data

    d = Path(os.environ.get("FASTRES_BENCH_DATA", REPO / "data"))
    if not has_data(d):
        from data_prep.cli import prepare
        prepare(None, str(d), download_dir=str(d / "downloads"), log=lambda *a: print(*a, file=sys.stderr))
    return d
