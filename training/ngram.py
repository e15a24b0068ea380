"""The n-gram baseline of `segue eval`: interpolated Kneser-Ney over the model's own REMI tokens.

    ngram = NgramModel.train(train_pieces, tokenizer.vocab_size, bos=kinds.bos, eos=kinds.eos, order=6)
    ngram.perplexity(val_pieces)                      # comparable with the model's, see below
    done = continue_clip(ngram, tokenizer, prompt, bars=4, params=SamplingParams(0.9, 0, 0.95), seed=0)

Perplexity is comparable with the transformer's because both score the same tokens with a full
distribution over the same vocabulary: each piece is `BOS piece EOS` (the training stream's
layout), every token after BOS is predicted, and the interpolated Kneser-Ney distribution sums to
1 over the whole vocabulary at every step (its lowest order interpolates with a uniform
distribution, so no token has probability 0). Continuations are sampled through the same
`ContinuationGrammar` and `sample` the engine uses, with the n-gram's log-probabilities as logits,
so they decode with exactly the bars asked for.

Counts live in sorted numpy arrays rather than dicts, so millions of training tokens fit:
a context of k tokens is hashed to 48 bits (64-bit multiply-xor hashing, then the low 16 bits are
cleared) and the next token fills the low 16 bits; sorting those keys sorts by context, then token,
so one `searchsorted` finds a context's whole row. Two contexts that share a 48-bit hash would
pool their counts; with a few million contexts that is a handful of pairs at most, negligible
for a baseline, and the distribution stays normalised either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.assembler import NoteAssembler
from engine.clip import Clip
from engine.generate import VariationDone
from engine.grammar import ContinuationGrammar, Vocabulary
from engine.sampling import SamplingParams, sample
from engine.tokens import ClipTokenizer

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_TOKEN_BITS = np.uint64(0xFFFF)
_CONTEXT_BITS = ~_TOKEN_BITS


@dataclass(frozen=True)
class _Order:
    """Counts of one context length: `keys` (context hash | token, sorted) with their counts, and per
    context its total count and how many distinct tokens follow it."""

    keys: np.ndarray  # uint64 [entries]
    counts: np.ndarray  # float64 [entries]
    contexts: np.ndarray  # uint64 [contexts], sorted
    first: np.ndarray  # int64 [contexts]: index of the context's first entry in `keys`
    types: np.ndarray  # float64 [contexts]: distinct next tokens
    totals: np.ndarray  # float64 [contexts]: summed counts
    discount: float


def _mix(h: np.ndarray) -> np.ndarray:
    """Spread the hash's entropy into its high bits before the low 16 are cleared."""
    h = h ^ (h >> np.uint64(31))
    h = h * _MIX
    return h ^ (h >> np.uint64(29))


def _context_hashes(stream: np.ndarray, positions: np.ndarray, longest: int):
    """For k = 0..longest: the hashed context (tokens positions-k .. positions-1) of each position,
    with the low 16 bits cleared. Every position must have `longest` tokens before it."""
    h = np.zeros(len(positions), dtype=np.uint64)
    for k in range(longest + 1):
        if k:
            h = (h ^ (stream[positions - k].astype(np.uint64) + np.uint64(1))) * _MULTIPLIER
        yield _mix(h) & _CONTEXT_BITS if k else h  # the empty context is 0 for every position


def _discount(counts: np.ndarray) -> float:
    """Ney's estimate n1 / (n1 + 2 n2), kept inside (0, 1) so every seen token keeps some mass."""
    n1, n2 = float((counts == 1).sum()), float((counts == 2).sum())
    return float(np.clip(n1 / (n1 + 2 * n2), 0.05, 0.95)) if n1 + n2 else 0.5


def _order(keys: np.ndarray, counts: np.ndarray) -> _Order:
    contexts, first, types = np.unique(keys & _CONTEXT_BITS, return_index=True, return_counts=True)
    totals = np.add.reduceat(counts, first) if len(first) else np.zeros(0)
    return _Order(keys, counts, contexts, first.astype(np.int64), types.astype(np.float64), totals, _discount(counts))


