"""engine/last_positions.py: a run can ask for only its last positions' logits, and the graph then skips
what the others need, without changing a cache entry or the logits it returns (beyond float rounding)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine import last_positions, native_attention
from engine.session import PREFILL_CHUNK, OnnxDecoder, session_options


def graphs(folder, variant: str) -> tuple[bytes, ort.InferenceSession, ort.InferenceSession]:
    """The rewritten graph, a session of the graph before the rewrite and one of the rewritten graph
    ("native": both with the native operator in place of the attention node)."""
    name = "model.int8.onnx" if variant == "int8" else "model.onnx"
    graph = (folder / name).read_bytes()
    options = session_options(1)
    if variant == "native":
        native, why = native_attention.prepare(graph)
        assert native is not None, why
        options.register_custom_ops_library(str(native.library))
        graph = native.graph
    rewritten, why = last_positions.rewrite(graph)
    assert why == "" and rewritten != graph
    return (rewritten, ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"]))


def feeds(session: ort.InferenceSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    past = next(i for i in session.get_inputs() if i.name.startswith("past_"))
    empty = np.zeros((ids.shape[0], past.shape[1], 0, past.shape[3]), dtype=np.float32)
    given = {"input_ids": ids, "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))}
    given.update((i.name, empty) for i in session.get_inputs() if i.name.startswith("past_"))
    return given


@pytest.mark.parametrize("variant", ["fp32", "native"])
@pytest.mark.parametrize("last", [1, 3, 10, 20, 21, last_positions.EVERY])
def test_the_last_positions_logits_and_every_cache_entry_are_the_graphs_own(tiny_model, variant, last):
    """fp32 and the native operator (which then attends for those positions only): the same logits for
    the positions asked for, to float rounding, and byte-identical caches for every position."""
    _, plain, rewritten = graphs(tiny_model, variant)
    ids = np.random.default_rng(last % 97).integers(0, 50, (2, 20))
    everything = plain.run(None, feeds(plain, ids))
    got = rewritten.run(None, {**feeds(plain, ids), last_positions.INPUT: np.array([last], dtype=np.int64)})
    kept = min(last, 20)
    assert got[0].shape == (2, kept, everything[0].shape[2])
    np.testing.assert_allclose(got[0], everything[0][:, 20 - kept:], atol=2e-5, rtol=0)
    for ours, theirs in zip(got[1:], everything[1:], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_int8_keeps_every_cache_entry_and_its_logits_stay_within_int8s_own_error(int8_model):
    """int8 quantizes each run's activations as a whole, so the last layer quantized over one position
    is not bit for bit the same as over twenty: no further from fp32 than int8 already is."""
    _, plain, rewritten = graphs(int8_model, "int8")
    reference = ort.InferenceSession(str(int8_model / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, 50, (1, 40))
    fp32 = reference.run(None, feeds(reference, ids))[0][:, -1]
    everything = plain.run(None, feeds(plain, ids))
    got = rewritten.run(None, {**feeds(plain, ids), last_positions.INPUT: np.array([1], dtype=np.int64)})
    for ours, theirs in zip(got[1:], everything[1:], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    int8_error = np.abs(everything[0][:, -1] - fp32).max()
    assert np.abs(got[0][:, -1] - fp32).max() <= 2 * int8_error + 1e-4


def test_the_native_operator_takes_the_count_and_the_node_keeps_its_output(tiny_model):
    native_graph, _, _ = graphs(tiny_model, "native")
    model = onnx.load_from_string(native_graph)
    attention = [n for n in model.graph.node if n.op_type == native_attention.OP_TYPE]
    assert attention[-1].input[-1] == last_positions.INPUT and all(len(n.input) == 5 for n in attention[:-1])
    node_graph, _, _ = graphs(tiny_model, "fp32")
    node = onnx.load_from_string(node_graph)
    assert all(last_positions.INPUT not in n.input for n in node.graph.node if n.op_type == "GroupQueryAttention")
    assert sum(n.op_type == "Slice" for n in node.graph.node) == 2  # the attention output and the residual stream


def test_a_tail_that_reads_a_tensor_of_unknown_shape_is_left_as_exported(tiny_model):
    model = onnx.load(tiny_model / "model.onnx")
    last = max(i for i, n in enumerate(model.graph.node) if n.op_type == "GroupQueryAttention")
    read = {name for n in model.graph.node[last + 1:] for name in n.input}
    residual = next(v.name for v in model.graph.value_info if v.name in read and len(v.type.tensor_type.shape.dim) == 3
                    and v.name not in {o for n in model.graph.node[last:] for o in n.output})
    kept = [v for v in model.graph.value_info if v.name != residual]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    graph = model.SerializeToString()
    rewritten, why = last_positions.rewrite(graph)
    assert rewritten == graph and residual in why and "sequence axis" in why
    assert last_positions.rewrite(last_positions.rewrite((tiny_model / "model.onnx").read_bytes())[0])[1].startswith(
        "the graph already has")


@pytest.fixture(scope="module")
def decoder(tiny_model):
    decoder = OnnxDecoder.load(tiny_model, threads=1)
    assert decoder._last_input
    return decoder


@pytest.mark.parametrize("length, last", [(150, 1), (150, 5), (150, 40), (150, 150), (30, 2)])
def test_the_decoder_gives_the_last_positions_of_a_chunked_prompt(decoder, length, last):
    """A prompt longer than a run (150 = 64 + 64 + 22): `last` positions across the runs' boundary too."""
    assert length <= PREFILL_CHUNK or length % PREFILL_CHUNK
    ids = np.random.default_rng(length + last).integers(0, 50, (1, length))
    everything, full_cache = decoder.forward(ids, decoder.empty_cache(1))
    got, cache = decoder.forward(ids, decoder.empty_cache(1), last=last)
    assert got.shape == (1, last, decoder.vocab_size)
    np.testing.assert_allclose(got, everything[:, length - last:], atol=2e-5, rtol=0)
    for ours, theirs in zip(cache.tensors, full_cache.tensors, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    step, _ = decoder.step(ids, decoder.empty_cache(1))  # a prefill asks for its last position only
    if last == 1:
        np.testing.assert_array_equal(step, got[:, -1])
    with pytest.raises(ValueError, match="at least one"):
        decoder.forward(ids, decoder.empty_cache(1), last=0)


def test_a_graph_left_as_exported_still_gives_the_last_positions(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(last_positions, "rewrite", lambda graph: (graph, "a reason given by the test"))
    with caplog.at_level(logging.INFO, logger="segue.engine"):
        plain = OnnxDecoder.load(tiny_model, threads=1)
    assert not plain._last_input
    assert "every position's logits computed on every run: a reason given by the test" in caplog.text
    ids = np.random.default_rng(1).integers(0, 50, (1, 90))
    everything, _ = plain.forward(ids, plain.empty_cache(1))
    got, _ = plain.forward(ids, plain.empty_cache(1), last=3)
    np.testing.assert_array_equal(got, everything[:, -3:])
