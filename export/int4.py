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

import dataclasses
from pathlib import Path

from engine.manifest import MODEL_FILE, Manifest, Variant, read_model_folder
from engine.variant_choice import INT4_VARIANT


def add_int4(folder: Path, val_data: Path | None = None, val_tokens: int = 50_000) -> Manifest:
    """Measure the int4 variant of `folder`'s int8 file and write it into the manifest with the serve choice
    made again here, atomically (export/folder_update.py). A signed folder comes out unsigned (its manifest
    changes): sign it again with `segue sign`."""
    from engine.session import OnnxDecoder
    from export.folder_update import update_model_folder, validation_set
    from export.quantize import INT4_WEIGHTS, choose_variant, every_run_on_decode_steps, speeds

    folder = Path(folder)
    manifest, files = read_model_folder(folder)
    int8 = manifest.variants.get("int8")
    if int8 is None:
        raise ValueError(f"{folder} has no int8 variant to read int4 decode steps from: export it with --quantize int8")
    if manifest.onnx.kv_cache != "shared-buffer":
        raise ValueError(f"{folder} has the older {manifest.onnx.kv_cache!r} graph; re-export it first "
                         "(python -m export.refresh FOLDER)")

    def update(stage: Path) -> Manifest:
        asked = dataclasses.replace(manifest, variants={**manifest.variants, INT4_VARIANT: Variant(int8.file, INT4_WEIGHTS)})
        fp32 = OnnxDecoder.from_bytes(stage, manifest, files[MODEL_FILE], threads=1, variant="fp32")
        int8_decoder = OnnxDecoder.from_bytes(stage, asked, b"", threads=1, variant="int8", files={int8.file: files[int8.file]})
        four = OnnxDecoder.from_bytes(stage, asked, b"", threads=1, variant=INT4_VARIANT, files={int8.file: files[int8.file]})
        if four.variant != INT4_VARIANT:
            raise RuntimeError("this CPU has no fast int4 kernel (AVX-512 VNNI or AVX2): int4 decode steps would not be "
                               "served here, so they are not measured here either")
        with every_run_on_decode_steps(four):
            int4_ppl, fp32_ppl, tokens, source = validation_set(stage, manifest, val_data, val_tokens).measure(fp32, four)
        if int4_ppl is None or fp32_ppl is None:
            raise ValueError("no validation data: the int4 variant is served only with its perplexity measured (pass "
                             "--val-data FOLDER of MIDI files the model was not trained on)")
        variant = Variant(int8.file, INT4_WEIGHTS, round(int4_ppl, 5), round(fp32_ppl, 5), tokens, source)
        timings = speeds({"fp32": fp32, "int8": int8_decoder, INT4_VARIANT: four})
        choice = choose_variant(timings, int8.perplexity_loss, variant.perplexity_loss)
        return dataclasses.replace(manifest, variants={**manifest.variants, INT4_VARIANT: variant}, serve=choice)

    return update_model_folder(folder, manifest, files, "int4", update)


def main(argv: list[str] | None = None) -> int:
    from export.folder_update import variant_command

    return variant_command(argv, "python -m export.int4", "Add the int4 variant (the int8 file's decode steps from int4 "
                           "weights) to a model folder, its validation perplexity next to fp32's, and choose again which "
                           "precision it serves.", add_int4, "added the int4 variant to {folder}")


if __name__ == "__main__":
    raise SystemExit(main())
