"""Pick a model shape by latency: time to first note of an 8-bar continuation of a dense 4-bar clip.

    python bench/bench_model_size.py --runs 7

Every candidate shape is built with random weights (latency does not depend on what the weights
learned, only on the shape, the context and how many tokens the prompt has), exported with
`export-onnx` exactly as a trained model would be, loaded as the server loads it, and timed side by
side in one run with the shipped default model (`--baseline`). The dense clips are the ones the
DAW-material issue names: a piano ostinato of 48 notes per bar (three-note chords on every
sixteenth) and a sixteenth-note drum groove with a bass line, 4 bars each. The table gives the
prompt length each model actually reads (a shorter context cuts the clip to its last bars), the
median time to first note, and its ratio to the baseline on the same clip.

    python bench/bench_model_size.py --models runs/models/default-v3 --clips docs/examples/*.mid

`--models` times trained model folders instead of random candidates (the same table), and `--clips`
adds `.mid` files (every track of a multi-track file is continued) to the two dense clips.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.clip import Arrangement, Clip, Note  # noqa: E402
from engine.generate import ContinuationRequest, Generator, NoteEvent  # noqa: E402
from engine.machine import cpu_name  # noqa: E402
from engine.midi_file import read_tracks  # noqa: E402
from engine.tokens import ClipTokenizer  # noqa: E402

CANDIDATES = {  # name: (layers, heads, d_model, d_ff)
    "small-6x256": (6, 8, 256, 1024),
    "5x256": (5, 8, 256, 1024),
    "4x256": (4, 8, 256, 1024),
    "4x192": (4, 6, 192, 768),
}


def ostinato() -> Clip:
    """48 notes per bar: a three-note chord on every sixteenth, with accents, 4 bars of 4/4."""
    chords = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)]
    notes = tuple(Note(p, 96 if step % 4 == 0 else 64 + 4 * (step % 3), bar * 4 + step * 0.25, 0.25)
                  for bar, chord in enumerate(chords) for step in range(16) for p in chord)
    return Clip(notes=notes, length=16.0, program=0)


def groove_with_bass() -> Arrangement:
    """Sixteenth hi-hats, kick and snare, and an eighth-note bass line: 4 bars, two tracks."""
    drums = []
    for bar in range(4):
        for step in range(16):
            t = bar * 4 + step * 0.25
            drums.append(Note(42, 70 + 20 * (step % 2 == 0), t, 0.125))
            if step in (0, 6, 8, 11):
                drums.append(Note(36, 110, t, 0.125))
            if step in (4, 12):
                drums.append(Note(38, 105, t, 0.125))
    bass = [Note([36, 36, 43, 41][bar] + (12 if step % 4 == 3 else 0), 90, bar * 4 + step * 0.5, 0.45)
            for bar in range(4) for step in range(8)]
    return Arrangement((Clip(notes=tuple(drums), length=16.0, is_drum=True, name="drums"),
                        Clip(notes=tuple(bass), length=16.0, program=33, name="bass")), (0, 1))


def build_candidate(shape: tuple[int, int, int, int], context: int, out: Path) -> Path:
    import torch

    from export.onnx_export import export_model
    from training.checkpoint import save_checkpoint
    from training.model import GPT, GPTConfig

    layers, heads, d_model, d_ff = shape
    torch.manual_seed(0)
    tokenizer = ClipTokenizer.default()
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=layers, n_head=heads, d_model=d_model,
                          d_ff=d_ff, max_context=context)).eval()
    folder = Path(tempfile.mkdtemp(dir=out))
    tokenizer.save(folder)
    save_checkpoint(folder / "random.safetensors", model, {"tokenizer": (folder / "tokenizer.json").read_text()})
    export_model(folder / "random.safetensors", out / f"model-{layers}x{d_model}-{context}")
    return out / f"model-{layers}x{d_model}-{context}"


def first_note_seconds(generator: Generator, clip, runs: int) -> float:
    request = ContinuationRequest(bars=8, variations=1, temperature=0.9, top_p=0.95, seed=1)
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        for event in generator.stream(clip, request):
            if isinstance(event, NoteEvent):
                if run:  # the first run warms caches and is not counted
                    times.append(time.perf_counter() - started)
                break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="trained model folders to time instead")
    parser.add_argument("--clips", type=Path, nargs="*", default=[], help="more clips (.mid) to time")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    clips = {"ostinato 48 notes/bar": ostinato(), "drums + bass, 16ths": groove_with_bass()}
    for path in args.clips:
        clips[path.name] = read_tracks(path)
    with tempfile.TemporaryDirectory(prefix="segue-size-") as work:
        models = {f"baseline ({args.baseline.name})": args.baseline}
        if args.models:
            models.update({f"{path.name} ({path})": path for path in args.models})
        else:
            for name in args.candidates:
                models[f"{name}, ctx {args.context}"] = build_candidate(CANDIDATES[name], args.context, Path(work))
        generators = {name: Generator.load(path, threads=args.threads) for name, path in models.items()}
        print(f"CPU: {cpu_name()}; time to first note of an 8-bar continuation, median of {args.runs}, {args.threads} thread(s)")
        print("| model | parameters | clip | prompt tokens (of clip) | first note (ms) | vs baseline |")
        print("|---|---|---|---|---|---|")
        baseline: dict[str, float] = {}
        for clip_name, clip in clips.items():
            for name, generator in generators.items():
                prompt, _ = generator.prompt_tokens(clip)
                whole = len(generator.tokenizer.encode_clip(clip))
                seconds = first_note_seconds(generator, clip, args.runs)
                baseline.setdefault(clip_name, seconds)
                params = generator.decoder.manifest.model.parameters
                print(f"| {name} | {params / 1e6:.2f} M | {clip_name} | {len(prompt)} ({whole}) | "
                      f"{seconds * 1000:.1f} | {seconds / baseline[clip_name]:.2f}x |")


if __name__ == "__main__":
    main()
