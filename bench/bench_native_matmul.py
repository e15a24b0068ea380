"""The native int8 matmul (engine/native_matmul.py) against ONNX Runtime's, in the engine, in one process.

    python bench/bench_native_matmul.py models/default           # the shipped model's int8 variant
    python bench/bench_native_matmul.py FOLDER --contexts 256 512 896 --batches 1 3 8

Two decoders over the same int8 graph, loaded side by side: the engine's default (decode steps on
segue.QuantizedMatMul, runs of more than NATIVE_MATMUL_ROWS rows on a second session with ONNX
Runtime's matmuls) and SEGUE_NATIVE_MATMUL=0 (ONNX Runtime's DynamicQuantizeMatMul for every run).
For each context and batch it prints the median ms of a decode step over --repeats rounds, the two
decoders alternating inside each round, and their ratio; then a 512-token prefill the same way (both
run ONNX Runtime's matmuls there: a check that the prompt path did not change). Process CPU time, one
thread.
"""

from __future__ import annotations

import bench_setup  # noqa: F401  (first: one thread, this checkout on sys.path)

# isort: split
import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from engine.machine import cpu_name
from engine.session import OnnxDecoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model folder with an int8 variant")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 896])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per sample")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    native = OnnxDecoder.load(args.folder, variant="int8")
    os.environ["SEGUE_NATIVE_MATMUL"] = "0"
    plain = OnnxDecoder.load(args.folder, variant="int8")
    del os.environ["SEGUE_NATIVE_MATMUL"]
    if not native.native_matmuls:
        print("the native matmul is not in use here (no C compiler, or the native attention is off): nothing to compare")
        return 1
    print(f"{cpu_name()}; {args.folder}: {native.native_matmuls} int8 matmuls a step; median of {args.repeats} rounds\n")
    ids = np.random.default_rng(0).integers(0, native.vocab_size, size=(1, max(args.contexts)))

    def decode_ms(decoder: OnnxDecoder, context: int, batch: int) -> float:
        _, cache = decoder.step(ids[:, :context - args.steps], decoder.empty_cache())
        cache = cache.repeat(batch) if batch > 1 else cache
        token = np.zeros((batch, 1), dtype=np.int64)
        started = time.process_time()
        for _ in range(args.steps):
            _, cache = decoder.step(token, cache)
        return (time.process_time() - started) / args.steps * 1e3

    def prefill_ms(decoder: OnnxDecoder, tokens: int) -> float:
        started = time.process_time()
        decoder.step(ids[:, :tokens], decoder.empty_cache())
        return (time.process_time() - started) * 1e3

    print(f"{'run':24s} {'native':>9s} {'ORT':>9s} {'ORT/native':>11s}")
    cases = [(f"step at {c}, batch {b}", lambda d, c=c, b=b: decode_ms(d, c, b)) for c in args.contexts for b in args.batches]
    cases.append(("prefill 512", lambda d: prefill_ms(d, min(512, max(args.contexts)))))
    for name, measure in cases:
        mine, theirs = [], []
        for _ in range(args.repeats):
            mine.append(measure(native))
            theirs.append(measure(plain))
        a, b = statistics.median(mine), statistics.median(theirs)
        print(f"{name:24s} {a:8.3f}  {b:8.3f}  {b / a:10.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
