"""What the guesses save: model calls and time per token of `segue continue`, this checkout against another.

    python bench/bench_guesses.py --baseline /tmp/before            # the four bundled examples, 8 bars
    python bench/bench_guesses.py --baseline /tmp/before --variant fp32 --rounds 6
    python bench/bench_guesses.py --widths                          # what each position more in a call costs

A step of `Generator` feeds the token it drew and, on a guess, the ones it expects next
(`Generator._guess`, engine/guesses.py): each guess that comes true saves a model call, each that does
not makes the call read one more position. `--baseline DIR` runs the same continuations (the examples in
docs/examples, seeds 0 and 1, one variation, the whole `Generator.generate`) in this checkout and in DIR
(another checkout, e.g. `git worktree add /tmp/before <rev>` with models/default copied in), each in a
process of its own, alternating one continuation at a time so that both see the same moment of a busy
machine. It prints, per clip, the medians of model calls per token, total process CPU time per token
(the prompt's prefill included) and the time inside ONNX Runtime's run calls per token. fp32 writes the
same tokens with and without guesses; int8's tokens move with what shares a call, so its continuations
differ slightly between two checkouts whose guesses differ.

`--widths` times one decode call of the served model that reads 1 to 8 new positions after 300 and 600
positions of history (process CPU time, medians of alternated rounds): the price of a guess that misses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("chorale", "reel", "jig", "folksong")


def worker(model: Path) -> None:
    """Read 'clip seed' lines, answer 'cpu_ms model_ms calls tokens' for each continuation (run in a checkout)."""
    sys.path.insert(0, os.getcwd())
    from engine.generate import ContinuationRequest, Generator
    from engine.midi_file import read_clip

    generator = Generator.load(model, threads=1)
    decoder = generator.decoder
    session = decoder.session
    counted = {"calls": 0, "seconds": 0.0}

    class Timed:  # the session, with its run calls counted and timed
        def run_with_iobinding(self, binding, *args):
            started = time.process_time()
            counted["calls"] += 1
            try:
                return session.run_with_iobinding(binding, *args)
            finally:
                counted["seconds"] += time.process_time() - started

        def __getattr__(self, name):
            return getattr(session, name)

    decoder.session = Timed()
    clips = {}
    print("ready", flush=True)
    for line in sys.stdin:
        name, seed = line.split()
        clip = clips.setdefault(name, read_clip(ROOT / "docs" / "examples" / f"{name}.mid"))
        counted["calls"], counted["seconds"] = 0, 0.0
        started = time.process_time()
        done = generator.generate(clip, ContinuationRequest(bars=8, variations=1, seed=int(seed)))[0]
        elapsed = time.process_time() - started
        print(f"{elapsed * 1000:.3f} {counted['seconds'] * 1000:.3f} {counted['calls']} {len(done.tokens)}", flush=True)


def compare(baseline: Path, model: Path, variant: str, rounds: int) -> None:
    sides = {"baseline": baseline.resolve(), "this checkout": ROOT}
    processes = {}
    for side, folder in sides.items():
        env = dict(os.environ, SEGUE_VARIANT=variant, PYTHONPATH=str(folder))
        model_folder = model if model.is_absolute() else folder / model
        processes[side] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(model_folder)], cwd=folder, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if processes[side].stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise SystemExit(f"{folder}: the model did not load")
    per_token: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for index in range(rounds):
        for clip in CLIPS:
            for seed in (0, 1):
                order = list(sides) if (index + seed) % 2 == 0 else list(reversed(sides))
                for side in order:
                    process = processes[side]
                    process.stdin.write(f"{clip} {seed}\n")  # type: ignore[union-attr]
                    process.stdin.flush()  # type: ignore[union-attr]
                    cpu, model_ms, calls, tokens = process.stdout.readline().split()  # type: ignore[union-attr]
                    n = int(tokens)
                    per_token.setdefault((side, clip), []).append((float(cpu) / n, float(model_ms) / n, int(calls) / n))
    for process in processes.values():
        process.stdin.close()  # type: ignore[union-attr]
        process.wait()

    from engine.machine import cpu_name

    print(f"{model} ({variant}), 8 bars, seeds 0 and 1, {rounds} rounds; {cpu_name()}, one thread, process CPU time, "
          f"medians; the two sides alternated one continuation at a time\n")
    print(f"| clip | model calls per token, {baseline} -> this | ms per token (ratio) | ms per token in the model |")
    print("|---|---|---|---|")
    for clip in CLIPS:
        before, now = per_token[("baseline", clip)], per_token[("this checkout", clip)]

        def median(values, i):
            return statistics.median(v[i] for v in values)

        print(f"| {clip} | {median(before, 2):.3f} -> {median(now, 2):.3f} | {median(before, 0):.3f} -> "
              f"{median(now, 0):.3f} ({median(before, 0) / median(now, 0):.2f}x) | {median(before, 1):.3f} -> {median(now, 1):.3f} |")


def widths(model: Path, rounds: int) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from engine.machine import cpu_name
    from engine.session import OnnxDecoder

    decoder = OnnxDecoder.load(model, threads=1)
    rng = np.random.default_rng(0)
    print(f"{model} ({decoder.variant}); {cpu_name()}, one thread, process CPU time of one call, medians of {rounds} "
          "alternated rounds of 10 calls\n")
    print("| history | " + " | ".join(f"{n} new" for n in range(1, 9)) + " |")
    print("|---|" + "---|" * 8)
    for history in (300, 600):
        _, cache = decoder.forward(rng.integers(0, decoder.vocab_size, (1, history)), decoder.empty_cache(1))
        times: dict[int, list[float]] = {n: [] for n in range(1, 9)}
        for _ in range(rounds):
            for n in times:
                ids = rng.integers(0, decoder.vocab_size, (1, n))
                started = time.process_time()
                for _ in range(10):
                    decoder.forward(ids, decoder.shortened(cache, history))
                times[n].append((time.process_time() - started) / 10 * 1000)
        one = statistics.median(times[1])
        print(f"| {history} | " + " | ".join(f"{statistics.median(v):.3f} ms ({statistics.median(v) / one:.2f}x)"
                                           for v in times.values()) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout to run side by side")
    parser.add_argument("--model", type=Path, default=Path("models") / "default",
                        help="model folder (relative: inside each checkout)")
    parser.add_argument("--variant", choices=("int8", "fp32"), default="int8")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--widths", action="store_true", help="time decode calls of 1-8 new positions")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0
    if args.widths:
        widths(ROOT / args.model if not args.model.is_absolute() else args.model, max(args.rounds, 20))
    if args.baseline is not None:
        compare(args.baseline, args.model, args.variant, args.rounds)
    if not args.widths and args.baseline is None:
        parser.error("nothing to do: --baseline DIR and/or --widths")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
