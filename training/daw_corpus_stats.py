"""What is in a rendered MIDI file, by instrument family: the checks and the counts of the DAW corpus.

Families follow the General MIDI program groups (a drum track is `drums` whatever its program):
keys (piano, chromatic percussion, organ), guitar, bass, strings (and string ensembles), voice,
brass, winds (reed and pipe), synth (leads, pads, effects), percussion (GM's pitched percussive
programs), other (ethnic instruments, sound effects, orchestra hit).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import symusic

FAMILIES = ("drums", "bass", "keys", "guitar", "strings", "voice", "brass", "winds", "synth", "percussion", "other")
MIN_NOTES = 16


def coarse_family(program: int, is_drum: bool) -> str:
    """The band section a track plays in, for the data card (drums, bass, keys, guitar, ...): coarser
    than the 16 General MIDI families that `segue eval` reports (training.daw_measures.instrument_family)."""
    if is_drum:
        return "drums"
    if program < 24:
        return "keys"
    if program < 32:
        return "guitar"
    if program < 40:
        return "bass"
    if 52 <= program <= 54:
        return "voice"
    if program < 55:
        return "strings"
    if program == 55:
        return "other"
    if program < 64:
        return "brass"
    if program < 80:
        return "winds"
    if program < 104:
        return "synth"
    if 112 <= program < 120:
        return "percussion"
    return "other"


@dataclass
class TrackInfo:
    name: str
    program: int
    is_drum: bool
    family: str
    notes: int
    pitch_min: int
    pitch_max: int
    pitch_mean: float


@dataclass
class FileInfo:
    tracks: list[TrackInfo]
    notes: int
    seconds: float
    bars: float  # length of the last note's end in bars of the file's meter
    time_signature: tuple[int, int]
    ticks_per_quarter: int
    notes_by_family: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    tokens_by_family: dict[str, int] = field(default_factory=dict)  # note tokens; "time" for Bar/TimeSig/Position


def describe(score: symusic.Score) -> FileInfo:
    tracks = []
    for track in score.tracks:
        if not len(track.notes):
            continue
        pitches = track.notes.numpy()["pitch"]
        program, drum = int(track.program), bool(track.is_drum)
        tracks.append(TrackInfo(track.name, program, drum, coarse_family(program, drum), int(len(pitches)),
                                int(pitches.min()), int(pitches.max()), round(float(pitches.mean()), 2)))
    signature = (4, 4)
    if len(score.time_signatures):
        first = score.time_signatures[0]
        signature = (int(first.numerator), int(first.denominator))
    bar_ticks = score.ticks_per_quarter * 4 * signature[0] / signature[1]
    notes_by_family: Counter = Counter()
    for track in tracks:
        notes_by_family[track.family] += track.notes
    return FileInfo(
        tracks=tracks,
        notes=sum(t.notes for t in tracks),
        seconds=round(float(score.to("second").end()), 3),
        bars=round(score.end() / bar_ticks, 3) if bar_ticks else 0.0,
        time_signature=signature,
        ticks_per_quarter=int(score.ticks_per_quarter),
        notes_by_family=dict(notes_by_family),
    )


def problems(info: FileInfo, needs_drums: bool, expected_bars: int) -> list[str]:
    """Why a rendered file must not go into the corpus (empty list when it is fine)."""
    found = []
    if info.notes < MIN_NOTES:
        found.append(f"only {info.notes} notes")
    if needs_drums and not any(t.is_drum for t in info.tracks):
        found.append("the groove has drums but the file has no drum track")
    if info.bars > expected_bars + 1.01:
        found.append(f"{info.bars:.1f} bars long, expected {expected_bars}: the bar lines do not match the groove")
    return found


def count_tokens(score: symusic.Score, tokenizer) -> tuple[int, dict[str, int]]:
    """Token count of the file with Segue's REMI tokenizer, split by the family each note belongs to.

    Programs are in one stream and every note starts with its Program token, so a Program token and
    the Pitch/Velocity/Duration tokens after it belong to that program's family; Bar, TimeSig and
    Position tokens are shared timing and are counted as "time".
    """
    ids = tokenizer.encode_score(score)
    kinds = tokenizer.kinds
    timing = {kinds.bar, *kinds.time_sig, *kinds.position}
    by_family: Counter = Counter()
    family = "time"
    for token in ids:
        if token in kinds.program:
            program = kinds.program[token]
            family = coarse_family(max(program, 0), program < 0)
        elif token in timing:
            by_family["time"] += 1
            continue
        by_family[family] += 1
    return len(ids), dict(by_family)


def format_table(rows: list[list], header: list[str]) -> str:
    """A plain text table with right-aligned numbers."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
