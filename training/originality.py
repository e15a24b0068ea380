"""Originality: how many consecutive bars of a continuation appear verbatim in the training data.

    index = CopyIndex(train_pieces, tokenizer)            # token ids of every training piece
    index.longest_copy(continuation_tokens)               # 0, 1, 2, ... bars
    copy_summary([index.longest_copy(t) for t in ...])    # mean, max, fraction copying >= 2 bars

Bars are compared in the token domain, where both sides have the same quantization (a training
file's raw MIDI timing would hide a copy the model learned from its tokens): a bar is its meter and
the set of (position in the bar, pitch, duration) of its notes. Velocity and instrument are
ignored, since a copied phrase played louder or on another instrument is still a copy. With
`transpose=True` a bar is also compared transposed: notes relative to the bar's lowest pitch, and
consecutive bars of a run must move between each other by the same interval as in training, so a
run is one consistent transposition. Bars with fewer than `min_notes` notes never count toward a
run: an empty bar or a single held note recurs everywhere and says nothing about copying.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from engine.tokens import ClipTokenizer

BLANK = -1  # key of a bar too sparse to count (Python's hash() never returns -1)
COPY_THRESHOLD_BARS = 2


def bar_signatures(tokens: Sequence[int], tokenizer: ClipTokenizer, transpose: bool = False,
                   min_notes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per bar of a REMI stream: a hash of its content (BLANK when sparse) and the interval from the
    previous bar's lowest pitch to its own (always 0 unless `transpose`)."""
    kinds = tokenizer.kinds
    bars: list[tuple[int, list[tuple[int, int, int]]]] = []
    meter = position = pitch = -1
    for token in tokens:
        token = int(token)
        if token == kinds.bar:
            bars.append((meter, []))
        elif token == kinds.eos:
            break
        elif not bars:
            continue  # BOS, or anything before the first Bar
        elif token in kinds.time_sig:
            meter = token
            bars[-1] = (meter, bars[-1][1])
        elif token in kinds.position:
            position = kinds.position[token]
        elif token in kinds.pitch or token in kinds.pitch_drum:
            pitch = kinds.pitch.get(token, kinds.pitch_drum.get(token))
        elif token in kinds.duration and pitch >= 0:
            bars[-1][1].append((position, pitch, token))
            pitch = -1
    keys = np.full(len(bars), BLANK, dtype=np.int64)
    links = np.zeros(len(bars), dtype=np.int64)
    previous_low = None
    for index, (bar_meter, notes) in enumerate(bars):
        low = min((p for _, p, _ in notes), default=None)
        if transpose and low is not None:
            notes = [(pos, p - low, d) for pos, p, d in notes]
            links[index] = low - previous_low if previous_low is not None else 0
            previous_low = low
        if len(notes) >= min_notes:
            keys[index] = hash((bar_meter, tuple(sorted(notes))))
    return keys, links


class CopyIndex:
    """Every bar of the training pieces, indexed by content, for longest-copied-run queries."""

    def __init__(self, pieces: Iterable[Sequence[int]], tokenizer: ClipTokenizer, transpose: bool = False,
                 min_notes: int = 2):
        self.tokenizer = tokenizer
        self.transpose = transpose
        self.min_notes = min_notes
        self.pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self.where: dict[int, list[tuple[int, int]]] = {}  # bar key -> (piece, bar) occurrences
        for piece in pieces:
            keys, links = bar_signatures(piece, tokenizer, transpose, min_notes)
            number = len(self.pieces)
            self.pieces.append((keys, links))
            for bar, key in enumerate(keys.tolist()):
                if key != BLANK:
                    self.where.setdefault(key, []).append((number, bar))

    def longest_copy(self, tokens: Sequence[int]) -> int:
        """The longest run of consecutive bars of `tokens` found, in the same order, in one training piece."""
        keys, links = bar_signatures(tokens, self.tokenizer, self.transpose, self.min_notes)
        best = 0
        for start, key in enumerate(keys.tolist()):
            if len(keys) - start <= best:
                break  # no longer run can start here
            for piece, bar in self.where.get(key, ()):
                train_keys, train_links = self.pieces[piece]
                run = 1
                while (start + run < len(keys) and bar + run < len(train_keys) and keys[start + run] != BLANK
                       and keys[start + run] == train_keys[bar + run] and links[start + run] == train_links[bar + run]):
                    run += 1
                best = max(best, run)
        return best


def copy_summary(runs: Sequence[int], threshold: int = COPY_THRESHOLD_BARS) -> dict:
    """Mean and longest copied run (bars), and the fraction of continuations copying >= `threshold` bars."""
    runs = np.asarray(runs, dtype=float)
    if len(runs) == 0:
        return {"continuations": 0, "mean_longest_copy": 0.0, "max_longest_copy": 0, "copying_fraction": 0.0,
                "threshold_bars": threshold}
    return {"continuations": len(runs), "mean_longest_copy": float(runs.mean()), "max_longest_copy": int(runs.max()),
            "copying_fraction": float((runs >= threshold).mean()), "threshold_bars": threshold}
