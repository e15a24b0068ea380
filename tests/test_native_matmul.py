"""The native int8 matmul (segue.QuantizedMatMul, engine/native_matmul_kernel.h) against the arithmetic of
the chain it replaces (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add) applied to each row on
its own, on every code path this CPU can run; the graph rewrite; and the engine serving it for decode steps,
and for prompts where that path is the faster (in long runs, lent in short steps, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import cache_rows, native_attention, native_matmul, session
from engine.session import NATIVE_MATMUL_ROWS, OnnxDecoder, session_options
from tests import native_builds

RUNNABLE = native_builds.RUNNABLE  # the code paths this CPU runs; `libraries` (a fixture) holds a build of each


def chain_graph(weights: np.ndarray, weight_scale: np.ndarray, weight_zero: int, bias: np.ndarray | None) -> onnx.ModelProto:
    """One linear layer as `export-onnx --quantize int8` writes it (onnxruntime's quantize_dynamic)."""
    k, n = weights.shape
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("Mul", ["xs", "ws"], ["scale"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["sums"]),
             helper.make_node("Cast", ["sums"], ["float_sums"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["float_sums", "scale"], ["y" if bias is None else "product"])]
    constants = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(weight_scale, "ws"),
                 numpy_helper.from_array(np.array(weight_zero, np.int8), "wz")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["product", "b"], ["y"]))
        constants.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "steps", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "steps", n])], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reference(x: np.ndarray, weights: np.ndarray, weight_scale: np.ndarray, weight_zero: int, bias: np.ndarray | None):
    """DynamicQuantizeLinear of each row on its own (the operator's one departure from the chain, which takes
    one scale for every row) and the integer product, in numpy: float32 arithmetic, exact integer sums."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], weights.shape[1]), np.float32)
    for r, row in enumerate(rows):
        low, high = np.float32(min(row.min(), 0)), np.float32(max(row.max(), 0))
        scale = np.float32(1) if high == low else np.float32((high - low) / np.float32(255))
        zero = np.float32(np.rint(np.clip(np.float32(0) - low / scale, 0, 255)))
        q = np.clip(np.rint(row / scale) + zero, 0, 255).astype(np.int64)
        exact = (q - int(zero)) @ (weights.astype(np.int64) - weight_zero)
        out[r] = exact.astype(np.float32) * (scale * weight_scale.astype(np.float32))
    y = out.reshape(*x.shape[:-1], weights.shape[1])
    return y + bias if bias is not None else y


def row_by_row(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The chain's result with each row quantized on its own, as the operator quantizes: a run per row."""
    rows = next(iter(feeds.values())).shape[1]
    return np.concatenate([session.run(None, {name: value[:, r:r + 1] for name, value in feeds.items()})[0]
                           for r in range(rows)], axis=1)


