"""`export-onnx`: a training checkpoint -> a verified model folder the engine can serve.

    export-onnx runs/default/best.safetensors --out models/default
    export-onnx runs/default/best.safetensors --out models/default --quantize int8   # + model.int8.onnx

Writes `model.onnx` (KV-cache inputs and outputs), `tokenizer.json` and `manifest.json` into OUT,
after checking that ONNX Runtime reproduces the torch logits within 1e-4 for a prefill and for
several cached decode steps, through the plain past/present interface and through the engine's
own shared-buffer cache. A folder that fails the parity check is not written. Writing is
staged in a sibling temp folder and swapped in at the end, so a running server never sees a
half-written model.

The graph's attention is ONNX Runtime's GroupQueryAttention (export/gqa.py), so the engine keeps
one preallocated cache buffer per layer bound as both past and present (`onnx.kv_cache` =
"shared-buffer"); `--kv-cache concat` writes the older plain graph. `--quantize int8` adds the
dynamically quantized variant with its validation perplexity beside the fp32 model's, measures
both here and records which one the engine serves (export/quantize.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.manifest import (
    INT8_MODEL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    TOKENIZER_FILE,
    Manifest,
    ModelError,
    OnnxSignature,
    Parity,
    ServeChoice,
    Variant,
    kv_names,
    sha256_file,
)
from training.checkpoint import CheckpointError, load_checkpoint
from training.model import GPT
from training.parity import logit_gaps

PARITY_TOLERANCE = 1e-4


class _FlatKV(torch.nn.Module):
    """The GPT with flat tensor inputs/outputs, as ONNX needs them."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *flat_past):
        pasts = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(len(flat_past) // 2)]
        logits, presents = self.model(input_ids, position_ids, pasts)
        flat = [t for pair in presents for t in pair]
        return (logits, *flat)


def export_graph(model: GPT, path: Path, kv_cache: str = "shared-buffer") -> str:
    """Write the graph; returns its cache kind ("shared-buffer" unless asked for "concat" or the head
    size rules GroupQueryAttention out)."""
    from export import gqa

    cfg = model.cfg
    if kv_cache == "shared-buffer" and not gqa.supports(cfg):
        print(f"note: head size {cfg.head_dim} is not a multiple of 8; exporting the plain concat cache", file=sys.stderr)
        kv_cache = "concat"
    wrapper = gqa.SharedKV(model) if kv_cache == "shared-buffer" else _FlatKV(model)
    translations = gqa.translation_table() if kv_cache == "shared-buffer" else None
    past_names, present_names = kv_names(cfg.n_layer)
    # Example sizes other than 0 and 1, so the exporter keeps the dimensions symbolic.
    batch, steps, past = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (batch, steps))
    positions = torch.arange(past, past + steps).unsqueeze(0).expand(batch, steps).contiguous()
    kv = [torch.randn(batch, cfg.n_head, past, cfg.head_dim) for _ in past_names]
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    seq_dim = torch.export.Dim("sequence", min=1, max=cfg.max_context)
    past_dim = torch.export.Dim("past", min=0, max=cfg.max_context)
    dynamic = {"input_ids": {0: batch_dim, 1: seq_dim}, "position_ids": {0: batch_dim, 1: seq_dim},
               "flat_past": tuple({0: batch_dim, 2: past_dim} for _ in past_names)}
    # The exporter logs a warning per torchvision op it cannot find; torchvision is irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # The exporter narrates its own symbolic-shape bookkeeping; none of it is actionable here.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper.eval(), (ids, positions, *kv), None, dynamo=True, dynamic_shapes=dynamic,
            input_names=["input_ids", "position_ids", *past_names], output_names=["logits", *present_names],
            optimize=True, verbose=False, custom_translation_table=translations,
        )
    program.save(str(path), external_data=False)
    return kv_cache


