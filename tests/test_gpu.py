"""The engine on a GPU: the shipped model served through ONNX Runtime's CUDA execution provider.

These need onnxruntime-gpu and a CUDA GPU, so they are marked `gpu` and deselected by default (CI has
no GPU); run them where there is one with `python3 -m pytest -m gpu tests/test_gpu.py`. Selected on a
machine without a usable GPU they fail and say so: a GPU check that passes without a GPU would be no
check. What falls back to the CPU when CUDA is asked for without one is tested everywhere, in
tests/test_session.py and tests/test_fp16_variant.py.

The GPU serves the fp16 variant (engine/variant_choice.choose_for_gpu), so its logits are compared
with the fp32 model's on the CPU within float16's tolerance, and its own cached steps with its own
one-run prefill of the same tokens."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine import host_lengths
from engine.generate import ContinuationRequest, Generator, VariationDone
from engine.manifest import read_model_folder
from engine.midi_file import read_clip
from engine.prefill_cache import PrefillCache
from engine.session import CPU, CUDA, OnnxDecoder, _DeviceStore, session_options

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "default"
CHORALE = ROOT / "docs" / "examples" / "chorale.mid"


@pytest.fixture(scope="module")
def gpu_decoder() -> OnnxDecoder:
    if CUDA not in ort.get_available_providers():
        pytest.fail(f"selected with -m gpu, but this onnxruntime ({ort.__version__}) has no CUDA execution provider: "
                    "install the `gpu` extra (onnxruntime-gpu)")
    decoder = OnnxDecoder.load(SHIPPED, providers=[CUDA, CPU])
    if decoder.device != "cuda":
        pytest.fail("onnxruntime-gpu is installed but the session came up on the CPU: no usable GPU or CUDA libraries")
    return decoder


@pytest.fixture(scope="module")
def cpu_reference() -> OnnxDecoder:
    return OnnxDecoder.load(SHIPPED, providers=[CPU], variant="fp32")


def prompt(decoder: OnnxDecoder, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, decoder.vocab_size, (1, length))


def test_the_gpu_serves_the_fp16_variant_with_every_float_node_on_cuda(gpu_decoder):
    assert gpu_decoder.variant == "fp16" and gpu_decoder.session.get_providers()[0] == CUDA
    assert gpu_decoder._last_input, "a prompt's unwanted logits are skipped on the GPU too (last_positions)"
    assert gpu_decoder._host_lengths, "GroupQueryAttention's lengths come from the host (engine/host_lengths.py)"
    # Profile the served graph: the attention and the matrix products must run on the GPU, or the cache
    # would cross the bus at every layer of every step.
    manifest, files = read_model_folder(SHIPPED)
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "placement")
    graph, why = host_lengths.rewrite(files[manifest.variants["fp16"].file])
    assert not why
    session = ort.InferenceSession(graph, options, providers=[CUDA, CPU])
    shape = manifest.model
    pasts = {name: np.zeros((1, shape.n_head, 0, shape.head_dim), np.float16) for name in manifest.onnx.past_inputs}
    positions = np.arange(8)[None]
    session.run(None, {"input_ids": prompt(gpu_decoder, 8), "position_ids": positions, **pasts, **host_lengths.feeds(positions)})
    events = json.loads(Path(session.end_profiling()).read_text())
    where: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") == "Node" and "provider" in event.get("args", {}):
            where.setdefault(event["args"]["op_name"], set()).add(event["args"]["provider"])
    assert where.get("GroupQueryAttention") == {CUDA}
    floats = {"MatMul", "Gemm", "LayerNormalization", "SkipLayerNormalization", "Gelu", "FastGelu", "Softmax"}
    assert all(providers == {CUDA} for op, providers in where.items() if op in floats), f"float nodes off the GPU: {where}"


def test_the_cache_stays_on_the_gpu_and_cached_steps_match_one_prefill(gpu_decoder):
    ids = prompt(gpu_decoder, 72, seed=1)
    whole, _ = gpu_decoder.step(ids, gpu_decoder.empty_cache())
    logits, cache = gpu_decoder.step(ids[:, :64], gpu_decoder.empty_cache())
    assert gpu_decoder.device_buffers and isinstance(cache._store, _DeviceStore)
    assert all(b.device_name().lower() == "cuda" for b in cache._store.buffers)
    for i in range(64, 72):
        logits, cache = gpu_decoder.step(ids[:, i:i + 1], cache)
    assert cache.length == 72
    assert np.abs(logits[0] - whole[0]).max() < 0.05 * max(1.0, np.abs(whole).max())
    assert logits[0].argmax() == whole[0].argmax()


def test_gpu_logits_follow_the_fp32_model_on_the_cpu(gpu_decoder, cpu_reference):
    ids = prompt(gpu_decoder, 200, seed=2)
    gpu = gpu_decoder.forward(ids, gpu_decoder.empty_cache())[0][0]
    cpu = cpu_reference.forward(ids, cpu_reference.empty_cache())[0][0]
    assert gpu.shape == cpu.shape == (200, gpu_decoder.vocab_size)
    scale = np.abs(cpu).max()
    assert np.abs(gpu - cpu).max() < 0.05 * scale, f"fp16 on the GPU drifts {np.abs(gpu - cpu).max():.3g} (logits up to {scale:.3g})"
    agree = float((gpu.argmax(-1) == cpu.argmax(-1)).mean())
    assert agree >= 0.95, f"greedy choice agrees at {agree:.0%} of positions"


def test_greedy_decoding_on_the_gpu_follows_the_cpu(gpu_decoder, cpu_reference):
    """A greedy continuation token by token through each side's cache: fp16 may part from fp32 at a
    near tie, so the check is that the first 32 tokens agree (they did at every seed tried)."""
    sequences = []
    for decoder in (gpu_decoder, cpu_reference):
        ids = prompt(decoder, 48, seed=3)
        logits, cache = decoder.step(ids, decoder.empty_cache())
        chosen = []
        for _ in range(32):
            token = int(logits[0].argmax())
            chosen.append(token)
            logits, cache = decoder.step(np.array([[token]]), cache)
        sequences.append(chosen)
    assert sequences[0] == sequences[1]


def test_a_continuation_on_the_gpu_is_music_and_repeats_with_its_seed(monkeypatch):
    monkeypatch.setenv("SEGUE_PROVIDER", "cuda")
    generator = Generator.load(SHIPPED)
    assert generator.decoder.device == "cuda"
    clip = read_clip(CHORALE)
    request = ContinuationRequest(bars=4, variations=2, seed=11)
    first = [e for e in generator.stream(clip, request) if isinstance(e, VariationDone)]
    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    prepared = [e for e in generator.stream(clip, request, prefills=prefills) if isinstance(e, VariationDone)]
    assert len(first) == 2 and all(done.clip.notes for done in first)
    assert [d.tokens for d in prepared] == [d.tokens for d in first], "a prepared prompt continues as a cold one"
