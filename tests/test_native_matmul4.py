"""int4 decode steps (segue.QuantizedMatMul4, engine/native_matmul4_kernel.h): the int8 weights quantized
again in groups of 64 rows (engine/native_matmul.py's pack4), the operator against the product of the
weights they stand for, on every code path this CPU can build, and the engine serving the int8 variant's
decode steps from them while its prompts stay on the int8 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engine import native_attention, native_matmul
from engine.manifest import MODEL_FILE, read_model_folder
from engine.session import NATIVE_MATMUL_ROWS, OnnxDecoder, fast_int4_here, session_options
from tests.test_native_matmul import RUNNABLE, chain_graph, folded_graph

# The int4 kernel's own path in each build: AVX-512 VNNI, else AVX2 (an AVX-VNNI build takes the AVX2 loop), else portable.
INT4_PATH = {"portable": "portable", "avx2": "avx2", "avx-vnni": "avx2", "avx512-vnni": "avx512-vnni"}


@pytest.mark.parametrize("path", RUNNABLE)
def test_each_build_takes_its_int4_path(libraries, path):
    assert native_matmul.int4_code_path(libraries[path]) == INT4_PATH[path]


def group_reference(weights: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """The float weights int4 stands for, computed plainly: each group of 64 rows of a column scaled by its
    largest |w| / 7 and rounded (half to even) to [-7, 7], in float32 as pack4 divides."""
    k, n = weights.shape
    scale = np.broadcast_to(weight_scale.astype(np.float32).reshape(-1), (n,))
    out = np.zeros((k, n), np.float64)
    for column in range(n):
        for start in range(0, k, 64):
            group = weights[start:start + 64, column].astype(np.float32)
            peak = np.abs(group).max()
            step = peak / np.float32(7) if peak else np.float32(1)
            fours = np.clip(np.rint(group / step), -7, 7).astype(np.float64)
            out[start:start + 64, column] = fours * float(np.float32(step * scale[column]))
    return out


def row_reference(x: np.ndarray, effective: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Each row quantized to uint8 on its own (as the int8 operator does), times the int4 weights' values."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], effective.shape[1]))
    for r, row in enumerate(rows):
        low, high = np.float32(min(row.min(), 0)), np.float32(max(row.max(), 0))
        scale = np.float32(1) if high == low else np.float32((high - low) / np.float32(255))
        zero = np.float32(np.rint(np.clip(np.float32(0) - low / scale, 0, 255)))
        q = np.clip(np.rint(row / scale) + zero, 0, 255)
        out[r] = float(scale) * ((q - zero) @ effective) + bias
    return out.reshape(*x.shape[:-1], effective.shape[1])


def int4_session(model: onnx.ModelProto, library: Path, streams: bool = True) -> ort.InferenceSession:
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert native_matmul.rewrite_model(rewritten, native_attention.DOMAIN, bits=4) == 1
    node = rewritten.graph.node[0]
    assert [n.op_type for n in rewritten.graph.node] == [native_matmul.INT4_OP_TYPE]
    if not streams:
        for attribute in node.attribute:
            if attribute.name == "streams":
                attribute.i = 1
    rewritten.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    options = session_options(1)
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k, n", [(128, 128), (100, 70), (512, 1536), (2048, 512), (64, 200), (192, 320), (32, 64)])
def test_packing_stands_for_each_group_quantized_on_its_own(k, n):
    """unpack4(pack4(w)) is the plain group quantization; every group's largest weight is kept exactly; the
    peaks are each group's largest |w| in int8 steps, the units the column's scale / 7, the C each column's
    sum of its int4 values times their groups' peaks (an integer); padding (k, n not multiples of 64) holds
    zeros."""
    rng = np.random.default_rng(k + n)
    weights = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    weights[5, 3] = 0
    weights[:64, 0] = 0  # an all-zero group
    weights[64 % k, 1] = -127  # a group's peak at the int8 limit
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    packed, peaks, terms = native_matmul.pack4(weights, scale)
    groups, blocks = -(-k // 64), -(-n // 64)
    assert packed.dtype == np.int8 and packed.shape == (blocks * groups * 64 * 64 // 2,)
    assert peaks.dtype == np.uint8 and peaks.shape == (blocks * groups * 64,)
    assert terms.dtype == np.float32 and terms.shape == (2 * blocks * 64,)
    corrections, units = terms.reshape(2, blocks * 64)
    effective = native_matmul.unpack4(packed, peaks, terms, k, n)
    want = group_reference(weights, scale)
    np.testing.assert_allclose(effective, want, rtol=1e-6, atol=1e-9)
    grid = peaks.reshape(blocks, groups, 64).transpose(1, 0, 2).reshape(groups, blocks * 64)
    for g, start in enumerate(range(0, k, 64)):  # the largest |w| of each group, exactly (to float32 rounding of the unit)
        group = weights[start:start + 64].astype(np.float64)
        peak = np.abs(group).argmax(axis=0)
        assert np.array_equal(grid[g, :n], np.abs(group).max(axis=0))
        np.testing.assert_allclose(effective[start + peak, np.arange(n)], group[peak, np.arange(n)] * scale, rtol=1e-6)
    np.testing.assert_allclose(units[:n], scale / np.float32(7), rtol=1e-7)
    assert np.array_equal(corrections, np.rint(corrections))  # whole numbers, exactly
    np.testing.assert_allclose(corrections[:n] * units[:n].astype(np.float64), effective.astype(np.float64).sum(axis=0),
                               rtol=1e-5, atol=1e-6 * np.abs(effective).sum(axis=0).max())
    assert not corrections[n:].any() and not units[n:].any() and not grid[:, n:].any()
    full = native_matmul.unpack4(packed, peaks, terms, groups * 64, blocks * 64)
    assert not full[k:].any() and not full[:, n:].any()


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("k, n, rows", [(512, 1536, 1), (2048, 512, 1), (256, 256, 3), (100, 70, 2), (64, 200, 1),
                                        (192, 320, 4), (128, 960, 1), (32, 64, 5), (1024, 64, 1),
                                        (256, 320, 6)])
def test_the_operator_computes_the_product_of_its_int4_weights(libraries, path, k, n, rows):
    """One to six rows (a step, a batch of variations, a guess); k and n multiples of 64 and not; an odd
    count of groups (192: three) and of blocks (n 320: five, the last read alone, after two pairs read from both
    halves of their groups); against the reference's float64 product of the same quantized rows and the int4
    weights' values. Each row alike whatever else is in the call (several rows share each block's unpacked
    weights, four at a time)."""
    rng = np.random.default_rng(k * n + rows)
    weights = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    scale = np.array(0.004, np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((1, rows, k)) * 1.5 + 0.4).astype(np.float32)
    session = int4_session(chain_graph(weights, scale, 0, bias), libraries[path])
    got = session.run(None, {"x": x})[0]
    want = row_reference(x, group_reference(weights, scale), bias)
    assert got.shape == (1, rows, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    alone = np.concatenate([session.run(None, {"x": x[:, r:r + 1]})[0] for r in range(rows)], axis=1)
    assert np.array_equal(got, alone)
    streamless = int4_session(chain_graph(weights, scale, 0, bias), libraries[path], streams=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(streamless, got, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("path", RUNNABLE)
def test_zero_points_column_scales_and_folded_neighbours(libraries, path):
    """A weight zero point (subtracted before the int4 quantization), one scale per column, and the norm
    before and the GELU after folded into the int4 node as into the int8 one."""
    rng = np.random.default_rng(5)
    k, n = 128, 192
    weights = rng.integers(-100, 100, size=(k, n), dtype=np.int8)
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    model = chain_graph(weights, scale, 3, None)
    x = rng.standard_normal((2, 1, k)).astype(np.float32)
    got = int4_session(model, libraries[path]).run(None, {"x": x})[0]
    effective = group_reference((weights.astype(np.int16) - 3).clip(-128, 127).astype(np.int8), scale)
    want = row_reference(x, effective, np.zeros(n))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

    layer = folded_graph(k, n, "norm", "gelu", rng)
    plain = onnx.ModelProto.FromString(layer.SerializeToString())
    four = onnx.ModelProto.FromString(layer.SerializeToString())
    assert native_matmul.rewrite_model(four, native_attention.DOMAIN, bits=4) == 1
    assert native_matmul.fold_neighbours(four, native_attention.DOMAIN) == 2
    assert [node.op_type for node in four.graph.node] == [native_matmul.INT4_OP_TYPE]
    four.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    options = session_options(1)
    options.register_custom_ops_library(str(libraries[path]))
    folded = ort.InferenceSession(four.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: rng.standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in layer.graph.input}
    unfolded = onnx.ModelProto.FromString(plain.SerializeToString())
    assert native_matmul.rewrite_model(unfolded, native_attention.DOMAIN, bits=4) == 1
    unfolded.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    separate = ort.InferenceSession(unfolded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(folded.run(None, feeds)[0], separate.run(None, feeds)[0], rtol=2e-5, atol=2e-5)


def test_a_packed_size_that_is_not_k_by_n_is_a_clear_error(libraries):
    rng = np.random.default_rng(2)
    model = chain_graph(rng.integers(-127, 128, size=(128, 64), dtype=np.int8), np.array(0.01, np.float32), 0, None)
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    native_matmul.rewrite_model(rewritten, native_attention.DOMAIN, bits=4)
    for attribute in rewritten.graph.node[0].attribute:
        if attribute.name == "k":
            attribute.i = 192  # three groups, for the two packed
    rewritten.opset_import.append(helper.make_opsetid(native_attention.DOMAIN, 1))
    rewritten.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 192
    options = session_options(1)
    options.register_custom_ops_library(str(next(iter(libraries.values()))))
    session = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="QuantizedMatMul4: the packed weights' size is not k x n's"):
        session.run(None, {"x": np.zeros((1, 1, 192), np.float32)})


def int4_exact(int8_model: Path) -> tuple[object, dict[str, bytes]]:
    """The int8 variant's files with every weight group made exactly representable in int4 (multiples of 16,
    each group's largest |w| 112 = 7 x 16), so int4 decode steps must compute what int8 ones do."""
    manifest, files = read_model_folder(int8_model)
    name = manifest.variants["int8"].file
    model = onnx.load_from_string(files[name])
    quantized = {node.input[1] for node in model.graph.node if node.op_type == "MatMulInteger"}
    assert quantized
    for initializer in model.graph.initializer:
        if initializer.name in quantized:
            w = numpy_helper.to_array(initializer).astype(np.int16)
            w = np.clip(np.rint(w / 16), -7, 7).astype(np.int16) * 16
            w[::64] = 112  # the first row of each group: the group's step is 16 exactly
            initializer.CopyFrom(numpy_helper.from_array(w.astype(np.int8), initializer.name))
    return manifest, {**files, name: model.SerializeToString()}


