"""The native attention operator (engine/native_attention.c) against ONNX Runtime's GroupQueryAttention
node it replaces: the same outputs and the same in-place cache writes, the engine serving it by default
where a C compiler is, and the node as the fallback, with the reason logged, where none is."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine import native_attention
from engine.generate import ContinuationRequest, Generator
from engine.midi_file import read_clip
from engine.session import OnnxDecoder, session_options


def attention_graph(heads: int, head_dim: int) -> bytes:
    """One GroupQueryAttention node as export/gqa.py writes it (packed QKV, no rotary)."""
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"],
                            ["out", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=heads)
    cache = ["batch", heads, "length", head_dim]
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "steps", 3 * heads * head_dim]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("out", "present_key", "present_value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


# The attention's two vector widths: this machine's build, and where it has AVX-512 the eight-lane code
# every CPU without it runs (AVX2 laptops), built here with AVX-512 turned off.
BUILDS = ["native"] + (["avx2"] if {"avx2", "avx512f"} <= native_attention.cpu_flags() else [])


@pytest.fixture(scope="session")
def avx2_library(libraries):
    """The AVX2 build of the suite's libraries (tests/native_builds.py): its attention takes eight lanes."""
    assert native_attention.attention_lanes(libraries["avx2"]) == 8
    return libraries["avx2"]


