"""Logits for only the last positions of a run: a prompt's prefill does not compute what it throws away.

A prefill needs the logits of one position, the prompt's last, and the keys and values of every
position in every layer. As exported, the graph computes everything for every position: after the
last layer's attention, its output projection, its feed-forward block, the final norm and the
vocabulary projection run for all T positions, and T-1 of those rows are thrown away. That is about a
quarter of a 4-layer model's matrix work on a prompt.

`rewrite(graph)` adds an input, `last_positions` (int64 [1]), and slices the run to its last
`last_positions` positions right after the last attention node: the attention output and each
other tensor the rest of the graph reads with a sequence axis (the residual stream). Everything
before the slice, the caches included, is computed exactly as before, and `logits` has
min(T, last_positions) positions; EVERY asks for all of them. (A required input, not an initializer
that a feed may override: ONNX Runtime warns at every load about such an initializer.)

Which tensors have the sequence axis is read from the graph's own value_info (the exporter writes
it): the attention output's second axis names it. A graph whose tail reads a tensor of unknown shape
is left as it is, with the reason.
"""

from __future__ import annotations

from engine import native_attention

INPUT = "last_positions"
EVERY = 2**62  # the default: more positions than any run has (Slice clamps it to the run)
ATTENTION_OPS = ("GroupQueryAttention", native_attention.OP_TYPE, native_attention.HALF_OP_TYPE, native_attention.INT8_OP_TYPE)


def rewrite(graph: bytes) -> tuple[bytes, str]:
    """`graph` with the `last_positions` input, or `graph` unchanged and why not (the reason is "" when
    rewritten)."""
    try:
        import onnx  # only here: a plain load needs no onnx package
        from onnx import TensorProto, helper
    except ImportError:
        return graph, "the onnx package is not installed (it rewrites the graph)"
    try:
        model = onnx.load_from_string(graph)
    except Exception as exc:  # a graph onnx cannot parse is ONNX Runtime's to judge, as before
        return graph, f"the graph could not be read: {exc}"
    body = model.graph
    if any(i.name == INPUT for i in body.input):
        return graph, f"the graph already has an input named {INPUT}"
    last = max((i for i, node in enumerate(body.node) if node.op_type in ATTENTION_OPS), default=None)
    if last is None:
        return graph, "the graph has no attention node"
    attention_out = body.node[last].output[0]
    shapes = {v.name: v.type.tensor_type.shape for v in [*body.value_info, *body.input, *body.output]
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}

    def sequence_axis(name: str) -> str | None:
        shape = shapes.get(name)
        if shape is None or len(shape.dim) != 3 or not shape.dim[1].dim_param:
            return None
        return shape.dim[1].dim_param

    sequence = sequence_axis(attention_out)
    if sequence is None:
        return graph, f"the last attention output {attention_out!r} has no [batch, sequence, width] shape in the graph"

    # The tail: every node downstream of the last attention output.
    produced_in_tail = {attention_out}
    tail = set()  # indices into body.node
    for index in range(last + 1, len(body.node)):
        node = body.node[index]
        if any(name in produced_in_tail for name in node.input):
            tail.add(index)
            produced_in_tail.update(node.output)
    # Tensors that change from run to run (they depend on a fed input); the rest (weights, a tied
    # embedding's transpose) are the same for every position and are not sliced.
    initializers = {init.name for init in body.initializer}
    varying = {i.name for i in body.input if i.name not in initializers}
    for node in body.node:
        if any(name in varying for name in node.input):
            varying.update(node.output)
    outside = {name for index in tail for name in body.node[index].input
               if name in varying and name not in produced_in_tail}
    for name in sorted(outside):
        if sequence_axis(name) != sequence:
            return graph, f"the tail after the last attention reads {name!r}, whose sequence axis is not known"
    outputs = {o.name for o in body.output}
    if "logits" not in produced_in_tail:
        return graph, "the logits are not computed after the last attention"
    if any(o in produced_in_tail and o != "logits" for o in outputs):
        return graph, "an output other than the logits depends on the last attention"

    # starts = -last_positions; ends: past the end; axis 1. Slice clamps a start before the first position.
    body.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1]))
    attention = body.node[last]
    if attention.domain == native_attention.DOMAIN and len(attention.input) == 5:
        # The native operator takes the count too and attends only for those positions (every position's
        # keys and values are still written); the Slice after it then keeps all it made.
        attention.input.append(INPUT)
    body.initializer.append(helper.make_tensor("last_positions_end", TensorProto.INT64, [1], [EVERY]))
    body.initializer.append(helper.make_tensor("last_positions_axis", TensorProto.INT64, [1], [1]))
    renamed = {name: f"{name}_last_positions" for name in outside | {attention_out}}
    # Each Slice goes right before the first node that reads it (its tensor is made before that node in
    # a graph in topological order), the Neg before the first Slice.
    nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in body.node]
    del body.node[:]
    placed: set[str] = set()
    ordered = []
    for index, node in enumerate(nodes):
        if index in tail:
            for i, name in enumerate(node.input):
                if name not in renamed:
                    continue
                if not placed:
                    ordered.append(helper.make_node("Neg", [INPUT], ["last_positions_start"], name="last_positions_start"))
                if name not in placed:
                    ordered.append(helper.make_node(
                        "Slice", [name, "last_positions_start", "last_positions_end", "last_positions_axis"],
                        [renamed[name]], name=renamed[name]))
                    placed.add(name)
                node.input[i] = renamed[name]
        ordered.append(node)
    body.node.extend(ordered)
    # The tail's shapes no longer have the sequence's length: drop what the exporter recorded of them.
    kept = [v for v in body.value_info if v.name not in produced_in_tail]
    del body.value_info[:]
    body.value_info.extend(kept)
    for output in body.output:
        if output.name == "logits" and output.type.tensor_type.HasField("shape"):
            output.type.tensor_type.shape.dim[1].dim_param = "last_positions"
    return model.SerializeToString(), ""

