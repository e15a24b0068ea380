"""bench/bench_saturation.py: its int8 arithmetic is ONNX Runtime's, its int16 cut is vpmaddubsw's.

The bench's figures (what int8 loses on a CPU without VNNI) are only as good as its simulation, so each
piece is checked against the real thing: the activations' quantization and the exact integer product
against ONNX Runtime's DynamicQuantizeLinear and MatMulInteger, the saturating product against every
pair cut to int16 one by one (not only the pairs the bench picks as able to saturate), and the whole run on
the tiny int8 model against the perplexity the engine itself measures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_saturation  # noqa: E402
from bench_saturation import Counts, QuantizedLinear, quantize  # noqa: E402


def onnx_runtime_integer_product(x: np.ndarray, weights: np.ndarray, weight_zero: int) -> tuple[np.ndarray, ...]:
    """ONNX Runtime's DynamicQuantizeLinear of x (one scale for all its rows) and MatMulInteger by weights."""
    inner, outer = weights.shape
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
         helper.make_node("MatMulInteger", ["q", "w", "zero", "w_zero"], ["y"])],
        "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, inner])],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in
         (("q", TensorProto.UINT8, [None, inner]), ("scale", TensorProto.FLOAT, []), ("zero", TensorProto.UINT8, []),
          ("y", TensorProto.INT32, [None, outer]))],
        [helper.make_tensor("w", TensorProto.INT8, weights.shape, weights.flatten().tolist()),
         helper.make_tensor("w_zero", TensorProto.INT8, [], [weight_zero])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"x": x}))


def layer(weights: np.ndarray, zero: int = 0) -> QuantizedLinear:
    return QuantizedLinear("test", weights, zero, 0.01, torch.zeros(weights.shape[1]))


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    # Full-range weights and activations with a strong positive tail: many pairs pass 32,767.
    weights = rng.integers(-127, 128, size=(96, 40)).astype(np.int8)
    x = np.concatenate([rng.normal(size=(16, 96)), rng.exponential(3.0, size=(16, 96))]).astype(np.float32)
    return weights, x


def test_quantization_and_exact_product_are_onnx_runtimes(data):
    weights, x = data
    q, scale, zero, product = onnx_runtime_integer_product(x, weights, 3)
    ours_q, ours_zero, ours_scale = quantize(torch.from_numpy(x), run=len(x))
    assert np.array_equal(ours_q.numpy(), q.astype(np.int64))
    assert set(ours_zero.flatten().tolist()) == {int(zero)}
    assert np.float32(ours_scale[0, 0]) == scale
    exact = layer(weights, 3).integer_product(ours_q, ours_zero, saturate=False, counts=Counts())
    assert np.array_equal(exact.numpy(), product.astype(np.int64))


def test_a_run_of_one_row_quantizes_each_row_on_its_own(data):
    _, x = data
    q, zero, scale = quantize(torch.from_numpy(x), run=1)
    for r in (0, 7, 20, 31):
        want_q, want_scale, want_zero, _ = onnx_runtime_integer_product(x[r:r + 1], np.zeros((96, 1), np.int8), 0)
        assert np.array_equal(q[r].numpy(), want_q[0].astype(np.int64))
        assert (int(zero[r, 0]), np.float32(scale[r, 0])) == (int(want_zero), want_scale)


def test_the_saturating_product_cuts_every_pair_as_vpmaddubsw_does(data):
    weights, x = data
    q, zero, _ = quantize(torch.from_numpy(x), run=8)
    counts = Counts()
    got = layer(weights).integer_product(q, zero, saturate=True, counts=counts)

    qn, w = q.numpy(), weights.astype(np.int64)
    pairs = qn[:, 0::2, None] * w[None, 0::2, :] + qn[:, 1::2, None] * w[None, 1::2, :]  # every pair, [rows, in/2, out]
    cut = np.clip(pairs, -32768, 32767)
    want = cut.sum(1) - zero.numpy() * w.sum(0)
    assert np.array_equal(got.numpy(), want)
    hits = int((cut != pairs).sum())
    assert hits > 50  # the data makes the cut matter, so the check above is not the exact product's
    assert counts.saturated == hits
    assert counts.rows_hit == int((cut != pairs).any(axis=(1, 2)).sum())
    exact = layer(weights).integer_product(q, zero, saturate=False, counts=Counts())
    assert not np.array_equal(got.numpy(), exact.numpy())


def test_the_bench_on_the_tiny_int8_model_matches_the_engines_perplexity(int8_model, tiny_build, monkeypatch):
    from engine.session import OnnxDecoder
    from engine.tokens import ClipTokenizer
    from export.quantize import perplexity, validation_pieces

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_saturation.py"), str(int8_model),
                             "--val-data", str(tiny_build / "midi"), "--max-tokens", "3000", "--runs", "64"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {m.group(1).strip(): m for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \| ([0-9.]+) \|", result.stdout, re.M)}
    exact, fp32 = float(rows["exact int32 (VNNI, AMX, native)"].group(3)), float(rows["fp32 (torch)"].group(3))
    assert "int16 pairs saturate (MLAS without VNNI)" in rows

    pieces = validation_pieces(tiny_build / "midi", int8_model / "tokenizer.json", 0.05, 3000)
    kinds = ClipTokenizer.from_file(int8_model / "tokenizer.json").kinds
    engine_fp32, _ = perplexity(OnnxDecoder.load(int8_model, variant="fp32"), pieces, kinds.bos, kinds.eos)
    # ONNX Runtime's int8 matmuls (one scale a run of 64), as this CPU's exact integer sums compute them
    monkeypatch.setenv("SEGUE_NATIVE_PROMPTS", "0")
    engine_int8, _ = perplexity(OnnxDecoder.load(int8_model, variant="int8"), pieces, kinds.bos, kinds.eos)
    assert fp32 == pytest.approx(engine_fp32, rel=1e-4)
    assert exact == pytest.approx(engine_int8, rel=2e-4)
    # The simulation is the int8 model, not the fp32 one: nearer the engine's int8 than int8 is to fp32.
    assert abs(exact - engine_int8) < 0.5 * abs(engine_int8 - engine_fp32)


def test_pairs_that_cannot_saturate_are_left_out():
    weights = np.full((4, 2), 64, np.int8)  # |w0| + |w1| = 128: 255 * 128 < 32,768
    weights[2:, 1] = 127
    assert bench_saturation.PAIR_LIMIT == pytest.approx(128.5, abs=0.01)
    linear = layer(weights)
    assert (linear.pair_index.tolist(), linear.column_index.tolist()) == ([1], [1])
