"""The engine's ONNX session: the shared-buffer KV cache bound through IO binding against the plain
path, cache row semantics, the int8 variant and the CPU fallback when CUDA is asked for.

The tiny model of the test session is exported with the shared-buffer graph (GroupQueryAttention);
the same checkpoint is also exported here with the older plain concat graph, as the reference."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest

from engine.generate import ContinuationRequest, Generator
from engine.manifest import INT8_MODEL_FILE, ModelError, verify_model_folder
from engine.midi_file import read_clip
from engine.session import KVCache, OnnxDecoder
from export.onnx_export import export_model


@pytest.fixture(scope="module")
def concat_model(tiny_build, tmp_path_factory):
    """The tiny checkpoint exported with the plain past/present graph (the pre-issue-11 format)."""
    out = tmp_path_factory.mktemp("concat") / "model"
    export_model(tiny_build / "run" / "best.safetensors", out, kv_cache="concat")
    return out


@pytest.fixture(scope="module")
def shared(tiny_model):
    return OnnxDecoder.load(tiny_model)


@pytest.fixture(scope="module")
def plain(tiny_model):
    """The same graph run through its plain interface: every step's presents allocated and returned."""
    decoder = OnnxDecoder.load(tiny_model)
    decoder.shared = False
    return decoder


def random_ids(decoder, shape, seed=0):
    return np.random.default_rng(seed).integers(0, decoder.vocab_size, shape)


def test_the_tiny_model_is_exported_with_the_shared_buffer(shared, concat_model):
    assert shared.kv_cache == "shared-buffer" and shared.shared
    assert verify_model_folder(shared.folder).onnx.kv_cache == "shared-buffer"
    assert OnnxDecoder.load(concat_model).kv_cache == "concat"


def test_io_bound_cache_gives_the_plain_paths_logits(shared, plain, concat_model):
    reference = OnnxDecoder.load(concat_model)
    ids = random_ids(shared, (2, 40))
    caches = [d.empty_cache(2) for d in (shared, plain, reference)]
    for start, stop in [(0, 24), *((t, t + 1) for t in range(24, 40))]:
        results = [d.forward(ids[:, start:stop], c) for d, c in zip((shared, plain, reference), caches, strict=True)]
        (a, _), (b, _), (c, _) = results
        assert np.array_equal(a, b), start  # the same graph, bound or not: the same bits
        assert np.abs(a - c).max() <= 1e-5, start  # GroupQueryAttention vs the plain attention
        caches = [cache for _, cache in results]
    for got, want in zip(caches[0].tensors, caches[2].tensors, strict=True):
        assert got.shape == want.shape == (2, shared.n_head, 40, shared.head_dim)
        assert np.abs(got - want).max() <= 1e-5


def test_greedy_decode_is_identical_to_the_reference_graph(tiny_model, concat_model, example_midi):
    optimised, reference = Generator.load(tiny_model), Generator.load(concat_model)
    assert optimised.decoder.shared and not reference.decoder.shared
    for path in example_midi[:4]:
        clip = read_clip(path)
        request = ContinuationRequest(bars=4, variations=2, temperature=0.0)
        got, want = optimised.generate(clip, request), reference.generate(clip, request)
        assert [d.tokens for d in got] == [d.tokens for d in want]
    beam = ContinuationRequest(bars=2, variations=2, mode="beam", beam_width=3)
    clip = read_clip(example_midi[0])
    assert [d.tokens for d in optimised.generate(clip, beam)] == [d.tokens for d in reference.generate(clip, beam)]


def test_select_and_repeat_keep_their_rows(shared, plain):
    ids = random_ids(shared, (3, 20), seed=1)
    rows = [2, 0, 2, 1]
    a = shared.step(ids[:, :12], shared.empty_cache(3))[1].select(rows)
    b = plain.step(ids[:, :12], plain.empty_cache(3))[1].select(rows)
    assert (a.batch, a.length) == (b.batch, b.length) == (4, 12)
    for got, want in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(got, want)
    step = random_ids(shared, (4, 1), seed=2)
    assert np.array_equal(shared.step(step, a)[0], plain.step(step, b)[0])
    # A boolean mask selects too; all rows in order is the same history.
    assert shared.step(ids[:, :4], shared.empty_cache(3))[1].select(np.array([True, False, True])).batch == 2
    one = shared.step(ids[:1, :12], shared.empty_cache(1))[1]
    three = one.repeat(3)
    assert (three.batch, three.length) == (3, 12)
    for row in three.tensors:
        assert np.array_equal(row[0], row[2])
    six, plain_six = three.repeat(2), KVCache(three.tensors).repeat(2)  # rows repeated in place, as np.repeat does
    for got, want in zip(six.tensors, plain_six.tensors, strict=True):
        assert np.array_equal(got, want) and got.shape[0] == 6


