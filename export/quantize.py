"""`export-onnx --quantize int8`: the int8 variant, its quality cost and which precision to serve.

    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    validation = ValidationSet(folder, data_folder, val_fraction=0.05, max_tokens=50_000)
    int8_ppl, fp32_ppl, tokens, source = validation.measure(fp32_decoder, int8_decoder)
    choice = choose_variant({"fp32": speed(fp32_decoder), "int8": speed(int8_decoder)}, int8_loss)

Where this CPU has the native int4 kernel, the int4 variant stands next to it: the same file, its decode
steps from its weights quantized again to int4 at load (engine/native_matmul4_kernel.h), its perplexity
measured with every position on the int4 weights.

Dynamic quantization (onnxruntime.quantization.quantize_dynamic) of the MatMul weights: int8
weights, activations quantized per call, so the variant needs no calibration data and has the
same inputs, outputs and KV cache as model.onnx. Its validation perplexity is measured by the same
function and on the same tokens as the fp32 model's (`segue eval`'s: the training split rule's
validation files in hash order, sliding windows), so the two stand side by side in the manifest.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engine.session import OnnxDecoder
from engine.variant_choice import (  # noqa: F401  (the rule, shared with load time)
    MAX_INT8_PERPLEXITY_LOSS,
    MIN_INT4_SPEEDUP,
    MIN_INT8_SPEEDUP,
    choose_variant,
)

WEIGHTS = "int8 (onnxruntime quantize_dynamic of the MatMul weights: QInt8 weights, activations quantized per call)"
INT4_WEIGHTS = ("int4 decode steps (the int8 file's weights quantized again at load to int4, a scale per group of 64 rows "
                "of a column: engine/native_matmul4_kernel.h; the vocabulary projection int8, per column); prompts on "
                "the int8 weights")


@contextmanager
def every_run_on_decode_steps(decoder: OnnxDecoder) -> Iterator[OnnxDecoder]:
    """`decoder` with its prompt session set aside, so that every run (a validation window too) goes through
    its decode-step session: how the int4 variant's perplexity measures its int4 weights on every position
    (served, its prompts run on the int8 weights, and only the positions it decodes see int4)."""
    kept = decoder.prefill_session
    decoder.prefill_session = None
    try:
        yield decoder
    finally:
        decoder.prefill_session = kept


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer suggests its pre-processing step on the root logger on every call; the exporter
    # already optimised the graph, so that advice is silenced for the call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def validation_pieces(data: Path, tokenizer_file: Path, val_fraction: float, max_tokens: int,
                      exclude: frozenset[str] = frozenset()) -> list[np.ndarray]:
    """The validation pieces of `data` by the training split rule, in hash order, up to `max_tokens`
    (training.held_out.split_folder's choice and order, tokenizing only the validation files), less
    the files training's --exclude left out (by content hash)."""
    from training.data import content_hash, find_midi_files, ingest_file, is_validation
    from training.held_out import capped

    chosen: dict[str, Path] = {}
    for path in find_midi_files(data):
        try:
            digest = content_hash(path.read_bytes())
        except OSError:
            continue
        if is_validation(digest, val_fraction) and digest not in exclude:
            chosen.setdefault(digest, path)
    pieces, total = [], 0
    for digest in sorted(chosen):
        if total >= max_tokens:
            break
        result = ingest_file(chosen[digest], str(tokenizer_file))
        if result.tokens is not None and not result.reason:
            pieces.append(result.tokens)
            total += len(result.tokens)
    return capped(pieces, max_tokens)


class ValidationSet:
    """The validation tokens every variant of one export is measured on, and fp32's perplexity on them,
    measured once however many variants stand next to it."""

    def __init__(self, stage: Path, val_data: Path | None, val_fraction: float, max_tokens: int,
                 exclude: frozenset[str] = frozenset()):
        from engine.manifest import TOKENIZER_FILE
        from engine.tokens import ClipTokenizer

        self.pieces: list[np.ndarray] = []
        self._where = f"{val_data} (validation files at fraction {val_fraction:g}, hash order"
        if val_data is not None and Path(val_data).is_dir():
            self.pieces = validation_pieces(Path(val_data), stage / TOKENIZER_FILE, val_fraction, max_tokens, exclude)
        else:
            print(f"note: no validation data ({val_data or 'none named'}); pass --val-data to measure the variants' "
                  "perplexity", file=sys.stderr)
        kinds = ClipTokenizer.from_file(stage / TOKENIZER_FILE).kinds
        self._bos, self._eos = kinds.bos, kinds.eos
        self._fp32: tuple[float, int] | None = None

    def measure(self, fp32: OnnxDecoder, variant: OnnxDecoder) -> tuple[float | None, float | None, int, str | None]:
        """`variant`'s perplexity, fp32's, the tokens scored and where they came from (all None/0 without data)."""
        if not self.pieces:
            return None, None, 0, None
        if self._fp32 is None:
            self._fp32 = perplexity(fp32, self.pieces, self._bos, self._eos)
        reference, tokens = self._fp32
        ppl, _ = perplexity(variant, self.pieces, self._bos, self._eos)
        return ppl, reference, tokens, f"{self._where}, first {tokens} tokens)"


def perplexity(decoder: OnnxDecoder, pieces: list[np.ndarray], bos: int, eos: int) -> tuple[float, int]:
    from training.eval_measures import model_perplexity

    return model_perplexity(decoder, pieces, bos, eos)


def speed(decoder: OnnxDecoder, context: int = 256, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds of a decode step at `context` tokens and of a prefill of `context` tokens (batch 1),
    in process CPU time: the session runs on one thread, and CPU time leaves out the waits for a core
    that other work on the machine causes."""
    context = min(context, decoder.max_context - 1)
    ids = np.random.default_rng(0).integers(0, decoder.vocab_size, (1, context + 1))

    def median_ms(fn, n: int) -> float:
        fn()
        samples = []
        for _ in range(n):
            started = time.process_time()
            fn()
            samples.append((time.process_time() - started) * 1000)
        return statistics.median(samples)

    prefill = median_ms(lambda: decoder.step(ids[:, :context], decoder.empty_cache(1)), max(3, repeats // 5))
    _, cache = decoder.step(ids[:, :context], decoder.empty_cache(1))
    decode = median_ms(lambda: decoder.step(ids[:, context:], cache), repeats)
    return {f"decode@{context}": round(decode, 4), f"prefill {context}": round(prefill, 3)}


def speeds(decoders: dict[str, OnnxDecoder], rounds: int = 5, repeats: int = 30) -> dict[str, dict[str, float]]:
    """`speed` of each decoder, the decoders taking turns over `rounds` rounds and each figure the median of
    its rounds: a busy moment of the machine slows them alike. (Timed one after the other, the int4 and
    int8 steps of the shipped default came out 0.99x and 1.17x in two runs a minute apart; Session 26.)"""
    taken: dict[str, list[dict[str, float]]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            taken[name].append(speed(decoder, repeats=max(5, repeats // rounds * 2)))
    return {name: {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]} for name, runs in taken.items()}

