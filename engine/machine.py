"""What this computer is, for every figure Segue records: the CPU's name and its vector extensions.

Speeds differ from one machine to the next (AVX-512 and AMX on one, AVX2 only on another), so each
benchmark table and each measured choice (export/quantize.py's served variant) names the CPU it
was measured on. Linux reads /proc/cpuinfo; elsewhere `platform` says what it can.
"""

from __future__ import annotations

import platform
from pathlib import Path

VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c")  # plus every avx512*, amx* and avx_vnni flag


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, e.g. "Intel(R) Xeon(R) Processor"."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def vector_extensions() -> list[str]:
    """The SIMD extensions the matmul kernels can use (AVX2, AVX-512 families, AMX, VNNI), as the kernel names them."""
    flags = (_cpuinfo_field("flags") or "").split()
    return [f for f in flags if f in VECTOR_FLAGS or f.startswith(("avx512", "amx", "avx_vnni"))]
