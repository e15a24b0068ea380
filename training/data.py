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
MAX_NOTE_BEATS = 2_000  # one note held for 17 minutes at 120 BPM: a lost note-off, not music
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
    """Every MIDI-named file under `folder`, sorted. A symbolic link whose target is gone is listed
    too, so ingest reports it as skipped instead of it vanishing without a word."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.suffix.lower() in MIDI_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists())))


@dataclass
class IngestResult:
    path: str
    hash: str = ""
    tokens: np.ndarray | None = None
    variants: list[np.ndarray] = field(default_factory=list)  # tempo-stretched copies (training files only)
    reason: str = ""  # why the file was skipped; empty when ingested


def check_score(score) -> str:
    """Why a parsed score must not be trained on, or "" when it is sane."""
    tpq = score.ticks_per_quarter
    if tpq <= 0:
        return "0 ticks per beat"
    if any(t.mspq <= 0 for t in score.tempos):
        return "a tempo of 0"
    if any(m.numerator <= 0 or m.denominator <= 0 for m in score.time_signatures):
        return "an impossible time signature (a numerator or denominator of 0)"
    notes = sum(len(t.notes) for t in score.tracks)
    if notes == 0:
        return "no notes"
    if notes > MAX_NOTES:
        return f"{notes} notes, more than {MAX_NOTES}"
    if score.end() / tpq > MAX_BEATS:
        return f"{score.end() / tpq:.0f} beats long, more than {MAX_BEATS}"
    longest = max((int(t.notes.numpy()["duration"].max()) for t in score.tracks if len(t.notes)), default=0)
    if longest / tpq > MAX_NOTE_BEATS:
        return f"a note {longest / tpq:.0f} beats long (a lost note-off?), more than {MAX_NOTE_BEATS}"
    return ""


def ingest_file(path: Path, tokenizer_file: str, tempo_factors: tuple[float, ...] = (),
                val_fraction: float = 0.0) -> IngestResult:
    """Read, check and tokenize one file; never raises (the reason is returned instead).

    Training files (by `is_validation`) also get one tempo-stretched copy per factor.
    """
    import symusic

    from training.augment import stretch_score

    result = IngestResult(str(path))
    if Path(path).is_symlink() and not Path(path).exists():
        result.reason = f"a symbolic link to {Path(path).readlink()}, which does not exist"
        return result
    try:
        data = Path(path).read_bytes()
        if len(data) > MAX_FILE_BYTES:
            result.reason = f"file is {len(data) // 1024 // 1024} MB, larger than {MAX_FILE_BYTES // 1024 // 1024} MB"
            return result
        result.hash = content_hash(data)
        try:
            score = symusic.Score.from_midi(data)
        except Exception as exc:  # the parser's many error types all mean "not a MIDI file we can read"
            message = str(exc).replace(": iostream error", "").strip() or type(exc).__name__
            result.reason = f"not a readable MIDI file ({message[:160]})"
            return result
        result.reason = check_score(score)
        if result.reason:
            return result
        tokenizer = _tokenizer(tokenizer_file)
        ids = tokenizer.encode_score(score)
        if len(ids) < 8:
            result.reason = "too few tokens after quantization (notes outside the pitch range or too short?)"
            return result
        result.tokens = np.asarray(ids, dtype=np.int16)
        if tempo_factors and not is_validation(result.hash, val_fraction):
            for factor in tempo_factors:
                stretched = tokenizer.encode_score(stretch_score(score, factor))
                if len(stretched) >= 8:
                    result.variants.append(np.asarray(stretched, dtype=np.int16))
    except Exception as exc:  # any other failure is a per-file skip, reported, never fatal
        result.tokens, result.variants = None, []
        result.reason = f"{type(exc).__name__}: {exc}".strip()[:200] or type(exc).__name__
    return result


_TOKENIZERS: dict[str, ClipTokenizer] = {}


def _tokenizer(path: str) -> ClipTokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = ClipTokenizer.from_file(path)
    return _TOKENIZERS[path]


@dataclass
class Corpus:
    """Ingested pieces split by content hash; each part is ordered by hash, not by file name, so the
    same files give the same training stream whatever their names or directory order."""

    train: list[np.ndarray] = field(default_factory=list)
    val: list[np.ndarray] = field(default_factory=list)
    train_hashes: list[str] = field(default_factory=list)
    val_hashes: list[str] = field(default_factory=list)
    train_variants: list[np.ndarray] = field(default_factory=list)  # tempo-stretched copies of train pieces
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, path of the same content kept)
    paths: dict[str, str] = field(default_factory=dict)  # hash -> path of the kept file
    files: int = 0

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.train_hashes + self.val_hashes)

    def token_count(self, part: str = "train") -> int:
        return int(sum(len(t) for t in getattr(self, part)))


def _ingest_all(files: list[Path], tokenizer_file: str, tempo_factors: tuple[float, ...], val_fraction: float,
                workers: int):
    """ingest_file over every file, in order; a process pool when there is enough work to share."""
    args = (files, [tokenizer_file] * len(files), [tempo_factors] * len(files), [val_fraction] * len(files))
    if workers <= 1 or len(files) < 32:
        yield from map(ingest_file, *args)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(ingest_file, *args, chunksize=8)


def load_corpus(files: list[Path], tokenizer_file: Path, val_fraction: float, workers: int | None = None,
                progress: bool = True, tempo_factors: tuple[float, ...] = ()) -> Corpus:
    """Ingest files (in parallel), drop content duplicates, split by content hash.

    Files are ingested in the order given (sorted paths from `find_midi_files`); of several files
    with the same content the first is kept and the others are listed as duplicates.
    """
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    corpus = Corpus(files=len(files))
    kept: dict[str, IngestResult] = {}
    results = _ingest_all(list(files), str(tokenizer_file), tuple(tempo_factors), val_fraction, workers)
    for result in tqdm(results, total=len(files), desc="reading MIDI", unit="file", disable=not progress):
        if result.reason:
            corpus.skipped.append((result.path, result.reason))
        elif result.hash in kept:
            corpus.duplicates.append((result.path, kept[result.hash].path))
        else:
            kept[result.hash] = result
    for file_hash in sorted(kept):
        result = kept[file_hash]
        corpus.paths[file_hash] = result.path
        if is_validation(file_hash, val_fraction):
            corpus.val.append(result.tokens)
            corpus.val_hashes.append(file_hash)
        else:
            corpus.train.append(result.tokens)
            corpus.train_hashes.append(file_hash)
            corpus.train_variants.extend(result.variants)
    return corpus


def _join(pieces: list[np.ndarray], bos: int, eos: int) -> np.ndarray:
    parts = []
    for piece in pieces:
        parts.extend([np.array([bos], dtype=np.int64), piece.astype(np.int64), np.array([eos], dtype=np.int64)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class WindowSampler:
    """Random training windows that start at a bar, optionally augmented.

    Pieces are joined as BOS piece EOS BOS piece ...; a window starts at a `Bar` token so the model
    sees the same kind of start a trimmed prompt has. With `variants` (tempo-stretched copies) a
    window comes from them with probability `variant_prob`; `augment` then transposes and shifts
    velocities in place. Every random choice comes from one numpy Generator, whose state (`state()`)
    is the sampler's whole position in the data: restoring it replays the same windows.
    """

    def __init__(self, pieces: list[np.ndarray], tokenizer: ClipTokenizer, window: int, seed: int = 0,
                 augment=None, variants: list[np.ndarray] | None = None, variant_prob: float = 0.0):
        kinds = tokenizer.kinds
        self.window = window
        self.stream = _join(pieces, kinds.bos, kinds.eos)
        self.starts = self._starts(self.stream, kinds.bar)
        if len(self.starts) == 0:
            raise ValueError(f"{len(self.stream)} tokens are not enough data for one window of {window} tokens")
        self.variant_stream = _join(variants or [], kinds.bos, kinds.eos)
        self.variant_starts = self._starts(self.variant_stream, kinds.bar)
        self.variant_prob = variant_prob if len(self.variant_starts) else 0.0
        self.augment = augment if augment is not None and augment.active else None
        self.rng = np.random.default_rng(seed)

    def _starts(self, stream: np.ndarray, bar: int) -> np.ndarray:
        starts = np.flatnonzero(stream == bar)
        return starts[starts + self.window + 1 <= len(stream)]

    def state(self) -> dict:
        """The generator state (JSON-ready): where the sampler is in its sequence of windows."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.rng.choice(self.starts, size=size)
        rows = np.stack([self.stream[s:s + self.window + 1] for s in chosen])
        if self.variant_prob:
            use = self.rng.random(size) < self.variant_prob
            other = self.rng.choice(self.variant_starts, size=size)
            for r in np.flatnonzero(use):
                rows[r] = self.variant_stream[other[r]:other[r] + self.window + 1]
        if self.augment is not None:
            self.augment(rows, self.rng)
        return rows[:, :-1], rows[:, 1:]

    def window_count(self, max_windows: int | None = None) -> int:
        n = (len(self.stream) - 1) // self.window
        return min(n, max_windows) if max_windows else n

    def sequential_batches(self, size: int, max_windows: int | None = None, rank: int = 0, world: int = 1):
        """Non-overlapping windows from the start of the stream, for a deterministic validation loss.

        With `world` > 1 each rank takes every world-th window, so ranks share the work.
        """
        mine = list(range(self.window_count(max_windows)))[rank::world]
        for first in range(0, len(mine), size):
            rows = np.stack([self.stream[i * self.window:(i + 1) * self.window + 1] for i in mine[first:first + size]])
            yield rows[:, :-1], rows[:, 1:]