def sessions(heads: int, head_dim: int, library=None) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """ONNX Runtime's node and the native operator (this machine's build, or `library`)."""
    graph = attention_graph(heads, head_dim)
    native, why = native_attention.prepare(graph)
    assert native is not None, why
    assert native.nodes == 1
    assert [n.op_type for n in onnx.load_from_string(native.graph).graph.node] == [native_attention.OP_TYPE]
    options = session_options(1)
    options.register_custom_ops_library(str(library or native.library))
    return (ort.InferenceSession(graph, session_options(1), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(native.graph, options, providers=["CPUExecutionProvider"]))


def run_shared(session: ort.InferenceSession, qkv: np.ndarray, keys: np.ndarray, values: np.ndarray,
               lengths: list[int]) -> np.ndarray:
    """One run with `keys` and `values` bound as both past and present (the engine's way); its output."""
    steps = qkv.shape[1]
    binding = session.io_binding()
    binding.bind_output("out")
    binding.bind_cpu_input("qkv", qkv)
    for past, present, buffer in (("past_key", "present_key", keys), ("past_value", "present_value", values)):
        shared = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(past, shared)
        binding.bind_ortvalue_output(present, shared)
    binding.bind_cpu_input("seqlens_k", np.array([n + steps - 1 for n in lengths], dtype=np.int32))
    binding.bind_cpu_input("total", np.array([max(lengths) + steps], dtype=np.int32))
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


@pytest.mark.parametrize("heads, head_dim", [(8, 32), (8, 64), (2, 16), (3, 24), (2, 48)])
@pytest.mark.parametrize("steps, lengths", [(1, [0]), (1, [300]), (3, [257]), (64, [0]), (64, [192]), (1, [10, 40]),
                                            (17, [33]), (7, [100]), (8, [100]), (12, [0, 0]), (30, [5]), (40, [70])])
@pytest.mark.parametrize("build", BUILDS)
def test_in_the_shared_buffer_it_matches_the_node(heads, head_dim, steps, lengths, build, request):
    """The engine's way: one buffer bound as past and present, the history's length from seqlens_k; a
    prompt chunk, decode steps, a guess's few positions, rows of different lengths, the last position;
    runs of new positions either side of SEGUE_QUERIES_FROM (8: from there a query per vector lane), and
    runs that end in a part of a set of sixteen queries or of a pair of sets (which share the scores' pass)."""
    node, native = sessions(heads, head_dim, request.getfixturevalue("avx2_library") if build == "avx2" else None)
    rng = np.random.default_rng(steps * 1000 + sum(lengths))
    batch, capacity = len(lengths), 512
    qkv = rng.standard_normal((batch, steps, 3 * heads * head_dim), dtype=np.float32)
    history = rng.standard_normal((2, batch, heads, capacity, head_dim), dtype=np.float32)
    results = []
    for session in (node, native):
        keys, values = history[0].copy(), history[1].copy()
        results.append((run_shared(session, qkv, keys, values, lengths), keys, values))
    (out_node, keys_node, values_node), (out_native, keys_native, values_native) = results
    assert out_native.shape == (batch, steps, heads * head_dim)
    np.testing.assert_allclose(out_native, out_node, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(keys_native, keys_node)  # the new positions written in place, nothing else
    np.testing.assert_array_equal(values_native, values_node)
    assert not np.array_equal(keys_native, history[0])


@pytest.mark.parametrize("steps, length", [(5, 0), (1, 7), (3, 20), (64, 64)])
def test_with_a_past_as_long_as_the_history_it_appends_like_the_node(steps, length):
    """The plain contract (the manifest's kv_layout): presents = pasts + the new positions."""
    node, native = sessions(8, 32)
    rng = np.random.default_rng(steps + length)
    batch = 2 if steps == 1 or length == 0 else 1  # the node takes several new positions after a past for one row only
    feeds = {"qkv": rng.standard_normal((batch, steps, 3 * 8 * 32), dtype=np.float32),
             "past_key": rng.standard_normal((batch, 8, length, 32), dtype=np.float32),
             "past_value": rng.standard_normal((batch, 8, length, 32), dtype=np.float32),
             "seqlens_k": np.full(batch, length + steps - 1, dtype=np.int32),
             "total": np.array([length + steps], dtype=np.int32)}
    expected, got = node.run(None, feeds), native.run(None, feeds)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=2e-6, rtol=0)
    assert got[1].shape == (batch, 8, length + steps, 32)


@pytest.mark.parametrize("head_dim", [32, 24])
@pytest.mark.parametrize("steps, last", [(20, 1), (20, 3), (20, 12), (20, 20), (20, 0), (20, 99), (1, 1)])
def test_asked_for_the_last_positions_it_gives_those_and_writes_every_cache_entry(head_dim, steps, last):
    """The optional sixth input (engine/last_positions.py): outputs for the last `last` positions only
    (a query per lane from 8 of them), the keys and values of all; 0 or more than there are: all."""
    _, native = sessions(4, head_dim)
    model = onnx.load_from_string(native_attention.rewrite(attention_graph(4, head_dim))[0])
    model.graph.node[0].input.append("last_positions")
    model.graph.input.append(helper.make_tensor_value_info("last_positions", TensorProto.INT64, [1]))
    options = session_options(1)
    options.register_custom_ops_library(str(native_attention.library()[0]))
    asking = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(steps + last)
    feeds = {"qkv": rng.standard_normal((2, steps, 3 * 4 * head_dim), dtype=np.float32),
             "past_key": rng.standard_normal((2, 4, 40, head_dim), dtype=np.float32),
             "past_value": rng.standard_normal((2, 4, 40, head_dim), dtype=np.float32),
             "seqlens_k": np.array([30 + steps - 1] * 2, dtype=np.int32), "total": np.array([30 + steps], dtype=np.int32)}
    everything = native.run(None, feeds)
    got = asking.run(None, {**feeds, "last_positions": np.array([last], dtype=np.int64)})
    kept = last if 1 <= last <= steps else steps
    assert got[0].shape == (2, kept, 4 * head_dim)
    np.testing.assert_allclose(got[0], everything[0][:, steps - kept:], atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got[1], everything[1])
    np.testing.assert_array_equal(got[2], everything[2])


def test_a_length_past_the_buffer_is_an_error_that_names_it():
    _, native = sessions(8, 32)
    feeds = {"qkv": np.zeros((1, 1, 3 * 8 * 32), dtype=np.float32),
             "past_key": np.zeros((1, 8, 4, 32), dtype=np.float32), "past_value": np.zeros((1, 8, 4, 32), dtype=np.float32),
             "seqlens_k": np.array([10], dtype=np.int32), "total": np.array([5], dtype=np.int32)}
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    with pytest.raises(Exception, match="seqlens_k"):
        native.run(None, feeds, quiet)
    feeds["past_value"] = np.zeros((1, 8, 5, 32), dtype=np.float32)
    feeds["seqlens_k"] = np.array([2], dtype=np.int32)
    with pytest.raises(Exception, match="past_key and past_value differ"):
        native.run(None, feeds, quiet)


def test_the_engine_serves_it_and_decodes_as_the_node_does(tiny_model, example_midi, monkeypatch):
    """Prefill in chunks, decode steps, several new positions after a history, a batch: the logits of the
    engine's native sessions are the node's within float rounding, and a greedy continuation is identical."""
    native = OnnxDecoder.load(tiny_model)
    monkeypatch.setenv(native_attention.SWITCH, "0")
    node = OnnxDecoder.load(tiny_model)
    assert native.attention.startswith("native (") and node.attention == "GroupQueryAttention"
    ids = np.random.default_rng(0).integers(4, native.vocab_size, size=(1, 150))
    got, want = native.step(ids, native.empty_cache()), node.step(ids, node.empty_cache())
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    for new in ([[5]], [[6, 7, 8]], [[9]]):
        got = native.step(np.array(new), got[1])
        want = node.step(np.array(new), want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    pair = native.step(np.array([[10], [11]]), got[1].repeat(2)), node.step(np.array([[10], [11]]), want[1].repeat(2))
    np.testing.assert_allclose(pair[0][0], pair[1][0], atol=1e-4, rtol=0)

    clip = read_clip(example_midi[0])
    request = ContinuationRequest(bars=4, variations=2, temperature=0.0)
    monkeypatch.delenv(native_attention.SWITCH)
    with_native = [d.tokens for d in Generator.load(tiny_model).generate(clip, request)]
    monkeypatch.setenv(native_attention.SWITCH, "0")
    with_node = [d.tokens for d in Generator.load(tiny_model).generate(clip, request)]
    assert with_native == with_node and len(with_native[0]) > 20


def test_without_a_compiler_the_node_serves_and_the_log_says_why(tiny_model, monkeypatch, caplog):
    monkeypatch.setenv("CC", "segue-no-such-compiler")
    assert native_attention.library() == (None, "no C compiler found (cc, gcc, clang or $CC)")
    with caplog.at_level(logging.INFO):
        decoder = OnnxDecoder.load(tiny_model)
    assert decoder.attention == "GroupQueryAttention"
    assert "GroupQueryAttention, not the native operator: no C compiler found" in caplog.text


def test_a_compiler_that_fails_leaves_the_node_and_a_warning(tiny_model, monkeypatch, caplog, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        decoder = OnnxDecoder.load(tiny_model)
    assert decoder.attention == "GroupQueryAttention"
    assert "broken-cc: cannot compile" in caplog.text  # the compiler's own words reach the log
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_the_library_is_built_once_per_machine_and_source(monkeypatch, tmp_path):
    """Its cache folder follows XDG_CACHE_HOME, and a library in it is loaded, not built again. (In the suite's
    own cache: a build in an empty one costs 13-17 s, and every engine test already builds there.)"""
    native_attention._built.clear()
    first, why = native_attention.library()
    assert first is not None, why
    assert first.parent == native_attention.cache_dir()
    built_at = first.stat().st_mtime_ns
    native_attention._built.clear()  # a new process: the file in the cache is used, not rebuilt
    again, _ = native_attention.library()
    assert again == first and again.stat().st_mtime_ns == built_at
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_attention.cache_dir() == tmp_path / "segue" / "native"
    monkeypatch.setenv(native_attention.SWITCH, "0")
    assert native_attention.library() == (None, f"{native_attention.SWITCH}=0")


def test_the_library_can_be_built_for_another_cpu(monkeypatch):
    """SEGUE_NATIVE_ARCH names the -march: haswell builds the eight-lane attention and the AVX2 matmul in a
    cache entry of its own (the suite's cache: tests/test_native_matmul4.py serves from that build too); a
    value that is not a CPU's name is refused with the reason, and the node serves."""
    native_attention._built.clear()
    here, why = native_attention.library()
    assert here is not None, why
    monkeypatch.setenv(native_attention.ARCH_SWITCH, "haswell")
    haswell, why = native_attention.library()
    assert haswell is not None, why
    assert haswell != here and haswell.parent == here.parent
    if "avx2" in native_attention.cpu_flags():  # the build is loaded to ask it: only where this CPU runs its code
        from engine import native_matmul

        assert native_attention.attention_lanes(haswell) == 8
        assert native_matmul.code_path(haswell) == "avx2"
    monkeypatch.setenv(native_attention.ARCH_SWITCH, "native -o /tmp/x")
    missing, why = native_attention.library()
    assert missing is None and native_attention.ARCH_SWITCH in why and "native -o /tmp/x" in why


def test_an_unwritable_cache_leaves_the_node(tiny_model, monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setenv("CC", "gcc")  # another cache key than the suite's other tests: built (or not) afresh
    assert OnnxDecoder.load(tiny_model).attention == "GroupQueryAttention"