class NgramModel:
    """An interpolated Kneser-Ney n-gram model over token ids (order = context length + 1)."""

    def __init__(self, order: int, vocab_size: int, bos: int, eos: int, levels: list[_Order]):
        self.order = order
        self.vocab_size = vocab_size
        self.bos = bos
        self.eos = eos
        self.levels = levels  # levels[k]: contexts of k tokens

    @classmethod
    def train(cls, pieces: Iterable[Sequence[int]], vocab_size: int, bos: int, eos: int, order: int = 6) -> NgramModel:
        """Count every piece as `BOS*(order-1) piece EOS`: the padding gives the first tokens a full
        context without letting one piece's end predict the next piece's start."""
        if not 1 <= order <= 16:
            raise ValueError(f"n-gram order must be between 1 and 16, not {order}")
        if vocab_size > 1 << 16:
            raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit the n-gram's 16-bit token field")
        stream, targets = _padded_stream(pieces, bos, eos, order - 1)
        if len(targets) == 0:
            raise ValueError("the n-gram baseline needs at least one training piece")
        words = stream[targets].astype(np.uint64)
        levels: list[_Order] = []
        previous = None  # the keys of the previous (shorter) context length, per position
        for context in _context_hashes(stream, targets, order - 1):
            keys = context | words
            if previous is not None:
                # Kneser-Ney: a shorter context's count of a token is how many distinct tokens preceded
                # it, i.e. how many distinct longer keys reduce to it.
                _, first = np.unique(keys, return_index=True)
                levels.append(_order(*_unique_counts(previous[first])))
            previous = keys
        levels.append(_order(*_unique_counts(previous)))  # the longest context keeps raw counts
        return cls(order, vocab_size, bos, eos, levels)

    def log_probs(self, context: Sequence[int]) -> np.ndarray:
        """Natural log-probabilities [vocab] of the next token after `context` (its last order-1
        tokens are used; a shorter context is padded with BOS, as pieces are in training)."""
        longest = self.order - 1
        recent = [int(t) for t in context][-longest:] if longest else []
        stream = np.asarray([self.bos] * (longest - len(recent)) + recent + [0], dtype=np.int64)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for level, context_hash in zip(self.levels, _context_hashes(stream, np.asarray([longest]), longest), strict=True):
            row = int(np.searchsorted(level.contexts, context_hash[0]))
            if row == len(level.contexts) or level.contexts[row] != context_hash[0]:
                continue  # unseen context: this level adds nothing, keep the shorter one's distribution
            lo = level.first[row]
            hi = lo + int(level.types[row])
            total = level.totals[row]
            p = p * (level.discount * level.types[row] / total)
            tokens = (level.keys[lo:hi] & _TOKEN_BITS).astype(np.int64)
            p[tokens] += np.maximum(level.counts[lo:hi] - level.discount, 0.0) / total
        return np.log(p)

    def token_log_probs(self, pieces: Iterable[Sequence[int]]) -> np.ndarray:
        """The log-probability of every scored token (each piece's tokens and its EOS), vectorised."""
        stream, targets = _padded_stream(pieces, self.bos, self.eos, self.order - 1)
        words = stream[targets].astype(np.uint64)
        p = np.full(len(targets), 1.0 / self.vocab_size)
        for level, context in zip(self.levels, _context_hashes(stream, targets, self.order - 1), strict=True):
            row = np.searchsorted(level.contexts, context)
            known = row < len(level.contexts)
            known[known] = level.contexts[row[known]] == context[known]
            row = np.where(known, row, 0)
            keys = context | words
            entry = np.searchsorted(level.keys, keys)
            seen = entry < len(level.keys)
            seen[seen] = level.keys[entry[seen]] == keys[seen]
            count = np.where(seen, level.counts[np.minimum(entry, len(level.keys) - 1)], 0.0)
            total, types = level.totals[row], level.types[row]
            mixed = np.maximum(count - level.discount, 0.0) / total + level.discount * types / total * p
            p = np.where(known, mixed, p)
        return np.log(p)

    def perplexity(self, pieces: Iterable[Sequence[int]]) -> tuple[float, int]:
        """exp(mean negative log-likelihood per scored token), and how many tokens were scored."""
        logp = self.token_log_probs(pieces)
        if len(logp) == 0:
            raise ValueError("no tokens to score")
        return float(np.exp(-logp.mean())), len(logp)


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, counts = np.unique(keys, return_counts=True)
    return unique, counts.astype(np.float64)


def _padded_stream(pieces: Iterable[Sequence[int]], bos: int, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """All pieces as `BOS*max(pad,1) piece EOS` in one stream, and the positions of the scored tokens
    (the piece and its EOS): exactly the tokens the transformer is scored on after its one BOS."""
    parts, targets, offset = [], [], 0
    lead = max(pad, 1)
    for piece in pieces:
        piece = np.asarray(piece, dtype=np.int64)
        if len(piece) == 0:
            continue
        parts.append(np.concatenate([np.full(lead, bos, dtype=np.int64), piece, [eos]]))
        targets.append(np.arange(offset + lead, offset + lead + len(piece) + 1))
        offset += lead + len(piece) + 1
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(parts), np.concatenate(targets)


def continue_clip(model: NgramModel, tokenizer: ClipTokenizer, clip: Clip, bars: int, params: SamplingParams,
                  seed: int) -> VariationDone:
    """Continue `clip` by `bars` bars with the n-gram model, under the engine's continuation grammar.

    The result is shaped like the transformer's: the continuation's notes placed after the prompt,
    and its tokens from the opening Bar and TimeSig on."""
    vocab = Vocabulary.of(tokenizer)
    meter = clip.time_signature
    grammar = ContinuationGrammar(vocab, tokenizer.time_sig_id(meter), tokenizer.program_id(clip.program, clip.is_drum),
                                  tokenizer.positions_per_bar(meter), bars, clip.is_drum)
    history = tokenizer.encode_clip(clip)
    prompt_bars = sum(1 for t in history if t == vocab.bar)
    assembler = NoteAssembler(tokenizer, meter, prompt_bars * clip.beats_per_bar, channel=9 if clip.is_drum else 0)
    rng = np.random.default_rng(seed)
    generated, notes = [], []
    for token in grammar.forced_opening():
        generated.append(token)
        assembler.feed(token)
    while True:
        token = sample(model.log_probs(history + generated), grammar.allowed(), params, rng)
        if not grammar.accept(token):
            break
        generated.append(token)
        note = assembler.feed(token)
        if note is not None:
            notes.append(note)
    return VariationDone(0, clip.with_notes(notes), tuple(generated))
