"""Which precision to serve: the rule `export-onnx --quantize int8` applies when it writes the manifest,
and the same rule applied again at load on a CPU other than the one the manifest's choice was
measured on.

    choice = choose_variant({"fp32": {"decode@128": 1.10}, "int8": {"decode@128": 0.62}}, int8_loss=0.0004)
    choice.variant   # "int8": within 2 % perplexity and at least 1.1x faster per decode step here

int8 wins on one machine by its VNNI/AMX kernels and may not on another (an AVX2-only CPU, a
different cache size), so a folder exported on one computer and served on another measures both
precisions where it runs (a few decode steps each, about 0.1 s at load) instead of trusting
numbers taken elsewhere. The quality half of the rule is the manifest's: the perplexities of both
files on the same validation tokens, measured at export.

Where the folder has the int4 variant too (the int8 file, its decode steps from its weights quantized
again to int4 at load: engine/native_matmul4_kernel.h) and int8 would be served, int4 is served instead
when its own perplexity loss is within the same limit and its decode step is at least MIN_INT4_SPEEDUP
faster than int8's here: it pays where the weights come from DRAM, little where they fit in cache, and
nothing on a CPU whose int4 kernel is the portable loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from engine.machine import cpu_name
from engine.manifest import Manifest, ServeChoice

MAX_INT8_PERPLEXITY_LOSS = 0.02  # serve int8 only when it costs at most 2 % validation perplexity ...
MIN_INT8_SPEEDUP = 1.10  # ... and is at least 10 % faster per decoded token here
LOAD_CONTEXT = 128  # the history a load-time decode step is timed at
LOAD_STEPS = 24  # decode steps timed per precision at load (median)
GPU_VARIANT = "fp16"  # what `export-onnx --fp16` writes, served through the CUDA execution provider
INT4_VARIANT = "int4"  # the int8 file, its decode steps from int4 weights (engine/session.py)
MIN_INT4_SPEEDUP = 1.05  # int4 over int8: at least 5 % faster per decode step here


class Decoder(Protocol):
    vocab_size: int
    max_context: int

    def empty_cache(self, batch: int = 1): ...

    def step(self, ids: np.ndarray, cache): ...


def choose_variant(timings: dict[str, dict[str, float]], int8_loss: float | None,
                   int4_loss: float | None = None) -> ServeChoice:
    """int8 when its perplexity loss is measured and small and it decodes measurably faster; else fp32; and
    where int8 wins and `timings` has int4, int4 when its loss is small too and it decodes measurably
    faster than int8. `timings`: per variant, measured medians in ms whose first key starting "decode" is
    a decode step."""
    choice = _choose_int8(timings, int8_loss)
    if choice.variant != "int8" or INT4_VARIANT not in timings:
        return choice
    decode = _decode_ms(timings)
    speedup = decode["int8"] / decode[INT4_VARIANT]
    if int4_loss is None:
        why = f"int4 decode steps {speedup:.2f}x int8's here, but their perplexity was not measured: int8"
    elif int4_loss > MAX_INT8_PERPLEXITY_LOSS:
        why = f"int4 perplexity {int4_loss * 100:+.2f} % vs fp32 (limit {MAX_INT8_PERPLEXITY_LOSS * 100:.0f} %): int8"
    elif speedup < MIN_INT4_SPEEDUP:
        why = f"int4 decode steps {speedup:.2f}x int8's here (needs {MIN_INT4_SPEEDUP:.2f}x): int8"
    else:
        return ServeChoice(INT4_VARIANT, f"{choice.reason}; int4 perplexity {int4_loss * 100:+.2f} % vs fp32, its decode "
                                         f"steps {speedup:.2f}x int8's here", choice.measured_on, choice.timings_ms)
    return ServeChoice(choice.variant, f"{choice.reason}; {why}", choice.measured_on, choice.timings_ms)


def _decode_ms(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    return {variant: next(v for k, v in measured.items() if k.startswith("decode")) for variant, measured in timings.items()}


def _choose_int8(timings: dict[str, dict[str, float]], int8_loss: float | None) -> ServeChoice:
    """fp32 or int8: the rule without int4."""
    flat = {f"{variant} {what}": value for variant, measured in timings.items() for what, value in measured.items()}
    decode = _decode_ms(timings)
    speedup = decode["fp32"] / decode["int8"]
    if int8_loss is None:
        return ServeChoice("fp32", f"int8 decodes {speedup:.2f}x faster here, but its perplexity was not measured "
                                   "(no validation data): fp32 until it is", cpu_name(), flat)
    quality = f"int8 perplexity {int8_loss * 100:+.2f} % vs fp32"
    if int8_loss <= MAX_INT8_PERPLEXITY_LOSS and speedup >= MIN_INT8_SPEEDUP:
        return ServeChoice("int8", f"{quality} (limit {MAX_INT8_PERPLEXITY_LOSS * 100:.0f} %), "
                                   f"decode step {speedup:.2f}x faster here", cpu_name(), flat)
    return ServeChoice("fp32", f"{quality} (limit {MAX_INT8_PERPLEXITY_LOSS * 100:.0f} %), decode step {speedup:.2f}x "
                               f"(needs {MIN_INT8_SPEEDUP:.2f}x): fp32 is served", cpu_name(), flat)


def choose_for_gpu(manifest: Manifest) -> tuple[str, str]:
    """The precision to serve through the CUDA execution provider, and why. ONNX Runtime's CUDA
    GroupQueryAttention kernel exists for float16 and bfloat16 only, and its int8 MatMuls are CPU
    kernels, so the fp16 variant (`export-onnx --fp16`) is the one whose every node, the cache with
    it, stays on the GPU. The same quality rule as int8's: at most 2 % validation perplexity lost."""
    fp16 = manifest.variants.get(GPU_VARIANT)
    if fp16 is None:
        return "fp32", ("this folder has no fp16 variant, so fp32 is served and its GroupQueryAttention nodes run on the "
                        "CPU (ONNX Runtime's CUDA kernel is float16/bfloat16 only); export it with --fp16")
    loss = fp16.perplexity_loss
    if loss is None:
        return GPU_VARIANT, "fp16 runs every node on the GPU (its perplexity was not measured)"
    quality = f"fp16 perplexity {loss * 100:+.2f} % vs fp32"
    if loss > MAX_INT8_PERPLEXITY_LOSS:
        return "fp32", (f"{quality} (limit {MAX_INT8_PERPLEXITY_LOSS * 100:.0f} %): fp32 is served, its "
                        "GroupQueryAttention nodes on the CPU")
    return GPU_VARIANT, f"{quality} (limit {MAX_INT8_PERPLEXITY_LOSS * 100:.0f} %), and it runs every node on the GPU"


