"""`segue provenance`: which model and settings made a .mid Segue wrote, and generating it again.

    segue provenance my-clip-continuation-2.mid
    segue provenance my-clip-continuation-2.mid --clip my-clip.mid            # reproduce it, note for note
    segue provenance take.mid --clip my-clip.mid --model models/my-band

Without --clip it prints the record in the file (engine/provenance.py). With --clip it checks that
this is the clip that was continued (its sha256), finds the model whose manifest has the recorded
sha256 (--model, or every folder of the models directory), generates the same variation again with
the recorded request and seed, and compares it with the file note for note. Exit status 0 when the
record is there (and, with --clip, the notes are identical), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from engine.clip import Arrangement, ClipError
from engine.generate import Generator, RequestError, VariationDone
from engine.locations import default_models_dir
from engine.manifest import ModelError
from engine.midi_file import read_tracks, write_tracks
from engine.provenance import Provenance, prompt_digest, read_provenance


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segue provenance", description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="a .mid that Segue wrote")
    p.add_argument("--clip", type=Path, help="the clip it continued: generate the continuation again and compare")
    p.add_argument("--model", type=Path, help="the model folder (default: the one in the models directory whose "
                                              "manifest matches the record)")
    p.add_argument("--models-dir", type=Path, default=None, help="where to look for the model (default: Segue's models directory)")
    return p


def describe(record: Provenance) -> list[str]:
    request = record.request
    search = (f"beam search, width {request['beam_width']}" if request["mode"] == "beam" else
              f"sampling: temperature {request['temperature']:g}, top-k {request['top_k']}, top-p {request['top_p']:g}")
    constraints = ", ".join(f"{k} {v}" for k, v in sorted(request["constraints"].items())) or "none"
    seed = record.seed if record.seed is not None else "- (beam search)"
    return [f"model: {record.model_name} (manifest sha256 {record.manifest_sha256}, {record.variant} weights)",
            f"training data fingerprint: {record.data_fingerprint or 'not recorded'}",
            f"variation {record.variation} of {request['variations']}, seed {seed}",
            f"request: {request['bars']} bars, {search}, stay with clip {request.get('stay_with_clip', 0):g}; "
            f"constraints: {constraints}",
            f"prompt clip sha256: {record.prompt_sha256} (tracks continued: {', '.join(str(t + 1) for t in record.continued)})"]


def find_model(record: Provenance, model: Path | None, models_dir: Path) -> Generator:
    """The generator of the model the record names, checked by its manifest's sha256."""
    candidates = [model] if model is not None else sorted(p for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    for folder in candidates:
        try:
            generator = Generator.load(folder, variant=record.variant)  # the file that wrote it, not this machine's choice
        except ModelError:
            continue
        if generator.manifest_sha256 == record.manifest_sha256:
            return generator
    where = str(model) if model is not None else f"any folder of {models_dir}"
    raise ModelError(f"the model that wrote this file (manifest sha256 {record.manifest_sha256[:12]}...) is not {where}")


def regenerate(record: Provenance, generator: Generator, prompt: Arrangement) -> list[VariationDone]:
    done = generator.generate(prompt, record.rebuilt_request())
    return sorted((d for d in done if d.variation == record.variation - 1), key=lambda d: d.track)


def notes_of(arrangement: Arrangement) -> list[list[tuple]]:
    return [sorted((n.pitch, n.velocity, n.start, n.duration) for n in track.notes) for track in arrangement.tracks]


def reproduce(args: argparse.Namespace, record: Provenance) -> int:
    prompt = read_tracks(args.clip)
    prompt = replace(prompt, continued=tuple(record.continued))
    prompt.validate()
    if prompt_digest(prompt) != record.prompt_sha256:
        print(f"error: {args.clip} is not the clip this file continued (its sha256 differs)", file=sys.stderr)
        return 1
    generator = find_model(record, args.model, args.models_dir or default_models_dir())
    again = regenerate(record, generator, prompt)
    with tempfile.TemporaryDirectory(prefix="segue-provenance-") as folder:
        # Through a file as the original went, so both sides carry the same tick rounding.
        path = write_tracks(Path(folder) / "again.mid", [d.clip for d in again])
        same = notes_of(read_tracks(path)) == notes_of(read_tracks(args.file))
    count = sum(len(d.clip.notes) for d in again)
    if same:
        print(f"reproduced note for note: {count} notes with {generator.decoder.folder}")
        return 0
    print(f"error: generated again, the continuation differs from {args.file} ({count} notes now); the file was "
          f"edited, or this machine's ONNX Runtime computes differently", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = read_provenance(args.file)
    except (OSError, ValueError, EOFError) as exc:  # mido raises these for missing or damaged files
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"{args.file} carries no Segue provenance record (not written by Segue, or the record was removed)")
        return 1
    print("\n".join(describe(record)))
    if args.clip is None:
        return 0
    try:
        return reproduce(args, record)
    except (ClipError, ModelError, RequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