def test_an_older_cache_still_means_what_it_meant(shared, plain):
    """Stepping a cache twice (the chord lookahead, "generate again" on a prepared prompt) must not let
    the second step overwrite the first one's positions in the shared buffer."""
    ids = random_ids(shared, (2, 16), seed=3)
    _, base = shared.step(ids[:, :10], shared.empty_cache(2))
    before = base.tensors
    first_logits, first = shared.step(ids[:, 10:11], base)
    second_logits, second = shared.step(ids[:, 11:12], base)  # a branch from the same history
    _, p_base = plain.step(ids[:, :10], plain.empty_cache(2))
    assert np.array_equal(first_logits, plain.step(ids[:, 10:11], p_base)[0])
    assert np.array_equal(second_logits, plain.step(ids[:, 11:12], p_base)[0])
    # The first branch is untouched by the second, and goes on correctly.
    after_first, _ = shared.step(ids[:, 12:13], first)
    _, p_first = plain.step(ids[:, 10:11], p_base)
    assert np.array_equal(after_first, plain.step(ids[:, 12:13], p_first)[0])
    for old, now in zip(before, base.tensors, strict=True):
        assert np.array_equal(old, now)
    assert first.length == second.length == 11 and base.length == 10


def test_stepping_instead_of_a_discarded_step_writes_over_it_without_a_copy(shared, plain):
    """The chord lookahead's redo: a speculative step is thrown away and the real tokens are fed from the
    history before it. On the shared buffer they overwrite the discarded position in the same buffers
    (no copy of the history), and the result is what a plain step from that history gives."""
    ids = random_ids(shared, (2, 16), seed=6)
    _, base = shared.step(ids[:, :10], shared.empty_cache(2))
    _, discarded = shared.step(ids[:, 10:11], base)
    logits, redone = shared.step_instead(ids[:, 11:12], base, discarded)
    assert redone._store is base._store  # written in place: the buffers were not copied
    _, p_base = plain.step(ids[:, :10], plain.empty_cache(2))
    p_logits, p_redone = plain.step(ids[:, 11:12], p_base)
    assert np.array_equal(logits, p_logits)
    for got, want in zip(redone.tensors, p_redone.tensors, strict=True):
        assert np.array_equal(got, want)
    with pytest.raises(IndexError):  # the discarded cache's positions were overwritten: it cannot be used again
        shared.step(ids[:, 12:13], discarded)
    # When something else was written after the discarded step, the history is copied as a plain step
    # would, and the newer branch is left as it was.
    _, other = shared.step(ids[:, 10:11], base)
    _, later = shared.step(ids[:, 11:12], other)
    logits, copied = shared.step_instead(ids[:, 11:12], base, other)
    assert copied._store is not base._store and np.array_equal(logits, p_logits)
    _, p_later = plain.step(ids[:, 11:12], plain.step(ids[:, 10:11], p_base)[1])
    assert np.array_equal(shared.step(ids[:, 12:13], later)[0], plain.step(ids[:, 12:13], p_later)[0])



def test_decode_steps_between_runs_of_other_shapes_read_their_own_inputs(shared, plain):
    """A decode step keeps its ids, positions and logits bound at fixed addresses for the next step of the
    same shape (OnnxDecoder._run). Runs of other shapes in between (several tokens, every position's
    logits) rebind them; each run's logits are its own, and stay what they were after later runs."""
    ids = random_ids(shared, (1, 30), seed=8)
    _, cache = shared.step(ids[:, :10], shared.empty_cache(1))
    _, p_cache = plain.step(ids[:, :10], plain.empty_cache(1))
    kept = []
    for start, stop, last in [(10, 11, 1), (11, 12, 1), (12, 15, 1), (15, 16, 1), (16, 17, None), (17, 18, 1),
                              (18, 19, 1), (19, 23, None), (23, 24, 1)]:
        got, cache = shared.forward(ids[:, start:stop], cache, last=last)
        want, p_cache = plain.forward(ids[:, start:stop], p_cache, last=last)
        assert np.array_equal(got, want), (start, stop, last)
        kept.append((got, got.copy()))
    assert all(np.array_equal(got, copy) for got, copy in kept)


