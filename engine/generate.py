"""Continue a clip: prompt -> KV-cached, grammar-constrained decoding -> notes, streamed.

    generator = Generator.load("models/default")
    for event in generator.stream(clip, ContinuationRequest(bars=8, variations=3, seed=7)):
        ...  # NoteEvent as each note completes, then VariationDone per variation

All variations share one prefill of the prompt and then decode in one batch, one token per
variation per step. Each variation has its own grammar state and its own random generator
(seeded by (seed, variation)), so variation 2 of seed 7 is the same however many were asked for.
When the context fills up, each variation's history is cut at a bar boundary and re-prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.assembler import NoteAssembler
from engine.clip import Clip, ClipError, Note
from engine.grammar import ContinuationGrammar, NoteLimits, Vocabulary
from engine.sampling import SamplingParams, sample
from engine.session import KVCache, OnnxDecoder
from engine.tokens import ClipTokenizer, trim_to_context

MAX_BARS = 64
MAX_VARIATIONS = 16


class RequestError(ValueError):
    """A request that cannot be served, with a sentence a musician understands."""


@dataclass(frozen=True)
class ContinuationRequest:
    bars: int = 4
    variations: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    limits: NoteLimits = field(default_factory=NoteLimits)

    def validate(self) -> None:
        if not 1 <= self.bars <= MAX_BARS:
            raise RequestError(f"bars must be between 1 and {MAX_BARS}, not {self.bars}")
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise RequestError(f"variations must be between 1 and {MAX_VARIATIONS}, not {self.variations}")
        try:
            self.sampling.validate()
        except ValueError as exc:
            raise RequestError(str(exc)) from exc

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class NoteEvent:
    variation: int
    note: Note  # in beats from the start of the prompt clip


@dataclass(frozen=True)
class VariationDone:
    variation: int
    clip: Clip  # the continuation alone, its notes placed after the prompt
    tokens: tuple[int, ...]


@dataclass
class _Row:
    """One variation in flight."""

    variation: int
    grammar: ContinuationGrammar
    assembler: NoteAssembler
    rng: np.random.Generator
    history: list[int]  # prompt + generated tokens, for re-prefill when the context fills
    generated: list[int] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)


@dataclass
class _Lane:
    """Rows decoded together in one batch with one KV cache (rows of equal history length)."""

    rows: list[_Row]
    cache: KVCache
    logits: np.ndarray  # [len(rows), vocab]: the next-token distribution of each row


class Generator:
    def __init__(self, decoder: OnnxDecoder, tokenizer: ClipTokenizer):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.vocab = Vocabulary.of(tokenizer)
        if tokenizer.vocab_size != decoder.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {decoder.vocab_size}")

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> Generator:
        decoder = OnnxDecoder.load(folder, threads=threads)
        return cls(decoder, ClipTokenizer.from_file(Path(folder)))

    @property
    def max_prompt_tokens(self) -> int:
        # Leave a quarter of the context for the continuation before the first re-prefill.
        return self.decoder.max_context * 3 // 4

    def prompt_tokens(self, clip: Clip) -> tuple[list[int], int]:
        """The clip's tokens cut to fit the context, and how many bars the full clip spans."""
        ids = self.tokenizer.encode_clip(clip)
        bars = sum(1 for i in ids if i == self.vocab.bar)
        return trim_to_context(ids, self.max_prompt_tokens, self.vocab.bar), bars

    def stream(self, clip: Clip, request: ContinuationRequest,
               should_stop: Callable[[], bool] | None = None) -> Iterator[NoteEvent | VariationDone]:
        """Notes as they complete, then one VariationDone per variation.

        `should_stop` is polled before every decode step; when it returns True the stream ends at
        once (a cancelled request frees the engine within one step)."""
        request.validate()
        try:
            clip.validate()
        except ClipError as exc:
            raise RequestError(str(exc)) from exc
        if not clip.notes:
            raise RequestError("the clip has no notes to continue")
        prompt, prompt_bars = self.prompt_tokens(clip)
        meter = clip.time_signature
        offset = prompt_bars * clip.beats_per_bar
        seed = request.seed if request.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        rows = []
        opening: list[int] = []
        for variation in range(request.variations):
            try:
                grammar = ContinuationGrammar(
                    self.vocab, self.tokenizer.time_sig_id(meter), self.tokenizer.program_id(clip.program, clip.is_drum),
                    self.tokenizer.positions_per_bar(meter), request.bars, clip.is_drum, request.limits)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            opening = grammar.forced_opening()
            assembler = NoteAssembler(self.tokenizer, meter, offset, channel=9 if clip.is_drum else 0)
            for token in opening:
                assembler.feed(token)
            rows.append(_Row(variation, grammar, assembler, np.random.default_rng([seed, variation]),
                             prompt + opening, list(opening)))
        # One prefill for the shared prompt, then the cache is copied for every variation.
        logits, cache = self.decoder.step(np.asarray([prompt + opening]), self.decoder.empty_cache(1))
        lanes = [_Lane(rows, cache.repeat(len(rows)), np.repeat(logits, len(rows), axis=0))]
        params = request.sampling
        while lanes:
            if should_stop is not None and should_stop():
                return
            next_lanes = []
            for lane in lanes:
                chosen, alive = [], []
                for index, row in enumerate(lane.rows):
                    token = sample(lane.logits[index], row.grammar.allowed(), params, row.rng)
                    if not row.grammar.accept(token):
                        yield VariationDone(row.variation, clip.with_notes(row.notes), tuple(row.generated))
                        continue
                    row.generated.append(token)
                    row.history.append(token)
                    note = row.assembler.feed(token)
                    if note is not None:
                        row.notes.append(note)
                        yield NoteEvent(row.variation, note)
                    chosen.append(token)
                    alive.append(index)
                if not alive:
                    continue
                cache = lane.cache if len(alive) == len(lane.rows) else lane.cache.select(alive)
                rows_alive = [lane.rows[i] for i in alive]
                if cache.length + 1 > self.decoder.max_context:
                    next_lanes.extend(self._reprefill(rows_alive))
                    continue
                logits, cache = self.decoder.step(np.asarray(chosen)[:, None], cache)
                next_lanes.append(_Lane(rows_alive, cache, logits))
            lanes = next_lanes

    def _reprefill(self, rows: list[_Row]) -> list[_Lane]:
        """Cut each row's history at a bar boundary to half the context and prefill it again.

        Rows whose cut histories have the same length stay batched together."""
        by_length: dict[int, list[tuple[_Row, list[int]]]] = {}
        for row in rows:
            half = self.decoder.max_context // 2
            try:
                kept = trim_to_context(row.history, half, self.vocab.bar)
            except ClipError:  # one bar longer than half the context: cut mid-bar rather than fail
                kept = row.history[-half:]
            row.history = kept
            by_length.setdefault(len(kept), []).append((row, kept))
        lanes = []
        for group in by_length.values():
            ids = np.asarray([kept for _, kept in group])
            logits, cache = self.decoder.step(ids, self.decoder.empty_cache(len(group)))
            lanes.append(_Lane([row for row, _ in group], cache, logits))
        return lanes

    def generate(self, clip: Clip, request: ContinuationRequest) -> list[VariationDone]:
        """All variations, complete (a convenience over `stream`)."""
        done = [event for event in self.stream(clip, request) if isinstance(event, VariationDone)]
        return sorted(done, key=lambda d: d.variation)


def timed(events: Iterator) -> Iterator[tuple[float, object]]:
    """Pairs each event with the seconds since the iteration started (for first-note latency)."""
    started = time.perf_counter()
    for event in events:
        yield time.perf_counter() - started, event
