"""Beam search under the grammar: the most likely continuations instead of sampled ones.

    found = beam_search(decoder, prompt, grammar, bar_id, width=5, keep=2)  # best first

Hypotheses advance together, one token per step, as the rows of one ONNX batch. Each step every
hypothesis proposes its `width + 1` most likely allowed tokens (enough to fill `width` live slots
even if one of them ends the sequence), the `width` best extensions by total score live on, and
the KV cache rows follow their parents (`KVCache.select` copies a row that has two children).
Each hypothesis owns a copy of the grammar, so every one of them decodes and obeys the constraints.

Scores are summed log-probabilities of the masked, renormalised distribution at temperature 1
(`masked_log_probs`), less a repetition penalty (`RepetitionPenalty`): the most likely continuation of a
small music model is a loop (one chord struck bar after bar, one pitch again and again), because each
repetition makes the next more likely. A pitched note costs `REPEAT_PENALTY` for every time its pitch
was played among the continuation's last `REPEAT_WINDOW` notes; drums are exempt (a groove repeats by
nature). There is no length normalisation: all hypotheses span the same number of bars, and the
penalised sum only falls as a hypothesis grows, which makes the stopping rule exact. A
hypothesis whose chosen token is the Bar that ends the continuation is finished and kept. The
search stops once `keep` hypotheses are finished and no live one scores above the `keep`-th best
of them (a live score can only fall), or when none is left alive. The price of the plain sum is
a bias towards few tokens, i.e. sparse bars or silence; a minimum density constraint counters it
without giving up the exact stop or the guarantee below.

The greedy path (the most likely token at every step) is never pruned: when it falls out of the
`width` best it takes the last slot. So the best result scores at least as high as greedy
decoding, and width 1 is greedy decoding.

When the context fills up, all hypotheses are cut at the same index (they have equal lengths and
must stay one batch): the first index within the last half-context where every one of them has a
Bar, else exactly the last half-context, mid-bar. Then they are prefilled again, as one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.clip_guidance import guide, steer_chord
from engine.grammar import ContinuationGrammar
from engine.interleaved import InterleavedGrammar
from engine.sampling import masked_log_probs
from engine.session import KVCache, OnnxDecoder

REPEAT_WINDOW = 16  # notes of the continuation the penalty looks back over
REPEAT_PENALTY = 0.5  # log-probability units per recent use of the same pitch (a factor of about 1.6)


@dataclass(frozen=True)
class RepetitionPenalty:
    """The pitches of a continuation's last notes, and what choosing each token would cost for them.

    Kept per track (a bass note does not make the same pitch in the chords a repeat), so a grammar
    that writes several tracks in one stream (engine/interleaved.py) is penalised track by track."""

    recent: tuple[tuple[int, int], ...] = ()  # (track, pitch) of the last notes, oldest first

    def adjust(self, log_probs: np.ndarray, grammar: ContinuationGrammar | InterleavedGrammar) -> np.ndarray:
        """`log_probs` [vocab] less the penalty on the Pitch tokens of the writing track's recent pitches."""
        if grammar.is_drum or not self.recent:
            return log_probs
        track = grammar.active_track
        pitches_played = [pitch for owner, pitch in self.recent if owner == track]
        if not pitches_played:
            return log_probs
        uses = np.bincount(np.asarray(pitches_played), minlength=128)
        pitches = grammar.pitch_table
        penalty = np.where(pitches >= 0, uses[np.clip(pitches, 0, 127)], 0) * REPEAT_PENALTY
        return log_probs - penalty

    def after(self, token: int, grammar: ContinuationGrammar | InterleavedGrammar) -> RepetitionPenalty:
        """The state once `token` is chosen (`grammar`: the state before it)."""
        pitch = int(grammar.pitch_table[token])
        if pitch < 0:
            return self
        track = grammar.active_track
        mine = [entry for entry in self.recent if entry[0] == track][-(REPEAT_WINDOW - 1):]
        others = [entry for entry in self.recent if entry[0] != track]
        return RepetitionPenalty(tuple(others + mine + [(track, pitch)]))


def scored_log_probs(logits: np.ndarray, grammar: ContinuationGrammar | InterleavedGrammar, repetition: RepetitionPenalty) -> np.ndarray:
    """What beam search ranks a next token by (and `Generator.log_prob` sums): the masked, renormalised
    log-probability, with the clip guidance of the writing track (engine/clip_guidance.py), less the
    repetition penalty; -inf for tokens the grammar forbids."""
    allowed = grammar.allowed()
    for notes, target, weight in grammar.chord_steers:
        logits = steer_chord(logits, allowed, notes, target, weight)
    if grammar.preference is not None:
        logits = guide(logits, allowed, grammar.preference, grammar.pitch_table)
    return repetition.adjust(masked_log_probs(logits, allowed), grammar)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, the forced opening included, the ending Bar not
    grammar: ContinuationGrammar | InterleavedGrammar
    context: list[int]  # the tokens in this hypothesis's KV-cache row (the prompt, cut when the context fills)
    score: float = 0.0  # summed scored_log_probs, the ending Bar's included once finished
    greedy: bool = True  # took the best-scored token at every step
    repetition: RepetitionPenalty = RepetitionPenalty()


