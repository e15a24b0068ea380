"""The measures `segue eval` takes (and bench/style_experiment.py reuses), as plain functions.

    ppl, scored = model_perplexity(decoder, pieces, bos, eos, stride)    # an exported model, per token
    baseline = repeat_last_bar(example.prompt, prompt_bars=4, bars=4)   # the simplest continuation
    tokens = continuation_tokens(tokenizer, continuation, 4, 4)         # what the copy index compares
    summary = summarise(clips)                                          # means over clips, per system

The style metrics themselves are in training/metrics.py, the n-gram baseline in training/ngram.py
and the copy index in training/originality.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from engine.clip import Clip
from engine.session import OnnxDecoder
from engine.tokens import ClipTokenizer
from training.held_out import bar_window
from training.metrics import HISTOGRAM_METRICS, SCALAR_METRICS
from training.originality import copy_summary

SYSTEMS = ("model", "ngram", "repeat")  # compared with "reference", the real continuation


def model_perplexity(decoder: OnnxDecoder, pieces: list[np.ndarray], bos: int, eos: int,
                     stride: int | None = None) -> tuple[float, int]:
    """Perplexity of the ONNX model on `BOS piece EOS` sequences, token-weighted, and the tokens scored.

    The model reads windows of its context sliding by `stride` tokens (default half the context):
    every token after BOS is scored exactly once, over the full vocabulary, with at least
    context - stride tokens before it (all of them near the start of a piece)."""
    context = decoder.max_context
    stride = min(stride or context // 2, context)
    nll, count = 0.0, 0
    for piece in pieces:
        seq = np.concatenate([[bos], np.asarray(piece, dtype=np.int64), [eos]]).astype(np.int64)
        start, scored = 0, 0  # seq[1..scored] have been scored
        while scored < len(seq) - 1:
            window = seq[start:start + context]
            logits, _ = decoder.forward(window[None, :], decoder.empty_cache(1))
            logits = logits[0].astype(np.float64)  # logits[t] predicts seq[start + t + 1]
            top = logits.max(axis=1, keepdims=True)
            log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
            predicted = min(len(window), len(seq) - 1 - start)
            t = np.arange(scored - start, predicted)
            nll -= float((logits[t, seq[start + 1 + t]] - log_z[t]).sum())
            count += len(t)
            scored = start + predicted
            start += stride
    if count == 0:
        raise ValueError("no validation tokens to score")
    return math.exp(nll / count), count


def repeat_last_bar(prompt: Clip, prompt_bars: int, bars: int) -> Clip:
    """The baseline that plays the prompt's last bar again `bars` times."""
    beats = prompt.beats_per_bar
    last = bar_window(prompt, prompt_bars - 1, 1, 0)
    return prompt.with_notes(replace(n, start=n.start + k * beats) for k in range(1, bars + 1) for n in last)


def continuation_tokens(tokenizer: ClipTokenizer, continuation: Clip, prompt_bars: int, bars: int) -> list[int]:
    """The continuation alone, from its first bar, as the tokens the originality index compares."""
    beats = continuation.beats_per_bar
    alone = replace(continuation.shifted(-prompt_bars * beats), length=bars * beats)
    return tokenizer.encode_clip(alone) if alone.notes else []


def summarise(clips: list[dict]) -> dict:
    """Per system: mean distance to the reference per metric; per system and the reference: mean metric values."""
    names = ("reference", *SYSTEMS)
    distances = {s: {m: float(np.mean([c["distances"][s][m] for c in clips])) for m in (*HISTOGRAM_METRICS, *SCALAR_METRICS)}
                 for s in SYSTEMS}
    values = {}
    for name in names:
        values[name] = {m: float(np.mean([c["metrics"][name][m] for c in clips])) for m in SCALAR_METRICS}
        for m in HISTOGRAM_METRICS:
            filled = [c["metrics"][name][m] for c in clips if sum(c["metrics"][name][m]) > 0]
            values[name][m] = np.mean(filled, axis=0).tolist() if filled else [0.0] * len(clips[0]["metrics"][name][m])
        values[name]["empty"] = sum(1 for c in clips if c["metrics"][name]["notes"] == 0)
    originality = {name: copy_summary([c["longest_copy"][name] for c in clips]) for name in names}
    return {"distances": distances, "values": values, "originality": originality}
