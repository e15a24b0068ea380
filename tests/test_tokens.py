"""Clip <-> tokens round trips on real MIDI files written by an independent library (mido)."""

from __future__ import annotations

import mido
import numpy as np
import pytest

from engine.clip import Clip, ClipError, Note
from engine.midi_file import read_clip, write_clip
from engine.tokens import ClipTokenizer, trim_to_context


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.default()


def _grid(value: float, tokenizer: ClipTokenizer, meter) -> float:
    step = tokenizer.ticks_per_beat(meter) / tokenizer.positions_per_beat / tokenizer.ticks_per_quarter
    return round(value / step) * step


def _velocity_bins(tokenizer: ClipTokenizer) -> np.ndarray:
    return np.array(sorted(tokenizer.kinds.velocity.values()))


def test_round_trip_keeps_every_note(example_midi, tokenizer):
    for path in example_midi[:12]:
        clip = read_clip(path)
        ids = tokenizer.encode_clip(clip)
        back = Clip.from_score(tokenizer.decode_to_score(ids))
        want = sorted((n.pitch, round(_grid(n.start, tokenizer, clip.time_signature), 6), n.velocity) for n in clip.notes)
        got = sorted((n.pitch, round(n.start, 6), n.velocity) for n in back.notes)
        assert [g[:2] for g in got] == [w[:2] for w in want], path.name
        # Velocities come back as the nearest velocity bin (ties may go either way).
        bins = _velocity_bins(tokenizer)
        half_step = np.diff(bins).max() / 2
        for (_, _, v_out), (_, _, v_in) in zip(got, want, strict=True):
            assert v_out in bins and abs(v_out - v_in) <= half_step, path.name
        durations_in = sorted(round(_grid(n.duration, tokenizer, clip.time_signature), 2) for n in clip.notes)
        durations_out = sorted(round(n.duration, 2) for n in back.notes)
        # Durations are quantized to the duration vocabulary, which is at least as fine as the grid here.
        assert np.allclose(durations_in, durations_out, atol=0.1), path.name


def test_round_trip_through_file_keeps_meter_tempo_program(tmp_path, tokenizer):
    clip = Clip((Note(60, 100, 0.0, 0.5), Note(64, 80, 0.5, 0.5), Note(67, 60, 1.0, 1.5)),
                tempo=96.0, time_signature=(3, 4), program=40)
    path = write_clip(tmp_path / "c.mid", clip, track_name="test")
    back = read_clip(path)
    assert back.time_signature == (3, 4)
    assert back.tempo == pytest.approx(96.0, abs=0.01)
    assert back.program == 40
    assert [(n.pitch, n.velocity, n.start, n.duration) for n in back.notes] == \
           [(n.pitch, n.velocity, n.start, n.duration) for n in clip.notes]
    ids = tokenizer.encode_clip(back)
    text = tokenizer.tokens_to_text(ids)
    assert text[:3] == ["Bar_None", "TimeSig_3/4", "Position_0"]
    assert "Program_40" in text


def test_every_bar_names_its_instrument_once(tokenizer):
    """A Program token opens each bar's notes and each change of instrument, never one per note, so
    a prompt or a training window cut at any Bar still says which instrument plays."""
    from engine.clip import Arrangement

    chords = tuple(Note(p, 80, bar * 4 + beat, 1.0) for bar in range(3) for beat in range(4) for p in (60, 64, 67))
    bass = tuple(Note(36, 90, bar * 4.0, 2.0) for bar in range(3))
    band = Arrangement((Clip(chords, program=0), Clip(bass, program=33)), (0, 1))
    ids = tokenizer.encode_clip(band)
    text = tokenizer.tokens_to_text(ids)
    # Per bar: chords and bass on beat 1 (Program_0 ... Program_33), then chords again (Program_0) on beat 2.
    assert text.count("Program_0") == 6 and text.count("Program_33") == 3
    assert len(ids) < 5 * (len(chords) + len(bass))  # fewer than the old Program-per-note stream
    bar_starts = [i for i, t in enumerate(text) if t == "Bar_None"]
    for start in bar_starts:  # cut at any bar: the first note is preceded by its Program
        tail = text[start:]
        first_note = next(i for i, t in enumerate(tail) if t.startswith("Pitch"))
        assert tail[first_note - 1].startswith("Program_")
        back = tokenizer.decode_to_score(ids[start:])
        assert {track.program for track in back.tracks} == {0, 33}
    back = tokenizer.decode_to_score(ids)  # the restated Programs change nothing miditok reads
    assert sorted((t.program, n.pitch, n.time) for t in back.tracks for n in t.notes) == \
        sorted((c.program, n.pitch, round(n.start * tokenizer.ticks_per_quarter)) for c in band.tracks for n in c.notes)


def test_encode_clip_spans_the_clip_length(tokenizer):
    clip = Clip((Note(60, 90, 0.0, 1.0),), time_signature=(4, 4), length=12.0)
    ids = tokenizer.encode_clip(clip)
    assert sum(1 for i in ids if i == tokenizer.kinds.bar) == 3  # one bar with a note, two empty


def test_unsupported_meter_is_a_clear_error(tokenizer):
    clip = Clip((Note(60, 90, 0.0, 1.0),), time_signature=(11, 16))
    with pytest.raises(ClipError, match="11/16 is not supported"):
        tokenizer.encode_clip(clip)


def test_tokenizer_is_rebuilt_from_its_file(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    again = ClipTokenizer.from_file(tmp_path)
    assert again.vocab_size == tokenizer.vocab_size
    assert again.tokens_to_text(range(again.vocab_size)) == tokenizer.tokens_to_text(range(tokenizer.vocab_size))


def test_trim_to_context_cuts_at_a_bar_and_keeps_the_end(tokenizer):
    bar = tokenizer.kinds.bar
    ids = [bar, 10, 11, 12, bar, 20, 21, bar, 30, 31, 32, 33]
    assert trim_to_context(ids, 100, bar) == ids
    assert trim_to_context(ids, 8, bar) == [bar, 20, 21, bar, 30, 31, 32, 33]
    assert trim_to_context(ids, 6, bar) == [bar, 30, 31, 32, 33]
    with pytest.raises(ClipError):
        trim_to_context(ids, 4, bar)


def test_mido_written_file_reads_as_written(tmp_path):
    mid = mido.MidiFile(ticks_per_beat=96)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("time_signature", numerator=6, denominator=8, time=0))
    track.append(mido.Message("note_on", note=62, velocity=77, time=0))
    track.append(mido.Message("note_off", note=62, velocity=0, time=48))
    track.append(mido.Message("note_on", note=65, velocity=90, time=48))
    track.append(mido.Message("note_off", note=65, velocity=0, time=144))
    mid.save(str(tmp_path / "m.mid"))
    clip = read_clip(tmp_path / "m.mid")
    assert clip.time_signature == (6, 8)
    assert [(n.pitch, n.velocity, n.start, n.duration) for n in clip.notes] == [(62, 77, 0.0, 0.5), (65, 90, 1.0, 1.5)]
    assert clip.bars == 1
