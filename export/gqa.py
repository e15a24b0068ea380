"""The GPT's forward pass with ONNX Runtime's GroupQueryAttention, for the shared-buffer KV cache.

`export-onnx` traces `SharedKV(model)` instead of the GPT's own forward: the same modules and
weights (so `training/from_onnx.py` reads them back by the same names), with each layer's
attention replaced by one `com.microsoft.GroupQueryAttention` node (packed QKV, no rotary).

What the node buys: it reads the history's length from `seqlens_k` (the last position id) instead
of the past tensor's shape, so the engine can bind one preallocated buffer of `max_context`
positions per layer as both the past input and the present output, and a step writes only its new
positions (ONNX Runtime's shared-buffer mode: past and present point at the same memory). Given a
past exactly as long as the history, the node appends like the plain graph does, so the graph
keeps the plain contract too (same inputs and outputs, presents = pasts + new positions) and
`training/parity.py` checks it unchanged.

ONNX Runtime's CPU kernel needs a head size that is a multiple of 8 (`supports`); a model without
one is exported with the plain attention instead.
"""

from __future__ import annotations

import functools

import torch

from training.model import GPT, GPTConfig

DOMAIN = "com.microsoft"


def supports(cfg: GPTConfig) -> bool:
    return cfg.head_dim % 8 == 0


@functools.cache
def _register_schema() -> None:
    """Declare the contrib op to onnx (once per process) so onnxscript can emit it. The schema only
    names the inputs, outputs and the two attributes used here; ONNX Runtime checks the rest."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("GroupQueryAttention", DOMAIN):
        return
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "GroupQueryAttention", DOMAIN, 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional), param("value", "T", param_option=optional),
                param("past_key", "T", param_option=optional), param("past_value", "T", param_option=optional),
                param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads")],
    )
    onnx.defs.register_schema(schema)


@functools.cache
def _op():
    """torch.ops.segue.gqa: causal attention over pasts + new positions, with the node's signature.
    Its torch body is the plain attention (what tracing sees and what the graph must equal)."""

    @torch.library.custom_op("segue::gqa", mutates_args=())
    def gqa(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, seqlens_k: torch.Tensor,
            total: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, steps, width3 = qkv.shape
        width = width3 // 3
        head_dim = width // n_head
        q, k, v = (t.reshape(batch, steps, n_head, head_dim).transpose(1, 2) for t in qkv.split(width, dim=2))
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        length = k.shape[2]
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        query_pos = torch.arange(steps).unsqueeze(1) + (length - steps)
        scores = scores.masked_fill(torch.arange(length).unsqueeze(0) > query_pos, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, steps, width)
        return out, k, v

    @gqa.register_fake
    def _(qkv, past_k, past_v, seqlens_k, total, n_head):
        batch, steps, width3 = qkv.shape
        present = (past_k.shape[0], past_k.shape[1], past_k.shape[2] + steps, past_k.shape[3])
        return qkv.new_empty((batch, steps, width3 // 3)), past_k.new_empty(present), past_v.new_empty(present)

    return gqa


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: torch.ops.segue.gqa -> GroupQueryAttention."""
    _register_schema()
    from onnxscript.values import Opset

    microsoft = Opset(DOMAIN, 1)

    def gqa_onnx(qkv, past_k, past_v, seqlens_k, total, n_head: int):
        return microsoft.GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens_k, total,
                                             num_heads=n_head, kv_num_heads=n_head)

    _op()
    return {torch.ops.segue.gqa.default: gqa_onnx}


class SharedKV(torch.nn.Module):
    """The GPT with flat tensor inputs/outputs and GroupQueryAttention (see the module docstring)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model  # the same attribute name as the plain wrapper: the same initializer names
        _op()

    def forward(self, input_ids, position_ids, *flat_past):
        m = self.model
        seqlens_k = position_ids[:, -1].to(torch.int32)  # total length - 1, per row
        total = (position_ids.max() + 1).to(torch.int32)
        x = m.tok_emb(input_ids) + m.pos_emb(position_ids)
        presents = []
        for i, block in enumerate(m.blocks):
            attn = block.attn
            out, k, v = torch.ops.segue.gqa(attn.qkv(block.ln1(x)), flat_past[2 * i], flat_past[2 * i + 1],
                                            seqlens_k, total, attn.n_head)
            x = x + attn.proj(out)
            x = x + block.mlp(block.ln2(x))
            presents += [k, v]
        return (m.head(m.ln_f(x)), *presents)
