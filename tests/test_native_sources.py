"""The native library's sources as shipped: every file the build hashes and compiles is in the wheel's package
data, and the GELU's table is what engine/gelu_table.py makes."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np

from engine import gelu_table, native_attention

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_the_build_reads_is_package_data():
    """A wheel without one of them cannot build the operator (the engine then serves ONNX Runtime's nodes):
    native_matmul4_kernel.h was missing from the list until session 27."""
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    line = re.search(r"^engine = \[([^\]]*)\]", section, re.MULTILINE)  # (no tomllib: Python 3.10 is supported)
    assert line is not None, "pyproject.toml has no package-data for engine"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    for source in native_attention.SOURCES:
        assert source.exists(), source
        assert any(fnmatch.fnmatch(source.name, pattern) for pattern in patterns), f"{source.name} is not in engine's package-data"
    included = {match for pattern in patterns for match in re.findall(r'#include "([^"]+)"', "".join(
        p.read_text() for p in native_attention.SOURCES))}
    assert included <= {p.name for p in native_attention.SOURCES}, "a header the sources include is not hashed into the build's key"


def test_the_gelu_table_is_what_its_script_makes():
    text = (ROOT / "engine" / "native_gelu_table.h").read_text()
    rows = re.findall(r"\{([^{}]+)\}", text.split("segue_gelu_table", 1)[1])
    committed = np.array([[float(v.strip().rstrip("f")) for v in row.split(",")] for row in rows], np.float32)
    made = gelu_table.coefficients()
    assert committed.shape == made.shape == (gelu_table.DEGREE + 1, gelu_table.PIECES)
    np.testing.assert_allclose(committed, made, rtol=1e-5, atol=1e-12)  # least squares may round differently elsewhere
    # and the pieces, evaluated as the kernel does (float32 Horner), are Phi to 3e-7 over [-8, 8) (4 ulps of 1)
    x = np.linspace(gelu_table.LOW, gelu_table.HIGH, 20001, endpoint=False).astype(np.float32)
    piece = np.clip(np.floor((x - np.float32(gelu_table.LOW)) * np.float32(2)), 0, gelu_table.PIECES - 1).astype(int)
    u = (x - np.float32(gelu_table.LOW)) - piece.astype(np.float32) * np.float32(0.5)
    p = committed[gelu_table.DEGREE, piece]
    for d in range(gelu_table.DEGREE - 1, -1, -1):
        p = (p * u + committed[d, piece]).astype(np.float32)
    want = np.array([gelu_table.phi(float(v)) for v in x])
    assert np.abs(p - want).max() < 3e-7
