"""CIFAR-10 -> FFCV .beton conversion (`fastres-prep`, `python -m data_prep`)."""
from .convert import MANIFEST_FILE, TEST_FILE, TRAIN_FILE, read_manifest
from .sources import SourceError, Split, balanced_indices, load

__all__ = ["MANIFEST_FILE", "TEST_FILE", "TRAIN_FILE", "read_manifest", "SourceError", "Split",
           "balanced_indices", "load"]
