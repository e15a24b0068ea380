"""`export-onnx`: a training checkpoint -> a verified model folder the engine can serve.

    export-onnx runs/default/best.safetensors --out models/default

Writes `model.onnx` (KV-cache inputs and outputs), `tokenizer.json` and `manifest.json` into OUT,
after checking that ONNX Runtime reproduces the torch logits within 1e-4 for a prefill and for
several cached decode steps. A folder that fails the parity check is not written. Writing is
staged in a sibling temp folder and swapped in at the end, so a running server never sees a
half-written model.
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

import torch

from engine.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    TOKENIZER_FILE,
    Manifest,
    ModelError,
    Parity,
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


def export_graph(model: GPT, path: Path) -> None:
    cfg = model.cfg
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
            _FlatKV(model).eval(), (ids, positions, *kv), None, dynamo=True, dynamic_shapes=dynamic,
            input_names=["input_ids", "position_ids", *past_names], output_names=["logits", *present_names],
            optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)


def check_parity(model: GPT, onnx_path: Path, seed: int = 0, decode_steps: int = 4) -> Parity:
    """Largest |onnx - torch| logit difference for a prefill and cached decode steps."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    prefill, decode = logit_gaps(model, session, seed, decode_steps)
    return Parity(prefill, decode, decode_steps, PARITY_TOLERANCE, max(prefill, decode) <= PARITY_TOLERANCE)


def build_manifest(model: GPT, meta: dict[str, str], name: str, parity: Parity, checkpoint_sha256: str, opset: int,
                   files: dict[str, str]) -> Manifest:
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
                 "past_inputs": past_names, "present_outputs": present_names, "opset": opset},
        "source_checkpoint_sha256": checkpoint_sha256,
        # The split rule's fraction and what --exclude left out: with the data source and
        # fingerprint they pin exactly which pieces trained the model, and which did not.
        "training": {"data_fingerprint": meta.get("data_fingerprint"), "data_source": meta.get("data_source"),
                     "steps": steps, "train_tokens": int(meta["train_tokens"]) if "train_tokens" in meta else None,
                     "programs": record("programs"), "val_fraction": number("val_fraction"), "excluded": record("excluded")},
        "metrics": {"val_loss": number("val_loss"), "val_perplexity": number("val_perplexity")},
        "parity": dataclasses.asdict(parity),
        "files": files,
        # A fine-tuned checkpoint names what it started from and what it learned (segue finetune).
        "base_model": record("base_model"),
        "finetune": None if "finetune" not in meta else {
            **json.loads(meta["finetune"]), "steps": steps, "val_perplexity": number("val_perplexity"),
            "base_val_perplexity": number("base_val_perplexity")},
    }
    return Manifest.from_dict(data, "the exported manifest")


def export_model(checkpoint: Path, out: Path, name: str | None = None, sign_key: Path | None = None) -> Manifest:
    """Export, check parity, sign the staged folder when `sign_key` is given, write the folder
    atomically (a running server never sees it unsigned). Returns the manifest it wrote."""
    model, meta, _ = load_checkpoint(checkpoint)
    if "tokenizer" not in meta:
        raise CheckpointError(f"{checkpoint} does not carry its tokenizer; it was not written by `segue train`")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        export_graph(model, stage / MODEL_FILE)
        (stage / TOKENIZER_FILE).write_text(meta["tokenizer"])
        parity = check_parity(model, stage / MODEL_FILE)
        if not parity.passed:
            raise RuntimeError(f"ONNX Runtime logits differ from torch by {parity.max_abs_diff:.2e} "
                               f"(tolerance {PARITY_TOLERANCE:g}); the model was not exported")
        manifest = build_manifest(model, meta, name or out.name, parity, sha256_file(checkpoint), _opset(stage / MODEL_FILE),
                                  {f: sha256_file(stage / f) for f in (MODEL_FILE, TOKENIZER_FILE)})
        (stage / MANIFEST_FILE).write_text(manifest.to_json())
        if sign_key is not None:
            from engine.signing import sign_folder

            sign_folder(stage, sign_key)
        _swap_in(stage, out)
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = export_model(args.checkpoint, args.out, args.name, args.sign)
    except (CheckpointError, ModelError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    assert manifest.parity is not None, "export_model always records parity"
    ppl = manifest.metrics.val_perplexity
    print(f"wrote {args.out} ({sum((args.out / f).stat().st_size for f in manifest.files) / 1e6:.1f} MB)")
    print(f"parity: max |onnx - torch| = {manifest.parity.max_abs_diff:.2e} (prefill and {manifest.parity.decode_steps} cached steps)")
    print(f"validation perplexity: {ppl:.2f}" if ppl is not None else "validation perplexity: not recorded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