# The engine's library as built for this CPU, and, where it runs AVX2, built for AVX2 alone (SEGUE_NATIVE_ARCH):
# the int4 kernel's AVX2 path serves decode steps there, as on an AVX2 CPU.
ENGINE_ARCHES = ["native", *(["haswell"] if "avx2" in native_attention.cpu_flags() else [])]


@pytest.mark.parametrize("arch", ENGINE_ARCHES)
def test_the_engine_decodes_from_int4_weights_and_keeps_prompts_on_int8(int8_model, monkeypatch, arch):
    """decode_weights="int4": steps of up to NATIVE_MATMUL_ROWS rows on the int4 session, prompts and larger
    batches on a session of the int8 weights (the native prompt kernel where it takes prompts); with weights
    int4 holds exactly, every step's logits are the int8 engine's (to float rounding), the prompt's bit for bit.
    (The vocabulary projection as the int8 file has it, float32, for this: its int8 form is the next test's.)"""
    if arch != "native":
        monkeypatch.setenv(native_attention.ARCH_SWITCH, arch)
        assert native_matmul.int4_code_path(native_attention.library()[0]) == "avx2"
    monkeypatch.setenv(native_matmul.HEAD_SWITCH, "0")
    manifest, files = int4_exact(int8_model)
    int8 = OnnxDecoder.from_bytes(int8_model, manifest, files[MODEL_FILE], variant="int8", files=files)
    four = OnnxDecoder.from_bytes(int8_model, manifest, files[MODEL_FILE], variant="int8", files=files, decode_weights="int4")
    if not fast_int4_here():  # a CPU without the fast int4 kernel: int8 decode steps, as without the option
        assert four.decode_weights == "int8" and four.serve_reason == int8.serve_reason
        return
    assert four.decode_weights == "int4" and int8.decode_weights == "int8"
    assert four.serve_reason.endswith("its decode steps from int4 weights (SEGUE_DECODE_WEIGHTS=int4)")
    assert four.native_matmuls == int8.native_matmuls > 0
    assert four.prefill_session is not None and four.prefill_from == NATIVE_MATMUL_ROWS + 1
    assert four.native_prompts == int8.native_prompts
    used: list[tuple[int, bool]] = []
    run = OnnxDecoder._run

    def spy(self, binding, ids, positions, session, last=None):
        if self is four:
            used.append((ids.size, session is self.session))
        return run(self, binding, ids, positions, session, last)

    monkeypatch.setattr(OnnxDecoder, "_run", spy)
    prompt = np.arange(3, 43)[None] % four.vocab_size
    want, cache8 = int8.step(prompt, int8.empty_cache())
    got, cache4 = four.step(prompt, four.empty_cache())
    assert np.array_equal(got, want)
    for token in (5, 9, 2):
        want, cache8 = int8.step(np.array([[token]]), cache8)
        got, cache4 = four.step(np.array([[token]]), cache4)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    guess_want, _ = int8.step(np.array([[5, 6, 7]]), cache8)
    guess_got, _ = four.step(np.array([[5, 6, 7]]), cache4)
    np.testing.assert_allclose(guess_got, guess_want, rtol=1e-4, atol=1e-4 * np.abs(guess_want).max())
    four.step(np.zeros((NATIVE_MATMUL_ROWS + 1, 1), np.int64), four.empty_cache().repeat(NATIVE_MATMUL_ROWS + 1))
    prompt_runs = [entry for entry in used if entry[0] == 40]
    assert prompt_runs and not any(on_int4 for _, on_int4 in prompt_runs)
    assert (1, True) in used and (3, True) in used and (NATIVE_MATMUL_ROWS + 1, False) in used


