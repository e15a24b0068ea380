"""The resumable state of a run, saved in one safetensors file (never pickle).

`last.safetensors` is an ordinary checkpoint (it exports like `best.safetensors`) that also holds:

* the optimizer: every state tensor flattened to `extra/optim/<param index>/<name>` (AdamW's
  `step`, `exp_avg`, `exp_avg_sq`), non-tensor state and the param groups as JSON metadata;
* the loop state as JSON (`train_state`): step, schedule length (the learning rate is a pure
  function of step and schedule, so this *is* the scheduler state), best validation loss, the
  early-stopping counter, the base model's loss, elapsed time;
* the random state of every rank as JSON (`rng`): the numpy sampler's generator state (which is
  the data position: it decides every window and augmentation still to come) and the torch CPU and
  CUDA generator states (dropout), base64-encoded.

Restoring all of it makes the rest of a run identical to a run that was never interrupted.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.model import GPT

OPTIM_PREFIX = "optim/"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into named tensors plus JSON-ready rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "class": type(optimizer).__name__}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint holds {meta.get('class')} state, this run uses {type(optimizer).__name__}")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, name = key[len(OPTIM_PREFIX):].split("/", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rank_rng_state(sampler_state: dict, device: torch.device) -> bytes:
    """This rank's random state (sampler + torch generators) as JSON bytes."""
    state = {"numpy": sampler_state, "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return json.dumps(state).encode()


def restore_rank_rng(state: dict, device: torch.device) -> dict:
    """Set the torch generators from a saved rank state; returns the sampler's state to set."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8), device)
    return state["numpy"]


def save_training_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer, loop_state: dict,
                             rng_states: list[dict], metadata: dict) -> None:
    """Atomically write weights + optimizer + loop state + every rank's RNG state."""
    tensors, optim_meta = optimizer_tensors(optimizer)
    meta = {**metadata, "train_state": loop_state, "optimizer": optim_meta, "rng": rng_states}
    save_checkpoint(path, model, meta, extra_tensors=tensors)


def load_training_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict], dict]:
    """Load weights into `model` and state into `optimizer`; returns (loop state, rng states, metadata)."""
    saved, meta, extras = load_checkpoint(path, device=str(next(model.parameters()).device))
    if "train_state" not in meta or "optimizer" not in meta:
        raise CheckpointError(f"{path} holds weights only (no optimizer or loop state); it cannot be resumed")
    if saved.cfg != model.cfg:
        raise CheckpointError(f"{path} holds a model of another shape than this run's")
    model.load_state_dict(saved.state_dict())
    restore_optimizer(optimizer, extras, json.loads(meta["optimizer"]))
    return json.loads(meta["train_state"]), json.loads(meta["rng"]), meta
