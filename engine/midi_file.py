"""Notes <-> `.mid` files: the one place that reads a clip from a file or writes one.

Reading is guarded: MIDI parsers raise many exception types on corrupt files and accept absurd
ones silently (0 ticks per beat, tempo 0, a note ten million ticks long), so every failure becomes
a `ClipError` with a sentence naming the file and the problem. Writing is atomic
(engine/atomic_file.py), so a DAW never imports half a clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import symusic
from symusic.core import ScoreTick

from engine.atomic_file import atomic_write
from engine.clip import Arrangement, Clip, ClipError, tracks_from_score
from engine.provenance import Provenance, stamp

MAX_CLIP_FILE_BYTES = 8 * 1024 * 1024
MAX_CLIP_NOTES = 50_000
MAX_CLIP_BEATS = 4096


def read_clip(path: str | Path) -> Clip:
    """A clip from a MIDI file: all tracks merged, tempo and meter from the file."""
    path = Path(path)
    clip = Clip.from_score(_read_score(path), name=path.stem)
    clip.validate()
    return clip


def read_tracks(path: str | Path) -> Arrangement:
    """A MIDI file's tracks kept apart, each with its program, drum flag and name; all continued."""
    path = Path(path)
    arrangement = tracks_from_score(_read_score(path), name=path.stem)
    arrangement.validate()
    return arrangement


def _read_score(path: Path) -> ScoreTick:
    """The file's score, after every check a DAW clip must pass (ClipError names the file and the problem)."""
    if not path.is_file():
        raise ClipError(f"{path} does not exist")
    size = path.stat().st_size
    if size > MAX_CLIP_FILE_BYTES:
        raise ClipError(f"{path} is {size / 1e6:.0f} MB; a clip file should be under {MAX_CLIP_FILE_BYTES // 1024 // 1024} MB")
    data = path.read_bytes()
    if not data.startswith(b"MThd"):
        raise ClipError(f"{path} is not a MIDI file (it does not start with a MIDI header)")
    try:
        score = symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError/ValueError/... on corrupt data
        raise ClipError(f"{path} is a damaged MIDI file ({exc})") from exc
    if score.ticks_per_quarter <= 0:
        raise ClipError(f"{path} declares 0 ticks per beat")
    if any(t.mspq <= 0 for t in score.tempos):
        raise ClipError(f"{path} has a tempo of 0")
    for meter in score.time_signatures:  # a damaged meta event can say 4/0 (found by tests/test_fuzz.py)
        if meter.numerator <= 0 or meter.denominator <= 0:
            raise ClipError(f"{path} has an impossible time signature {meter.numerator}/{meter.denominator}")
    notes = sum(len(t.notes) for t in score.tracks)
    if notes == 0:
        raise ClipError(f"{path} has no notes to continue")
    if notes > MAX_CLIP_NOTES:
        raise ClipError(f"{path} has {notes} notes; a clip may have at most {MAX_CLIP_NOTES}")
    beats = score.end() / score.ticks_per_quarter
    if beats > MAX_CLIP_BEATS:
        raise ClipError(f"{path} is {beats:.0f} beats long; a clip may be at most {MAX_CLIP_BEATS} beats")
    return score


def write_clip(path: str | Path, clip: Clip, track_name: str | None = None) -> Path:
    """Write `clip` as a one-track MIDI file with its tempo, meter and instrument."""
    return write_tracks(path, [clip], None if track_name is None else [track_name])


def write_tracks(path: str | Path, clips: Sequence[Clip], track_names: Sequence[str] | None = None,
                 provenance: Provenance | None = None) -> Path:
    """Write clips as the tracks of one MIDI file (each with its program, drum flag and name), with
    the first clip's tempo and meter, and where it came from when `provenance` is given."""
    score = Arrangement(tuple(clips), tuple(range(len(clips)))).to_score()
    for track, name in zip(score.tracks, track_names or (), strict=False):
        track.name = name

    def write(tmp: Path) -> None:
        score.dump_midi(str(tmp))
        if provenance is not None:
            stamp(tmp, provenance)

    return atomic_write(path, write)
