"""The clip model: notes in beats, as a DAW thinks of them.

A beat is a quarter note. Seconds never appear here; they belong to files and synthesizers.
A `Clip` is one track (one instrument); an `Arrangement` is several tracks that play together,
some of them to be continued and the others heard as context. `Arrangement.to_score` /
`Clip.from_score` / `tracks_from_score` are the one place where beats meet MIDI ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import symusic
from symusic.core import ScoreTick

# Ticks per quarter note used whenever a clip becomes a symusic Score (fine enough for any grid).
TICKS_PER_BEAT = 480
# A clip that ends this little past a bar line ends at the bar line: DAWs write note-offs and
# end-of-track a tick or two late (16.002 beats for a 4-bar clip at 480 ticks per beat), and
# counting that as a fifth bar would move the continuation a whole bar later. Two ticks at 96
# ticks per beat, the coarsest resolution in common use.
BAR_SNAP_BEATS = 2 / 96


def whole_bars(beats: float, beats_per_bar: float) -> int:
    """Bars needed to hold `beats`, at least one: a partial bar counts, an overhang of at most
    BAR_SNAP_BEATS past a bar line does not."""
    full, overhang = divmod(beats, beats_per_bar)
    return max(1, int(full) + (overhang > BAR_SNAP_BEATS))


class ClipError(ValueError):
    """A clip that cannot be used, with a sentence that says why."""


@dataclass(frozen=True)
class Note:
    pitch: int  # 0-127
    velocity: int  # 1-127
    start: float  # beats from the clip start
    duration: float  # beats
    channel: int = 0

    def validate(self) -> None:
        if not 0 <= self.pitch <= 127:
            raise ClipError(f"note pitch {self.pitch} is outside 0-127")
        if not 1 <= self.velocity <= 127:
            raise ClipError(f"note velocity {self.velocity} is outside 1-127")
        if not self.start >= 0:
            raise ClipError(f"note start {self.start} beats is negative")
        if not self.duration > 0:
            raise ClipError(f"note duration {self.duration} beats is not positive")
        if not 0 <= self.channel <= 15:
            raise ClipError(f"note channel {self.channel} is outside 0-15")

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class Clip:
    notes: tuple[Note, ...]
    tempo: float = 120.0  # quarter notes per minute
    time_signature: tuple[int, int] = (4, 4)
    length: float | None = None  # beats; None means "up to the end of the bar of the last note"
    program: int = 0  # General MIDI program 0-127
    is_drum: bool = False
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def beats_per_bar(self) -> float:
        numerator, denominator = self.time_signature
        return numerator * 4.0 / denominator

    @property
    def length_beats(self) -> float:
        """The clip length in beats, rounded up to whole bars when not given."""
        if self.length is not None:
            return self.length
        last_end = max((n.end for n in self.notes), default=0.0)
        return whole_bars(last_end, self.beats_per_bar) * self.beats_per_bar

    @property
    def bars(self) -> int:
        """Whole bars the clip occupies (a partial last bar counts as a bar; see BAR_SNAP_BEATS)."""
        return whole_bars(self.length_beats, self.beats_per_bar)

    def validate(self) -> None:
        numerator, denominator = self.time_signature
        if not 1 <= numerator <= 255:  # one byte in a MIDI file; never quote a huge number back
            raise ClipError("a time signature's numerator must be 1-255 beats per bar")
        if denominator not in (1, 2, 4, 8, 16, 32):
            raise ClipError(f"time signature {numerator}/{denominator} is not a valid meter")
        if not 10.0 <= self.tempo <= 400.0:
            raise ClipError(f"tempo {self.tempo:g} BPM is outside 10-400")
        if not 0 <= self.program <= 127:
            raise ClipError(f"program {self.program} is outside 0-127")
        if self.length is not None and not self.length > 0:
            raise ClipError(f"clip length {self.length} beats is not positive")
        for note in self.notes:
            note.validate()

    def with_notes(self, notes) -> Clip:
        return replace(self, notes=tuple(sorted(notes, key=lambda n: (n.start, n.pitch))))

    def shifted(self, beats: float) -> Clip:
        """The same notes moved later by `beats` (used to place a continuation after its prompt)."""
        return self.with_notes(replace(n, start=n.start + beats) for n in self.notes)

    def to_score(self) -> ScoreTick:
        """This clip as a one-track symusic Score at TICKS_PER_BEAT, with its tempo and meter."""
        return Arrangement.of(self).to_score()

    def to_track(self) -> symusic.core.TrackTick:
        """This clip's notes as one symusic track (program, drum flag and name kept)."""
        track = symusic.Track(name=self.name, program=self.program, is_drum=self.is_drum)
        for n in sorted(self.notes, key=lambda n: (n.start, n.pitch)):
            start = round(n.start * TICKS_PER_BEAT)
            duration = max(1, round(n.duration * TICKS_PER_BEAT))
            track.notes.append(symusic.Note(start, duration, n.pitch, n.velocity))
        return track

    @classmethod
    def from_score(cls, score: ScoreTick, length: float | None = None, name: str = "") -> Clip:
        """All notes of a score, merged into one clip; tempo, meter and instrument from the score.

        The instrument is the first non-empty track's. Channels are kept as the track order
        (capped at 15) so a multi-track file stays distinguishable after merging.
        """
        tpq = score.ticks_per_quarter
        if tpq <= 0:
            raise ClipError("the MIDI file has 0 ticks per beat")
        notes = []
        tracks = [t for t in score.tracks if len(t.notes)]
        for index, track in enumerate(tracks):
            channel = 9 if track.is_drum else min(index, 15)
            for n in track.notes:
                notes.append(Note(int(n.pitch), max(1, min(127, int(n.velocity))), n.time / tpq,
                                  max(n.duration, 1) / tpq, channel))
        tempo = float(score.tempos[0].qpm) if len(score.tempos) else 120.0
        if len(score.time_signatures):
            ts = score.time_signatures[0]
            meter = (int(ts.numerator), int(ts.denominator))
        else:
            meter = (4, 4)
        program = int(tracks[0].program) if tracks else 0
        is_drum = bool(tracks[0].is_drum) if tracks else False
        clip = cls((), tempo, meter, length, program, is_drum, name)
        return clip.with_notes(notes)


