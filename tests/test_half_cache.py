"""The float16 KV cache of the int8 variant on the native operator (segue.CausalAttention16): the same
arithmetic as the float operator on the same (half-precision) history, keys and values rounded to the
nearest half as they are written, and the engine choosing it (with SEGUE_INT8_CACHE=0: by default the
int8 variant keeps int8 rows, tests/test_int8_cache.py) only where every session shares it."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine import native_attention, native_matmul
from engine.session import OnnxDecoder, session_options
from tests.test_native_attention import attention_graph, run_shared

pytestmark = pytest.mark.skipif(not native_attention.enabled() or native_attention.library()[0] is None
                                or not native_attention.offers_half_cache(native_attention.library()[0]),
                                reason="this machine builds no native operator with a float16 cache (no F16C)")


def operators(heads: int, head_dim: int) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The native operator over float buffers and over half buffers, on the same one-node graph."""
    graph = attention_graph(heads, head_dim)
    made = []
    for half in (False, True):
        native, why = native_attention.prepare(graph, half_cache=half)
        assert native is not None, why
        assert native.half_cache is half
        model = onnx.load_from_string(native.graph)
        assert [n.op_type for n in model.graph.node] == [native_attention.HALF_OP_TYPE if half else native_attention.OP_TYPE]
        cache_types = {i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past")}
        assert cache_types == {TensorProto.FLOAT16 if half else TensorProto.FLOAT}
        options = session_options(1)
        options.register_custom_ops_library(str(native.library))
        made.append(ort.InferenceSession(native.graph, options, providers=["CPUExecutionProvider"]))
    return made[0], made[1]


@pytest.mark.parametrize("heads, head_dim", [(8, 32), (8, 64), (3, 24)])
@pytest.mark.parametrize("steps, lengths", [(1, [0]), (1, [300]), (3, [257]), (64, [0]), (64, [192]), (1, [10, 40]),
                                            (17, [33]), (8, [100])])
def test_on_a_history_of_halves_it_computes_what_the_float_operator_does(heads, head_dim, steps, lengths):
    """Keys and values that are halves already: widened exactly, so the outputs are the float operator's
    (a decode step, a prompt's run a query per lane, a guess, rows of different lengths) and the buffer
    holds the same numbers, in half the bytes."""
    floats, halves = operators(heads, head_dim)
    rng = np.random.default_rng(steps * 1000 + sum(lengths))
    batch, capacity = len(lengths), 512
    qkv = rng.standard_normal((batch, steps, 3 * heads * head_dim), dtype=np.float32).astype(np.float16).astype(np.float32)
    history = rng.standard_normal((2, batch, heads, capacity, head_dim), dtype=np.float32).astype(np.float16)
    keys32, values32 = history[0].astype(np.float32), history[1].astype(np.float32)
    keys16, values16 = history[0].copy(), history[1].copy()
    want = run_shared(floats, qkv, keys32, values32, lengths)
    got = run_shared(halves, qkv, keys16, values16, lengths)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(keys16.astype(np.float32), keys32)
    np.testing.assert_array_equal(values16.astype(np.float32), values32)
    assert not np.array_equal(keys16, history[0])  # the new positions were written


def test_new_keys_and_values_are_rounded_to_the_nearest_half():
    """Written as numpy rounds float32 to float16 (to nearest, ties to even): the cache a float16 KVCache
    holds, bit for bit, whoever wrote it."""
    _, halves = operators(2, 32)
    rng = np.random.default_rng(3)
    qkv = (rng.standard_normal((1, 5, 3 * 2 * 32), dtype=np.float32) * 3.0).astype(np.float32)
    keys, values = np.zeros((2, 1, 2, 64, 32), dtype=np.float16)
    run_shared(halves, qkv, keys, values, [10])
    new = qkv.reshape(1, 5, 3, 2, 32)
    for buffer, part in ((keys, 1), (values, 2)):
        np.testing.assert_array_equal(buffer[0, :, 10:15], new[0, :, part].transpose(1, 0, 2).astype(np.float16))
        assert not buffer[0, :, :10].any() and not buffer[0, :, 15:].any()


@pytest.mark.parametrize("steps, length", [(5, 0), (1, 7), (64, 64)])
def test_with_a_past_as_long_as_the_history_it_appends_halves(steps, length):
    """The plain contract (not the shared buffer): the presents are the pasts and the new positions."""
    floats, halves = operators(8, 32)
    rng = np.random.default_rng(steps + length)
    batch = 2 if steps == 1 or length == 0 else 1
    qkv = rng.standard_normal((batch, steps, 3 * 8 * 32), dtype=np.float32).astype(np.float16).astype(np.float32)
    pasts = rng.standard_normal((2, batch, 8, length, 32), dtype=np.float32).astype(np.float16)
    lengths = {"seqlens_k": np.full(batch, length + steps - 1, dtype=np.int32), "total": np.array([length + steps], dtype=np.int32)}
    want = floats.run(None, {"qkv": qkv, "past_key": pasts[0].astype(np.float32), "past_value": pasts[1].astype(np.float32), **lengths})
    got = halves.run(None, {"qkv": qkv, "past_key": pasts[0], "past_value": pasts[1], **lengths})
    assert got[1].dtype == np.float16 and got[1].shape == (batch, 8, length + steps, 32)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got[1].astype(np.float32), want[1])
    np.testing.assert_array_equal(got[2].astype(np.float32), want[2])