def test_host_tensors_and_several_new_positions_after_a_history(shared, plain):
    """KVCache(tensors) built by a caller steps on any decoder; several tokens after a history in a batch
    (GroupQueryAttention takes those one row at a time) equal the plain path."""
    ids = random_ids(shared, (2, 30), seed=4)
    _, cache = shared.step(ids[:, :12], shared.empty_cache(2))
    rebuilt = KVCache(tuple(np.array(t) for t in cache.tensors))
    a, a_cache = shared.forward(ids[:, 12:20], rebuilt)
    _, p_cache = plain.step(ids[:, :12], plain.empty_cache(2))
    b, _ = plain.forward(ids[:, 12:20], p_cache)
    assert np.array_equal(a, b)
    assert a_cache.length == 20
    with pytest.raises(ValueError, match="exceed the model context"):
        shared.step(np.zeros((1, shared.max_context + 1), dtype=np.int64), shared.empty_cache(1))


def test_a_prefill_session_with_more_threads_gives_the_same_logits(tiny_model, shared):
    wide = OnnxDecoder.load(tiny_model, threads=1, prefill_threads=2)
    assert wide.prefill_session is not None
    ids = random_ids(shared, (1, 64), seed=5)
    a, cache_a = wide.step(ids[:, :60], wide.empty_cache(1))
    b, cache_b = shared.step(ids[:, :60], shared.empty_cache(1))
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(wide.step(ids[:, 60:61], cache_a)[0] - shared.step(ids[:, 60:61], cache_b)[0]).max() <= 1e-5


def test_int8_variant_is_written_loadable_and_measured(int8_model, example_midi, monkeypatch):
    manifest = verify_model_folder(int8_model)
    variant = manifest.variants["int8"]
    assert variant.file == INT8_MODEL_FILE and INT8_MODEL_FILE in manifest.files
    assert variant.val_perplexity is not None and variant.reference_val_perplexity is not None and variant.val_tokens
    assert abs(variant.perplexity_loss) < 0.05  # int8's cost, stated in the manifest, small even on the tiny model
    assert manifest.serve is not None and manifest.serve.variant in ("fp32", "int8", "int4") and manifest.serve.reason
    assert {"fp32 decode@255", "int8 decode@255"} <= set(manifest.serve.timings_ms)
    int8 = OnnxDecoder.load(int8_model, variant="int8")
    fp32 = OnnxDecoder.load(int8_model, variant="fp32")
    assert int8.variant == "int8" and int8.shared
    ids = random_ids(int8, (1, 20), seed=6)
    assert np.abs(int8.step(ids, int8.empty_cache())[0] - fp32.step(ids, fp32.empty_cache())[0]).max() < 1.0
    monkeypatch.setenv("SEGUE_VARIANT", "int8")
    generator = Generator.load(int8_model)
    assert generator.decoder.variant == "int8"
    done = generator.generate(read_clip(example_midi[0]), ContinuationRequest(bars=2, seed=1))
    assert done and done[0].tokens
    with pytest.raises(ModelError, match="no 'int3' variant"):
        OnnxDecoder.load(int8_model, variant="int3")


