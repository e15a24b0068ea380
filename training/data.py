"""Training data: MIDI files -> checked, deduplicated, split, tokenized windows.

Every file is read inside its own guard (MIDI parsers raise a zoo of exception types and accept
absurd files silently), checked for sanity, and either tokenized or reported with its reason.
The train/validation split is keyed on each file's content hash, so it is stable across runs and
directory orders, adding files moves none of the existing ones, and duplicates never straddle it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.tokens import ClipTokenizer

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_NOTES = 200_000
MAX_BEATS = 20_000  # about 2.5 hours at 120 BPM: anything longer is a broken file
MIDI_SUFFIXES = {".mid", ".midi", ".smf"}


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_validation(file_hash: str, val_fraction: float) -> bool:
    """The split decision for one file: a pure function of its content hash."""
    return int(file_hash[:8], 16) / 0xFFFFFFFF < val_fraction


def data_fingerprint(file_hashes) -> str:
    """sha256 over the sorted per-file hashes: names the exact data a model was trained on."""
    return hashlib.sha256("\n".join(sorted(file_hashes)).encode()).hexdigest()


def find_midi_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())


@dataclass
class IngestResult:
    path: str
    hash: str = ""
    tokens: np.ndarray | None = None
    reason: str = ""  # why the file was skipped; empty when ingested


def ingest_file(path: Path, tokenizer_file: str) -> IngestResult:
    """Read, check and tokenize one file; never raises (the reason is returned instead)."""
    import symusic

    result = IngestResult(str(path))
    try:
        data = Path(path).read_bytes()
        if len(data) > MAX_FILE_BYTES:
            result.reason = f"file is {len(data) // 1024 // 1024} MB, larger than {MAX_FILE_BYTES // 1024 // 1024} MB"
            return result
        result.hash = content_hash(data)
        score = symusic.Score.from_midi(data)
        if score.ticks_per_quarter <= 0:
            result.reason = "0 ticks per beat"
            return result
        if any(t.mspq <= 0 for t in score.tempos):
            result.reason = "a tempo of 0"
            return result
        notes = sum(len(t.notes) for t in score.tracks)
        if notes == 0:
            result.reason = "no notes"
            return result
        if notes > MAX_NOTES:
            result.reason = f"{notes} notes, more than {MAX_NOTES}"
            return result
        if score.end() / score.ticks_per_quarter > MAX_BEATS:
            result.reason = f"{score.end() / score.ticks_per_quarter:.0f} beats long, more than {MAX_BEATS}"
            return result
        ids = _tokenizer(tokenizer_file).encode_score(score)
        if len(ids) < 8:
            result.reason = "too few tokens after quantization"
            return result
        result.tokens = np.asarray(ids, dtype=np.int16)
    except Exception as exc:  # any parser failure is a per-file skip, reported, never fatal
        result.reason = f"{type(exc).__name__}: {exc}".strip()[:200] or type(exc).__name__
    return result


_TOKENIZERS: dict[str, ClipTokenizer] = {}


def _tokenizer(path: str) -> ClipTokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = ClipTokenizer.from_file(path)
    return _TOKENIZERS[path]


@dataclass
class Corpus:
    train: list[np.ndarray] = field(default_factory=list)
    val: list[np.ndarray] = field(default_factory=list)
    train_hashes: list[str] = field(default_factory=list)
    val_hashes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.train_hashes + self.val_hashes)

    def token_count(self, part: str = "train") -> int:
        return int(sum(len(t) for t in getattr(self, part)))


def load_corpus(files: list[Path], tokenizer_file: Path, val_fraction: float, workers: int | None = None,
                progress: bool = True) -> Corpus:
    """Ingest files in parallel, drop content duplicates, split by content hash."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    corpus = Corpus()
    seen: set[str] = set()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(ingest_file, files, [str(tokenizer_file)] * len(files), chunksize=16)
        for result in tqdm(results, total=len(files), desc="tokenizing", unit="file", disable=not progress):
            if result.reason:
                corpus.skipped.append((result.path, result.reason))
                continue
            if result.hash in seen:
                corpus.duplicates.append(result.path)
                continue
            seen.add(result.hash)
            if is_validation(result.hash, val_fraction):
                corpus.val.append(result.tokens)
                corpus.val_hashes.append(result.hash)
            else:
                corpus.train.append(result.tokens)
                corpus.train_hashes.append(result.hash)
    return corpus


class WindowSampler:
    """Random training windows that start at a bar, optionally transposed.

    Pieces are joined as BOS piece EOS BOS piece ...; a window starts at a `Bar` token so the model
    sees the same kind of start a trimmed prompt has. Transposition shifts every pitch token of the
    window by the same number of semitones when all of them stay inside the vocabulary's range,
    so the model learns every key from a corpus that favours a few.
    """

    def __init__(self, pieces: list[np.ndarray], tokenizer: ClipTokenizer, window: int, seed: int = 0,
                 transpose: int = 0):
        kinds = tokenizer.kinds
        parts = []
        for piece in pieces:
            parts.extend([np.array([kinds.bos], dtype=np.int64), piece.astype(np.int64), np.array([kinds.eos], dtype=np.int64)])
        self.stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.window = window
        starts = np.flatnonzero(self.stream == kinds.bar)
        self.starts = starts[starts + window + 1 <= len(self.stream)]
        if len(self.starts) == 0:
            raise ValueError(f"not enough data for one window of {window} tokens")
        self.rng = np.random.default_rng(seed)
        self.transpose = transpose
        # table[s, token] = token moved s semitones (or -1 where that leaves the pitch range)
        size = tokenizer.vocab_size
        pitch_of = kinds.pitch
        id_of = {p: i for i, p in pitch_of.items()}
        shifts = range(-transpose, transpose + 1)
        self.table = np.tile(np.arange(size), (len(shifts), 1))
        for row, s in enumerate(shifts):
            for token, pitch in pitch_of.items():
                self.table[row, token] = id_of.get(pitch + s, -1)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.rng.choice(self.starts, size=size)
        rows = np.stack([self.stream[s:s + self.window + 1] for s in chosen])
        if self.transpose:
            for r in range(size):
                shifted = self.table[self.rng.integers(len(self.table)), rows[r]]
                if (shifted >= 0).all():
                    rows[r] = shifted
        return rows[:, :-1], rows[:, 1:]

    def sequential_batches(self, size: int, max_windows: int | None = None):
        """Non-overlapping windows from the start of the stream, for a deterministic validation loss."""
        n = (len(self.stream) - 1) // self.window
        if max_windows:
            n = min(n, max_windows)
        for first in range(0, n, size):
            rows = np.stack([self.stream[i * self.window:(i + 1) * self.window + 1] for i in range(first, min(n, first + size))])
            yield rows[:, :-1], rows[:, 1:]