def native_session(model: onnx.ModelProto, library: Path) -> ort.InferenceSession:
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert native_matmul.rewrite_model(rewritten, native_attention.DOMAIN) == 1
    assert [node.op_type for node in rewritten.graph.node] == [native_matmul.OP_TYPE]
    rewritten.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    options = session_options(1)
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_packing_puts_four_rows_of_each_column_together():
    weights = np.arange(-60, 60, dtype=np.int8)[: 10 * 12].reshape(10, 12)  # k = 10: a quad padded; n = 12 < 64
    packed, sums = native_matmul.pack(weights)
    quads, blocks = 3, 1
    assert packed.shape == (blocks * quads * 64 * 4,)
    for row in range(10):
        for column in range(12):
            assert packed[((row // 4) * 64 + column) * 4 + row % 4] == weights[row, column]
    assert not packed.reshape(quads, 64, 4)[:, 12:].any() and not packed.reshape(quads, 64, 4)[2, :, 2:].any()
    assert sums.tolist() == weights.astype(np.int32).sum(axis=0).tolist() + [0] * 52


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("k, n, rows", [(256, 768, 1), (256, 256, 3), (1024, 256, 1), (30, 70, 5), (32, 96, 9),
                                        (7, 129, 2), (256, 1024, 8), (64, 64, 4), (256, 768, 64), (1024, 256, 64),
                                        (40, 130, 11), (33, 65, 13), (17, 64, 6), (40, 330, 1), (32, 200, 1)])
def test_the_operator_computes_the_quantized_product(libraries, path, k, n, rows):
    """Rows 1-9 (a step, a batch of variations, a guess) and a prompt's run of 64, k not a multiple of 4 or
    of 16 and n not of 64 (padding), rows past a multiple of four and of six (the AVX-512 path's passes of
    six rows, then four, then one); the exact integer sums and float32 scaling of the reference."""
    rng = np.random.default_rng(k * n + rows)
    weights = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    weight_scale = np.array(0.004, np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((1, rows, k)) * 1.5 + 0.4).astype(np.float32)
    got = native_session(chain_graph(weights, weight_scale, 0, bias), libraries[path]).run(None, {"x": x})[0]
    want = reference(x, weights, weight_scale, 0, bias)
    assert got.shape == (1, rows, n)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("k, n", [(256, 768), (1024, 256), (40, 330), (32, 200), (64, 1000), (16, 64), (20, 256),
                                  (4, 256)])
def test_a_step_reads_its_weights_as_streams_with_the_same_result(libraries, path, k, n, monkeypatch):
    """A one-row call reads four blocks of 64 columns at once, each from its first and its second half of
    quads, where the path can (AVX-512 VNNI): groups of four, then the blocks left one by one; a partial
    last block inside a group (n 200, 1000) or after one (330); fewer blocks than a group (64); an odd
    count of quads (k 20) and a single one (k 4). Bit for bit what reading them one by one gives."""
    rng = np.random.default_rng(k + n)
    weights, scale = rng.integers(-127, 128, size=(k, n), dtype=np.int8), np.array(0.003, np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    model = chain_graph(weights, scale, 0, bias)
    x = (rng.standard_normal((1, 1, k)) * 2 + 0.3).astype(np.float32)
    results = {}
    for streams in (native_matmul.STREAMS, 1):
        if streams == 1:
            monkeypatch.setenv(native_matmul.STREAMS_SWITCH, "0")
        rewritten = onnx.ModelProto.FromString(model.SerializeToString())
        native_matmul.rewrite_model(rewritten, native_attention.DOMAIN)
        assert {a.name: a.i for a in rewritten.graph.node[0].attribute}["streams"] == streams
        results[streams] = native_session(model, libraries[path]).run(None, {"x": x})[0]
    assert np.array_equal(results[native_matmul.STREAMS], results[1])
    want = reference(x, weights, scale, 0, bias)
    np.testing.assert_allclose(results[1], want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("path", RUNNABLE)
def test_a_value_quantized_past_255_is_clamped_as_dynamic_quantize_linear_clamps_it(libraries, path):
    """x from -1.5 to 253.5: scale 1, zero point round(1.5) = 2, and 253.5 rounds to 254 (ties to even), so
    254 + 2 = 256 must clamp to 255, in every one of a prompt's 64 rows and in the rows' sums."""
    rng = np.random.default_rng(11)
    k, n = 48, 64
    weights = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    weight_scale = np.array(0.01, np.float32)
    x = rng.uniform(-1.5, 253.5, size=(1, 64, k)).astype(np.float32)
    x[0, :, 0], x[0, :, 1] = -1.5, 253.5
    got = native_session(chain_graph(weights, weight_scale, 0, None), libraries[path]).run(None, {"x": x})[0]
    want = reference(x, weights, weight_scale, 0, None)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("path", RUNNABLE)
def test_zero_points_column_scales_no_bias_and_more_dimensions(libraries, path):
    rng = np.random.default_rng(3)
    k, n = 40, 100
    weights = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    weight_scale = rng.uniform(0.001, 0.01, n).astype(np.float32)  # one scale per column
    x = np.abs(rng.standard_normal((3, 2, k))).astype(np.float32)  # all positive: the activation's zero point is 0
    for weight_zero in (0, 5, -128):
        got = native_session(chain_graph(weights, weight_scale, weight_zero, None), libraries[path]).run(None, {"x": x})[0]
        want = reference(x, weights, weight_scale, weight_zero, None)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
        x = -x  # then all negative: the zero point is 255


@pytest.mark.parametrize("path", RUNNABLE)
def test_it_matches_onnx_runtime_on_a_layer_of_the_exported_kind(libraries, path):
    """Weights as quantize_dynamic makes them from a trained-looking matrix: ONNX Runtime's own result, each
    row run on its own (each row its own quantization, as the operator quantizes them), to within a rounding
    of the last multiply-add (where its CPU kernel cannot saturate, as VNNI's cannot)."""
    rng = np.random.default_rng(5)
    k, n = 256, 768
    floats = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    weight_scale = np.array(np.abs(floats).max() / 127, np.float32)
    weights = np.clip(np.rint(floats / weight_scale), -127, 127).astype(np.int8)
    bias = rng.standard_normal(n).astype(np.float32) * 0.1
    model = chain_graph(weights, weight_scale, 0, bias)
    plain = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    native = native_session(model, libraries[path])
    for rows in (1, 2, 5, 64):
        x = rng.standard_normal((1, rows, k)).astype(np.float32)
        ours = native.run(None, {"x": x})[0]
        theirs = row_by_row(plain, {"x": x})
        if "avx512_vnni" in native_attention.cpu_flags():
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours, reference(x, weights, weight_scale, 0, bias), rtol=2e-6, atol=1e-6)


def test_a_wrong_width_is_a_clear_error(libraries):
    model = chain_graph(np.ones((16, 8), np.int8), np.array(0.1, np.float32), 0, None)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "width"  # so that ONNX Runtime lets it through
    session = native_session(model, libraries["portable"])
    with pytest.raises(Exception, match="QuantizedMatMul: the input's last dimension is not the weights' k"):
        session.run(None, {"x": np.ones((1, 1, 12), np.float32)})
    assert session.run(None, {"x": np.ones((1, 0, 16), np.float32)})[0].shape == (1, 0, 8)  # no rows: no work, no error


def test_a_chain_with_an_intermediate_read_elsewhere_is_left_alone():
    model = chain_graph(np.ones((16, 8), np.int8), np.array(0.1, np.float32), 0, np.zeros(8, np.float32))
    model.graph.node.append(helper.make_node("Identity", ["xs"], ["scale_seen"]))
    model.graph.output.append(helper.make_tensor_value_info("scale_seen", TensorProto.FLOAT, []))
    assert native_matmul.rewrite_model(model, native_attention.DOMAIN) == 0
    assert "MatMulInteger" in [node.op_type for node in model.graph.node]


def test_the_int8_export_is_rewritten_whole_and_computes_the_same(int8_model, monkeypatch):
    graph = (int8_model / "model.int8.onnx").read_bytes()
    exported = [node.op_type for node in onnx.load_from_string(graph).graph.node]
    chains, layers = exported.count("MatMulInteger"), exported.count("Gelu")
    with_matmuls, _ = native_attention.prepare(graph, quantized_matmuls=True)
    attention_only, _ = native_attention.prepare(graph)
    monkeypatch.setenv(native_matmul.FOLD_SWITCH, "0")
    unfolded, _ = native_attention.prepare(graph, quantized_matmuls=True)
    assert with_matmuls is not None and attention_only is not None and unfolded is not None
    assert with_matmuls.matmuls == chains > 0 and attention_only.matmuls == 0
    kinds = [node.op_type for node in onnx.load_from_string(with_matmuls.graph).graph.node]
    assert kinds.count(native_matmul.OP_TYPE) == chains and not {"MatMulInteger", "DynamicQuantizeLinear"} & set(kinds)
    # Each layer's two norms, its GELU and its two residual adds are folded in: the final norm, the
    # embeddings' add and the lengths' arithmetic stay ONNX Runtime's.
    assert layers > 0 and "Gelu" not in kinds and kinds.count("LayerNormalization") == 1
    assert len(kinds) == len(onnx.load_from_string(unfolded.graph).graph.node) - 5 * layers
    for native in (with_matmuls, unfolded):
        onnx.checker.check_model(onnx.load_from_string(native.graph))  # topologically sorted, every input made

    sessions = []
    for native in (with_matmuls, attention_only, unfolded):
        options = session_options(1)
        options.register_custom_ops_library(str(native.library))
        sessions.append(ort.InferenceSession(native.graph, options, providers=["CPUExecutionProvider"]))
    for ids in ([3], [3, 17, 9, 40]):
        outputs = []
        for graph in sessions:
            feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                     for i in graph.get_inputs() if i.name.startswith("past_")}
            feeds.update(input_ids=np.array([ids]), position_ids=np.arange(len(ids))[None])
            outputs.append(graph.run(None, feeds))
        # One position: one row, quantized alike on both sides. Several: ONNX Runtime's chain takes one scale
        # for them all and the operator one a row, so the two differ by int8 roundings (a few 1e-3 here).
        tolerance = 1e-4 if len(ids) == 1 else 2e-2
        for ours, theirs, unfolded_ones in zip(*outputs, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance)
            np.testing.assert_allclose(ours, unfolded_ones, rtol=1e-4, atol=1e-4)


def test_the_engine_decodes_with_it_and_keeps_prompts_on_onnx_runtime_when_told(int8_model, monkeypatch):
    """SEGUE_NATIVE_PROMPTS=0, or a CPU whose kernel path is not in PROMPT_PATHS: prompts on a second session
    with ONNX Runtime's int8 matmuls, steps of a few rows on the native ones."""
    monkeypatch.setenv(native_matmul.PROMPTS_SWITCH, "0")
    decoder = OnnxDecoder.load(int8_model, variant="int8")
    assert decoder.attention.startswith("native") and decoder.native_matmuls > 0 and not decoder.native_prompts
    assert decoder.prefill_session is not None and decoder.prefill_from == NATIVE_MATMUL_ROWS + 1
    used: list[tuple[int, bool]] = []
    run = OnnxDecoder._run

    def spy(self, binding, ids, positions, session, last=None):
        used.append((ids.size, session is self.session))
        return run(self, binding, ids, positions, session, last)

    monkeypatch.setattr(OnnxDecoder, "_run", spy)
    prompt = np.arange(3, 43)[None] % decoder.vocab_size
    logits, cache = decoder.step(prompt, decoder.empty_cache())  # 40 positions: the prompt session
    step_logits, step_cache = decoder.step(np.array([[5]]), cache)  # a step: the native matmuls
    guess_logits, _ = decoder.step_instead(np.array([[5, 6, 7]]), cache, step_cache, every_position=True)
    batch = decoder.empty_cache().repeat(NATIVE_MATMUL_ROWS + 1)
    decoder.step(np.zeros((NATIVE_MATMUL_ROWS + 1, 1), np.int64), batch)  # more rows than the native way is for
    assert used == [(40, False), (1, True), (3, True), (NATIVE_MATMUL_ROWS + 1, False)]

    monkeypatch.setenv("SEGUE_NATIVE_MATMUL", "0")
    plain = OnnxDecoder.load(int8_model, variant="int8")
    assert plain.native_matmuls == 0 and plain.prefill_session is None
    plain_logits, plain_cache = plain.step(prompt, plain.empty_cache())
    np.testing.assert_array_equal(logits, plain_logits)  # the prompt: the same session graph
    plain_step, plain_step_cache = plain.step(np.array([[5]]), plain_cache)
    np.testing.assert_allclose(step_logits, plain_step, rtol=1e-4, atol=1e-4)
    plain_guess, _ = plain.step_instead(np.array([[5, 6, 7]]), plain_cache, plain_step_cache, every_position=True)
    # Three rows: the native operator quantizes each on its own, ONNX Runtime's chain all three with one scale.
    np.testing.assert_allclose(guess_logits, plain_guess, rtol=1e-2, atol=1e-2)
    assert guess_logits.argmax(-1).tolist() == plain_guess.argmax(-1).tolist()


def test_prompts_run_on_the_native_matmuls_where_that_path_is_the_faster(int8_model, monkeypatch):
    """On a CPU whose kernel path takes prompts (AVX-512 VNNI without AMX), every run goes to the one
    session, a 130-token prompt too (in one run: OnnxDecoder._runs), and its logits and cache are what ONNX Runtime's
    int8 matmuls make of it; elsewhere the second session stays."""
    decoder = OnnxDecoder.load(int8_model, variant="int8")
    library = native_attention.library()[0]
    assert library is not None and decoder.native_matmuls > 0
    if not native_matmul.takes_prompts(library):
        assert decoder.prefill_session is not None and not decoder.native_prompts
        return
    assert decoder.prefill_session is None and decoder.native_prompts
    sessions: list[bool] = []
    run = OnnxDecoder._run

    def spy(self, binding, ids, positions, session, last=None):
        sessions.append(session is self.session)
        return run(self, binding, ids, positions, session, last)

    monkeypatch.setattr(OnnxDecoder, "_run", spy)
    prompt = (np.arange(130)[None] * 7 + 3) % decoder.vocab_size
    logits, cache = decoder.step(prompt, decoder.empty_cache())
    assert sessions == [True]
    monkeypatch.setenv(native_matmul.PROMPTS_SWITCH, "0")
    theirs = OnnxDecoder.load(int8_model, variant="int8")
    their_logits, their_cache = theirs.step(prompt, theirs.empty_cache())
    # Not bit for bit: the folded norms and GELU are the ONNX operators' arithmetic, not ONNX Runtime's
    # instructions, and a last bit can move an int8 rounding (engine/native_layer_kernel.h).
    np.testing.assert_allclose(logits, their_logits, rtol=1e-3, atol=2e-3)
    assert logits.argmax(-1).tolist() == their_logits.argmax(-1).tolist()
    for ours, reference in zip(cache.tensors, their_cache.tensors, strict=True):
        if ours.dtype == np.int8:  # int8 rows (engine/cache_rows.py): a number may round to the next step
            ours, reference = cache_rows.widen(ours), cache_rows.widen(reference)
            step = np.abs(reference).max(axis=-1, keepdims=True) / 127
            assert (np.abs(ours - reference) <= 1e-2 + 1e-2 * np.abs(reference) + 1.01 * step).all()
        else:
            np.testing.assert_allclose(ours.astype(np.float32), reference.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("run", [64, session.NATIVE_PROMPT_RUN])
def test_a_prompt_after_any_whole_step_of_lent_positions_is_computed_as_the_whole_prompt_is(int8_model, monkeypatch, run):
    """Where the native matmuls take prompts (each row quantized on its own), a prompt goes in long runs and
    a kept prompt may lend its first positions in steps of 16, leaving at least 8: whatever was lent, the
    rest computes every position bit for bit as a prefill of the whole prompt does. 245 positions: in runs
    of 64 (the run size patched down to the tiny model's context; the rest's first run is then the tail of
    one of them) or in one; 240 lent would leave 5, which the attention takes a query at a time, where the
    whole prompt's run of 245 went a query per lane (another order of sums)."""
    decoder = OnnxDecoder.load(int8_model, variant="int8")
    if not decoder.native_prompts:
        pytest.skip("this CPU keeps prompts on ONNX Runtime's int8 matmuls (native_matmul.takes_prompts)")
    monkeypatch.setattr(session, "NATIVE_PROMPT_RUN", run)
    step, rest = decoder.prefill_chunk, decoder.prefill_rest
    assert (step, rest) == (session.NATIVE_LEND_STEP, session.NATIVE_LEND_REST)
    ids = (np.arange(245)[None] * 11 + 5) % decoder.vocab_size
    whole_logits, whole = decoder.forward(ids, decoder.empty_cache(), last=1)
    assert decoder._runs(0, 245, prompt=True) == ([(0, 64), (64, 128), (128, 192), (192, 245)] if run == 64 else [(0, 245)])
    lendable = range(step, 245 - rest + 1, step)
    assert lendable[-1] == 224
    for lent in lendable:
        logits, cache = decoder.forward(ids[:, lent:], decoder.shortened(whole, lent), rest_of_prompt=True, last=1)
        assert np.array_equal(logits, whole_logits), lent
        for ours, theirs in zip(cache.tensors, whole.tensors, strict=True):
            assert np.array_equal(ours, theirs), lent


def test_each_row_of_a_batched_step_is_what_it_is_alone(int8_model):
    """The variations of a request decode as one batch; on the native matmuls each row is quantized on its
    own, so a row's logits are bit for bit those of the same step taken alone (with one scale for the
    batch, as ONNX Runtime's chain quantizes, they moved with the other rows)."""
    decoder = OnnxDecoder.load(int8_model, variant="int8")
    assert decoder.native_matmuls > 0
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, decoder.vocab_size, size=(1, 70))
    tokens = rng.integers(0, decoder.vocab_size, size=(3, 1))
    _, cache = decoder.step(prompt, decoder.empty_cache())
    together, _ = decoder.step(tokens, cache.repeat(3))
    for row in range(3):
        _, alone_cache = decoder.step(prompt, decoder.empty_cache())
        alone, _ = decoder.step(tokens[row:row + 1], alone_cache)
        assert np.array_equal(together[row], alone[0]), row


def test_which_kernels_take_prompts(monkeypatch, tmp_path):
    """Only the measured path, only without AMX (ONNX Runtime's matmuls use its tiles), and not when told no."""
    library = tmp_path / "segue.so"
    for path, flags, switch, expected in [("avx512-vnni", {"avx512_vnni"}, None, True),
                                          ("avx512-vnni", {"avx512_vnni", "amx_int8"}, None, False),
                                          ("avx512-vnni", {"avx512_vnni"}, "0", False),
                                          ("avx-vnni", {"avx_vnni"}, None, False), ("avx2", {"avx2"}, None, False),
                                          ("portable", set(), None, False)]:
        monkeypatch.setattr(native_matmul, "code_path", lambda _library, path=path: path)
        monkeypatch.setattr(native_attention, "cpu_flags", lambda flags=flags: flags)
        if switch is None:
            monkeypatch.delenv(native_matmul.PROMPTS_SWITCH, raising=False)
        else:
            monkeypatch.setenv(native_matmul.PROMPTS_SWITCH, switch)
        assert native_matmul.takes_prompts(library) is expected, (path, flags, switch)


# --- the neighbours folded into the operator (engine/native_layer_kernel.h) ---------------------------------

def folded_graph(k: int, n: int, before: str, after: str, rng: np.random.Generator) -> onnx.ModelProto:
    """One quantized linear layer with a LayerNormalization before it (`before` = "norm") and a GELU or a
    residual Add after it (`after` = "gelu" / "residual"), as the exporter writes a transformer layer's."""
    floats = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    weight_scale = np.array(np.abs(floats).max() / 127, np.float32)
    weights = np.clip(np.rint(floats / weight_scale), -127, 127).astype(np.int8)
    model = chain_graph(weights, weight_scale, 0, rng.standard_normal(n).astype(np.float32) * 0.1)
    graph = model.graph
    if before == "norm":
        for node in graph.node:
            node.input[:] = ["normed" if name == "x" else name for name in node.input]
        graph.node.insert(0, helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], axis=-1, epsilon=1e-5))
        graph.initializer.extend([numpy_helper.from_array((1 + 0.3 * rng.standard_normal(k)).astype(np.float32), "gamma"),
                                  numpy_helper.from_array((0.2 * rng.standard_normal(k)).astype(np.float32), "beta")])
    if after:
        graph.node[-1].output[0] = "product_y"
        graph.value_info.append(helper.make_tensor_value_info("product_y", TensorProto.FLOAT, ["batch", "steps", n]))
    if after == "gelu":
        graph.node.append(helper.make_node("Gelu", ["product_y"], ["y"], approximate="none"))
    elif after == "residual":
        graph.node.append(helper.make_node("Add", ["stream", "product_y"], ["y"]))
        graph.input.append(helper.make_tensor_value_info("stream", TensorProto.FLOAT, ["batch", "steps", n]))
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 20))  # Gelu
    return model