def test_a_changed_int8_file_is_refused(int8_model, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(int8_model, copy)
    data = bytearray((copy / INT8_MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / INT8_MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=INT8_MODEL_FILE):
        OnnxDecoder.load(copy, variant="int8")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_falls_back_to_the_cpu_and_says_so(tiny_model, example_midi, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="segue.engine")
    decoder = OnnxDecoder.load(tiny_model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert decoder.device == "cpu" and decoder.session.get_providers() == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider was requested" in r.getMessage() and "running on the CPU" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("SEGUE_PROVIDER", "cuda")
    generator = Generator.load(tiny_model)
    assert any("CUDAExecutionProvider was requested" in r.getMessage() for r in caplog.records)
    done = generator.generate(read_clip(example_midi[0]), ContinuationRequest(bars=2, seed=3))
    assert done and done[0].clip.notes
    monkeypatch.setenv("SEGUE_PROVIDER", "tpu")
    with pytest.raises(ModelError, match="SEGUE_PROVIDER"):
        OnnxDecoder.load(tiny_model)


def test_older_folders_load_and_a_manifest_cannot_claim_the_wrong_cache(concat_model, model_copy):
    data = json.loads((concat_model / "manifest.json").read_text())
    del data["onnx"]["kv_cache"]  # a manifest written before the field existed
    assert "kv_cache" not in data["onnx"]
    older = concat_model.parent / "older"
    older.mkdir(exist_ok=True)
    for name in ("model.onnx", "tokenizer.json"):
        (older / name).write_bytes((concat_model / name).read_bytes())
    (older / "manifest.json").write_text(json.dumps(data))
    assert OnnxDecoder.load(older).kv_cache == "concat"
    data["onnx"]["kv_cache"] = "shared-buffer"
    (older / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="kv_cache is 'shared-buffer', but the graph's cache is 'concat'"):
        OnnxDecoder.load(older)
    edited = json.loads((model_copy / "manifest.json").read_text())
    edited["onnx"]["kv_cache"] = "paged"
    (model_copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ModelError, match="onnx.kv_cache is 'paged'"):
        verify_model_folder(model_copy)


def test_refresh_gives_an_older_folder_the_shared_buffer_and_keeps_its_records(concat_model, tmp_path):
    """export/refresh.py: the same weights read back from model.onnx, the new graph, the old provenance."""
    from export.refresh import refresh

    out = tmp_path / "refreshed"
    manifest = refresh(concat_model, out)
    old = verify_model_folder(concat_model)
    assert manifest.onnx.kv_cache == "shared-buffer" and manifest.parity is not None and manifest.parity.passed
    assert (manifest.source_checkpoint_sha256, manifest.training, manifest.metrics, manifest.search) == \
        (old.source_checkpoint_sha256, old.training, old.metrics, old.search)
    assert (out / "tokenizer.json").read_bytes() == (concat_model / "tokenizer.json").read_bytes()
    new, reference = OnnxDecoder.load(out), OnnxDecoder.load(concat_model)
    ids = random_ids(new, (1, 30), seed=7)
    assert np.abs(new.step(ids, new.empty_cache())[0] - reference.step(ids, reference.empty_cache())[0]).max() <= 1e-5


def test_a_long_prompt_fed_in_chunks_equals_the_plain_path(shared, plain):
    """Prompts longer than PREFILL_CHUNK run in chunks (and, in a batch, row by row) on the shared buffer."""
    from engine.session import PREFILL_CHUNK

    ids = random_ids(shared, (2, 2 * PREFILL_CHUNK + 22), seed=8)
    a, a_cache = shared.forward(ids, shared.empty_cache(2))
    b, b_cache = plain.forward(ids, plain.empty_cache(2))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    for got, want in zip(a_cache.tensors, b_cache.tensors, strict=True):
        assert np.abs(got - want).max() <= 1e-5
    step = random_ids(shared, (2, 1), seed=9)
    assert np.abs(shared.step(step, a_cache)[0] - plain.step(step, b_cache)[0]).max() <= 1e-5


def test_a_preferred_variant_a_folder_lacks_falls_back_with_a_warning(tiny_model, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="segue.engine")
    monkeypatch.setenv("SEGUE_VARIANT", "int8")  # the tiny model of the session has no int8 variant
    decoder = OnnxDecoder.load(tiny_model)
    assert decoder.variant == "fp32"
    assert any("SEGUE_VARIANT is int8" in r.getMessage() for r in caplog.records)


def _exported_elsewhere(int8_model, tmp_path, cpu: str | None):
    """A copy of the int8 model folder whose manifest says its precision was chosen on `cpu`."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(int8_model, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["serve"]["measured_on"] = cpu
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("fp32_ms, int8_ms, int4_ms, served", [(1.0, 0.5, 0.49, "int8"), (0.5, 1.0, 0.4, "fp32"),
                                                                (1.0, 0.95, 0.5, "fp32"), (1.0, 0.5, 0.4, "int4")])
def test_a_folder_exported_on_another_cpu_is_timed_here_and_serves_the_faster_precision(
        int8_model, tmp_path, monkeypatch, caplog, fp32_ms, int8_ms, int4_ms, served):
    """The manifest's fp32/int8 choice was measured on another CPU: at load the precisions are timed here
    (int4 too: the tiny model's int4 variant is within 2 % of fp32's perplexity) and the export's rule
    applies (int8 within 2 % perplexity and at least 1.1x faster than fp32, int4 within 2 % and at least
    1.05x faster than int8), and the log and the decoder say why."""
    import engine.variant_choice as variant_choice

    folder = _exported_elsewhere(int8_model, tmp_path, "AMD EPYC 7B13 (a machine with AVX2 only)")
    timed: list[str] = []

    def fake_decode_ms(decoder, context=variant_choice.LOAD_CONTEXT, steps=variant_choice.LOAD_STEPS):
        timed.append(decoder.variant)
        return {"fp32": fp32_ms, "int8": int8_ms, "int4": int4_ms}[decoder.variant]

    monkeypatch.setattr(variant_choice, "decode_ms", fake_decode_ms)
    monkeypatch.delenv("SEGUE_VARIANT", raising=False)
    caplog.set_level(logging.INFO, logger="segue.engine")
    decoder = OnnxDecoder.load(folder)
    fast = "int4" in verify_model_folder(int8_model).variants  # exported where the fast int4 kernel runs
    served = served if fast or served != "int4" else "int8"
    assert decoder.variant == served and set(timed) == ({"fp32", "int8", "int4"} if fast else {"fp32", "int8"})
    assert decoder.decode_weights == served
    assert decoder.serve_reason.startswith("measured at load on this CPU") and "AMD EPYC" in decoder.serve_reason
    assert any(f"serving {served} on" in r.getMessage() for r in caplog.records)
    ids = random_ids(decoder, (1, 12), seed=11)
    assert decoder.step(ids, decoder.empty_cache())[0].shape == (1, decoder.vocab_size)


def test_a_choice_measured_on_this_cpu_or_asked_for_is_not_timed_again(int8_model, tmp_path, monkeypatch):
    import engine.variant_choice as variant_choice
    from engine.machine import cpu_name

    def no_timing(*args, **kwargs):
        raise AssertionError("timed at load although the manifest's choice was made here or a variant was asked for")

    monkeypatch.setattr(variant_choice, "decode_ms", no_timing)
    monkeypatch.delenv("SEGUE_VARIANT", raising=False)
    here = OnnxDecoder.load(_exported_elsewhere(int8_model, tmp_path / "here", cpu_name()))
    assert here.variant == verify_model_folder(int8_model).serve.variant and not here.serve_reason.startswith("measured at load")
    elsewhere = _exported_elsewhere(int8_model, tmp_path / "elsewhere", "Another CPU")
    assert OnnxDecoder.load(elsewhere, variant="fp32").variant == "fp32"
    monkeypatch.setenv("SEGUE_VARIANT", "int8")
    asked = OnnxDecoder.load(elsewhere)
    assert asked.variant == "int8" and asked.serve_reason.startswith("asked for")


def test_timing_both_precisions_at_load_really_runs_them(int8_model, tmp_path, monkeypatch):
    """Unpatched: the load-time measurement times real decode steps of both files and records them."""
    from engine.variant_choice import choose_here

    monkeypatch.delenv("SEGUE_VARIANT", raising=False)
    folder = _exported_elsewhere(int8_model, tmp_path, None)
    manifest = verify_model_folder(folder)
    decoders = {name: OnnxDecoder.load(folder, variant=name) for name in ("fp32", "int8")}
    choice = choose_here(manifest, decoders)
    assert choice.variant in ("fp32", "int8") and choice.reason.startswith("measured at load")
    assert set(choice.timings_ms) == {"fp32 decode@128", "int8 decode@128"} and all(v > 0 for v in choice.timings_ms.values())
