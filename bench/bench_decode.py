"""Decode-step cost of a model folder: KV cache vs recomputing everything, threads, batch, side by side.

    python bench/bench_decode.py --model models/default

Every row is measured in the same run on the same machine, so read the ratios, not the absolute
numbers (a DAW, a test run or a training job on the same cores moves them all together).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.session import OnnxDecoder  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    decoders = {threads: OnnxDecoder.load(args.model, threads=threads) for threads in (1, 2)}
    vocab = decoders[1].vocab_size
    print(f"model {args.model}: {(decoders[1].manifest.model.parameters or 0) / 1e6:.2f} M parameters, "
          f"context {decoders[1].max_context}\n")
    print("| context | threads | batch | prefill (ms) | cached decode step (ms) | uncached step (ms) | uncached / cached |")
    print("|---|---|---|---|---|---|---|")
    for context in (64, 256, min(480, decoders[1].max_context - 1)):
        for threads, batch in ((1, 1), (2, 1), (1, 4)):
            decoder = decoders[threads]
            ids = rng.integers(0, vocab, (batch, context))
            prefill = timed(lambda d=decoder, i=ids: d.step(i, d.empty_cache(i.shape[0])), max(3, args.repeats // 5))
            _, cache = decoder.step(ids, decoder.empty_cache(batch))
            step_ids = rng.integers(0, vocab, (batch, 1))
            cached = timed(lambda d=decoder, c=cache, s=step_ids: d.step(s, c), args.repeats)
            full = np.concatenate([ids, step_ids], axis=1)
            uncached = timed(lambda d=decoder, f=full: d.step(f, d.empty_cache(f.shape[0])), max(3, args.repeats // 5))
            print(f"| {context} | {threads} | {batch} | {prefill:.2f} | {cached:.3f} | {uncached:.2f} | {uncached / cached:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