def check_parity(model: GPT, onnx_path: Path, seed: int = 0, decode_steps: int = 4) -> Parity:
    """Largest |onnx - torch| logit difference for a prefill and cached decode steps."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    prefill, decode = logit_gaps(model, session, seed, decode_steps)
    return Parity(prefill, decode, decode_steps, PARITY_TOLERANCE, max(prefill, decode) <= PARITY_TOLERANCE)


def check_engine_parity(model: GPT, decoder, seed: int = 0, decode_steps: int = 4) -> float:
    """Largest |engine - torch| logit gap through the engine's own session and cache (for a shared-buffer
    graph: the buffers bound as past and present), on a batch of two, with a row selection on the way."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    batch, length = 2, int(rng.integers(4, max(5, min(48, cfg.max_context - decode_steps - 1))))
    ids = rng.integers(0, cfg.vocab_size, (batch, length))
    gaps = []
    model.eval()
    with torch.no_grad():
        past = model.empty_past(batch)
        cache = decoder.empty_cache(batch)
        position = 0
        for step in range(decode_steps + 1):
            steps = ids.shape[1]
            pos = torch.arange(position, position + steps).expand(ids.shape[0], steps)
            expected, past = model(torch.from_numpy(ids), pos, past)
            logits, cache = decoder.forward(ids, cache)
            gaps.append(float(np.abs(logits - expected.numpy()).max()))
            position += steps
            if step == 1:  # beam search and finished variations reorder and duplicate rows
                rows = [1, 0, 1]
                past = [(k[rows], v[rows]) for k, v in past]
                cache = cache.select(rows)
            ids = rng.integers(0, cfg.vocab_size, (cache.batch, 1))
    return max(gaps)


def build_manifest(model: GPT, meta: dict[str, str], name: str, parity: Parity, checkpoint_sha256: str, opset: int,
                   files: dict[str, str], kv_cache: str = "concat", variants: dict[str, Variant] | None = None,
                   serve: ServeChoice | None = None) -> Manifest:
    """The one place a manifest is made: the checkpoint's own metadata says where the model came from."""
    cfg = model.cfg
    past_names, present_names = kv_names(cfg.n_layer)

    def number(key: str) -> float | None:
        return float(meta[key]) if key in meta else None

    def record(key: str) -> dict | None:
        return json.loads(meta[key]) if key in meta else None

    steps = int(meta["step"]) if "step" in meta else None
    data = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
                  "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "max_context": cfg.max_context,
                  "parameters": model.num_parameters(), "preset": meta.get("preset")},
        "onnx": {"inputs": ["input_ids", "position_ids", *past_names], "outputs": ["logits", *present_names],
                 "past_inputs": past_names, "present_outputs": present_names, "opset": opset, "kv_cache": kv_cache,
                 "kv_layout": ("[batch, heads, sequence, head_dim] per layer; presents = pasts + new positions, "
                               "or, given a past buffer longer than the history (its length from position_ids), "
                               "that buffer with the new positions written in place" if kv_cache == "shared-buffer"
                               else OnnxSignature.kv_layout)},
        "source_checkpoint_sha256": checkpoint_sha256,
        # The split rule's fraction and what --exclude left out: with the data source and
        # fingerprint they pin exactly which pieces trained the model, and which did not.
        "training": {"data_fingerprint": meta.get("data_fingerprint"), "data_source": meta.get("data_source"),
                     "steps": steps, "train_tokens": int(meta["train_tokens"]) if "train_tokens" in meta else None,
                     "programs": record("programs"), "val_fraction": number("val_fraction"), "excluded": record("excluded")},
        "metrics": {"val_loss": number("val_loss"), "val_perplexity": number("val_perplexity")},
        "parity": dataclasses.asdict(parity),
        "variants": {key: dataclasses.asdict(v) for key, v in (variants or {}).items()},
        "serve": dataclasses.asdict(serve) if serve is not None else None,
        "files": files,
        # A fine-tuned checkpoint names what it started from and what it learned (segue finetune).
        "base_model": record("base_model"),
        "finetune": None if "finetune" not in meta else {
            **json.loads(meta["finetune"]), "steps": steps, "val_perplexity": number("val_perplexity"),
            "base_val_perplexity": number("base_val_perplexity")},
    }
    return Manifest.from_dict(data, "the exported manifest")


def export_model(checkpoint: Path, out: Path, name: str | None = None, sign_key: Path | None = None,
                 quantize: str | None = None, val_data: Path | None = None, val_tokens: int = 50_000,
                 kv_cache: str = "shared-buffer", fp16: bool = False) -> Manifest:
    """Export, check parity, add the int8 variant when asked, sign the staged folder when `sign_key` is
    given, write the folder atomically (a running server never sees it unsigned). Returns the manifest
    it wrote."""
    model, meta, _ = load_checkpoint(checkpoint)
    if "tokenizer" not in meta:
        raise CheckpointError(f"{checkpoint} does not carry its tokenizer; it was not written by `segue train`")
    if val_data is None and meta.get("data_source"):
        val_data = Path(meta["data_source"]).expanduser()
    val_fraction = float(meta.get("val_fraction", 0.05))
    exclude = frozenset(json.loads(meta["excluded"]).get("hashes", [])) if meta.get("excluded") else frozenset()

    def manifest_for(stage: Path, kind: str, parity: Parity, files: dict[str, str], variants=None, serve=None) -> Manifest:
        return build_manifest(model, meta, name or Path(out).name, parity, sha256_file(checkpoint), _opset(stage / MODEL_FILE),
                              files, kind, variants, serve)

    def write_tokenizer(stage: Path) -> None:
        (stage / TOKENIZER_FILE).write_text(meta["tokenizer"])

    return export_folder(model, out, write_tokenizer, manifest_for, sign_key, quantize, val_data, val_fraction, val_tokens,
                         kv_cache, exclude, fp16=fp16)


