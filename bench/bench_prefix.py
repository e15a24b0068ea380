"""A Continue of a clip that begins like one already prefilled: what reusing the kept prompt's first positions saves.

    python bench/bench_prefix.py                        # models/default, the bundled examples and a dense ostinato
    python bench/bench_prefix.py --model FOLDER --runs 21

A musician prepares or continues a clip, changes its last bar (or records one more, or accepts a
continuation into it) and presses Continue again. The new prompt begins like the kept one, and
`PrefillCache` lends it the positions they share, in whole steps of the decoder's `prefill_chunk`
(engine/prefill_cache.py): only the rest is prefilled. For each clip (the bundled examples cut to
4 bars, and bench_prepare's 4-bar ostinato of 48 notes a bar) and each change, in one process on one
thread, it times the `continue` of the changed clip from the request to its first streamed note
(`Generator.stream`, one variation, 8 bars, seed 0): cold (nothing kept) and with only the original
clip kept (prefilled beforehand, untimed, as its earlier prepare or continue left it). The two are
alternated run by run, so both see the same moment of a busy machine; medians of `--runs`, wall
time (one thread). The notes are the same either way (tests/test_prepare.py checks it bit for bit).

Changes: "last note edited" (the clip's last note a semitone higher), "one bar added" (the clip cut
to 3 bars kept, to 4 sent), "continuation accepted" (the clip's 8-bar continuation, as the
model wrote it, added to the clip; its prompt is cut to the context like any other).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_prepare import cpu_flags, ostinato  # noqa: E402
from bench_server import prompt_payload  # noqa: E402

from engine.clip import Clip  # noqa: E402
from engine.generate import ContinuationRequest, Generator, NoteEvent  # noqa: E402
from engine.machine import cpu_name  # noqa: E402
from engine.prefill_cache import PrefillCache  # noqa: E402
from plugin_bridge.protocol import parse_clip  # noqa: E402

CLIPS = ("chorale", "reel", "jig", "folksong")
REQUEST = ContinuationRequest(bars=8, variations=1, seed=0)


def last_note_edited(clip: Clip) -> Clip:
    notes = sorted(clip.notes, key=lambda n: (n.start, n.pitch))
    return replace(clip, notes=tuple(notes[:-1]) + (replace(notes[-1], pitch=notes[-1].pitch + 1),))


def with_continuation(generator: Generator, clip: Clip) -> Clip:
    continuation = generator.generate(clip, REQUEST)[0].clip  # its notes placed after the clip's
    assert clip.length is not None
    return replace(clip, notes=clip.notes + continuation.notes, length=clip.length + REQUEST.bars * clip.beats_per_bar)


def first_note_ms(generator: Generator, clip: Clip, prefills: PrefillCache | None,
                  request: ContinuationRequest = REQUEST) -> float:
    """Wall milliseconds from the request to its first streamed note."""
    started = time.perf_counter()
    for event in generator.stream(clip, request, prefills=prefills):
        if isinstance(event, NoteEvent):
            return (time.perf_counter() - started) * 1000
    raise RuntimeError("the continuation wrote no note")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--runs", type=int, default=15, help="runs per clip, change and side (median reported)")
    args = parser.parse_args()

    generator = Generator.load(args.model, threads=1)
    examples = {name: ROOT / "docs" / "examples" / f"{name}.mid" for name in CLIPS}
    # Each clip cut to 4 bars, and to its first 3 (what it was one recorded bar before).
    clips = {name: (parse_clip(prompt_payload(path, 4), name), parse_clip(prompt_payload(path, 3), name))
             for name, path in examples.items()}
    clips["ostinato"] = (parse_clip(ostinato(4), "ostinato"), parse_clip(ostinato(3), "ostinato"))
    print(f"{args.model} ({generator.decoder.variant}), runs of {args.runs}; {cpu_name()} ({cpu_flags()}), one thread, "
          "wall time, medians; first note of an 8-bar continue of the changed clip")
    print()
    print("| clip | change | prompt tokens | reused | first note cold (ms) | with the original kept (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (clip, three_bars) in clips.items():
        changes = {"last note edited": (clip, last_note_edited(clip)),
                   "one bar added": (three_bars, clip),
                   "continuation accepted": (clip, with_continuation(generator, clip))}
        for change, (original, changed) in changes.items():
            cold, warm = [], []
            lender = PrefillCache()
            generator.prefill(original, lender)
            changed_prompt = generator.prefill(changed, lender)  # its prompt, and how much of it the original lends
            for _ in range(args.runs):
                cold.append(first_note_ms(generator, changed, None))
                prefills = PrefillCache()
                generator.prefill(original, prefills)
                warm.append(first_note_ms(generator, changed, prefills))
            c, w = statistics.median(cold), statistics.median(warm)
            tokens, reused = len(changed_prompt.ids), changed_prompt.prefix_reused
            print(f"| {name} | {change} | {tokens} | {reused} | {c:.1f} | {w:.1f} | {c / w:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
