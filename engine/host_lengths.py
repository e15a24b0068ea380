"""The history's lengths fed from the host, for ONNX Runtime's CUDA GroupQueryAttention.

As exported, the graph computes GroupQueryAttention's `seqlens_k` (per row, the last position id) and
`total_sequence_length` (the largest position id + 1) from `position_ids` inside the graph. The CPU
kernel reads them right. Run through the CUDA execution provider (onnxruntime-gpu 1.31.1 on an H200,
session 15), the node computed nothing: its output was all zeros, so every logit was wrong. The same
node fed the same lengths as graph inputs from the host was right (the fp16 logits within 0.01 of the
fp32 model's on the CPU). With the lengths as inputs, every node of the fp16 graph runs on the GPU,
where the computed ones were a few integer nodes on the CPU with copies between.

`rewrite(graph)` adds the two inputs (int32 [batch] and int32 scalar), points every GroupQueryAttention
node at them and removes the nodes that computed them. The engine feeds them from the positions it
already holds (`feeds(positions)`), for the CUDA session only: the CPU graph is left as exported.
"""

from __future__ import annotations

import numpy as np

SEQLENS = "seqlens_k"
TOTAL = "total_sequence_length"
ATTENTION = "GroupQueryAttention"


def rewrite(graph: bytes) -> tuple[bytes, str]:
    """`graph` with the host-fed lengths, or `graph` unchanged and why not ("" when rewritten)."""
    try:
        import onnx  # only here: a plain load needs no onnx package
        from onnx import TensorProto, helper
    except ImportError:
        return graph, "the onnx package is not installed (it rewrites the graph)"
    model = onnx.load_from_string(graph)
    body = model.graph
    attention = [node for node in body.node if node.op_type == ATTENTION]
    if not attention:
        return graph, "the graph has no GroupQueryAttention node"
    taken = {i.name for i in body.input} | {o for node in body.node for o in node.output}
    if taken & {SEQLENS, TOTAL}:
        return graph, f"the graph already has a tensor named {SEQLENS} or {TOTAL}"
    if any(len(node.input) < 7 for node in attention):
        return graph, "a GroupQueryAttention node lacks its seqlens_k or total_sequence_length input"
    body.input.append(helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]))
    body.input.append(helper.make_tensor_value_info(TOTAL, TensorProto.INT32, []))
    for node in attention:
        node.input[5], node.input[6] = SEQLENS, TOTAL
    # The nodes that computed the lengths now feed nothing: remove them (and anything only they read).
    while True:
        read = {name for node in body.node for name in node.input} | {o.name for o in body.output}
        unread = [node for node in body.node if not any(o in read for o in node.output)]
        if not unread:
            break
        for node in unread:
            body.node.remove(node)
    read = {name for node in body.node for name in node.input}
    for initializer in [i for i in body.initializer if i.name not in read]:  # the constants they alone read
        body.initializer.remove(initializer)
    return model.SerializeToString(), ""


def feeds(positions: np.ndarray) -> dict[str, np.ndarray]:
    """The two inputs for a run at `positions` [batch, T]: each row's last position id, and the
    largest position id + 1 (GroupQueryAttention's documented meaning of both)."""
    last = positions[:, -1].astype(np.int32)
    return {SEQLENS: last, TOTAL: np.array(int(last.max()) + 1, dtype=np.int32)}