def test_the_int4_session_reads_the_vocabulary_projection_as_int8(int8_model, monkeypatch):
    """The int4 decode session's vocabulary projection (the tied embedding, transposed: a float32 MatMul in the
    int8 file) is one more native int8 matmul, its weights quantized per column: no float MatMul left, the
    logits within the rounding that costs (its perplexity is part of the int4 variant's), the prompt's (on the
    int8 session) untouched; SEGUE_QUANTIZED_HEAD=0 keeps the float one."""
    monkeypatch.setenv(native_matmul.HEAD_SWITCH, "0")
    plain = OnnxDecoder.load(int8_model, variant="int8", decode_weights="int4")
    monkeypatch.setenv(native_matmul.HEAD_SWITCH, "1")
    head = OnnxDecoder.load(int8_model, variant="int8", decode_weights="int4")
    if not fast_int4_here():  # int8 decode steps there, whose session keeps the float projection
        assert head.decode_weights == "int8" and head.native_matmuls == plain.native_matmuls
        return
    assert head.native_matmuls == plain.native_matmuls + 1
    graph = onnx.load_from_string(native_attention.rewrite(read_model_folder(int8_model)[1]["model.int8.onnx"],
                                                           quantized_matmuls=True, matmul_bits=4)[0])
    kinds = [node.op_type for node in graph.graph.node]
    assert "MatMul" not in kinds and "Transpose" not in kinds and kinds.count(native_matmul.OP_TYPE) == 1
    prompt = np.arange(3, 43)[None] % head.vocab_size
    want, cache_plain = plain.step(prompt, plain.empty_cache())
    got, cache_head = head.step(prompt, head.empty_cache())
    assert np.array_equal(got, want)  # prompts: the int8 session, which keeps the float projection
    for token in (5, 9, 2, 7):
        want, cache_plain = plain.step(np.array([[token]]), cache_plain)
        got, cache_head = head.step(np.array([[token]]), cache_head)
        assert not np.array_equal(got, want)
        np.testing.assert_allclose(got, want, rtol=0, atol=0.03 * np.abs(want).max())


