"""GroupQueryAttention's lengths fed from the host (engine/host_lengths.py) and the GPU's cache in device
buffers (engine/session.py's _DeviceStore), both checked here on the CPU, which runs the same graph and
the same binding code (OrtValues in host memory instead of device memory). On a GPU, tests/test_gpu.py
(`-m gpu`) checks them through CUDA."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine import host_lengths
from engine.manifest import MODEL_FILE, read_model_folder
from engine.session import CPU, KVCache, OnnxDecoder, _DeviceStore, session_options


def test_the_rewrite_feeds_the_lengths_from_the_host_and_computes_the_same(tiny_model):
    manifest, files = read_model_folder(tiny_model)
    rewritten, why = host_lengths.rewrite(files[MODEL_FILE])
    assert why == ""
    graph = onnx.load_from_string(rewritten)
    onnx.checker.check_model(graph)
    assert {host_lengths.SEQLENS, host_lengths.TOTAL} <= {i.name for i in graph.graph.input}
    attention = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == manifest.model.n_layer
    assert all(list(n.input[5:7]) == [host_lengths.SEQLENS, host_lengths.TOTAL] for n in attention)
    assert not any(n.op_type == "ReduceMax" for n in graph.graph.node), "the nodes that computed the lengths are gone"
    read = {name for node in graph.graph.node for name in node.input}
    assert all(i.name in read for i in graph.graph.initializer), "no constant is left unread"

    shape = manifest.model
    sessions = [ort.InferenceSession(g, session_options(1), providers=[CPU]) for g in (files[MODEL_FILE], rewritten)]
    ids = np.random.default_rng(0).integers(0, shape.vocab_size, (2, 24))
    results = []
    for session, fed in zip(sessions, (False, True), strict=True):
        pasts = [np.zeros((2, shape.n_head, 0, shape.head_dim), np.float32) for _ in manifest.onnx.past_inputs]
        logits = []
        for start, stop in ((0, 20), (20, 21), (21, 22)):  # a prompt of two rows, then two steps
            positions = np.repeat(np.arange(start, stop)[None], 2, axis=0)
            feeds = {"input_ids": ids[:, start:stop], "position_ids": positions,
                     **dict(zip(manifest.onnx.past_inputs, pasts, strict=True)),
                     **(host_lengths.feeds(positions) if fed else {})}
            out = session.run(None, feeds)
            logits.append(out[0][:, -1])
            pasts = out[1:]
        results.append(np.stack(logits))
    np.testing.assert_array_equal(results[0], results[1])


def test_the_lengths_are_the_documented_ones():
    fed = host_lengths.feeds(np.array([[5, 6, 7], [9, 10, 11]]))
    assert fed[host_lengths.SEQLENS].dtype == np.int32 and fed[host_lengths.SEQLENS].tolist() == [7, 11]
    assert fed[host_lengths.TOTAL].dtype == np.int32 and fed[host_lengths.TOTAL].shape == () and int(fed[host_lengths.TOTAL]) == 12


def test_a_graph_without_group_query_attention_is_left_as_it_is():
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    data = onnx.helper.make_model(graph).SerializeToString()
    assert host_lengths.rewrite(data) == (data, "the graph has no GroupQueryAttention node")


@pytest.fixture(scope="module")
def decoders(tiny_model):
    """The tiny model's usual CPU decoder, and one over the rewritten graph that takes the GPU's path:
    its cache in _DeviceStore buffers bound as past and present (here OrtValues in host memory)."""
    manifest, files = read_model_folder(tiny_model)
    reference = OnnxDecoder.load(tiny_model, variant="fp32")
    graph = host_lengths.rewrite(files[MODEL_FILE])[0]
    device = OnnxDecoder(tiny_model, manifest, ort.InferenceSession(graph, session_options(1), providers=[CPU]))
    assert device._host_lengths and not device.device_buffers  # on the CPU the host buffers serve...
    device.shared, device.device_buffers = False, True  # ...so take the GPU's path by hand
    return reference, device


def test_the_device_buffer_path_steps_as_the_engine_does(decoders):
    reference, device = decoders
    ids = np.random.default_rng(1).integers(0, reference.vocab_size, (1, 60))
    expected, cache_r = reference.step(ids[:, :40], reference.empty_cache())
    got, cache_d = device.step(ids[:, :40], device.empty_cache())
    assert isinstance(cache_d._store, _DeviceStore) and cache_d.length == 40
    np.testing.assert_allclose(got, expected, atol=1e-4)
    for i in range(40, 60):
        expected, cache_r = reference.step(ids[:, i:i + 1], cache_r)
        got, cache_d = device.step(ids[:, i:i + 1], cache_d)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(cache_d.tensors), np.concatenate(cache_r.tensors), atol=1e-4)


def test_a_device_cache_keeps_its_meaning_after_a_newer_one_wrote_past_it(decoders):
    reference, device = decoders
    ids = np.random.default_rng(2).integers(0, reference.vocab_size, (1, 40))
    _, older = device.step(ids[:, :20], device.empty_cache())
    _, newer = device.step(ids[:, 20:30], older)  # writes positions 20..29 of the same buffers
    assert newer._store is older._store
    again, branched = device.step(ids[:, 35:36], older)  # a different token at position 20: a copy first
    assert branched._store is not older._store
    _, cache = reference.step(ids[:, :20], reference.empty_cache())
    expected, _ = reference.step(ids[:, 35:36], cache)
    np.testing.assert_allclose(again, expected, atol=1e-4)
    # The newer cache still holds its own positions 20..29.
    after_newer, _ = device.step(ids[:, 30:31], newer)
    _, cache = reference.step(ids[:, :30], reference.empty_cache())
    np.testing.assert_allclose(after_newer, reference.step(ids[:, 30:31], cache)[0], atol=1e-4)


def test_device_caches_repeat_select_and_take_host_histories(decoders):
    reference, device = decoders
    ids = np.random.default_rng(3).integers(0, reference.vocab_size, (1, 16))
    _, cache_d = device.step(ids, device.empty_cache())
    _, cache_r = reference.step(ids, reference.empty_cache())
    pair_d, pair_r = cache_d.repeat(3), cache_r.repeat(3)
    assert pair_d.batch == 3 and pair_d.length == 16
    tokens = np.array([[4], [5], [6]])
    got, pair_d = device.step(tokens, pair_d)
    expected, pair_r = reference.step(tokens, pair_r)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    chosen = pair_d.select([2, 0])
    assert chosen.batch == 2 and chosen.length == 17
    np.testing.assert_allclose(np.concatenate(chosen.tensors, axis=0), np.concatenate(pair_r.select([2, 0]).tensors, axis=0), atol=1e-4)
    # A history built elsewhere (host arrays, as a PrefillCache keeps them) goes into new device buffers.
    from_host, _ = device.step(np.array([[7]]), KVCache(cache_r.tensors))
    np.testing.assert_allclose(from_host, reference.step(np.array([[7]]), cache_r)[0], atol=1e-4)


def test_a_failed_device_step_leaves_the_cache_steppable_in_place(decoders):
    _, device = decoders
    ids = np.random.default_rng(4).integers(0, device.vocab_size, (1, 12))
    _, cache = device.step(ids[:, :10], device.empty_cache())
    with pytest.raises(Exception, match="out of"):  # onnxruntime's own error type
        device.step(np.array([[device.vocab_size + 5]]), cache)  # a token outside the vocabulary
    _, stepped = device.step(ids[:, 10:11], cache)
    assert stepped._store is cache._store, "the failed step gave its positions back"
