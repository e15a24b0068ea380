"""The int8 graph's quantized matmuls as one native operator each, for the runs of a few rows.

`export-onnx --quantize int8` writes every linear layer as DynamicQuantizeLinear -> MatMulInteger ->
Cast -> Mul (by the two scales) -> Add (the bias), which ONNX Runtime fuses into one
DynamicQuantizeMatMul node. For a decode step (one row per sequence) that node costs 11-16 us with its
weights in cache, where streaming them takes 2-4 us: it is a matrix-matrix kernel paying its packing
and blocking for a vector. `segue.QuantizedMatMul` (engine/native_matmul_kernel.h, in the same library
as the native attention) computes the same thing a few rows at a time from weights packed here, at
load, for the dot product instructions. In a whole step the weights mostly come from L3 (a step's
weights and cache outgrow L2), which caps the gain: 1.2x a step for the small preset at 512-896
positions, none measurable for the shipped 4-layer model (docs/performance.md, Session 14).

Prompt chunks (64 rows) stay on ONNX Runtime's node, which is faster there (a blocked GEMM, AMX on
CPUs that have it): the engine keeps a second session without this rewrite for them
(engine/session.py; its own copy of the int8 weights, a few MB). `rewrite_model` changes a parsed
graph in place; the attention rewrite (engine/native_attention.py) calls it so the graph is parsed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OP_TYPE = "QuantizedMatMul"
SWITCH = "SEGUE_NATIVE_MATMUL"  # =0: ONNX Runtime's int8 matmuls for every run (to compare, or to rule this out)
COLUMNS = 64  # columns per packed block (SEGUE_QM_COLUMNS in engine/native_matmul_kernel.h)


def code_path(library: Path) -> str:
    """The kernel's code path in a built library: avx512-vnni, avx-vnni, avx2 or portable."""
    import ctypes

    function = ctypes.CDLL(str(library)).segue_matmul_path
    function.restype = ctypes.c_char_p
    return function().decode()


def pack(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights [k, n] in the kernel's layout (blocks of 64 columns, rows in quads, each quad's
    64 x 4 bytes together), flat, and each packed column's sum (for the activation's zero point)."""
    k, n = weights.shape
    quads, blocks = -(-k // 4), -(-n // COLUMNS)
    padded = np.zeros((quads * 4, blocks * COLUMNS), dtype=np.int8)
    padded[:k, :n] = weights
    packed = padded.reshape(quads, 4, blocks, COLUMNS).transpose(2, 0, 3, 1)  # [block, quad, column, row of quad]
    return np.ascontiguousarray(packed).reshape(-1), padded.astype(np.int32).sum(axis=0, dtype=np.int32)


def _padded(values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(-(-n // COLUMNS) * COLUMNS, dtype=np.float32)
    out[:n] = np.broadcast_to(values.astype(np.float32), (n,))
    return out


def rewrite_model(model: Any, domain: str) -> int:
    """Each quantized linear layer of `model` (an onnx ModelProto) replaced by `domain`'s QuantizedMatMul,
    in place; returns how many. A chain that is not exactly the exporter's (an intermediate read by
    another node, per-column zero points, weights that are not initializers) is left as it is."""
    from onnx import NodeProto, TensorProto, helper, numpy_helper

    graph = model.graph
    # Copies, held in one list: nodes are compared by identity below, which protobuf's wrappers of the
    # graph's own repeated field do not promise from one access to the next.
    nodes = [NodeProto.FromString(node.SerializeToString()) for node in graph.node]
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_reader(tensor: str) -> Any:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    fused: dict[int, Any] = {}  # id of the chain's last node -> the fused node
    removed: set[int] = set()
    new_initializers = []
    for node in nodes:
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        quantize = producer.get(node.input[0])
        weights = constant(node.input[1])
        weight_zero = constant(node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros((), np.int8)
        if (quantize is None or quantize.op_type != "DynamicQuantizeLinear" or weights is None or weights.ndim != 2
                or weights.dtype != np.int8 or weight_zero is None or weight_zero.size != 1
                or node.input[2] != quantize.output[2]):
            continue
        cast = only_reader(node.output[0])
        to_float = cast is not None and cast.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT for a in cast.attribute)
        scaled = only_reader(cast.output[0]) if to_float else None
        if scaled is None or scaled.op_type != "Mul":
            continue
        scale_name = next((name for name in scaled.input if name != cast.output[0]), "")
        scales = producer.get(scale_name)
        if scales is None or scales.op_type != "Mul" or quantize.output[1] not in scales.input:
            continue
        weight_scale = constant(next((name for name in scales.input if name != quantize.output[1]), ""))
        k, n = weights.shape
        if weight_scale is None or weight_scale.size not in (1, n):
            continue
        if (only_reader(quantize.output[0]) is not node or only_reader(quantize.output[1]) is not scales
                or only_reader(quantize.output[2]) is not node or only_reader(scales.output[0]) is not scaled):
            continue
        last, bias = scaled, np.zeros(n, dtype=np.float32)
        adder = only_reader(scaled.output[0])
        if adder is not None and adder.op_type == "Add":
            other = constant(next((name for name in adder.input if name != scaled.output[0]), ""))
            if other is not None and other.shape == (n,) and other.dtype == np.float32:
                last, bias = adder, other
        packed, sums = pack(weights)
        stem = f"{node.name or node.output[0]}_segue"
        tensors = [numpy_helper.from_array(packed, f"{stem}_packed"), numpy_helper.from_array(sums, f"{stem}_column_sums"),
                   numpy_helper.from_array(_padded(weight_scale.reshape(-1), n), f"{stem}_scales"),
                   numpy_helper.from_array(_padded(bias, n), f"{stem}_bias")]
        new_initializers += tensors
        fused[id(last)] = helper.make_node(
            OP_TYPE, [quantize.input[0], *(t.name for t in tensors)], [last.output[0]], name=stem, domain=domain,
            k=int(k), n=int(n), weight_zero_point=int(weight_zero.reshape(-1)[0]))
        removed.update(id(part) for part in (quantize, scales, node, cast, scaled, last))
    if not fused:
        return 0
    # The fused node takes the place of its chain's last node: its inputs (the chain's input and
    # constants) are all there by then, so the order stays topological.
    kept = [fused.get(id(node), node) for node in nodes if id(node) not in removed or id(node) in fused]
    chains_read = {name for node in nodes if id(node) in removed for name in node.input}
    del graph.node[:]
    graph.node.extend(kept)  # our own copies (made above), not wrappers of what was just deleted
    # The weights, scales and biases only the removed chains read, and the shapes of the tensors they made,
    # deleted in place (from the end, so that indices stay valid).
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in chains_read - used:
            del graph.initializer[index]
    graph.initializer.extend(new_initializers)
    produced = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    for index in reversed(range(len(graph.value_info))):
        if graph.value_info[index].name not in produced:
            del graph.value_info[index]
    return len(fused)