def test_int4_is_asked_for_only_where_it_applies(int8_model, tiny_model, monkeypatch):
    """SEGUE_DECODE_WEIGHTS=int4 serves the int8 variant's steps from int4; the fp32 model, or the native
    matmuls switched off, stay as they are; an unknown value is a clear error."""
    monkeypatch.setenv("SEGUE_DECODE_WEIGHTS", "int4")
    assert OnnxDecoder.load(int8_model, variant="int8").decode_weights == ("int4" if fast_int4_here() else "int8")
    assert OnnxDecoder.load(int8_model, variant="fp32").decode_weights == "fp32"
    monkeypatch.setenv("SEGUE_NATIVE_MATMUL", "0")
    off = OnnxDecoder.load(int8_model, variant="int8")
    assert off.decode_weights == "int8" and off.native_matmuls == 0
    monkeypatch.setenv("SEGUE_DECODE_WEIGHTS", "int3")
    with pytest.raises(ValueError, match="decode weights 'int3': choose int8 or int4"):
        OnnxDecoder.load(int8_model, variant="int8")


def test_the_export_writes_the_int4_variant_measured_and_it_loads_as_int4(int8_model):
    """`export-onnx --quantize int8` writes the int4 variant where this CPU has the fast int4 kernel: the int8
    file, its perplexity measured on int8's tokens with every position on the int4 weights (not int8's
    figure copied), its decode step timed, the rule's choice recorded; loaded as "int4" it decodes from int4."""
    manifest, _ = read_model_folder(int8_model)
    if not fast_int4_here():  # not offered where int4 decode steps would not be served
        assert "int4" not in manifest.variants and "int4 decode@255" not in manifest.serve.timings_ms
        return
    int8, int4 = manifest.variants["int8"], manifest.variants["int4"]
    assert int4.file == int8.file and int4.weights.startswith("int4 decode steps")
    assert int4.val_tokens == int8.val_tokens and int4.reference_val_perplexity == int8.reference_val_perplexity
    assert int4.val_perplexity is not None and int4.val_perplexity != int8.val_perplexity
    assert abs(int4.perplexity_loss) < 0.05
    assert manifest.serve is not None and "int4 decode@255" in manifest.serve.timings_ms
    decoder = OnnxDecoder.load(int8_model, variant="int4")
    assert decoder.variant == "int4" and decoder.decode_weights == "int4" and decoder.prefill_session is not None


@pytest.mark.parametrize("int8_ms, int4_ms, int4_loss, served, why", [
    (0.5, 0.40, 0.001, "int4", "its decode steps 1.25x int8's here"),
    (0.5, 0.49, 0.001, "int8", "int4 decode steps 1.02x int8's here (needs 1.05x)"),
    (0.5, 0.30, 0.030, "int8", "int4 perplexity +3.00 % vs fp32 (limit 2 %)"),
    (0.5, 0.30, None, "int8", "but their perplexity was not measured"),
    (1.0, 0.30, 0.001, "fp32", "decode step 1.00x (needs 1.10x)"),
])
def test_int4_is_served_where_int8_would_be_and_it_is_measurably_faster_and_as_good(int8_ms, int4_ms, int4_loss, served, why):
    from engine.variant_choice import choose_variant

    choice = choose_variant({"fp32": {"decode@128": 1.0}, "int8": {"decode@128": int8_ms}, "int4": {"decode@128": int4_ms}},
                            0.001, int4_loss)
    assert choice.variant == served and why in choice.reason
    assert choose_variant({"fp32": {"decode@128": 1.0}, "int8": {"decode@128": 0.5}}, 0.001, 0.001).variant == "int8"
