"""Data augmentation: transposition within each instrument's range, velocity jitter, tempo scaling.

Pitch and velocity are augmented on tokens, per training window, as windows are drawn (cheap, and
a different variant every time). Tempo scaling cannot be: REMI here has no tempo tokens, so the only
way a tempo change reaches the model is as stretched time (notes land on other positions and get
other durations). It is therefore done on the score before tokenizing: each training file gets a
few stretched copies (`--tempo-copies`, factors spread evenly over `--tempo-scale LO HI`, 1.0
excluded), tokenized once at ingest, and a training window comes from a stretched copy with
probability `tempo_prob`, so the original timing stays the most common. A stretch is a change of
the file's ticks-per-beat (`tpq / factor`): every event moves together, exactly and cheaply, and
miditok's resampling then quantizes the stretched times to the model's grid. Validation data is
never augmented. miditok's own augmentation shifts pitch, velocity and duration but has no time
stretch, and augments files rather than windows; its table of instrument ranges is used here.

    segue finetune ... --transpose 5 --velocity-jitter 8 --tempo-scale 0.8 1.2 --tempo-copies 2
    segue finetune ... --no-augment
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np

from engine.tokens import ClipTokenizer


@dataclass(frozen=True)
class AugmentConfig:
    transpose: int = 0  # largest shift in semitones, each way (0: off)
    velocity_jitter: int = 0  # largest velocity offset per window, in MIDI velocity units (0: off)
    tempo_low: float = 0.8
    tempo_high: float = 1.2
    tempo_copies: int = 0  # stretched copies per training file (0: off)
    tempo_prob: float = 0.5  # chance that a window comes from a stretched copy

    @property
    def tempo_factors(self) -> tuple[float, ...]:
        """Evenly spread stretch factors in [low, high] without 1.0 (the original is always there)."""
        if self.tempo_copies <= 0:
            return ()
        grid = np.linspace(self.tempo_low, self.tempo_high, self.tempo_copies + 1)
        factors = [f for f in grid if abs(f - 1.0) > 1e-6][: self.tempo_copies]
        if len(factors) < self.tempo_copies:  # 1.0 was not on the grid: use the copies-wide grid instead
            factors = list(np.linspace(self.tempo_low, self.tempo_high, self.tempo_copies))
        return tuple(round(float(f), 4) for f in factors)

    def to_dict(self) -> dict:
        return {**asdict(self), "tempo_factors": list(self.tempo_factors)}


def add_augment_args(parser: argparse.ArgumentParser, defaults: AugmentConfig) -> None:
    group = parser.add_argument_group("augmentation (training windows only; validation is never augmented)")
    group.add_argument("--no-augment", action="store_true", help="switch every augmentation off")
    group.add_argument("--transpose", type=int, default=defaults.transpose, metavar="N",
                       help=f"shift windows up to +-N semitones, keeping every note in its instrument's range "
                            f"(0: off; default {defaults.transpose})")
    group.add_argument("--velocity-jitter", type=int, default=defaults.velocity_jitter, metavar="V",
                       help=f"move a window's velocities together by up to +-V (0: off; default {defaults.velocity_jitter})")
    group.add_argument("--tempo-scale", type=float, nargs=2, default=(defaults.tempo_low, defaults.tempo_high),
                       metavar=("LO", "HI"), help=f"stretch time by factors in LO..HI "
                                                  f"(default {defaults.tempo_low} {defaults.tempo_high})")
    group.add_argument("--tempo-copies", type=int, default=defaults.tempo_copies, metavar="K",
                       help=f"stretched copies per training file (0: off; default {defaults.tempo_copies})")


def augment_from_args(args: argparse.Namespace) -> AugmentConfig:
    if args.no_augment:
        return AugmentConfig()
    low, high = sorted(args.tempo_scale)
    if low <= 0:
        raise SystemExit("error: --tempo-scale factors must be above 0")
    return AugmentConfig(transpose=max(0, args.transpose), velocity_jitter=max(0, args.velocity_jitter),
                         tempo_low=low, tempo_high=high, tempo_copies=max(0, args.tempo_copies))


def stretch_score(score, factor: float):
    """A copy of a symusic Score with every time multiplied by about `factor` (slower above 1).

    Lowering ticks-per-beat by the factor turns the same ticks into more beats; the rounding to
    an integer tpq changes the factor by less than 1% for ordinary resolutions.
    """
    stretched = score.copy()
    stretched.ticks_per_quarter = max(1, round(score.ticks_per_quarter / factor))
    return stretched


def instrument_ranges(tokenizer: ClipTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) pitch per program + 1 (index 0 is drums), inside the vocabulary's pitch range."""
    from miditok.constants import MIDI_INSTRUMENTS  # General MIDI tessituras (128 programs)

    pitches = tokenizer.kinds.pitch.values()
    vocab_low, vocab_high = min(pitches), max(pitches)
    low = np.full(129, vocab_low, dtype=np.int64)
    high = np.full(129, vocab_high, dtype=np.int64)
    for program, info in enumerate(MIDI_INSTRUMENTS):
        span = info["pitch_range"]
        low[program + 1] = max(vocab_low, span.start)
        high[program + 1] = min(vocab_high, span.stop - 1)
    return low, high


