"""FFCV, imported once per process without the seconds its image field spends at import.

`ffcv.fields.rgb_image` (imported by `import ffcv`, whatever part of FFCV is asked for) fills a
`numba.typed.Dict` with its two image modes, {'jpg': 0, 'raw': 1}, when it is imported. Building
that first typed dict compiles numba's dictionary machinery: about 4 s of a 7 s import on a
2-core CPU (`python -X importtime -c "import ffcv"`; the `startup` group, bench/test_startup.py,
measures both imports side by side), in every process that loads or writes data: each `fastres
train`, sweep worker, `fastres-prep` and test process. FFCV reads the dict only from Python (to pick
the constants its compiled decoders close over, and in the writer), never inside compiled code, so
a plain dict does the same job. For FFCV 1.0.2, the version fastres pins and whose code this was
read from, the import runs with `numba.typed.Dict` set to `dict` and puts it back after; any
other version is imported as it is.
"""
from __future__ import annotations

import importlib.metadata
import sys

READ_FROM = "1.0.2"  # the FFCV version whose rgb_image.py and memory_managers/base.py use Dict as above


def import_ffcv() -> None:
    """Import FFCV if this process has not yet (call it before the first `from ffcv... import`).

    Also puts torch's intra-op thread count back as it was: importing `ffcv.pipeline.compiler`
    runs `Compiler.set_num_threads(1)`, which calls `torch.set_num_threads(1)`, so a process
    that imported FFCV would otherwise compute on one core until a Loader set it again."""
    if "ffcv" in sys.modules:
        return
    import torch

    threads = torch.get_num_threads()
    try:
        version = importlib.metadata.version("ffcv")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        if version != READ_FROM:
            import ffcv  # noqa: F401  as it is (or the ImportError that names the missing package)
            return
        import numba.typed

        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            import ffcv  # noqa: F401,F811
        finally:
            numba.typed.Dict = typed_dict
    finally:
        torch.set_num_threads(threads)
