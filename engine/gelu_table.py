"""The table the native GELU reads on AVX-512 CPUs (engine/native_gelu_table.h), and how it was made.

GELU(x) = x Phi(x), Phi the normal distribution function. On [-8, 8) Phi is cut into 32 pieces of width 1/2,
each a degree-5 polynomial in u = x - (the piece's start), fitted by least squares at 200 Chebyshev nodes of
the piece in float64 and rounded to float32; Phi = 1 above 8 and 0 below -8 (|GELU| < 5e-15 there). The
kernel picks a piece's six coefficients out of two registers each (vpermt2ps) and runs Horner's rule:
about 20 instructions a vector of sixteen, where the erfc formula it replaced took some 40 and a division
(docs/performance.md, "Session 27").

    python -m engine.gelu_table > engine/native_gelu_table.h

Run at development time only (numpy and the standard library); the header is committed.
"""

from __future__ import annotations

import math
import sys

import numpy as np

PIECES = 32
LOW, HIGH = -8.0, 8.0
DEGREE = 5
NODES = 200


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def coefficients() -> np.ndarray:
    """[DEGREE + 1, PIECES] float32: row d holds every piece's coefficient of u^d."""
    width = (HIGH - LOW) / PIECES
    nodes = (np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES) + 1.0) / 2.0 * width
    table = np.empty((DEGREE + 1, PIECES), np.float32)
    for piece in range(PIECES):
        start = LOW + piece * width
        values = np.array([phi(start + u) for u in nodes])
        table[:, piece] = np.polynomial.polynomial.polyfit(nodes, values, DEGREE).astype(np.float32)
    return table


def header(table: np.ndarray) -> str:
    rows = ",\n".join("    {" + ", ".join(f"{float(v)!r}f" for v in row) + "}" for row in table)
    return ("/* Made by `python -m engine.gelu_table > engine/native_gelu_table.h` (engine/gelu_table.py): Phi(x), the\n"
            f" * normal distribution function, on [{LOW:g}, {HIGH:g}) in {PIECES} pieces of width {(HIGH - LOW) / PIECES:g},\n"
            f" * a degree-{DEGREE} polynomial in x - (the piece's start) each; row d holds every piece's coefficient of\n"
            " * that power d. */\n"
            "#ifndef SEGUE_NATIVE_GELU_TABLE_H\n#define SEGUE_NATIVE_GELU_TABLE_H\n\n"
            f"#define SEGUE_GELU_LOW ({LOW:.1f}f)\n#define SEGUE_GELU_HIGH ({HIGH:.1f}f)\n"
            f"#define SEGUE_GELU_PER_UNIT ({PIECES / (HIGH - LOW):.1f}f) /* pieces per unit of x */\n"
            f"#define SEGUE_GELU_WIDTH ({(HIGH - LOW) / PIECES:.1f}f) /* a piece's */\n"
            f"#define SEGUE_GELU_DEGREE {DEGREE}\n\n"
            f"static const float segue_gelu_table[{DEGREE + 1}][{PIECES}] = {{\n{rows}}};\n\n#endif\n")


if __name__ == "__main__":
    sys.stdout.write(header(coefficients()))
