"""The fp16 variant (`export-onnx --fp16`, `python -m export.half FOLDER`): the precision the engine serves
through CUDA, where ONNX Runtime's GroupQueryAttention kernel is float16/bfloat16 only.

No GPU runs here, so these tests check what can be checked on the CPU, which runs the same graph: that
the variant is written whole in float16 (weights, cache) with fp32 logits, measured (its perplexity next
to fp32's) and verified like any other file; that the engine runs it with a float16 cache, prepared and
cold alike; which precision a GPU is given; and that a GPU that does not start leaves the CPU's choice."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.generate import ContinuationRequest, Generator, VariationDone
from engine.manifest import ModelError, Variant, read_model_folder, verify_model_folder
from engine.midi_file import read_clip
from engine.prefill_cache import PrefillCache
from engine.session import KVCache, OnnxDecoder
from engine.variant_choice import choose_for_gpu
from export.half import FP16_MODEL_FILE, add_fp16
from export.onnx_export import export_model

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture(scope="module")
def fp16_model(tiny_build, tmp_path_factory):
    """The tiny checkpoint exported with both variants: int8 for the CPU, fp16 for a GPU."""
    out = tmp_path_factory.mktemp("fp16") / "model"
    export_model(tiny_build / "run" / "best.safetensors", out, quantize="int8", fp16=True, val_data=tiny_build / "midi")
    return out


def test_the_fp16_variant_is_float16_throughout_but_its_logits(fp16_model):
    manifest = verify_model_folder(fp16_model)
    variant = manifest.variants["fp16"]
    assert variant.file == FP16_MODEL_FILE and FP16_MODEL_FILE in manifest.files
    graph = onnx.load(str(fp16_model / FP16_MODEL_FILE))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [w for w in graph.graph.initializer if w.data_type in float_types and len(w.dims) >= 1 and np.prod(w.dims) > 1]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert all(types[name] == onnx.TensorProto.FLOAT16 for name in [*manifest.onnx.past_inputs, *manifest.onnx.present_outputs])
    assert sum(node.op_type == "GroupQueryAttention" for node in graph.graph.node) == manifest.model.n_layer
    # The CPU's choice is still between fp32 and int8: fp16 is not faster on a CPU.
    assert manifest.serve is not None and manifest.serve.variant in ("fp32", "int8", "int4")


def test_the_fp16_variant_is_measured_next_to_fp32(fp16_model):
    manifest = verify_model_folder(fp16_model)
    fp16, int8 = manifest.variants["fp16"], manifest.variants["int8"]
    assert fp16.val_tokens and fp16.val_tokens == int8.val_tokens and fp16.val_source == int8.val_source
    assert fp16.reference_val_perplexity == int8.reference_val_perplexity  # the same tokens, the same fp32 figure
    assert fp16.perplexity_loss is not None and abs(fp16.perplexity_loss) < 0.01


def test_the_engine_runs_fp16_with_a_float16_cache_close_to_fp32(fp16_model):
    fp16 = OnnxDecoder.load(fp16_model, variant="fp16")
    fp32 = OnnxDecoder.load(fp16_model, variant="fp32")
    assert fp16.variant == "fp16" and fp16.cache_dtype == np.float16 and fp16.shared
    ids = np.random.default_rng(3).integers(0, fp16.vocab_size, (1, 90))  # two prefill runs of 64 and 26
    got, cache = fp16.step(ids, fp16.empty_cache())
    want, reference = fp32.step(ids, fp32.empty_cache())
    assert got.dtype == np.float32 and cache.tensors[0].dtype == np.float16 and cache.length == 90
    assert np.abs(got - want).max() < 0.05
    for token in (5, 9, 2):
        got, cache = fp16.step(np.array([[token]]), cache)
        want, reference = fp32.step(np.array([[token]]), reference)
    assert np.abs(got - want).max() < 0.05
    for key_or_value, expected in zip(cache.tensors, reference.tensors, strict=True):
        assert np.abs(key_or_value.astype(np.float32) - expected).max() < 0.05
    # A history built elsewhere in float32 (KVCache(tensors)) is taken in the graph's type, by the shared
    # buffer and by the plain interface (a GPU's path: pasts fed, presents returned).
    direct, _ = fp16.step(np.array([[7]]), cache)
    plain = OnnxDecoder.load(fp16_model, variant="fp16")
    plain.shared = False
    for decoder in (fp16, plain):
        again, _ = decoder.step(np.array([[7]]), KVCache(reference.tensors))
        assert np.abs(again - direct).max() < 0.05


def test_a_prepared_fp16_continuation_is_the_cold_one(fp16_model, example_midi, monkeypatch):
    monkeypatch.setenv("SEGUE_VARIANT", "fp16")
    generator = Generator.load(fp16_model)
    assert generator.decoder.variant == "fp16"
    clip = read_clip(example_midi[0])
    request = ContinuationRequest(bars=2, variations=2, seed=5)
    cold = generator.generate(clip, request)
    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    warm = sorted((e for e in generator.stream(clip, request, prefills=prefills) if isinstance(e, VariationDone)),
                  key=lambda d: d.variation)
    assert [d.clip.notes for d in warm] == [d.clip.notes for d in cold] and all(d.clip.notes for d in cold)


def test_a_gpu_is_given_fp16_where_the_folder_has_it_within_the_quality_rule(fp16_model, tiny_model):
    manifest = read_model_folder(fp16_model)[0]
    assert choose_for_gpu(manifest)[0] == "fp16"
    fp32_only, reason = choose_for_gpu(read_model_folder(tiny_model)[0])
    assert fp32_only == "fp32" and "--fp16" in reason and "GroupQueryAttention" in reason
    worse = dataclasses.replace(manifest.variants["fp16"], val_perplexity=manifest.variants["fp16"].reference_val_perplexity * 1.05)
    variant, reason = choose_for_gpu(dataclasses.replace(manifest, variants={**manifest.variants, "fp16": worse}))
    assert variant == "fp32" and "+5.00 %" in reason
    unmeasured = dataclasses.replace(manifest, variants={**manifest.variants, "fp16": Variant(FP16_MODEL_FILE, "fp16")})
    assert choose_for_gpu(unmeasured) == ("fp16", "fp16 runs every node on the GPU (its perplexity was not measured)")


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has CUDA")
@pytest.mark.parametrize("cpu_choice", ["int8", "int4"])
def test_a_gpu_that_does_not_start_leaves_the_cpus_precision(fp16_model, tmp_path, monkeypatch, caplog, cpu_choice):
    """onnxruntime-gpu on a machine whose GPU or CUDA libraries fail: ONNX Runtime lists the provider but
    the session comes up on the CPU. The fp16 variant chosen for the GPU would then run on the CPU at no
    gain, so the CPU's own choice (the manifest's: int8, or int4 with its int4 decode steps where the
    export wrote it) is served, with the warning."""
    folder = tmp_path / "model"
    shutil.copytree(fp16_model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    cpu_choice = cpu_choice if cpu_choice in manifest["variants"] else "int8"  # int4 only where the fast kernel runs
    manifest["serve"]["variant"] = cpu_choice
    (folder / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="segue.engine")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    decoder = OnnxDecoder.load(folder, providers=[CUDA, CPU])
    served = verify_model_folder(folder).serve
    assert served is not None and served.variant == cpu_choice
    assert decoder.device == "cpu" and decoder.variant == cpu_choice and decoder.serve_reason == served.reason
    assert decoder.decode_weights == cpu_choice
    assert any("could not start here" in r.getMessage() for r in caplog.records)


def test_add_fp16_to_a_folder_leaves_its_other_files_alone(tiny_build, model_copy):
    before, files = read_model_folder(model_copy)
    manifest = add_fp16(model_copy, val_data=tiny_build / "midi")
    assert set(manifest.files) == set(before.files) | {FP16_MODEL_FILE}
    after, new_files = read_model_folder(model_copy)  # every hash checked, the new file's too
    assert after.variants["fp16"].val_perplexity is not None and after.serve == before.serve
    assert all(new_files[name] == data for name, data in files.items() if name != "manifest.json")
    assert OnnxDecoder.load(model_copy, variant="fp16").cache_dtype == np.float16


def test_a_changed_fp16_file_is_refused(fp16_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(fp16_model, copy)
    data = bytearray((copy / FP16_MODEL_FILE).read_bytes())
    data[-10] ^= 0xFF
    (copy / FP16_MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=FP16_MODEL_FILE):
        OnnxDecoder.load(copy, variant="fp16")


def test_fp16_is_refused_for_the_older_graph(tiny_build, tmp_path):
    """The older concat graph has no GroupQueryAttention for CUDA to run in float16: refused, nothing written."""
    with pytest.raises(ValueError, match="shared-buffer"):
        export_model(tiny_build / "run" / "best.safetensors", tmp_path / "model", kv_cache="concat", fp16=True)
    assert not (tmp_path / "model").exists()


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has CUDA")
def test_a_gpu_that_does_not_start_serves_the_cpus_own_graph_of_the_same_precision(tiny_model, example_midi, monkeypatch):
    """The same fallback where the GPU's precision is the CPU's (a folder without fp16): the graph was
    prepared for CUDA (engine/host_lengths.py), so the CPU gets a session of its own graph, and runs."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    decoder = OnnxDecoder.load(tiny_model, providers=[CUDA, CPU])
    assert decoder.device == "cpu" and not decoder._host_lengths
    clip = read_clip(example_midi[0])
    done = Generator(decoder, Generator.load(tiny_model).tokenizer, "").generate(clip, ContinuationRequest(bars=1, seed=2))
    assert done and done[0].clip.notes
