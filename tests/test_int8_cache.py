"""The int8 KV cache of the int8 variant on the native operator (segue.CausalAttention8): each position's
keys and values of a head as head_dim bytes and a float32 scale, written exactly as engine/cache_rows.py
makes them, read back to the same attention the float operator computes on the numbers they stand for,
and the engine serving it for the int8 variant (float16 with SEGUE_INT8_CACHE=0)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from engine import cache_rows, native_attention
from engine.session import KVCache, OnnxDecoder, session_options
from tests.test_half_cache import greedy_side_by_side
from tests.test_native_attention import BUILDS, attention_graph, avx2_library, run_shared  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not native_attention.enabled() or native_attention.library()[0] is None,
                                reason="this machine builds no native operator (no C compiler)")


def operators(heads: int, head_dim: int, library=None) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The native operator over float buffers and over int8 rows, on the same one-node graph (this
    machine's build, or `library`)."""
    graph = attention_graph(heads, head_dim)
    made = []
    for int8 in (False, True):
        native, why = native_attention.prepare(graph, int8_cache=int8)
        assert native is not None, why
        assert native.int8_cache is int8 and not native.half_cache
        model = onnx.load_from_string(native.graph)
        assert [n.op_type for n in model.graph.node] == [native_attention.INT8_OP_TYPE if int8 else native_attention.OP_TYPE]
        pasts = [i for i in model.graph.input if i.name.startswith("past")]
        assert {i.type.tensor_type.elem_type for i in pasts} == {TensorProto.INT8 if int8 else TensorProto.FLOAT}
        assert {i.type.tensor_type.shape.dim[3].dim_value for i in pasts} == {head_dim + 4 if int8 else head_dim}
        options = session_options(1)
        options.register_custom_ops_library(str(library or native.library))
        made.append(ort.InferenceSession(native.graph, options, providers=["CPUExecutionProvider"]))
    return made[0], made[1]


