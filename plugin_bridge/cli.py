"""The `segue` command: one entry point, one subcommand per job.

    segue continue CLIP.mid --bars 8 --variations 3 --temperature 0.9 --seed 7 --out DIR
    segue train --preset small --out runs/default
    segue export-onnx runs/default/best.safetensors --out models/my-model

Subcommands that need PyTorch import it only when they run, so `segue continue` starts fast and
works on a machine with only the runtime installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.locations import default_model_dir
from plugin_bridge.options import add_continuation_args, continuation_options, read_arrangement


def _continue_parser(sub) -> None:
    p = sub.add_parser(
        "continue",
        help="continue a MIDI clip in the style of the model",
        description="Continue a MIDI clip: writes one .mid per variation, each holding the new bars placed "
                    "right after the end of your clip (drop it on the clip's start and it lines up).",
    )
    add_continuation_args(p)
    p.add_argument("--out", type=Path, default=Path("segue-out"), help="folder for the .mid files (default ./segue-out)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: models/default, or $SEGUE_MODEL)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default 1, leaves cores to your DAW)")
    p.add_argument("--render", action="store_true", help="also render each .mid to a .wav beside it with FluidSynth "
                   "(as `segue render` does), to listen without a DAW")
    p.set_defaults(run=run_continue)


def run_continue(args) -> int:
    try:
        from engine.clip import ClipError
        from engine.constraints import Constraints
        from engine.generate import ContinuationRequest, Generator, NoteEvent, RequestError, VariationDone
        from engine.manifest import ModelError, load_manifest
        from engine.midi_file import write_tracks
        from engine.provenance import Provenance
    except ImportError as exc:
        return _missing(exc)

    model_dir = args.model or default_model_dir()
    try:
        options = continuation_options(args)
        constraints = Constraints.from_dict(options.pop("constraints", {}))
        request = ContinuationRequest.from_options(load_manifest(model_dir).search, constraints=constraints, **options)
    except (RequestError, ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        clip = read_arrangement(args.clip, args.track)
        loaded = time.perf_counter()
        generator = Generator.load(model_dir, threads=args.threads)
        generator.decoder.warm_up()
        load_seconds = time.perf_counter() - loaded
        started = time.perf_counter()
        first_note = None
        finished: list = []
        for event in generator.stream(clip, request):
            if isinstance(event, NoteEvent) and first_note is None:
                first_note = time.perf_counter() - started
            elif isinstance(event, VariationDone):
                finished.append(event)
        total = time.perf_counter() - started
    except (ClipError, RequestError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = generator.decoder.manifest
    stem = args.clip.stem
    print(f"model: {model_dir} ({manifest.name or model_dir.name}, {(manifest.model.parameters or 0) / 1e6:.1f} M parameters)")
    print(f"clip: {args.clip} ({clip.notes} notes, {clip.bars} bars of {clip.time_signature[0]}/{clip.time_signature[1]} "
          f"at {clip.tempo:g} BPM)")
    if len(clip.tracks) > 1:
        for index, track in enumerate(clip.tracks):
            role = "continued" if index in clip.continued else "context"
            print(f"  track {index + 1}: {track.name} ({'drums' if track.is_drum else f'program {track.program}'}, "
                  f"{len(track.notes)} notes, {role})")
    tokens = 0
    for number in range(1, request.variations + 1):
        tracks = sorted((d for d in finished if d.variation == number - 1), key=lambda d: d.track)
        name = f"Segue continuation {number} of {request.variations}" + (f" (seed {request.seed})" if request.seed is not None else "")
        names = [name] if len(clip.tracks) == 1 else [f"{d.clip.name}: {name}" for d in tracks]
        record = Provenance.of(generator.manifest_sha256, manifest, request, tracks[0].seed if tracks else None, number, clip,
                               generator.decoder.variant)
        path = write_tracks(args.out / f"{stem}-continuation-{number}.mid", [d.clip for d in tracks], names, provenance=record)
        tokens += sum(len(d.tokens) for d in tracks)
        notes = sum(len(d.clip.notes) for d in tracks)
        print(f"  {path}  ({notes} notes" + (f" in {len(tracks)} tracks)" if len(tracks) > 1 else ")"))
        if args.render and notes:  # an empty continuation renders to silence, which render_midi refuses
            from engine.render import RenderError, render_midi

            try:
                rendered = render_midi(path)
            except RenderError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"  {rendered.path}  ({rendered.seconds:.1f} s of audio)")
    first = f"{first_note * 1000:.0f} ms" if first_note is not None else "no notes"
    print(f"time to first note: {first}; total: {total:.2f} s for {request.bars} bars x {request.variations} "
          f"({tokens / total:.0f} tokens/s); model load {load_seconds:.2f} s")
    return 0


# Subcommands whose own parser lives in their module (some need torch, imported only when used).
PASSTHROUGH = {
    "serve": ("plugin_bridge.server", "run the generation server for plugins and DAW scripts (OSC + ZeroMQ)"),
    "client": ("plugin_bridge.client", "talk to a running server: continue a clip, ping, hello"),
    "train": ("training.train", "train a model from scratch on the built-in corpus or a MIDI folder"),
    "finetune": ("training.finetune", "fine-tune a model on a folder of MIDI files (your catalogue, an artist's)"),
    "eval": ("training.evaluate", "measure how well a model continues held-out clips in their style, with a report"),
    "eval-tracks": ("training.daw_eval", "per-track DAW measures of a band's continuation on held-out multi-track MIDI"),
    "render": ("engine.render", "render a .mid file to audio with FluidSynth and a General MIDI soundfont"),
    "export-onnx": ("export.onnx_export", "turn a training checkpoint into a model folder Segue can serve"),
    "provenance": ("plugin_bridge.provenance_cli", "say which model and settings made a .mid Segue wrote; reproduce it"),
    "sign": ("plugin_bridge.signing_cli:sign_main", "sign a model folder with your key (OpenSSF model-signing)"),
    "verify": ("plugin_bridge.signing_cli:verify_main", "check a model folder's hashes and signature"),
    "keys": ("plugin_bridge.zmq_curve", "make a CURVE key pair so only your clients can use the ZeroMQ transport"),
}


TRAINING_PACKAGES = ("torch", "onnx", "onnxscript", "safetensors", "music21", "tqdm", "tensorboard")


def _missing(exc: ImportError) -> int:
    """One line naming the package a command needs and the install command that brings it."""
    hint = "pip install -e '.[cpu,train]' torch==2.13.0" if exc.name in TRAINING_PACKAGES else "pip install -e '.[cpu]'"
    print(f"error: this command needs {exc.name}, which is not installed: {hint}", file=sys.stderr)
    return 1


def _run_module(module: str, argv: list[str]) -> int:
    """Run `module`'s main(argv), or the function named after a colon (`module:function`)."""
    import importlib

    module, _, function = module.partition(":")
    try:
        entry = importlib.import_module(module)
    except ImportError as exc:
        return _missing(exc)
    return getattr(entry, function or "main")(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segue",
        description="Segue: continue MIDI clips in style with a model trained on music you choose.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _continue_parser(sub)
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; parsed by its own module
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return _run_module(PASSTHROUGH[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


def export_onnx_main() -> int:
    """The `export-onnx` console script."""
    return _run_module(PASSTHROUGH["export-onnx"][0], sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
