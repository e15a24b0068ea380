"""Safetensors checkpoints that carry their own config, written atomically.

A checkpoint is one `.safetensors` file: the weights plus string metadata holding the model
config, the training state summary and anything else worth knowing (data fingerprint, metrics).
Writing goes to a temporary file, is fsynced, then `os.replace`d, and the folder is fsynced:
a kill at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.atomic_file import atomic_write
from training.model import GPT, GPTConfig


class CheckpointError(ValueError):
    pass


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    # The output head shares the embedding matrix; store it once.
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "head.weight"}


def save_checkpoint(path: Path, model: GPT, metadata: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = model_state(model)
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra/{key}"] = value.detach().contiguous().cpu()
    meta = {"config": model.cfg.to_json(), "format": "segue-checkpoint-1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model config in its metadata; it was not written by Segue")
    return meta


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[GPT, dict, dict[str, torch.Tensor]]:
    """The model (weights loaded, eval mode), its metadata, and any extra tensors stored with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    meta = read_metadata(path)
    cfg = GPTConfig.from_json(meta["config"])
    tensors = load_file(str(path), device=device)
    extras = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra/")}
    weights["head.weight"] = weights["tok_emb.weight"]
    model = GPT(cfg).to(device)
    model.load_state_dict(weights)
    model.eval()
    return model, meta, extras