def folded_session(model: onnx.ModelProto, library: Path, expect_folded: int) -> ort.InferenceSession:
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert native_matmul.rewrite_model(rewritten, native_attention.DOMAIN) == 1
    assert native_matmul.fold_neighbours(rewritten, native_attention.DOMAIN) == expect_folded
    assert [node.op_type for node in rewritten.graph.node] == [native_matmul.OP_TYPE]
    rewritten.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    onnx.checker.check_model(rewritten)
    options = session_options(1)
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("before, after, folded", [("norm", "", 1), ("", "gelu", 1), ("", "residual", 1),
                                                   ("norm", "gelu", 2), ("norm", "residual", 2)])
def test_folded_norms_gelus_and_residuals_compute_what_the_nodes_did(libraries, path, before, after, folded):
    """Against ONNX Runtime running the same nodes unfolded. A norm's output may differ from ONNX Runtime's in
    its last bit, which can move the int8 rounding of that value by one step: the bound is two such steps,
    far below what a lost scale, bias, epsilon or GELU side would cost (the small-variance row makes the
    epsilon count)."""
    rng = np.random.default_rng(len(before) * 7 + len(after))
    k, n = 256, 768 if after != "residual" else 256
    model = folded_graph(k, n, before, after, rng)
    plain = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    native = folded_session(model, libraries[path], folded)
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for rows in (1, 3, 9):
        x = (rng.standard_normal((1, rows, k)) * 2 + 0.5).astype(np.float32)
        x[0, 0] *= 1e-3  # a row whose variance (4e-6) is of the epsilon's order
        feeds = {"x": x}
        if after == "residual":
            feeds["stream"] = rng.standard_normal((1, rows, n)).astype(np.float32)
        ours, theirs = native.run(None, feeds)[0], row_by_row(plain, feeds)
        quantized = x.astype(np.float64)
        if before:
            centred = quantized - quantized.mean(-1, keepdims=True)
            quantized = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * constants["gamma"] + constants["beta"]
        spread = (np.maximum(quantized.max(-1), 0) - np.minimum(quantized.min(-1), 0)).max()  # the widest row's
        one_rounding = spread / 255 * float(constants["ws"]) * np.abs(constants["w"]).max()  # one input moved one int8 step
        assert ours.shape == theirs.shape == (1, rows, n)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2 * one_rounding)
        assert np.abs(ours - theirs).mean() < 0.05 * one_rounding  # most values agree to float rounding


