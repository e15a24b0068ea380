"""Imported first by the bench scripts, before numpy, torch or onnxruntime: one thread for the BLAS and
OpenMP pools unless the caller chose (a bench measures one core, and numpy's pool would otherwise wake the
second), and this checkout's root on sys.path, so that `python bench/NAME.py` imports its engine/ and
training/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
sys.path.insert(0, str(ROOT))  # first, ahead of an installed copy of the packages