def needs_measuring_here(manifest: Manifest) -> bool:
    """Whether the manifest's choice between fp32 and int8 was measured on another CPU (or not at all) and
    int8's quality is known, so that timing both here could change what is served."""
    int8 = manifest.variants.get("int8")
    if int8 is None or int8.perplexity_loss is None or int8.perplexity_loss > MAX_INT8_PERPLEXITY_LOSS:
        return False  # fp32 either way: there is no int8, or its quality rules it out whatever the speed
    measured_on = manifest.serve.measured_on if manifest.serve is not None else None
    return measured_on != cpu_name()


def decode_ms(decoder: Decoder, context: int = LOAD_CONTEXT, steps: int = LOAD_STEPS) -> float:
    """Median process-CPU milliseconds of one decode step after `context` positions (random ids, batch 1).
    Every step starts from the same history, so each one is timed at the same context."""
    context = min(context, decoder.max_context - 1)
    ids = np.random.default_rng(0).integers(0, decoder.vocab_size, (1, context + 1))
    _, cache = decoder.step(ids[:, :context], decoder.empty_cache(1))
    decoder.step(ids[:, context:], cache)  # first use of this decoder's step buffers
    samples = []
    for _ in range(steps):
        started = time.process_time()
        decoder.step(ids[:, context:], cache)
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def choose_here(manifest: Manifest, decoders: Mapping[str, Decoder]) -> ServeChoice:
    """The rule applied to fp32 and int8 (and int4, where `decoders` has it) timed on this CPU, their steps
    interleaved so a busy moment slows them alike."""
    rounds: dict[str, list[float]] = {variant: [] for variant in decoders}
    for _ in range(3):
        for variant, decoder in decoders.items():
            rounds[variant].append(decode_ms(decoder, steps=LOAD_STEPS // 3))
    timings = {variant: {f"decode@{LOAD_CONTEXT}": round(statistics.median(values), 4)} for variant, values in rounds.items()}
    int4 = manifest.variants.get(INT4_VARIANT)
    choice = choose_variant(timings, manifest.variants["int8"].perplexity_loss, int4.perplexity_loss if int4 else None)
    serve = manifest.serve
    before = f"the manifest's {serve.variant} was measured on {serve.measured_on}" if serve and serve.measured_on \
        else "the manifest's choice was not measured"
    return ServeChoice(choice.variant, f"measured at load on this CPU ({before}): {choice.reason}", choice.measured_on,
                       choice.timings_ms)