@dataclass(frozen=True)
class Arrangement:
    """Tracks that play together: a multi-track clip with one tempo, one meter and one length.

    `continued` holds the indices of the tracks to continue; the others are context the model
    hears but does not continue (a bass line written against the drums and chords). A single
    `Clip` is the arrangement of one continued track (`Arrangement.of`)."""

    tracks: tuple[Clip, ...]
    continued: tuple[int, ...]

    @classmethod
    def of(cls, clip: Clip) -> Arrangement:
        return cls((clip,), (0,))

    @property
    def tempo(self) -> float:
        return self.tracks[0].tempo

    @property
    def time_signature(self) -> tuple[int, int]:
        return self.tracks[0].time_signature

    @property
    def beats_per_bar(self) -> float:
        return self.tracks[0].beats_per_bar

    @property
    def length_beats(self) -> float:
        """The longest track's length: every track ends where the arrangement ends."""
        return max(track.length_beats for track in self.tracks)

    @property
    def bars(self) -> int:
        return max(track.bars for track in self.tracks)

    @property
    def notes(self) -> int:
        return sum(len(track.notes) for track in self.tracks)

    def validate(self) -> None:
        if not self.tracks:
            raise ClipError("the clip has no tracks")
        for track in self.tracks:
            track.validate()
            if (track.tempo, track.time_signature) != (self.tempo, self.time_signature):
                raise ClipError(f"track {track.name or '?'!r} is at {track.tempo:g} BPM in {track.time_signature[0]}/"
                                f"{track.time_signature[1]}, the first at {self.tempo:g} BPM in "
                                f"{self.time_signature[0]}/{self.time_signature[1]}: tracks of one clip share them")
        if not self.continued:
            raise ClipError("no track is marked to continue")
        if len(set(self.continued)) != len(self.continued) or not all(0 <= i < len(self.tracks) for i in self.continued):
            raise ClipError(f"the tracks to continue must be distinct track numbers 1-{len(self.tracks)}")

    def to_score(self) -> ScoreTick:
        """All tracks as one symusic Score at TICKS_PER_BEAT, with the tempo and meter."""
        score = symusic.Score(TICKS_PER_BEAT)
        numerator, denominator = self.time_signature
        score.time_signatures.append(symusic.TimeSignature(0, numerator, denominator))
        score.tempos.append(symusic.Tempo(0, qpm=float(self.tempo)))
        for track in self.tracks:
            score.tracks.append(track.to_track())
        return score


def tracks_from_score(score: ScoreTick, name: str = "") -> Arrangement:
    """Every non-empty track of a score as its own Clip (program, drum flag and name kept), all
    sharing the score's first tempo and meter and one length in whole bars; every track continued.

    Drum tracks' notes are on channel 9 (MIDI channel 10), the others on channel 0."""
    merged = Clip.from_score(score, name=name)  # tempo, meter and the ticks check, once
    tpq = score.ticks_per_quarter
    length = merged.length_beats
    clips = []
    for index, track in enumerate(t for t in score.tracks if len(t.notes)):
        channel = 9 if track.is_drum else 0
        notes = [Note(int(n.pitch), max(1, min(127, int(n.velocity))), n.time / tpq, max(n.duration, 1) / tpq, channel)
                 for n in track.notes]
        label = str(track.name) or f"{name} track {index + 1}".strip()
        clips.append(Clip((), merged.tempo, merged.time_signature, length, int(track.program), bool(track.is_drum),
                          label).with_notes(notes))
    return Arrangement(tuple(clips), tuple(range(len(clips))))