@pytest.mark.parametrize("path", RUNNABLE)
def test_the_gelu_is_the_exact_one_to_a_floats_rounding(libraries, path):
    """The operator's GELU against x erfc(-x / sqrt 2) / 2 (= x Phi(x)) in float64, from -12 to 12, on every
    code path: AVX-512 builds read Phi from engine/native_gelu_table.h's pieces, the others use the erfc
    formula. Relative accuracy where GELU is not tiny, absolute where it is (the negative side: the down
    projection quantizes its input in steps of about a hundredth of the row's range, so 1e-7 is far inside
    one); a float's rounding past |x| = 4."""
    import math

    values = np.concatenate([np.linspace(-12, 12, 4001), [0.0, 1e-6, -1e-6, 3.0e-3, -7.99, 7.99, 8.0, -8.0, 8.01, -8.01]])
    values = values.astype(np.float32)
    k, n = 4, len(values)
    model = folded_graph(k, n, "", "gelu", np.random.default_rng(0))
    # Weights of zero and the values as the bias: the product is exactly the bias, the GELU's input.
    for index, init in enumerate(model.graph.initializer):
        if init.name in ("w", "b"):
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(np.zeros((k, n), np.int8) if init.name == "w" else values, init.name))
    session = folded_session(model, libraries[path], 1)
    got = session.run(None, {"x": np.ones((1, 1, k), np.float32)})[0].ravel().astype(np.float64)
    want = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in values.astype(np.float64)])  # = 1 + erf, no cancelling
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-7)
    middle = (np.abs(values) <= 4) & (np.abs(want) > 1e-3)  # where a trained model's products fall, not tiny
    np.testing.assert_allclose(got[middle], want[middle], rtol=5e-6, atol=0)
    assert got[values == 0.0][0] == 0.0 and np.all(got[values <= -9] <= 0) and np.all(got[values >= 8] == values[values >= 8])