class TokenAugmenter:
    """Transposes and velocity-shifts batches of REMI windows in place, with a caller's RNG."""

    def __init__(self, tokenizer: ClipTokenizer, config: AugmentConfig):
        kinds = tokenizer.kinds
        size = tokenizer.vocab_size
        self.transpose = config.transpose
        self.pitch_of = np.full(size, -1, dtype=np.int64)
        self.pitch_id = np.full(128, -1, dtype=np.int64)
        for token, pitch in kinds.pitch.items():
            self.pitch_of[token] = pitch
            self.pitch_id[pitch] = token
        # Program tokens name the instrument of the Pitch that follows (drums use PitchDrum, never shifted).
        self.program_of = np.full(size, -2, dtype=np.int64)
        for token, program in kinds.program.items():
            self.program_of[token] = program
        self.low, self.high = instrument_ranges(tokenizer)
        velocities = sorted(kinds.velocity.items(), key=lambda item: item[1])
        self.velocity_ids = np.array([token for token, _ in velocities], dtype=np.int64)
        self.velocity_rank = np.full(size, -1, dtype=np.int64)
        for rank, (token, _) in enumerate(velocities):
            self.velocity_rank[token] = rank
        values = [v for _, v in velocities]
        step = (values[-1] - values[0]) / max(1, len(values) - 1)
        self.velocity_bins = int(round(config.velocity_jitter / step)) if config.velocity_jitter else 0

    @property
    def active(self) -> bool:
        return bool(self.transpose or self.velocity_bins)

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.transpose:
            self._transpose(rows, rng)
        if self.velocity_bins:
            offsets = rng.integers(-self.velocity_bins, self.velocity_bins + 1, size=(len(rows), 1))
            rank = self.velocity_rank[rows]
            moved = self.velocity_ids[np.clip(rank + offsets, 0, len(self.velocity_ids) - 1)]
            np.copyto(rows, moved, where=rank >= 0)
        return rows

    def _transpose(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        pitch = self.pitch_of[rows]
        is_pitch = pitch >= 0
        # The program of each token: the last Program token at or before it (piano before any).
        program = self.program_of[rows]
        where = np.where(program >= -1, np.arange(rows.shape[1]), 0)
        np.maximum.accumulate(where, axis=1, out=where)
        current = np.take_along_axis(program, where, axis=1)
        current = np.where(current >= -1, current, 0) + 1
        room_down = np.where(is_pitch, self.low[current] - pitch, -128).max(axis=1)  # most negative allowed shift
        room_up = np.where(is_pitch, self.high[current] - pitch, 128).min(axis=1)
        # A note already outside its range may move back towards it, never further out.
        low = np.maximum(-self.transpose, np.minimum(0, room_down))
        high = np.minimum(self.transpose, np.maximum(0, room_up))
        shift = rng.integers(low, high + 1)[:, None]
        moved = self.pitch_id[np.clip(pitch + shift, 0, 127)]
        np.copyto(rows, moved, where=is_pitch & (moved >= 0))