def int16_queries(qkv: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """qkv with each position's query of each head rounded to int16 steps of its largest magnitude / 32767,
    as an AVX-512 VNNI build rounds a prompt's queries before scoring them against int8 keys."""
    parts = qkv.reshape(*qkv.shape[:-1], 3, heads, head_dim).copy()
    q = parts[..., 0, :, :]
    most = np.abs(q).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(most > 0, np.float32(32767) / most, np.float32(0)).astype(np.float32)
    step = (most * np.float32(1 / 32767)).astype(np.float32)
    parts[..., 0, :, :] = np.rint(q * inverse).astype(np.float32) * step
    return parts.reshape(qkv.shape)


def takes_int16_scores(library, steps: int, head_dim: int) -> bool:
    """Whether `library` scores this run from int16 queries: a prompt's run (a query per lane) on a build that has them."""
    return (native_attention.int16_prompt_scores(library) and steps >= 8 and head_dim % native_attention.attention_lanes(library) == 0
            and head_dim <= 64)


def representable(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """qkv whose keys and values are numbers int8 rows hold exactly (each head's row through the rows and back)."""
    shape = x.shape
    parts = x.reshape(*shape[:-1], 3, heads, head_dim).copy()
    parts[..., 1:, :, :] = cache_rows.widen(cache_rows.quantize(parts[..., 1:, :, :]))
    return parts.reshape(shape)


@pytest.mark.parametrize("heads, head_dim", [(8, 32), (8, 64), (3, 24)])
@pytest.mark.parametrize("steps, lengths", [(1, [0]), (1, [300]), (3, [257]), (64, [0]), (64, [192]), (1, [10, 40]),
                                            (17, [33]), (8, [100])])
@pytest.mark.parametrize("build", BUILDS)
def test_on_a_history_of_int8_rows_it_computes_what_the_float_operator_does(heads, head_dim, steps, lengths, build, request):
    """A history of int8 rows and new keys and values they hold exactly: the outputs are the float
    operator's on the numbers the rows stand for (a decode step, a prompt's run a query per lane, a guess,
    rows of different lengths; on both vector widths; a prompt's run on an AVX-512 VNNI build with its
    queries rounded to int16 steps, as that build scores them), and the new positions' rows are written as
    engine/cache_rows.py writes them, bit for bit."""
    library = request.getfixturevalue("avx2_library") if build == "avx2" else native_attention.library()[0]
    floats, rows = operators(heads, head_dim, library)
    rng = np.random.default_rng(steps * 1000 + sum(lengths))
    batch, capacity = len(lengths), 512
    qkv = representable(rng.standard_normal((batch, steps, 3 * heads * head_dim), dtype=np.float32) * 2, heads, head_dim)
    history = cache_rows.quantize(rng.standard_normal((2, batch, heads, capacity, head_dim), dtype=np.float32))
    keys32, values32 = cache_rows.widen(history[0]), cache_rows.widen(history[1])
    keys8, values8 = history[0].copy(), history[1].copy()
    rounded = takes_int16_scores(library, steps, head_dim)
    want = run_shared(floats, int16_queries(qkv, heads, head_dim) if rounded else qkv, keys32, values32, lengths)
    got = run_shared(rows, qkv, keys8, values8, lengths)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if rounded:  # the rounding is what the outputs differ by from the float arithmetic on the queries themselves
        exact = run_shared(floats, qkv, keys32.copy(), values32.copy(), lengths)
        assert 0 < np.abs(got - exact).max() < 2e-3
    new = qkv.reshape(batch, steps, 3, heads, head_dim)
    for b, length in enumerate(lengths):
        for buffer, part in ((keys8, 1), (values8, 2)):
            np.testing.assert_array_equal(buffer[b, :, length:length + steps],
                                          cache_rows.quantize(new[b, :, part].transpose(1, 0, 2)))
            np.testing.assert_array_equal(buffer[b, :, :length], history[part - 1][b, :, :length])  # the history kept
    assert not np.array_equal(keys8, history[0])


@pytest.mark.parametrize("build", BUILDS)
def test_new_rows_are_the_numpy_rows_for_any_numbers(build, request):
    """Numbers the rows do not hold exactly (large, tiny, ties, a row of zeros): written as numpy rounds
    them, ties to even, the largest magnitude 127, an all-zero row zero bytes and a zero scale."""
    _, rows = operators(2, 32, request.getfixturevalue("avx2_library") if build == "avx2" else None)
    rng = np.random.default_rng(3)
    qkv = (rng.standard_normal((1, 6, 3 * 2 * 32), dtype=np.float32) * np.float32(1e3)).astype(np.float32)
    qkv[0, 1] *= np.float32(1e-6)
    qkv[0, 2, 2 * 32:3 * 32] = 0.0  # position 2's keys of head 0
    ties = np.concatenate([[127.0], np.arange(-15, 16) + 0.5]).astype(np.float32)  # a step of 1: halfway numbers
    qkv[0, 4, 2 * 32:3 * 32] = ties
    keys, values = np.zeros((2, 1, 2, 64, 36), dtype=np.int8)
    run_shared(rows, qkv, keys, values, [10])
    new = qkv.reshape(1, 6, 3, 2, 32)
    for buffer, part in ((keys, 1), (values, 2)):
        np.testing.assert_array_equal(buffer[0, :, 10:16], cache_rows.quantize(new[0, :, part].transpose(1, 0, 2)))
        assert not buffer[0, :, :10].any() and not buffer[0, :, 16:].any()
    assert not keys[0, 0, 12].any()
    assert np.abs(keys[0, :, 10:16, :32]).max() == 127
    np.testing.assert_array_equal(keys[0, 0, 14, 1:32], 2 * np.round((np.arange(-15, 16) + 0.5) / 2))  # to even
    assert keys[0, 0, 14, 0] == 127


def test_with_a_past_as_long_as_the_history_it_appends_rows():
    """The plain contract (not the shared buffer): the presents are the pasts' rows and the new ones."""
    floats, rows = operators(8, 32)
    rng = np.random.default_rng(5)
    batch, steps, length = 2, 1, 7
    qkv = representable(rng.standard_normal((batch, steps, 3 * 8 * 32), dtype=np.float32), 8, 32)
    pasts = cache_rows.quantize(rng.standard_normal((2, batch, 8, length, 32), dtype=np.float32))
    lengths = {"seqlens_k": np.full(batch, length + steps - 1, dtype=np.int32), "total": np.array([length + steps], dtype=np.int32)}
    want = floats.run(None, {"qkv": qkv, "past_key": cache_rows.widen(pasts[0]), "past_value": cache_rows.widen(pasts[1]), **lengths})
    got = rows.run(None, {"qkv": qkv, "past_key": pasts[0], "past_value": pasts[1], **lengths})
    assert got[1].dtype == np.int8 and got[1].shape == (batch, 8, length + steps, 36)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[1][:, :, :length], pasts[0])
    np.testing.assert_array_equal(cache_rows.widen(got[1]), want[1])
    np.testing.assert_array_equal(cache_rows.widen(got[2]), want[2])


def test_rows_too_short_for_a_scale_are_refused_with_a_clear_error():
    """A graph whose rows' size is symbolic, fed rows with no room for a head and its scale: the operator's
    own error (ONNX Runtime checks a declared size itself)."""
    native, why = native_attention.prepare(attention_graph(2, 32), int8_cache=True)
    assert native is not None, why
    model = onnx.load_from_string(native.graph)
    for value in model.graph.input:
        if value.name.startswith("past"):
            value.type.tensor_type.shape.dim[3].dim_param = "row"
    options = session_options(1)
    options.register_custom_ops_library(str(native.library))
    rows = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    lengths = {"seqlens_k": np.zeros(1, dtype=np.int32), "total": np.array([1], dtype=np.int32)}
    short = np.zeros((1, 2, 4, 4), dtype=np.int8)
    with pytest.raises(Exception, match="head_dim bytes and a 4-byte scale"):
        rows.run(None, {"qkv": np.zeros((1, 1, 3 * 2 * 32), np.float32), "past_key": short, "past_value": short, **lengths})


def test_cache_rows_round_trip():
    """widen(quantize(x)) is within half a step of x, and quantize(widen(rows)) gives the rows back."""
    x = np.random.default_rng(0).standard_normal((3, 4, 50, 32), dtype=np.float32) * 5
    rows = cache_rows.quantize(x)
    step = np.abs(x).max(-1, keepdims=True) / 127
    assert (np.abs(cache_rows.widen(rows) - x) <= step / 2 * (1 + 1e-5)).all()
    np.testing.assert_array_equal(cache_rows.quantize(cache_rows.widen(rows)), rows)


def test_the_engine_keeps_the_int8_variants_cache_in_int8_rows(int8_model, monkeypatch):
    """The int8 variant on one thread: int8 rows on its sessions (float16 with SEGUE_INT8_CACHE=0), the
    last-positions rewrite still applied; logits near the float16 cache's, the same greedy tokens; a
    cache given as float arrays (KVCache(tensors)) is made rows as the operator would write them."""
    rows = OnnxDecoder.load(int8_model, variant="int8")
    monkeypatch.setenv(native_attention.INT8_SWITCH, "0")
    half = OnnxDecoder.load(int8_model, variant="int8")
    assert rows.cache_dtype == np.int8 and rows.cache_row == rows.head_dim + 4 and "int8 cache" in rows.attention
    assert half.cache_dtype == np.float16 and half.cache_row == half.head_dim and "float16 cache" in half.attention
    assert rows._last_input and (rows.prefill_session is None) == rows.native_prompts
    for session in (rows.session, rows.prefill_session):  # a prompt's session shares the buffers
        assert session is None or {i.type for i in session.get_inputs() if i.name.startswith("past")} == {"tensor(int8)"}
    assert rows.empty_cache().tensors[0].shape == (1, rows.n_head, 0, rows.head_dim + 4)

    ids = np.random.default_rng(1).integers(4, rows.vocab_size, size=(1, 120))
    got, want = rows.step(ids, rows.empty_cache()), half.step(ids, half.empty_cache())
    np.testing.assert_allclose(got[0], want[0], atol=0.1, rtol=0)
    cache_rows_, cache_half = got[1], want[1]
    assert cache_rows_.tensors[0].dtype == np.int8 and cache_rows_.tensors[0].shape[-1] == rows.head_dim + 4
    np.testing.assert_allclose(cache_rows.widen(cache_rows_.tensors[0]), cache_half.tensors[0].astype(np.float32), atol=0.05, rtol=0.02)

    as_floats = KVCache(tuple(cache_rows.widen(t) for t in cache_rows_.tensors))  # the same history, built elsewhere
    token = np.array([[int(got[0].argmax())]])
    np.testing.assert_array_equal(rows.step(token, as_floats)[0], rows.step(token, cache_rows_)[0])

    greedy_side_by_side(rows, cache_rows_, half, cache_half, int(token[0, 0]), atol=0.1)
