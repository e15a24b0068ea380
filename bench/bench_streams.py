"""One core reading one stream of memory against several at once, and what that gives a decode step's
int8 matmuls (engine/native_matmul_kernel.h: a row reads four blocks of weights at once, each from two
places: eight streams).

    python bench/bench_streams.py                  # the tables in docs/performance.md, "Session 21"
    python bench/bench_streams.py --read-mb 64 --shapes 512x12

Builds bench/streams_probe.c with the compiler and flags the engine builds its native library with, for
this CPU (or --arch="-march=native -mno-avx512f": the AVX2 path, on an AVX-512 CPU), and prints
two tables:
- read rate (GB/s) of one core over 1, 2, 4 and 8 interleaved streams, the data coming from DRAM (256 MB
  of other memory read before each pass, as after other work) or just read (L2/L3 where it fits);
- the matmuls of a decode step of a transformer of width D and L layers (D x 3D, D x D, D x 4D, 4D x D a
  layer; the small preset 256x6, the shipped default 256x4, the seed 512x12), weights read as streams
  (eight on the AVX-512 VNNI path, two on the AVX2 ones) against one block after another, from DRAM and
  warm.
Medians of 31 passes, the variants alternating pass by pass, in one process.
"""

from __future__ import annotations

from bench_setup import ROOT  # first: this checkout on sys.path (bench/bench_setup.py)

# isort: split
import argparse
import subprocess
import tempfile
from pathlib import Path

from engine import native_attention
from engine.machine import cpu_name


def build(folder: Path, arch: list[str]) -> Path:
    compiler = native_attention.compiler()
    if compiler is None:
        raise SystemExit("no C compiler (cc, gcc or clang) on PATH")
    if "avx2" not in native_attention.cpu_flags():
        raise SystemExit("this CPU has no AVX2: the kernel's streams are its AVX2 and AVX-512 paths'")
    target = folder / "streams_probe"
    flags = [flag for flag in native_attention.FLAGS if flag not in ("-shared", "-fPIC")]
    subprocess.run([compiler, *flags, *arch, "-o", str(target), str(ROOT / "bench" / "streams_probe.c"), "-lm"], check=True)
    return target


def run(probe: Path, *args: object) -> dict[int, float]:
    out = subprocess.run([str(probe), *map(str, args)], check=True, capture_output=True, text=True, timeout=900).stdout
    return {int(line.split()[1]): float(line.split()[2]) for line in out.splitlines() if not line.startswith("path ")}


def code_path(probe: Path) -> str:
    out = subprocess.run([str(probe), "matmul", "16", "1", "0"], check=True, capture_output=True, text=True, timeout=120).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("path "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--read-mb", type=int, nargs="+", default=[40, 8])
    parser.add_argument("--shapes", nargs="+", default=["256x6", "256x4", "512x12"], help="WIDTHxLAYERS")
    parser.add_argument("--arch", default="-march=native",
                        help='the build\'s target flags: --arch="-march=native -mno-avx512f" measures the AVX2 path here')
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        probe = build(Path(folder), args.arch.split())
        path = code_path(probe)
        print(f"{cpu_name()}, one core; the kernel's {path} path ({args.arch})\n")
        print("| data | from | 1 stream (GB/s) | 2 | 4 | 8 | 4 / 1 | 8 / 1 |\n|---|---|---|---|---|---|---|---|")
        for megabytes in args.read_mb:
            for cold in (1, 0):
                rates = run(probe, "read", megabytes, cold)
                print(f"| {megabytes} MB | {'DRAM' if cold else 'just read'} | {rates[1]:.1f} | {rates[2]:.1f} | "
                      f"{rates[4]:.1f} | {rates[8]:.1f} | {rates[4] / rates[1]:.2f}x | {rates[8] / rates[1]:.2f}x |", flush=True)
        print(f"\n| decode step's matmuls | int8 weights | from | as streams (ms, {path}) | one block at a time (ms) | ratio |")
        print("|---|---|---|---|---|---|")
        for shape in args.shapes:
            width, layers = (int(part) for part in shape.split("x"))
            megabytes = layers * 12 * width * width / 1e6
            for cold in (1, 0):
                ms = run(probe, "matmul", width, layers, cold)
                print(f"| {width} wide, {layers} layers | {megabytes:.1f} MB | {'DRAM' if cold else 'just read'} | "
                      f"{ms[8]:.3f} | {ms[1]:.3f} | {ms[1] / ms[8]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
