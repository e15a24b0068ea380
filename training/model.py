"""The Segue GPT: a decoder-only transformer over REMI tokens, in one file.

Attention is written by hand with one key and one value tensor per layer so that the forward pass
with a KV cache exports cleanly to ONNX (no library cache classes, no SDPA special cases):

    logits, presents = model(input_ids, position_ids, pasts)

`pasts` is a list of (key, value) pairs of shape [batch, heads, past_len, head_dim], one per layer
(empty tensors with past_len 0 for a prefill); `presents` are the same with the new positions
appended. The config travels with every checkpoint (safetensors metadata) so a model is rebuilt
from its own files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 256
    d_ff: int = 1024
    max_context: int = 1024
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        return cls(**json.loads(text))


# Named shapes. `tiny` is for tests; `small` is the shipped default; `seed` is the seed article's.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, d_model=32, d_ff=64, max_context=256),
    # 4 layers of the small width: the default model's shape since it reads 1,024 tokens of context
    # (bench/bench_model_size.py: a third less time to the first note than `small` on a dense clip).
    "compact": dict(n_layer=4, n_head=8, d_model=256, d_ff=1024, max_context=1024),
    "small": dict(n_layer=6, n_head=8, d_model=256, d_ff=1024, max_context=1024),
    "seed": dict(n_layer=12, n_head=8, d_model=512, d_ff=2048, max_context=2048),
}


def preset(name: str, vocab_size: int, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    return GPTConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor | None, past_v: torch.Tensor | None):
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q = q.view(batch, steps, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, steps, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, steps, self.n_head, self.head_dim).transpose(1, 2)
        if past_k is None:
            # Training path (no cache): the fused kernel computes the same causal attention faster.
            # No dropout on the attention weights: with dropout_p > 0 PyTorch's CPU kernel falls back
            # to materialising every attention matrix (3x slower steps); the residual dropout in Block
            # (and here, on the attention's output) regularises enough for models this size.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.dropout(self.proj(out.transpose(1, 2).reshape(batch, steps, width))), k, v
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        total = k.shape[2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # Query i sits at absolute position past_len + i and may see keys 0..past_len + i.
        query_pos = torch.arange(steps, device=x.device).unsqueeze(1) + (total - steps)
        key_pos = torch.arange(total, device=x.device).unsqueeze(0)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, steps, width)
        return self.dropout(self.proj(out)), k, v


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout)
        )

    def forward(self, x, past_k, past_v):
        attended, k, v = self.attn(self.ln1(x), past_k, past_v)
        x = x + attended
        x = x + self.mlp(self.ln2(x))
        return x, k, v


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: fewer parameters, better small models
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_past(self, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.cfg.n_head, 0, self.cfg.head_dim)
        device = self.tok_emb.weight.device
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.blocks]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, pasts=None):
        """Logits and per-layer (key, value) presents. `pasts=None` is the uncached training path."""
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        presents = []
        for block, (past_k, past_v) in zip(self.blocks, pasts or [(None, None)] * len(self.blocks), strict=True):
            x, k, v = block(x, past_k, past_v)
            presents.append((k, v))
        return self.head(self.ln_f(x)), presents

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Next-token cross-entropy over a batch of windows (no cache; for training)."""
        batch, steps = input_ids.shape
        if steps > self.cfg.max_context:
            raise ValueError(f"window of {steps} tokens exceeds the model context of {self.cfg.max_context}")
        positions = torch.arange(steps, device=input_ids.device).unsqueeze(0).expand(batch, steps)
        logits, _ = self(input_ids, positions)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
