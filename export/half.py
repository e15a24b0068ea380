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

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from engine.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    Manifest,
    ModelError,
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
    the `serve` choice unchanged), atomically: the folder is staged next to itself and swapped in. A
    signed folder comes out unsigned (its manifest changes): sign it again with `segue sign`."""
    from engine.session import OnnxDecoder
    from export.onnx_export import _swap_in
    from export.quantize import ValidationSet

    folder = Path(folder)
    manifest, files = read_model_folder(folder)
    if manifest.onnx.kv_cache != "shared-buffer":
        raise ValueError(f"{folder} has the older {manifest.onnx.kv_cache!r} graph; re-export it first "
                         "(python -m export.refresh FOLDER --fp16)")
    training = manifest.training
    if val_data is None and training.data_source:
        val_data = Path(training.data_source).expanduser()
    exclude = frozenset(training.excluded.hashes) if training.excluded else frozenset()
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.fp16-", dir=folder.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        for name in manifest.files:
            if name != FP16_MODEL_FILE:
                (stage / name).write_bytes(files[name])
        fp32 = OnnxDecoder.from_bytes(stage, manifest, files[MODEL_FILE], threads=1, variant="fp32")
        validation = ValidationSet(stage, val_data, training.val_fraction or 0.05, val_tokens, exclude)
        variant = fp16_variant(stage, manifest, fp32, validation)
        updated = dataclasses.replace(manifest, variants={**manifest.variants, "fp16": variant},
                                      files={**manifest.files, FP16_MODEL_FILE: sha256_file(stage / FP16_MODEL_FILE)})
        (stage / MANIFEST_FILE).write_text(updated.to_json())
        if (folder / SIGNATURE_FILE).exists():
            print(f"note: {folder} was signed; its manifest changed, so it comes out unsigned: sign it again with "
                  "`segue sign`", file=sys.stderr)
        _swap_in(stage, folder)
        return updated
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def main(argv: list[str] | None = None) -> int:
    from export.onnx_export import report_variants

    p = argparse.ArgumentParser(prog="python -m export.half", description="Add the fp16 variant (model.fp16.onnx, for "
                                "the CUDA execution provider) to a model folder, its validation perplexity next to fp32's.")
    p.add_argument("folder", type=Path, help="a model folder, e.g. models/default")
    p.add_argument("--val-data", type=Path, metavar="FOLDER", help="validation data (default: the manifest's training data)")
    p.add_argument("--val-tokens", type=int, default=50_000)
    args = p.parse_args(argv)
    try:
        manifest = add_fp16(args.folder, args.val_data, args.val_tokens)
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.folder / FP16_MODEL_FILE}")
    report_variants(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
