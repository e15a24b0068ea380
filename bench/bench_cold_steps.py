"""The decode steps right after other work: each of the first steps timed on its own, after nothing, after
reading other memory, after a prefill, and after the process slept (--idle-ms: nothing ran, as before a
musician's click), with the native int8 matmuls reading their weights as eight streams and as one
(SEGUE_MATMUL_STREAMS=0), the two decoders alternating in one process.

    python bench/bench_cold_steps.py models/default
    python bench/bench_cold_steps.py FOLDER --context 512 --evict-mb 64 --rounds 30

Why: a step's weights and cache (8 MB for the small preset at 512 positions) stay in L3 while steps follow
each other, but anything else that runs in between (a prefill, the DAW) pushes them out, and the next
steps read them back from DRAM at one core's rate. That is what a first note waits for after a prefill.
Prints, for each case, the median ms of step 1, 2, ... after it (wall clock, one thread).
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

from engine import native_matmul
from engine.machine import cpu_name
from engine.session import OnnxDecoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model folder with an int8 variant")
    parser.add_argument("--context", type=int, default=512, help="positions before the timed steps")
    parser.add_argument("--steps", type=int, default=8, help="steps timed after each case")
    parser.add_argument("--evict-mb", type=int, default=64, help="other memory read in the second case")
    parser.add_argument("--idle-ms", type=float, default=30.0, help="how long the process sleeps in the last case")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args(argv)

    decoders = {"8 streams": OnnxDecoder.load(args.folder, variant="int8")}
    os.environ[native_matmul.STREAMS_SWITCH] = "0"
    decoders["1 stream"] = OnnxDecoder.load(args.folder, variant="int8")
    del os.environ[native_matmul.STREAMS_SWITCH]
    ids = np.random.default_rng(0).integers(0, decoders["1 stream"].vocab_size, size=(1, args.context))
    other = np.ones(args.evict_mb * 1024 * 1024 // 8)
    state = {}
    for name, decoder in decoders.items():
        _, cache = decoder.step(ids, decoder.empty_cache())
        base = decoder.shortened(cache, args.context - 1)  # each step rewrites the last position in place
        _, cache = decoder.step_instead(ids[:, -1:], base, cache)
        state[name] = [decoder, base, cache]

    def nothing(decoder: OnnxDecoder) -> None:
        pass

    def read_other(decoder: OnnxDecoder) -> None:
        other.sum()

    def prefill(decoder: OnnxDecoder) -> None:
        decoder.step(ids[:, :300], decoder.empty_cache())

    def idle(decoder: OnnxDecoder) -> None:
        time.sleep(args.idle_ms / 1000)

    cases = {"nothing (steps back to back)": nothing, f"reading {args.evict_mb} MB of other memory": read_other,
             "a prefill of 300 tokens": prefill, f"{args.idle_ms:g} ms asleep": idle}
    times = {(case, name): [[] for _ in range(args.steps)] for case in cases for name in decoders}
    for _ in range(args.rounds):
        for case, before in cases.items():
            for name in decoders:
                decoder, base, cache = state[name]
                for _ in range(4):  # steps back to back first, so each case starts from the same state
                    _, cache = decoder.step_instead(ids[:, -1:], base, cache)
                before(decoder)
                for step in range(args.steps):
                    started = time.perf_counter()
                    _, cache = decoder.step_instead(ids[:, -1:], base, cache)
                    times[(case, name)][step].append((time.perf_counter() - started) * 1000)
                state[name][2] = cache

    print(f"{cpu_name()}; {args.folder} int8 at {args.context} positions; median ms of each step over "
          f"{args.rounds} rounds\n")
    print("| after | matmuls read as | " + " | ".join(f"step {i + 1}" for i in range(args.steps)) + " |")
    print("|---|---|" + "---|" * args.steps)
    for case in cases:
        for name in decoders:
            cells = " | ".join(f"{statistics.median(t):.2f}" for t in times[(case, name)])
            print(f"| {case} | {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
