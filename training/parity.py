"""Torch vs ONNX Runtime: the largest logit gap on random prompts, for a prefill and cached steps.

One implementation for both directions of the bridge: `export-onnx` checks the graph it wrote,
and `segue finetune --from FOLDER` checks the weights it read back out of one.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.manifest import kv_names
from training.model import GPT


def logit_gaps(model: GPT, session, seed: int, decode_steps: int) -> tuple[float, float]:
    """(largest |torch - onnx| logit gap on the prefill, largest over the cached decode steps).

    `session` is an onnxruntime.InferenceSession of the model's graph; the prompt (2 sequences of
    a random length) and every decode token are drawn from `seed`."""
    cfg = model.cfg
    past_names, _ = kv_names(cfg.n_layer)
    rng = np.random.default_rng(seed)
    batch, length = 2, int(rng.integers(4, max(5, min(48, cfg.max_context - decode_steps))))
    ids = rng.integers(0, cfg.vocab_size, (batch, length))
    torch_past = model.empty_past(batch)
    ort_past = [np.zeros((batch, cfg.n_head, 0, cfg.head_dim), np.float32) for _ in past_names]
    position = 0
    gaps = []
    model.eval()
    for _ in range(decode_steps + 1):
        steps = ids.shape[1]
        pos = np.broadcast_to(np.arange(position, position + steps), (batch, steps)).astype(np.int64)
        with torch.no_grad():
            logits, torch_past = model(torch.from_numpy(ids), torch.from_numpy(pos.copy()), torch_past)
        outputs = session.run(None, {"input_ids": ids.astype(np.int64), "position_ids": pos,
                                     **dict(zip(past_names, ort_past, strict=True))})
        gaps.append(float(np.abs(outputs[0] - logits.numpy()).max()))
        ort_past = outputs[1:]
        position += steps
        ids = rng.integers(0, cfg.vocab_size, (batch, 1))
    return gaps[0], max(gaps[1:], default=0.0)
