"""data_prep/ffcv_import.py: FFCV imported without building its numba typed dict, the same image
modes, numba left as it was; another FFCV version imported as it is. Each case in a fresh process
(this one may have imported FFCV already)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="needs FFCV")

PROBE = """
import importlib.metadata, sys
if sys.argv[1] != "as-is":
    real = importlib.metadata.version
    importlib.metadata.version = lambda name: sys.argv[1] if name == "ffcv" else real(name)
from data_prep.ffcv_import import import_ffcv
import_ffcv()
import numba.typed, numba.typed.typeddict
import ffcv.fields.rgb_image as r
print(numba.typed.Dict is numba.typed.typeddict.Dict, type(r.IMAGE_MODES).__name__, sorted(r.IMAGE_MODES.items()))
"""


def probe(version: str) -> str:
    r = subprocess.run([sys.executable, "-c", PROBE, version], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def modes_in_ffcv_source() -> list:
    """The image modes as FFCV's own source assigns them (`IMAGE_MODES['jpg'] = 0`, ...)."""
    src = Path(importlib.util.find_spec("ffcv.fields.rgb_image").origin).read_text()
    return sorted((k, int(v)) for k, v in re.findall(r"IMAGE_MODES\['(\w+)'\] = (\d+)", src))


def test_pinned_ffcv_gets_a_plain_dict_of_the_same_modes_and_numba_is_put_back():
    want = modes_in_ffcv_source()
    assert want == [("jpg", 0), ("raw", 1)]
    assert probe("as-is") == f"True dict {want}"


def test_another_ffcv_version_is_imported_as_it_is():
    want = modes_in_ffcv_source()
    assert probe("9.9.9") == f"True Dict {want}"  # numba's typed Dict, built by FFCV itself
