"""Group 'startup': the seconds a fresh process spends importing FFCV, as `import ffcv` does it
and as fastres does it (data_prep/ffcv_import.py: the same modules without the numba typed dict
FFCV builds at import). Every process that loads or writes data pays this once: each `fastres
train`, sweep worker and `fastres-prep`. A round is one `python -c` process; the fastres case runs
first, so any cold file cache counts against it.
"""
import subprocess
import sys

import pytest

from bench.common import MINIMAL, REPO

CODE = {"fastres": "from data_prep.ffcv_import import import_ffcv; import_ffcv()", "plain": "import ffcv"}


@pytest.mark.benchmark(group="startup")
@pytest.mark.parametrize("how", list(CODE))
def test_import_ffcv(benchmark, how):
    cmd = [sys.executable, "-c", CODE[how]]
    benchmark.pedantic(lambda: subprocess.run(cmd, cwd=REPO, check=True), rounds=1 if MINIMAL else 3, iterations=1)
    benchmark.extra_info.update(how=how, seconds_per_process=benchmark.stats.stats.median)
