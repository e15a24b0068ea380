"""Hard musical constraints on a continuation: what a musician may lock before generating.

    Constraints(key="D", scale="dorian", pitch_min=50, pitch_max=74, max_polyphony=1)
    Constraints.from_dict({"key": "Bb", "scale": "blues", "max_notes_per_bar": 8})

This module only describes and validates them; `engine.grammar.ContinuationGrammar` turns each
one into a mask over the vocabulary at every decoding step, so a generated note can never break
one (see the grammar's docstring for exactly what each guarantees).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),  # natural minor
    "harmonic_minor": (0, 2, 3, 5, 7, 8, 11),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "pentatonic_major": (0, 2, 4, 7, 9),
    "pentatonic_minor": (0, 3, 5, 7, 10),
    "blues": (0, 3, 5, 6, 7, 10),
    "chromatic": tuple(range(12)),
}

_NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTALS = {"#": 1, "♯": 1, "b": -1, "♭": -1}
_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def parse_key(key: str | int) -> int:
    """A tonic as a pitch class 0-11: "C", "F#", "Bb", "c#" (case of the letter is ignored) or 0-11."""
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key <= 11:
            return key
    elif isinstance(key, str) and key.strip():
        name = key.strip()
        letter, accidentals = name[0].upper(), name[1:]
        if letter in _NATURALS and all(a in _ACCIDENTALS for a in accidentals) and len(accidentals) <= 2:
            return (_NATURALS[letter] + sum(_ACCIDENTALS[a] for a in accidentals)) % 12
    raise ValueError(f"unknown key {key!r}; write a tonic such as C, F#, Bb or a pitch class 0-11")


@dataclass(frozen=True)
class Constraints:
    """Limits that every generated note obeys. None means "no limit"."""

    key: str | int | None = None  # tonic: "C", "F#", "Bb" or pitch class 0-11
    scale: str | None = None  # one of SCALES; "major" when only a key is given
    pitch_min: int | None = None  # 0-127, inclusive
    pitch_max: int | None = None
    max_polyphony: int | None = None  # notes sounding at once, held notes included
    max_notes_per_bar: int | None = None
    min_notes_per_bar: int | None = None  # see the grammar for what is guaranteed
    velocity_min: int | None = None  # 1-127, inclusive
    velocity_max: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Constraints:
        """From a protocol message's constraint object; unknown names are refused, not ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"constraints must be an object of name: value, not {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown constraint(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        # Some clients send every number as a float (60.0); a whole float is the integer it names.
        values = {name: int(v) if isinstance(v, float) and v.is_integer() and name not in ("key", "scale") else v
                  for name, v in data.items()}
        constraints = cls(**values)  # type: ignore[arg-type]  # validate() checks the types, with a sentence
        constraints.validate()
        return constraints

    def validate(self) -> None:
        """Raise ValueError with a sentence a musician understands when these cannot be played."""
        for name in ("pitch_min", "pitch_max", "max_polyphony", "max_notes_per_bar", "min_notes_per_bar",
                     "velocity_min", "velocity_max"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be a whole number, not {value!r}")
        if self.key is not None:
            if not isinstance(self.key, (str, int)) or isinstance(self.key, bool):
                raise ValueError(f"key must be a note name such as 'C' or 'F#', not {self.key!r}")
            parse_key(self.key)
        if self.scale is not None:
            if not isinstance(self.scale, str) or self.scale not in SCALES:
                raise ValueError(f"unknown scale {self.scale!r}; choose from {', '.join(SCALES)}")
            if self.key is None and self.scale != "chromatic":
                raise ValueError(f"the scale {self.scale!r} needs a key (its tonic), for example key='D'")
        low, high = self.pitch_range
        for label, value in (("lowest pitch", low), ("highest pitch", high)):
            if not 0 <= value <= 127:
                raise ValueError(f"{label} {value} is outside 0-127")
        if low > high:
            raise ValueError(f"pitch range {low}-{high} is empty")
        low_v, high_v = self.velocity_range
        for label, value in (("lowest velocity", low_v), ("highest velocity", high_v)):
            if not 1 <= value <= 127:
                raise ValueError(f"{label} {value} is outside 1-127")
        if low_v > high_v:
            raise ValueError(f"velocity range {low_v}-{high_v} is empty")
        if self.max_polyphony is not None and self.max_polyphony < 1:
            raise ValueError(f"at most {self.max_polyphony} notes at once leaves nothing to play; use 1 or more")
        if self.max_notes_per_bar is not None and self.max_notes_per_bar < 1:
            raise ValueError(f"at most {self.max_notes_per_bar} notes per bar leaves nothing to play; use 1 or more")
        if self.min_notes_per_bar is not None and self.min_notes_per_bar < 0:
            raise ValueError(f"at least {self.min_notes_per_bar} notes per bar is not a number of notes")
        if (self.min_notes_per_bar is not None and self.max_notes_per_bar is not None
                and self.min_notes_per_bar > self.max_notes_per_bar):
            raise ValueError(f"at least {self.min_notes_per_bar} and at most {self.max_notes_per_bar} notes per bar "
                             "cannot both hold")
        if not self.pitch_mask().any():
            raise ValueError(f"no note of {self.scale_name} lies in the pitch range {low}-{high}")

    @property
    def pitch_range(self) -> tuple[int, int]:
        return (0 if self.pitch_min is None else self.pitch_min, 127 if self.pitch_max is None else self.pitch_max)

    @property
    def velocity_range(self) -> tuple[int, int]:
        return (1 if self.velocity_min is None else self.velocity_min,
                127 if self.velocity_max is None else self.velocity_max)

    @property
    def pitch_classes(self) -> frozenset[int]:
        """The pitch classes the key and scale allow (all twelve when neither is set)."""
        if self.key is None:
            return frozenset(range(12))
        tonic = parse_key(self.key)
        return frozenset((tonic + step) % 12 for step in SCALES[self.scale or "major"])

    @property
    def scale_name(self) -> str:
        if self.key is None:
            return "any key"
        return f"{_NAMES[parse_key(self.key)]} {(self.scale or 'major').replace('_', ' ')}"

    def pitch_mask(self, is_drum: bool = False) -> np.ndarray:
        """[128] bool: the MIDI pitches a note may have. A drum clip's pitch numbers name drum
        sounds, not notes, so key and scale do not apply to it; the range does."""
        pitches = np.arange(128)
        low, high = self.pitch_range
        mask = (pitches >= low) & (pitches <= high)
        if not is_drum and self.key is not None:  # no key: all twelve pitch classes
            in_scale = np.zeros(12, dtype=bool)
            in_scale[list(self.pitch_classes)] = True
            mask &= in_scale[pitches % 12]
        return mask

    def velocity_mask(self, velocities: np.ndarray) -> np.ndarray:
        low, high = self.velocity_range
        return (velocities >= low) & (velocities <= high)
