"""The native operator library built once per code path this CPU can run, for the whole test session.

Why one place: a build of engine/native_attention.c takes 13-17 s of one core, and the suite's native tests
each built their own (the same three libraries twice over, an AVX2 one twice more): about 13 builds, a
third of the suite's time on two cores. They are built here side by side, one compiler per core.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine import native_attention, native_matmul

# Each code path, the -march flags that select it (native_attention.build_command adds the rest) and the CPU flags it needs.
# The portable path runs everywhere; the others where this CPU has their instructions.
PATHS = {
    "portable": ((), set()),
    "avx2": (("-march=native", "-mno-avx512f", "-mno-avxvnni"), {"avx2"}),
    "avx-vnni": (("-march=native", "-mno-avx512f"), {"avx2", "avx_vnni"}),
    "avx512-vnni": (("-march=native",), {"avx512f", "avx512bw", "avx512_vnni"}),
}
RUNNABLE = [name for name, (_, needs) in PATHS.items() if needs <= native_attention.cpu_flags()]


def build_libraries(folder: Path) -> dict[str, Path]:
    """segue-<path>.so in `folder` for every runnable path, each checked to have taken its path."""
    compiler = native_attention.compiler()
    assert compiler is not None, "the tests need a C compiler (the README's set-up installs gcc)"

    def build(name: str) -> Path:
        target = folder / f"segue-{name}.so"
        subprocess.run(native_attention.build_command(compiler, PATHS[name][0], target), check=True, capture_output=True,
                       timeout=300)  # two builds share two cores: each may take twice its time alone
        return target

    with ThreadPoolExecutor(max_workers=max(1, min(len(RUNNABLE), os.cpu_count() or 1))) as pool:
        built = dict(zip(RUNNABLE, pool.map(build, RUNNABLE), strict=True))
    for name, target in built.items():
        assert native_matmul.code_path(target) == name
    return built