def export_folder(model: GPT, out: Path, write_tokenizer, manifest_for, sign_key: Path | None, quantize: str | None,
                  val_data: Path | None, val_fraction: float, val_tokens: int, kv_cache: str = "shared-buffer",
                  val_exclude: frozenset[str] = frozenset(), verify=None, fp16: bool = False) -> Manifest:
    """The staged export shared by `export_model` (from a checkpoint) and export/refresh.py (from a model
    folder): graph, parity (plain and engine), optional int8 and fp16 variants, manifest, signature, swap.
    `verify(decoder)` may refuse the staged fp32 model (raise) before anything is written to OUT."""
    from engine.session import OnnxDecoder

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        kind = export_graph(model, stage / MODEL_FILE, kv_cache)
        if fp16 and kind != "shared-buffer":
            raise ValueError("--fp16 needs the shared-buffer graph (its GroupQueryAttention is the node CUDA runs in "
                             f"float16); this model was exported with the {kind!r} graph")
        write_tokenizer(stage)
        parity = check_parity(model, stage / MODEL_FILE)
        if not parity.passed:
            raise RuntimeError(f"ONNX Runtime logits differ from torch by {parity.max_abs_diff:.2e} "
                               f"(tolerance {PARITY_TOLERANCE:g}); the model was not exported")
        files = {f: sha256_file(stage / f) for f in (MODEL_FILE, TOKENIZER_FILE)}
        staged = manifest_for(stage, kind, parity, files)
        fp32 = OnnxDecoder.from_bytes(stage, staged, (stage / MODEL_FILE).read_bytes(), threads=1, variant="fp32")
        engine_gap = check_engine_parity(model, fp32)
        parity = dataclasses.replace(parity, max_abs_diff_engine=engine_gap, passed=engine_gap <= PARITY_TOLERANCE)
        if not parity.passed:
            raise RuntimeError(f"the engine's cached session differs from torch by {engine_gap:.2e} "
                               f"(tolerance {PARITY_TOLERANCE:g}); the model was not exported")
        if verify is not None:
            verify(fp32)
        variants, serve = {}, None
        if quantize is not None or fp16:
            from export.quantize import ValidationSet

            validation = ValidationSet(stage, val_data, val_fraction, val_tokens, val_exclude)
        if quantize == "int8":
            quantized, serve = int8_variant(stage, staged, fp32, validation)
            variants.update(quantized)
            files[INT8_MODEL_FILE] = sha256_file(stage / INT8_MODEL_FILE)
        elif quantize is not None:
            raise ValueError(f"unknown quantization {quantize!r} (int8 is the one there is)")
        if fp16:
            from export.half import FP16_MODEL_FILE, fp16_variant

            variants["fp16"] = fp16_variant(stage, staged, fp32, validation)
            files[FP16_MODEL_FILE] = sha256_file(stage / FP16_MODEL_FILE)
        manifest = manifest_for(stage, kind, parity, files, variants, serve)
        (stage / MANIFEST_FILE).write_text(manifest.to_json())
        if sign_key is not None:
            from engine.signing import sign_folder

            sign_folder(stage, sign_key)
        _swap_in(stage, out)
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def int8_variant(stage: Path, staged: Manifest, fp32, validation) -> tuple[dict[str, Variant], ServeChoice]:
    """Quantize the staged model.onnx, measure both precisions' validation perplexity on the same
    tokens (`validation`, a quantize.ValidationSet) and their speed here, and choose the one to serve
    (export/quantize.py); where this CPU has the native int4 kernel, the int4 variant (the same file,
    int4 decode steps) measured and in the choice too."""
    from engine.session import OnnxDecoder
    from export import quantize

    quantize.quantize_int8(stage / MODEL_FILE, stage / INT8_MODEL_FILE)
    data = (stage / INT8_MODEL_FILE).read_bytes()
    with_variant = dataclasses.replace(staged, variants={"int8": Variant(INT8_MODEL_FILE, quantize.WEIGHTS),
                                                         "int4": Variant(INT8_MODEL_FILE, quantize.INT4_WEIGHTS)},
                                       files={**staged.files, INT8_MODEL_FILE: sha256_file(stage / INT8_MODEL_FILE)})
    int8 = OnnxDecoder.from_bytes(stage, with_variant, b"", threads=1, variant="int8", files={INT8_MODEL_FILE: data})
    int8_ppl, fp32_ppl, tokens, source = validation.measure(fp32, int8)
    variants = {"int8": Variant(INT8_MODEL_FILE, quantize.WEIGHTS, _round(int8_ppl), _round(fp32_ppl), tokens or None, source)}
    timed = {"fp32": fp32, "int8": int8}
    int4 = OnnxDecoder.from_bytes(stage, with_variant, b"", threads=1, variant="int4", files={INT8_MODEL_FILE: data})
    if int4.variant == "int4":
        with quantize.every_run_on_decode_steps(int4):
            int4_ppl, _, _, _ = validation.measure(fp32, int4)
        variants["int4"] = Variant(INT8_MODEL_FILE, quantize.INT4_WEIGHTS, _round(int4_ppl), _round(fp32_ppl), tokens or None, source)
        timed["int4"] = int4
    else:
        print("note: no fast int4 kernel on this CPU (AVX-512 VNNI or AVX2; see the log): the int4 variant is not written",
              file=sys.stderr)
    timings = quantize.speeds(timed)
    return variants, quantize.choose_variant(timings, variants["int8"].perplexity_loss,
                                             variants["int4"].perplexity_loss if "int4" in variants else None)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _swap_in(stage: Path, out: Path) -> None:
    """Replace OUT with the staged folder; the old folder is removed only after the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export-onnx",
        description="Turn a training checkpoint into a model folder (ONNX + tokenizer + manifest) that Segue can serve. "
                    "Checks that ONNX Runtime reproduces the PyTorch model before writing anything.",
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint written by `segue train` or `segue finetune`")
    p.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. models/my-artist")
    p.add_argument("--name", help="model name shown to clients (default: the folder name)")
    p.add_argument("--sign", type=Path, metavar="KEY", help="sign the folder with this ECDSA private key (see `segue sign`)")
    p.add_argument("--quantize", choices=["int8"],
                   help="also write model.int8.onnx (int8 weights: about 4x smaller, faster on most CPUs), measure its "
                        "validation perplexity next to fp32's and record which one to serve")
    p.add_argument("--fp16", action="store_true",
                   help="also write model.fp16.onnx (float16: the precision served through CUDA, every node on the GPU) "
                        "and measure its validation perplexity next to fp32's")
    p.add_argument("--val-data", type=Path, metavar="FOLDER",
                   help="MIDI folder whose validation split measures the perplexities (default: the checkpoint's training data)")
    p.add_argument("--val-tokens", type=int, default=50_000, help="validation tokens to score (default 50000)")
    p.add_argument("--kv-cache", choices=["shared-buffer", "concat"], default="shared-buffer",
                   help="shared-buffer (default): one preallocated cache per layer, nothing copied per step; "
                        "concat: the older graph that appends to its cache (for comparison)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = export_model(args.checkpoint, args.out, args.name, args.sign, args.quantize, args.val_data,
                                args.val_tokens, args.kv_cache, args.fp16)
    except (CheckpointError, ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    assert manifest.parity is not None, "export_model always records parity"
    ppl = manifest.metrics.val_perplexity
    print(f"wrote {args.out} ({sum((args.out / f).stat().st_size for f in manifest.files) / 1e6:.1f} MB)")
    print(f"parity: max |onnx - torch| = {manifest.parity.max_abs_diff:.2e} (prefill and {manifest.parity.decode_steps} cached steps)")
    print(f"validation perplexity: {ppl:.2f}" if ppl is not None else "validation perplexity: not recorded")
    report_variants(manifest)
    return 0


def report_variants(manifest: Manifest) -> None:
    for key, variant in manifest.variants.items():
        if variant.val_perplexity is not None and variant.reference_val_perplexity is not None:
            print(f"{key}: validation perplexity {variant.val_perplexity:.3f} vs fp32 {variant.reference_val_perplexity:.3f} "
                  f"({(variant.perplexity_loss or 0) * 100:+.2f} %) on {variant.val_tokens} tokens")
        else:
            print(f"{key}: written; perplexity not measured")
    if manifest.serve is not None:
        print(f"serves {manifest.serve.variant}: {manifest.serve.reason}")


if __name__ == "__main__":
    raise SystemExit(main())
