"""Where a token's time goes in `segue continue`: the model call, and everything the Generator does around it.

    python bench/bench_token_time.py                    # models/default, the 4-bar chorale, 8 bars
    python bench/bench_token_time.py --model FOLDER --clip docs/examples/reel.mid --runs 7

Three measurements of the same continuation (one variation, seed 0, the whole `Generator.generate`:
grammar masks, clip guidance, sampling, the note assembler, the KV cache's bindings):

* total: per generated token, the prompt's prefill included;
* model: the time inside ONNX Runtime's run calls (per token);
* replayed: the same continuation with every model call answered from the logits recorded on the
  first run, so no model runs: the Generator's own Python per token, with warm caches.

It also prints the model calls per token and how many of the row's guesses (Velocity, Duration,
Position: `Generator._guess`) came true.

"around the model" (total minus model) is larger than "replayed": each model call streams the
weights and the KV cache through the CPU's caches, and the Python code that follows finds its own
data evicted. Times are process CPU time, medians of `--runs`, runs of the two kinds alternated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.generate import ContinuationRequest, Generator  # noqa: E402
from engine.machine import cpu_name  # noqa: E402
from engine.midi_file import read_clip  # noqa: E402
from engine.session import OnnxDecoder  # noqa: E402


class TimedSession:
    """The decoder's ONNX Runtime session, with the time spent inside its run calls added up."""

    def __init__(self, session):
        self.session = session
        self.seconds = 0.0
        self.calls = 0

    def run_with_iobinding(self, binding, *args):
        started = time.process_time()
        self.calls += 1
        try:
            return self.session.run_with_iobinding(binding, *args)
        finally:
            self.seconds += time.process_time() - started

    def __getattr__(self, name):
        return getattr(self.session, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--clip", type=Path, default=ROOT / "docs" / "examples" / "chorale.mid")
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    generator = Generator.load(args.model, threads=1)
    decoder = generator.decoder
    clip = read_clip(args.clip)
    request = ContinuationRequest(bars=args.bars, variations=1, seed=0)

    recorded = []
    real_run = OnnxDecoder._run

    def recording_run(self, binding, ids, positions, session, *rest):  # rest: whatever else _run takes (last)
        logits = real_run(self, binding, ids, positions, session, *rest)
        recorded.append(logits.copy())
        return logits

    decoder._run = recording_run.__get__(decoder)  # type: ignore[method-assign]
    rows = []
    real_guess = Generator._guess

    def watched_guess(self, row, length):  # the row's record of its guesses, read after the run
        rows.append(row)
        return real_guess(self, row, length)

    Generator._guess = watched_guess  # type: ignore[method-assign]
    try:
        tokens = len(generator.generate(clip, request)[0].tokens)
    finally:
        Generator._guess = real_guess  # type: ignore[method-assign]
    del decoder._run  # the class's method again
    guessed = {kind: getattr(rows[-1], f"{kind.lower()}_guesses") for kind in ("Velocity", "Duration", "Position")} if rows else {}

    def replaying_run(self, binding, ids, positions, session, *rest):
        return replayed.pop(0).copy()

    timed = TimedSession(decoder.session)
    totals, models, replays = [], [], []
    for _ in range(args.runs):
        decoder.session = timed
        timed.seconds, timed.calls = 0.0, 0
        started = time.process_time()
        done = generator.generate(clip, request)[0]
        totals.append((time.process_time() - started) * 1000 / tokens)
        models.append(timed.seconds * 1000 / tokens)
        decoder.session = timed.session
        if len(done.tokens) != tokens:
            raise SystemExit(f"the continuation changed between runs ({len(done.tokens)} vs {tokens} tokens)")

        replayed = list(recorded)
        decoder._run = replaying_run.__get__(decoder)  # type: ignore[method-assign]
        started = time.process_time()
        again = generator.generate(clip, request)[0]
        replays.append((time.process_time() - started) * 1000 / tokens)
        del decoder._run
        if again.tokens != done.tokens:
            raise SystemExit("the replayed continuation differs from the real one")

    total, model, replay = (statistics.median(v) for v in (totals, models, replays))
    print(f"{args.model.name} ({decoder.variant}), {args.clip.name}, {args.bars} bars, one variation: {tokens} tokens; "
          f"{cpu_name()}, process CPU time, medians of {args.runs} runs\n")
    print("| per token | ms |")
    print("|---|---|")
    print(f"| total (prefill included) | {total:.3f} |")
    print(f"| model (ONNX Runtime run calls) | {model:.3f} |")
    print(f"| around the model (total - model) | {total - model:.3f} |")
    print(f"| replayed: the Generator alone, no model run | {replay:.3f} |")
    print(f"\nmodel calls: {timed.calls} for {tokens} tokens ({timed.calls / tokens:.2f} per token; the prompt's prefill "
          "in 64-position chunks included)")
    if guessed:
        print("guesses that came true: " + ", ".join(f"{kind} {g.right} of {g.made}" for kind, g in guessed.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
