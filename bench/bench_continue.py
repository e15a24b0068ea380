"""What `segue continue` does with a model: latency, throughput, and what the notes look like.

    python bench/bench_continue.py --model models/default --runs 5

For each bundled example clip: time to first note and total time (median over runs, model loaded
and warmed once, as the server does), tokens per second, and for the continuations the numbers a
musician would look at first: notes, pitch range, notes per bar, polyphony, distinct pitch classes,
compared side by side with the same numbers for the prompt clip itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from engine.clip import Clip
from engine.generate import ContinuationRequest, Generator, NoteEvent, VariationDone
from engine.midi_file import read_clip

ROOT = Path(__file__).resolve().parents[1]


def describe(clip: Clip, bars: int) -> dict:
    notes = clip.notes
    if not notes:
        return {"notes": 0, "range": "-", "per_bar": 0.0, "poly": 0.0, "pcs": 0, "repeats": 0.0}
    pitches = [n.pitch for n in notes]
    onsets = sorted({round(n.start, 4) for n in notes})
    poly = statistics.mean(sum(1 for n in notes if n.start <= t < n.end) for t in onsets)
    return {"notes": len(notes), "range": f"{min(pitches)}-{max(pitches)}", "per_bar": len(notes) / bars,
            "poly": poly, "pcs": len({p % 12 for p in pitches}), "repeats": repeated_bars(clip)}


def repeated_bars(clip: Clip) -> float:
    """Share of bars (after the first) whose notes (pitch and onset in the bar) equal the bar before:
    how much a continuation loops."""
    beats = clip.beats_per_bar
    bars: dict[int, set] = {}
    for n in clip.notes:
        bars.setdefault(int(n.start // beats), set()).add((n.pitch, round(n.start % beats, 3)))
    numbers = sorted(bars)
    pairs = list(zip(numbers, numbers[1:], strict=False))
    return sum(bars[a] == bars[b] for a, b in pairs) / len(pairs) if pairs else 0.0


def run_once(generator: Generator, clip: Clip, request: ContinuationRequest):
    started = time.perf_counter()
    first = None
    done = []
    for event in generator.stream(clip, request):
        if isinstance(event, NoteEvent) and first is None:
            first = time.perf_counter() - started
        elif isinstance(event, VariationDone):
            done.append(event)
    return first, time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--clips", type=Path, nargs="*", default=sorted((ROOT / "docs" / "examples").glob("*.mid")))
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--variations", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["sample", "beam"], default="sample", help="sampling or beam search")
    parser.add_argument("--beam-width", type=int, default=5)
    parser.add_argument("--stay-with-clip", type=float, nargs="+", default=[ContinuationRequest.stay_with_clip],
                        help="clip guidance strengths; several print one table each, measured in this one run")
    args = parser.parse_args()

    generator = Generator.load(args.model, threads=args.threads)
    generator.decoder.warm_up()
    for strength in args.stay_with_clip:
        print(f"model {args.model} | {args.bars} bars x {args.variations} variations | temperature {args.temperature} "
              f"top-p {args.top_p} | mode {args.mode} | stay with clip {strength:g} | {args.runs} runs | "
              f"{args.threads} thread(s)\n")
        table(generator, args, strength)
        print()


def table(generator: Generator, args: argparse.Namespace, strength: float) -> None:
    print("| clip | prompt tokens | first note p50 (ms) | total p50 (s) | tokens/s | notes | range | notes/bar "
          "| polyphony | pitch classes | bars repeating the one before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.clips:
        clip = read_clip(path)
        prompt, _ = generator.prompt_tokens(clip)
        firsts, totals, rates, looks = [], [], [], []
        for run in range(args.runs):
            request = ContinuationRequest(bars=args.bars, variations=args.variations, temperature=args.temperature,
                                          top_p=args.top_p, seed=run, mode=args.mode, beam_width=args.beam_width,
                                          stay_with_clip=strength)
            first, total, done = run_once(generator, clip, request)
            firsts.append(first if first is not None else float("nan"))
            totals.append(total)
            rates.append(sum(len(d.tokens) for d in done) / total)
            looks.extend(describe(d.clip, args.bars) for d in done)
        src = describe(clip, clip.bars)
        print(f"| {path.stem} (prompt) | {len(prompt)} | | | | {src['notes']} | {src['range']} | {src['per_bar']:.1f} | "
              f"{src['poly']:.2f} | {src['pcs']} | {src['repeats']:.2f} |")
        ranges = [look["range"] for look in looks]
        print(f"| {path.stem} (continuations) | | {statistics.median(firsts) * 1000:.1f} | {statistics.median(totals):.2f} | "
              f"{statistics.median(rates):.0f} | {statistics.mean(x['notes'] for x in looks):.1f} | "
              f"{ranges[0]} .. {ranges[-1]} | {statistics.mean(x['per_bar'] for x in looks):.1f} | "
              f"{statistics.mean(x['poly'] for x in looks):.2f} | {statistics.mean(x['pcs'] for x in looks):.1f} | "
              f"{statistics.mean(x['repeats'] for x in looks):.2f} |")


if __name__ == "__main__":
    main()
