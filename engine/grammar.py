"""The REMI token grammar for a continuation, as a mask over the vocabulary.

Every generated sequence decodes because the sampler may only pick what the grammar allows:

    Bar -> TimeSig(clip meter) -> { Position(later than now) -> Program(clip) -> Pitch -> Velocity -> Duration }*
                                     ^ after a Duration: another note at the same position (higher pitch),
                                       a later Position, or the next Bar

Positions strictly increase inside a bar and pitches strictly increase inside a position (the order
miditok writes), so a bar always ends and no note is doubled. The bar counter stops generation at
exactly the requested number of bars: the `Bar` that would open one bar too many ends the sequence.
Constraints (pitch range, velocities, ...) only narrow the allowed sets further.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from engine.tokens import ClipTokenizer


class Expect(Enum):
    TIME_SIG = "time_sig"
    BAR_START = "bar_start"  # after TimeSig: first Position, or Bar (an empty bar)
    PROGRAM = "program"
    PITCH = "pitch"
    VELOCITY = "velocity"
    DURATION = "duration"
    NOTE_END = "note_end"  # after Duration: Program (same position), later Position, or Bar
    DONE = "done"


@dataclass(frozen=True)
class Vocabulary:
    """Token-id masks built once per tokenizer; the per-step work is only boolean ANDs."""

    size: int
    bar: int
    position_index: np.ndarray  # [size] index for Position tokens (1/res beat each), -1 elsewhere
    pitch_value: np.ndarray  # [size] MIDI pitch for Pitch tokens, -1 elsewhere
    drum_value: np.ndarray  # [size] MIDI pitch for PitchDrum tokens, -1 elsewhere
    velocity_value: np.ndarray  # [size] velocity for Velocity tokens, -1 elsewhere
    duration_mask: np.ndarray  # [size] bool

    @classmethod
    def of(cls, tokenizer: ClipTokenizer) -> Vocabulary:
        kinds = tokenizer.kinds
        size = tokenizer.vocab_size

        def table(mapping: dict[int, int]) -> np.ndarray:
            out = np.full(size, -1, dtype=np.int64)
            for token, value in mapping.items():
                out[token] = value
            return out

        durations = np.zeros(size, dtype=bool)
        durations[list(kinds.duration)] = True
        return cls(size, kinds.bar, table(kinds.position), table(kinds.pitch), table(kinds.pitch_drum),
                   table(kinds.velocity), durations)


@dataclass
class NoteLimits:
    """Hard limits applied at decode time (the server's constraints build on these)."""

    pitch_min: int = 0
    pitch_max: int = 127
    velocity_min: int = 1
    velocity_max: int = 127


class ContinuationGrammar:
    """Tracks one continuation's place in the grammar and answers which tokens may come next."""

    def __init__(self, vocab: Vocabulary, time_sig_id: int, program_id: int, positions_per_bar: int, bars: int,
                 is_drum: bool = False, limits: NoteLimits | None = None):
        if bars < 1:
            raise ValueError("a continuation needs at least one bar")
        self.vocab = vocab
        self.time_sig_id = time_sig_id
        self.program_id = program_id
        self.positions_per_bar = positions_per_bar
        self.bars = bars
        self.limits = limits or NoteLimits()
        pitch_table = vocab.drum_value if is_drum else vocab.pitch_value
        self._pitch_table = pitch_table
        self._pitch_ok = (pitch_table >= self.limits.pitch_min) & (pitch_table <= self.limits.pitch_max)
        self._velocity_ok = (vocab.velocity_value >= self.limits.velocity_min) & (vocab.velocity_value <= self.limits.velocity_max)
        if not self._pitch_ok.any():
            raise ValueError(f"no pitch of this model lies in {self.limits.pitch_min}-{self.limits.pitch_max}")
        if not self._velocity_ok.any():
            raise ValueError(f"no velocity bin of this model lies in {self.limits.velocity_min}-{self.limits.velocity_max}")
        self._position_ok = (vocab.position_index >= 0) & (vocab.position_index < positions_per_bar)
        self.bars_started = 0
        self.position = -1
        self.last_pitch = -1
        self.expect = Expect.BAR_START

    def forced_opening(self) -> list[int]:
        """The tokens that open the first bar (fed with the prompt): Bar, TimeSig."""
        self._advance(self.vocab.bar)
        self._advance(self.time_sig_id)
        return [self.vocab.bar, self.time_sig_id]

    @property
    def done(self) -> bool:
        return self.expect is Expect.DONE

    def allowed(self) -> np.ndarray:
        v = self.vocab
        mask = np.zeros(v.size, dtype=bool)
        e = self.expect
        if e is Expect.TIME_SIG:
            mask[self.time_sig_id] = True
        elif e is Expect.PROGRAM:
            mask[self.program_id] = True
        elif e is Expect.PITCH:
            mask |= self._pitch_ok & (self._pitch_table > self.last_pitch)
        elif e is Expect.VELOCITY:
            mask |= self._velocity_ok
        elif e is Expect.DURATION:
            mask |= v.duration_mask
        elif e in (Expect.BAR_START, Expect.NOTE_END):
            mask |= self._position_ok & (v.position_index > self.position)
            mask[v.bar] = True
            if e is Expect.NOTE_END and (self._pitch_ok & (self._pitch_table > self.last_pitch)).any():
                mask[self.program_id] = True
        return mask

    def accept(self, token: int) -> bool:
        """Record a sampled token. Returns False when it ends the continuation (it is not emitted)."""
        if not self.allowed()[token]:
            raise ValueError(f"token {token} is not allowed here (expecting {self.expect.value})")
        if token == self.vocab.bar and self.bars_started == self.bars:
            self.expect = Expect.DONE
            return False
        self._advance(token)
        return True

    def _advance(self, token: int) -> None:
        v = self.vocab
        if token == v.bar:
            self.bars_started += 1
            self.position = -1
            self.last_pitch = -1
            self.expect = Expect.TIME_SIG
        elif token == self.time_sig_id and self.expect is Expect.TIME_SIG:
            self.expect = Expect.BAR_START
        elif v.position_index[token] >= 0:
            self.position = int(v.position_index[token])
            self.last_pitch = -1
            self.expect = Expect.PROGRAM
        elif token == self.program_id:
            self.expect = Expect.PITCH
        elif self._pitch_table[token] >= 0:
            self.last_pitch = int(self._pitch_table[token])
            self.expect = Expect.VELOCITY
        elif v.velocity_value[token] >= 0:
            self.expect = Expect.DURATION
        elif v.duration_mask[token]:
            self.expect = Expect.NOTE_END
        else:
            raise ValueError(f"token {token} has no place in a continuation")
