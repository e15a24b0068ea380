"""`export-onnx --fp16`: the float16 variant, for the CUDA execution provider.

    python -m export.half models/default     # add model.fp16.onnx to a folder (perplexity measured, manifest updated)
    convert_fp16(folder / "model.onnx", folder / "model.fp16.onnx")

ONNX Runtime's CUDA GroupQueryAttention kernel is registered for float16 and bfloat16 only, and the
int8 variant's quantized MatMuls are CPU kernels: served through CUDA, either of the CPU's graphs
would run its attention (or its matmuls) on the CPU and carry the cache across the bus at every
layer of every step. model.fp16.onnx holds the weights, the activations and the KV cache in float16
(onnxruntime.transformers.float16, the converter ONNX Runtime ships for its own transformer graphs),
with the same inputs, outputs and cache layout as model.onnx; only the logits stay float32, so
sampling reads them as before. The engine serves it on a GPU (engine/variant_choice.choose_for_gpu);
on a CPU it runs too (how its perplexity is measured here, and how the tests check it), but no faster
than fp32, so a CPU never chooses it. Its validation perplexity stands next to fp32's in the manifest,
measured on the same tokens as int8's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.manifest import (
    MODEL_FILE,
    Manifest,
    Variant,
    read_model_folder,
    sha256_file,
)

FP16_MODEL_FILE = "model.fp16.onnx"
WEIGHTS = ("fp16 (onnxruntime.transformers.float16: weights, activations and the KV cache in float16, logits float32; "
           "for the CUDA execution provider)")


def convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=["logits"])
    onnx.save(half, str(target))


def fp16_variant(stage: Path, staged: Manifest, fp32, validation) -> Variant:
    """Convert the staged model.onnx and measure the fp16 graph's validation perplexity next to fp32's on
    `validation` (a quantize.ValidationSet: int8's tokens when the export writes both), on this CPU."""
    from engine.session import OnnxDecoder

    convert_fp16(stage / MODEL_FILE, stage / FP16_MODEL_FILE)
    graph = (stage / FP16_MODEL_FILE).read_bytes()
    with_variant = dataclasses.replace(staged, variants={**staged.variants, "fp16": Variant(FP16_MODEL_FILE, WEIGHTS)})
    # Loaded (and warmed up) even when nothing is measured: a graph ONNX Runtime cannot run is refused here.
    fp16 = OnnxDecoder.from_bytes(stage, with_variant, b"", threads=1, variant="fp16", files={FP16_MODEL_FILE: graph})
    ppl, reference, tokens, source = validation.measure(fp32, fp16)
    return Variant(FP16_MODEL_FILE, WEIGHTS, _round(ppl), _round(reference), tokens or None, source)


def add_fp16(folder: Path, val_data: Path | None = None, val_tokens: int = 50_000) -> Manifest:
    """Add model.fp16.onnx to a model folder whose other files stay as they are (their bytes, hashes and
    the `serve` choice unchanged), atomically (export/folder_update.py). A signed folder comes out unsigned
    (its manifest changes): sign it again with `segue sign`."""
    from engine.session import OnnxDecoder
    from export.folder_update import update_model_folder, validation_set

    folder = Path(folder)
    manifest, files = read_model_folder(folder)
    if manifest.onnx.kv_cache != "shared-buffer":
        raise ValueError(f"{folder} has the older {manifest.onnx.kv_cache!r} graph; re-export it first "
                         "(python -m export.refresh FOLDER --fp16)")

    def update(stage: Path) -> Manifest:
        fp32 = OnnxDecoder.from_bytes(stage, manifest, files[MODEL_FILE], threads=1, variant="fp32")
        variant = fp16_variant(stage, manifest, fp32, validation_set(stage, manifest, val_data, val_tokens))
        return dataclasses.replace(manifest, variants={**manifest.variants, "fp16": variant},
                                   files={**manifest.files, FP16_MODEL_FILE: sha256_file(stage / FP16_MODEL_FILE)})

    return update_model_folder(folder, manifest, files, "fp16", update, leave_out=frozenset({FP16_MODEL_FILE}))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def main(argv: list[str] | None = None) -> int:
    from export.folder_update import variant_command

    return variant_command(argv, "python -m export.half", "Add the fp16 variant (model.fp16.onnx, for the CUDA execution "
                           "provider) to a model folder, its validation perplexity next to fp32's.", add_fp16,
                           f"wrote {{folder}}/{FP16_MODEL_FILE}")


if __name__ == "__main__":
    raise SystemExit(main())
