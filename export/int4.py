"""Add the int4 variant to a model folder exported without it (before it existed, or on a CPU without the int4 kernel).

    python -m export.int4 models/default --val-data DIR

The int4 variant is the int8 file with its decode steps read from its weights quantized again to int4 at
load (engine/native_matmul4_kernel.h): no new file. What changes is the manifest: the `int4` variant, its
validation perplexity next to fp32's on the same tokens (every position on the int4 weights, as
`export-onnx --quantize int8` measures it), and the `serve` choice made again with all three precisions
timed here (engine/variant_choice.py's rule). The other variants keep the figures they were measured
with: each variant's loss is against fp32 on its own tokens, which its `val_source` names, so a folder
whose training data is gone can still have int4 measured on other held-out music.

Why a command of its own: the shipped default was exported before int4 decode steps existed, from data
that is no longer at hand, and re-exporting would change its int8 file's bytes for nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from engine.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest, ModelError, Variant, read_model_folder
from engine.variant_choice import INT4_VARIANT


def add_int4(folder: Path, val_data: Path | None = None, val_tokens: int = 50_000) -> Manifest:
    """Measure the int4 variant of `folder`'s int8 file and write it into the manifest with the serve choice
    made again here, atomically (the folder is staged next to itself and swapped in). A signed folder comes
    out unsigned (its manifest changes): sign it again with `segue sign`."""
    from engine.session import OnnxDecoder
    from export.onnx_export import _swap_in
    from export.quantize import INT4_WEIGHTS, ValidationSet, choose_variant, every_run_on_decode_steps, speeds

    folder = Path(folder)
    manifest, files = read_model_folder(folder)
    int8 = manifest.variants.get("int8")
    if int8 is None:
        raise ValueError(f"{folder} has no int8 variant to read int4 decode steps from: export it with --quantize int8")
    if manifest.onnx.kv_cache != "shared-buffer":
        raise ValueError(f"{folder} has the older {manifest.onnx.kv_cache!r} graph; re-export it first "
                         "(python -m export.refresh FOLDER)")
    training = manifest.training
    if val_data is None and training.data_source:
        val_data = Path(training.data_source).expanduser()
    exclude = frozenset(training.excluded.hashes) if training.excluded else frozenset()
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.int4-", dir=folder.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        for name in manifest.files:
            (stage / name).write_bytes(files[name])
        asked = dataclasses.replace(manifest, variants={**manifest.variants, INT4_VARIANT: Variant(int8.file, INT4_WEIGHTS)})
        fp32 = OnnxDecoder.from_bytes(stage, manifest, files[MODEL_FILE], threads=1, variant="fp32")
        int8_decoder = OnnxDecoder.from_bytes(stage, asked, b"", threads=1, variant="int8", files={int8.file: files[int8.file]})
        four = OnnxDecoder.from_bytes(stage, asked, b"", threads=1, variant=INT4_VARIANT, files={int8.file: files[int8.file]})
        if four.variant != INT4_VARIANT:
            raise RuntimeError("this CPU has no fast int4 kernel (AVX-512 VNNI or AVX2): int4 decode steps would not be "
                               "served here, so they are not measured here either")
        validation = ValidationSet(stage, val_data, training.val_fraction or 0.05, val_tokens, exclude)
        with every_run_on_decode_steps(four):
            int4_ppl, fp32_ppl, tokens, source = validation.measure(fp32, four)
        if int4_ppl is None or fp32_ppl is None:
            raise ValueError(f"no validation data in {val_data or 'the manifest'}: the int4 variant is served only with its "
                             "perplexity measured (pass --val-data FOLDER of MIDI files the model was not trained on)")
        variant = Variant(int8.file, INT4_WEIGHTS, round(int4_ppl, 5), round(fp32_ppl, 5), tokens, source)
        timings = speeds({"fp32": fp32, "int8": int8_decoder, INT4_VARIANT: four})
        choice = choose_variant(timings, int8.perplexity_loss, variant.perplexity_loss)
        updated = dataclasses.replace(manifest, variants={**manifest.variants, INT4_VARIANT: variant}, serve=choice)
        (stage / MANIFEST_FILE).write_text(updated.to_json())
        read_model_folder(stage)  # the manifest as written reads back, with every file's hash
        if (folder / SIGNATURE_FILE).exists():
            print(f"note: {folder} was signed; its manifest changed, so it comes out unsigned: sign it again with "
                  "`segue sign`", file=sys.stderr)
        _swap_in(stage, folder)
        return updated
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from export.onnx_export import report_variants

    p = argparse.ArgumentParser(prog="python -m export.int4", description="Add the int4 variant (the int8 file's decode "
                                "steps from int4 weights) to a model folder, its validation perplexity next to fp32's, "
                                "and choose again which precision it serves.")
    p.add_argument("folder", type=Path, help="a model folder with the int8 variant, e.g. models/default")
    p.add_argument("--val-data", type=Path, metavar="FOLDER", help="validation data (default: the manifest's training data)")
    p.add_argument("--val-tokens", type=int, default=50_000)
    args = p.parse_args(argv)
    try:
        manifest = add_int4(args.folder, args.val_data, args.val_tokens)
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"added the int4 variant to {args.folder}")
    report_variants(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
