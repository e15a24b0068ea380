"""Held-out music: which pieces and prompts a model is measured on, chosen the way training splits.

    split = split_folder(folder, model / "tokenizer.json", 0.2)     # the content-hash split, as training does
    skipped = []
    for example in held_out_examples(split.val, tokenizer, prompt_bars=4, bars=4, seed=0, skipped=skipped):
        example.prompt, example.reference                             # P bars of the piece, the real next B bars

`segue eval` and bench/style_experiment.py both choose here, so the two measure the same clips of
the same pieces. Pieces are split by `is_validation(content hash, fraction)`, the rule `segue train`
and `segue finetune` split by: a model trained with at least that validation fraction on the same
files has never trained on a held-out piece. The held-out pieces are in hash order (an arbitrary
but stable sample of the folder), and each piece's bar offset comes from a generator seeded by
(seed, the piece's hash), so a piece's clip does not depend on the other files in the folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import symusic

from engine.clip import Clip
from engine.tokens import ClipTokenizer
from training.data import find_midi_files, ingest_file, is_validation


class Piece(NamedTuple):
    path: Path
    hash: str  # sha256 of the file's bytes: the split key
    tokens: np.ndarray  # token ids by the model's tokenizer


@dataclass
class DataSplit:
    train: list[Piece]  # in file order
    val: list[Piece]  # in hash order
    files: int
    skipped: list[tuple[str, str]]  # (file, reason)
    duplicates: int


def split_folder(folder: Path, tokenizer_file: Path, val_fraction: float) -> DataSplit:
    """Tokenize every MIDI file of `folder` with the model's tokenizer and split it as training does."""
    files = find_midi_files(folder)
    split = DataSplit([], [], len(files), [], 0)
    seen: set[str] = set()
    for path in files:
        result = ingest_file(path, str(tokenizer_file))
        if result.reason:
            split.skipped.append((str(path), result.reason))
        elif result.hash in seen:
            split.duplicates += 1
        else:
            seen.add(result.hash)
            piece = Piece(path, result.hash, result.tokens)
            (split.val if is_validation(result.hash, val_fraction) else split.train).append(piece)
    split.val.sort(key=lambda piece: piece.hash)  # hash order: an arbitrary but stable sample of the folder
    return split


def capped(pieces: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """Whole pieces in order until `max_tokens` (the first piece is cut if it alone is longer)."""
    out, total = [], 0
    for piece in pieces:
        if total + len(piece) > max_tokens:
            if not out:
                out.append(piece[:max_tokens])
            break
        out.append(piece)
        total += len(piece)
    return out


def read_piece(path: Path) -> Clip:
    """A whole piece as one clip. The file has passed `ingest_file`'s checks; it is read without
    `read_clip`'s limits, which are sized for a DAW clip and would refuse a long piece. Raises
    whatever symusic raises for a file it cannot parse."""
    return Clip.from_score(symusic.Score.from_midi(Path(path).read_bytes()), name=Path(path).stem)


@dataclass(frozen=True)
class Example:
    """One held-out clip: the prompt (P bars from beat 0) and the real next bars placed after it."""

    path: Path  # the piece it was cut from
    offset_bar: int  # the prompt's first bar in the piece (0-based)
    prompt: Clip
    reference: Clip

    @property
    def name(self) -> str:
        return self.path.stem


def bar_window(clip: Clip, first_bar: int, bars: int, shift_bars: int) -> list:
    """Notes starting in bars [first_bar, first_bar + bars), moved `shift_bars` bars earlier, cut at the window's end."""
    beats = clip.beats_per_bar
    start, end = first_bar * beats, (first_bar + bars) * beats
    # max(0, ...): an onset a hair before the bar line (float ticks) must not become a negative start.
    return [replace(n, start=max(0.0, n.start - shift_bars * beats), duration=min(n.duration, end - n.start))
            for n in clip.notes if start - 1e-6 <= n.start < end - 1e-6]


def held_out_example(path: Path, prompt_bars: int, bars: int, rng: np.random.Generator) -> Example | str:
    """A prompt and its real continuation at a random bar offset where both hold notes, or why there is none."""
    try:
        clip = read_piece(path)
    except Exception as exc:  # symusic's parse errors have many types; the file is skipped with the reason
        return f"unreadable ({exc})"
    beats = clip.beats_per_bar
    onsets = np.bincount([int(math.floor(n.start / beats + 1e-6)) for n in clip.notes], minlength=clip.bars + 1)
    cumulative = np.concatenate([[0], np.cumsum(onsets)])  # notes starting before bar b: cumulative[b]
    offsets = [o for o in range(0, clip.bars - prompt_bars - bars + 1)
               if cumulative[o + prompt_bars] > cumulative[o] and cumulative[o + prompt_bars + bars] > cumulative[o + prompt_bars]]
    if not offsets:
        return f"no {prompt_bars}+{bars} bars with notes in both prompt and continuation ({clip.bars} bars long)"
    offset = int(rng.choice(offsets))
    prompt = Clip((), clip.tempo, clip.time_signature, prompt_bars * beats, clip.program, clip.is_drum, path.stem)
    prompt = prompt.with_notes(bar_window(clip, offset, prompt_bars, offset))
    reference = replace(prompt, length=(prompt_bars + bars) * beats).with_notes(
        bar_window(clip, offset + prompt_bars, bars, offset))
    return Example(Path(path), offset, prompt, reference)


def held_out_examples(pieces: list[Piece], tokenizer: ClipTokenizer, prompt_bars: int, bars: int, seed: int,
                      skipped: list[tuple[str, str]]) -> Iterator[Example]:
    """Each piece's example, lazily, in the order given; a piece without one goes to `skipped` as
    (file name, why). A piece that changes meter has none: its bars would not line up."""
    time_sigs = tokenizer.kinds.time_sig
    for piece in pieces:
        if len({int(t) for t in piece.tokens if int(t) in time_sigs}) > 1:
            skipped.append((piece.path.name, "changes meter (bars would not line up)"))
            continue
        rng = np.random.default_rng([seed, int(piece.hash[:8], 16)])
        example = held_out_example(piece.path, prompt_bars, bars, rng)
        if isinstance(example, str):
            skipped.append((piece.path.name, example))
        else:
            yield example