def test_an_add_of_two_matmuls_is_folded_into_one_of_them_only(libraries):
    """Add(matmul a, matmul b), each output read by the Add alone: the first takes the Add (the second's output
    as its residual); the second stays as it is, and the graph still computes the same."""
    rng = np.random.default_rng(11)
    k = n = 64
    parts = [folded_graph(k, n, "", "", rng) for _ in range(2)]
    nodes, initializers = [], []
    for tag, part in zip("ab", parts, strict=True):
        renamed = {name: f"{name}_{tag}" for node in part.graph.node for name in [*node.input, *node.output] if name != "x"}
        for node in part.graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
            node.output[:] = [renamed.get(name, name) for name in node.output]
            nodes.append(node)
        for init in part.graph.initializer:
            init.name = renamed[init.name]
            initializers.append(init)
    nodes.append(helper.make_node("Add", ["y_a", "y_b"], ["sum"]))
    shape = ["batch", "steps", n]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "steps", k])],
                              [helper.make_tensor_value_info("sum", TensorProto.FLOAT, shape)], initializers,
                              value_info=[helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("y_a", "y_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert native_matmul.rewrite_model(rewritten, native_attention.DOMAIN) == 2
    assert native_matmul.fold_neighbours(rewritten, native_attention.DOMAIN) == 1
    assert [node.op_type for node in rewritten.graph.node] == [native_matmul.OP_TYPE] * 2
    rewritten.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    onnx.checker.check_model(rewritten)
    options = session_options(1)
    options.register_custom_ops_library(str(libraries[RUNNABLE[-1]]))
    native = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    np.testing.assert_allclose(native.run(None, {"x": x})[0], row_by_row(plain, {"x": x}), rtol=1e-5, atol=1e-5)