def test_a_cache_another_node_reads_stays_float():
    """Halves only where the attention nodes alone touch the cache: a past read by anything else keeps
    the graph as it is (float32), rather than feed it halves it does not expect."""
    model = onnx.load_from_string(attention_graph(2, 16))
    model.graph.node.append(helper.make_node("Identity", ["past_key"], ["peek"]))
    model.graph.output.append(helper.make_tensor_value_info("peek", TensorProto.FLOAT, None))
    rewritten, nodes, _, halved = native_attention.rewrite(model.SerializeToString(), half_cache=True)
    assert nodes == 1 and not halved
    assert [n.op_type for n in onnx.load_from_string(rewritten).graph.node][0] == native_attention.OP_TYPE


def test_the_engine_keeps_the_int8_variants_cache_in_halves(int8_model, monkeypatch):
    """The int8 variant on one thread, int8 rows turned off: a float16 cache on its sessions (the prompts'
    too, where it has one: native_matmul.takes_prompts), the last-positions rewrite still applied, and
    logits within half rounding of the float32 cache's, greedy tokens the same."""
    monkeypatch.setenv(native_attention.INT8_SWITCH, "0")
    half = OnnxDecoder.load(int8_model, variant="int8")
    monkeypatch.setenv(native_attention.HALF_SWITCH, "0")
    full = OnnxDecoder.load(int8_model, variant="int8")
    assert half.cache_dtype == np.float16 and "float16 cache" in half.attention
    assert full.cache_dtype == np.float32 and "float16" not in full.attention
    assert half._last_input and (half.prefill_session is None) == half.native_prompts
    for session in (half.session, half.prefill_session):  # a prompt's session shares the buffers
        assert session is None or {i.type for i in session.get_inputs() if i.name.startswith("past")} == {"tensor(float16)"}
    assert half.empty_cache().tensors[0].dtype == np.float16

    ids = np.random.default_rng(1).integers(4, half.vocab_size, size=(1, 120))
    got, want = half.step(ids, half.empty_cache()), full.step(ids, full.empty_cache())
    np.testing.assert_allclose(got[0], want[0], atol=0.05, rtol=0)
    cache_half, cache_full = got[1], want[1]
    assert cache_half.tensors[0].nbytes * 2 == cache_full.tensors[0].nbytes
    np.testing.assert_allclose(cache_half.tensors[0].astype(np.float32), cache_full.tensors[0], atol=0.02, rtol=1e-3)
    greedy_side_by_side(half, cache_half, full, cache_full, int(got[0].argmax()), atol=0.05)


def greedy_side_by_side(ours: OnnxDecoder, our_cache, theirs: OnnxDecoder, their_cache, first: int, atol: float,
                        steps: int = 24) -> None:
    """Two decoders decode greedily from their caches, each from its own argmax: logits within `atol` at
    every step, and the same tokens."""
    tokens: tuple[list[int], list[int]] = ([], [])
    token_ours = token_theirs = np.array([[first]])
    for _ in range(steps):
        logits_ours, our_cache = ours.step(token_ours, our_cache)
        logits_theirs, their_cache = theirs.step(token_theirs, their_cache)
        np.testing.assert_allclose(logits_ours, logits_theirs, atol=atol, rtol=0)
        token_ours, token_theirs = np.array([[int(logits_ours.argmax())]]), np.array([[int(logits_theirs.argmax())]])
        tokens[0].append(int(token_ours[0, 0]))
        tokens[1].append(int(token_theirs[0, 0]))
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("why, int8_rows", [("fp32 variant", True), ("fp32 variant", False), ("prefill threads", True),
                                            ("prefill threads", False), ("no F16C", False)])
def test_elsewhere_the_cache_stays_float32(int8_model, monkeypatch, why, int8_rows):
    """The fp32 variant (served to match the reference exactly) and a prefill session of more threads (ONNX
    Runtime's node, float32 only, shares the buffers) keep float32, int8 rows allowed or not; a library
    without halves, where int8 rows are turned off, too (with them on it keeps int8 rows: any CPU has them)."""
    if not int8_rows:
        monkeypatch.setenv(native_attention.INT8_SWITCH, "0")
    kwargs: dict = {"variant": "int8"}
    if why == "fp32 variant":
        kwargs["variant"] = "fp32"
    elif why == "prefill threads":
        kwargs["prefill_threads"] = 2
    else:
        monkeypatch.setattr(native_attention, "offers_half_cache", lambda path: False)
    decoder = OnnxDecoder.load(int8_model, **kwargs)
    assert decoder.attention.startswith("native") and decoder.cache_dtype == np.float32
    sessions = [s for s in (decoder.session, decoder.prefill_session) if s is not None]
    assert all({i.type for i in s.get_inputs() if i.name.startswith("past")} == {"tensor(float)"} for s in sessions)


def test_sessions_that_disagree_on_the_cache_leave_prompts_on_the_decode_session(int8_model, monkeypatch, caplog):
    """Should the prompt session's graph fall back to ONNX Runtime's node (float32 only) while the decode
    session has a narrower cache (int8 rows, by default), prompts go to the decode session rather than
    write floats into its buffer."""
    monkeypatch.setenv(native_matmul.PROMPTS_SWITCH, "0")  # a second session for prompts, on any CPU
    real = native_attention.prepare

    def only_for_decode(graph, quantized_matmuls=False, half_cache=False, int8_cache=False, matmul_bits=8):
        return real(graph, quantized_matmuls, half_cache, int8_cache, matmul_bits) if quantized_matmuls else (None, "planted")

    monkeypatch.setattr(native_attention, "prepare", only_for_decode)
    with caplog.at_level(logging.WARNING, logger="engine.session"):
        decoder = OnnxDecoder.load(int8_model, variant="int8")
    assert decoder.cache_dtype == np.int8 and decoder.prefill_session is None
    assert "prompts run on the decode session" in caplog.text
    logits, cache = decoder.step(np.arange(4, 84)[None, :], decoder.empty_cache())
    assert np.isfinite(logits).all() and cache.length == 80