@dataclass(frozen=True)
class _Candidate:
    score: float
    parent: int
    token: int
    greedy: bool


def beam_search(decoder: OnnxDecoder, prompt: list[int], grammar: ContinuationGrammar | InterleavedGrammar, bar_id: int, width: int,
                keep: int = 1, should_stop: Callable[[], bool] | None = None,
                prefill: Callable[[list[int]], tuple[np.ndarray, KVCache]] | None = None) -> list[Hypothesis] | None:
    """The `keep` best finished hypotheses, best first; fewer only when the grammar admits fewer
    distinct continuations. None when `should_stop` returned True (polled before every step).
    `prefill(ids)` gives the logits and batch-1 cache after the prompt and opening (a kept prefill,
    engine/prefill_cache.py); by default the decoder runs it."""
    if not 1 <= keep <= width:
        raise ValueError(f"beam search of width {width} cannot return {keep} hypotheses")
    opening = grammar.forced_opening()
    context = list(prompt) + opening
    if prefill is not None:
        logits, cache = prefill(context)
    else:
        logits, cache = decoder.step(np.asarray([context]), decoder.empty_cache(1))
    live = [Hypothesis(list(opening), grammar, context)]
    finished: list[Hypothesis] = []
    while live:
        if should_stop is not None and should_stop():
            return None
        chosen = _choose(live, logits, width, finished)
        finished.sort(key=lambda h: -h.score)  # stable: ties keep the order they were found in
        if not chosen or (len(finished) >= keep and max(c.score for c in chosen) <= finished[keep - 1].score):
            break
        live = [_child(live[c.parent], c) for c in chosen]
        if cache.length + 1 > decoder.max_context:
            logits, cache = _reprefill(decoder, live, bar_id)
        else:
            parents = [c.parent for c in chosen]
            if parents != list(range(cache.batch)):  # copying the cache costs; skip it when rows stay put
                cache = cache.select(parents)
            logits, cache = decoder.step(np.asarray([[c.token] for c in chosen]), cache)
    return finished[:keep]


def _choose(live: list[Hypothesis], logits: np.ndarray, width: int, finished: list[Hypothesis]) -> list[_Candidate]:
    """The best `width` live extensions, best first (the greedy one last if it had to be rescued).
    Extensions that end the continuation go to `finished` if they rank above the last live one
    (the greedy one always)."""
    candidates = []
    for index, hyp in enumerate(live):
        log_probs = scored_log_probs(logits[index], hyp.grammar, hyp.repetition)
        allowed = int(np.isfinite(log_probs).sum())
        top = np.argsort(-log_probs, kind="stable")[:min(width + 1, allowed)]  # ties: lower token id first
        candidates += [_Candidate(hyp.score + float(log_probs[t]), index, int(t), hyp.greedy and rank == 0)
                       for rank, t in enumerate(top)]
    candidates.sort(key=lambda c: (-c.score, c.parent, c.token))
    chosen: list[_Candidate] = []
    greedy = None
    for c in candidates:
        ends = live[c.parent].grammar.ends_continuation(c.token)
        if ends and (len(chosen) < width or c.greedy):  # the greedy path is kept even when it ranks low
            finished.append(_finish(live[c.parent], c))
        elif not ends and len(chosen) < width:
            chosen.append(c)
        if c.greedy and not ends:
            greedy = c
    if greedy is not None and greedy not in chosen:
        chosen[-1] = greedy
    return chosen


def _child(parent: Hypothesis, c: _Candidate) -> Hypothesis:
    grammar = parent.grammar.copy()
    grammar.accept(c.token)
    return Hypothesis(parent.tokens + [c.token], grammar, parent.context + [c.token], c.score, c.greedy,
                      parent.repetition.after(c.token, parent.grammar))


def _finish(parent: Hypothesis, c: _Candidate) -> Hypothesis:
    grammar = parent.grammar.copy()
    grammar.accept(c.token)  # the ending Bar: the grammar is done, the token is not part of the result
    return Hypothesis(list(parent.tokens), grammar, parent.context, c.score, c.greedy)


def _reprefill(decoder: OnnxDecoder, live: list[Hypothesis], bar_id: int) -> tuple[np.ndarray, KVCache]:
    """Cut every hypothesis's context at one shared index (a Bar in all of them when there is one)
    and prefill them again as one batch."""
    length = len(live[0].context)
    assert all(len(h.context) == length for h in live), "beam hypotheses advance in lockstep"
    half = decoder.max_context // 2
    start = next((i for i in range(length - half, length) if all(h.context[i] == bar_id for h in live)),
                 length - half)
    for hyp in live:
        hyp.context = hyp.context[start:]
    return decoder.step(np.asarray([h.context for h in live]), decoder.empty_cache(len(live)))
