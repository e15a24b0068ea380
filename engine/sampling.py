"""Choosing the next token: a pure function of logits, the grammar mask and a seeded generator.

Temperature 0 is greedy (argmax). Otherwise the masked logits are scaled by 1/temperature, cut to
the `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`, and one
token is drawn with the caller's `numpy.random.Generator`, so a seed reproduces a continuation.
`masked_log_probs` is the distribution beam search ranks by and `Generator.log_prob` scores with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature {self.temperature} is outside 0-5")
        if self.top_k < 0:
            raise ValueError(f"top-k {self.top_k} is negative")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p {self.top_p} is outside (0, 1]")


def sample(logits: np.ndarray, allowed: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from `logits` [vocab], restricted to `allowed` [vocab] (at least one True)."""
    candidates = allowed.nonzero()[0]  # the array methods, not their np.* wrappers: this runs every token
    if len(candidates) == 0:
        raise ValueError("the grammar allows no token here")
    if len(candidates) == 1:
        return int(candidates[0])
    scores = logits[candidates].astype(np.float64)
    if params.temperature == 0.0:
        return int(candidates[int(scores.argmax())])
    scores /= params.temperature
    order = (-scores).argsort(kind="stable")
    if params.top_k and params.top_k < len(order):
        order = order[: params.top_k]
    scores = scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(probs.cumsum().searchsorted(params.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    # What rng.choice(len(order), p=probs) draws, without its checks of p (0.1 ms a token): the same
    # uniform number against the same normalised running sum, so a seed gives the same notes.
    cdf = probs.cumsum()
    cdf /= cdf[-1]
    return int(candidates[order[int(cdf.searchsorted(rng.random(), side="right"))]])


def masked_log_probs(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """log p [vocab] of the model's distribution restricted to `allowed` and renormalised
    (temperature 1); -inf where not allowed. A token the grammar forces has log p = 0."""
    out = np.full(logits.shape, -np.inf)
    scores = logits[allowed].astype(np.float64)
    if len(scores) == 0:
        raise ValueError("the grammar allows no token here")
    top = scores.max()
    out[allowed] = scores - (top + np.log(np.exp(scores - top).sum()))
    return out
