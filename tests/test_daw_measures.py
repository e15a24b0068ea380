"""DAW measures (training/daw_measures.py) on hand-built clips, each checked against a value computed by hand:
pitched and drum measures, both baselines, meters other than 4/4, clips through .mid files, the summary and
the "Done when" criteria flipping at their thresholds."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from engine.clip import Clip, Note
from engine.midi_file import read_clip, write_clip
from training.daw_measures import (
    ALL_PITCHED,
    DRUMS,
    GM_FAMILIES,
    LOOP_THE_CLIP,
    MODEL,
    REPEAT_LAST_BAR,
    DawScores,
    continuation_start,
    copied_bars,
    criteria_verdicts,
    distinct_velocities,
    instrument_family,
    is_drum_clip,
    kit_histogram_agreement,
    longest_drum_note,
    loop_clip,
    markdown_table,
    markdown_verdicts,
    notes_per_bar_ratio,
    onset_grid_agreement,
    pitch_class_agreement,
    pitch_offset,
    repeat_last_bar_clip,
    score_continuation,
    score_example,
    summarize,
    voices,
    voices_delta,
)

KICK, SNARE, HAT = 36, 38, 42


def clip(notes, meter=(4, 4), program=0, is_drum=False, length=None) -> Clip:
    return Clip((), time_signature=meter, program=program, is_drum=is_drum, length=length).with_notes(notes)


def n(pitch: int, start: float, duration: float = 1.0, velocity: int = 80, channel: int = 0) -> Note:
    return Note(pitch, velocity, start, duration, channel)


def transposed(c: Clip, semitones: int) -> Clip:
    return c.with_notes(replace(x, pitch=x.pitch + semitones) for x in c.notes)


def moved(c: Clip, beats: float) -> Clip:
    return c.shifted(beats)


def arpeggio_prompt() -> Clip:
    """Two bars of 4/4: C E G C' in quarters, then D F A D' (prompt ends at beat 8)."""
    return clip([n(p, i) for i, p in enumerate([60, 64, 67, 72, 62, 65, 69, 74])], length=8.0)


def groove(bars: int, offset: float = 0.0, shift: float = 0.0, velocity: int = 100) -> list[Note]:
    """A rock beat per 4/4 bar: kick on 1 and 3, snare on 2 and 4, closed hat on every eighth (16 notes a bar)."""
    notes = []
    for bar in range(bars):
        t = offset + bar * 4 + shift
        notes += [n(KICK, t + b, 0.25, velocity, 9) for b in (0, 2)] + [n(SNARE, t + b, 0.25, velocity, 9) for b in (1, 3)]
        notes += [n(HAT, t + e / 2, 0.25, velocity - 30, 9) for e in range(8)]
    return notes


# --- pitched measures ------------------------------------------------------------------------------

def test_an_octave_up_is_12_semitones_off_with_the_same_pitch_classes():
    real = clip([n(60, 8), n(64, 9), n(67, 10), n(60, 12, 2), n(62, 14)])
    up = transposed(real, 12)
    assert pitch_offset(up, real, 8.0, 2) == pytest.approx(12.0)
    assert pitch_offset(real, up, 8.0, 2) == pytest.approx(12.0)  # absolute value
    assert pitch_class_agreement(up, real, 8.0, 2) == pytest.approx(1.0)
    assert notes_per_bar_ratio(up, real, 8.0, 2) == 1.0
    # A semitone up: offset 1, and the pitch classes C C D E G become C# C# D# F G#, disjoint from them.
    assert pitch_offset(transposed(real, 1), real, 8.0, 2) == pytest.approx(1.0)
    assert pitch_class_agreement(transposed(real, 1), real, 8.0, 2) == 0.0


def test_pitch_class_agreement_is_the_cosine_of_count_weighted_histograms():
    continuation = clip([n(60, 8), n(64, 9), n(67, 10)])  # C E G: (1, 1, 1)
    real = clip([n(60, 8, 0.25), n(72, 9, 0.25), n(64, 10, 3.0)])  # C C E: (2, 1, 0), E held 12x longer
    assert pitch_class_agreement(continuation, real, 8.0, 1) == pytest.approx(3 / math.sqrt(3 * 5))
    # Only notes starting inside the window count: a note of the prompt (before beat 8) or after it changes nothing.
    noisy = clip([*continuation.notes, n(61, 7.5), n(66, 12.0)])
    assert pitch_class_agreement(noisy, real, 8.0, 1) == pytest.approx(3 / math.sqrt(15))
    assert pitch_offset(noisy, real, 8.0, 1) == pytest.approx(abs((60 + 64 + 67) / 3 - (60 + 72 + 64) / 3))


def test_notes_per_bar_ratio_counts_every_note_of_a_chord():
    real = clip([n(60, 8), n(62, 10), n(64, 12), n(65, 14)])  # 4 notes in 2 bars
    chords = clip([n(p, t) for t in (8, 12) for p in (60, 64, 67)])  # 6 notes
    assert notes_per_bar_ratio(chords, real, 8.0, 2) == pytest.approx(1.5)
    assert notes_per_bar_ratio(real, chords, 8.0, 2) == pytest.approx(4 / 6)


def test_an_empty_continuation_has_defined_measures():
    real = clip([n(60, 8), n(64, 9)])
    empty = clip([])
    assert notes_per_bar_ratio(empty, real, 8.0, 2) == 0.0
    assert pitch_class_agreement(empty, real, 8.0, 2) == 0.0
    assert pitch_offset(empty, real, 8.0, 2) is None  # no mean pitch to compare
    assert copied_bars(arpeggio_prompt(), empty, 2) == 0.0
    assert distinct_velocities(empty, 8.0, 2) == 0
    assert voices(empty, 8.0, 2) == 0.0
    scores = score_continuation(arpeggio_prompt(), empty, real, 2)
    assert scores.notes == 0 and scores.notes_per_bar_ratio == 0.0 and scores.pitch_class_agreement == 0.0
    assert scores.voices_delta == pytest.approx(-1.0)  # the prompt is a melody: one voice


def test_empty_real_bars_leave_the_ratio_undefined_and_silence_agrees_with_silence():
    empty = clip([])
    continuation = clip([n(60, 8)])
    assert notes_per_bar_ratio(continuation, empty, 8.0, 1) is None
    assert pitch_class_agreement(continuation, empty, 8.0, 1) == 0.0
    assert pitch_class_agreement(empty, empty, 8.0, 1) == 1.0
    assert kit_histogram_agreement(empty, empty, 8.0, 1) == 1.0
    scores = score_continuation(arpeggio_prompt(), continuation, empty, 1)
    assert scores.real_notes == 0 and scores.notes_per_bar_ratio is None and scores.pitch_offset is None


def test_single_notes():
    one = clip([n(67, 8, 0.5, velocity=90)])
    assert pitch_offset(one, clip([n(60, 9)]), 8.0, 1) == 7.0
    assert pitch_class_agreement(one, clip([n(55, 11)]), 8.0, 1) == pytest.approx(1.0)  # G and G an octave lower
    assert voices(one, 8.0, 1) == 1.0
    assert distinct_velocities(one, 8.0, 1) == 1
    assert longest_drum_note(one, 8.0, 1) == 0.5


def test_voices_is_the_time_average_of_sounding_notes_over_sounding_time():
    prompt = arpeggio_prompt()
    assert voices(prompt) == 1.0  # quarter notes one after the other
    # A C major triad for two beats, then G alone for two: 3*2 + 2 = 8 note-beats over 4 sounding beats.
    thick = clip([n(60, 8, 2), n(64, 8, 2), n(67, 8, 2), n(67, 10, 2)])
    assert voices(thick, 8.0, 1) == pytest.approx(2.0)
    assert voices_delta(prompt, thick, 1) == pytest.approx(1.0)
    # Two half notes overlapping by one beat: 4 note-beats over 3 sounding beats; the rests between count for nothing.
    overlap = clip([n(60, 8, 2), n(64, 9, 2), n(60, 13, 1)])
    assert voices(overlap, 8.0, 2) == pytest.approx(5 / 4)  # (2 + 2 + 1) note-beats over (3 + 1) sounding beats
    # A note ringing past the window's end is cut there: the whole note at beat 10 sounds for 2 of its beats.
    ringing = clip([n(60, 8, 4), n(64, 10, 4)])
    assert voices(ringing, 8.0, 1) == pytest.approx((4 + 2) / 4)


def test_distinct_velocities_of_clip_and_continuation():
    prompt = clip([n(60, i, velocity=v) for i, v in enumerate([60, 70, 80, 90, 90, 60])], length=8.0)
    flat = clip([n(60, 8 + i, velocity=100) for i in range(4)])
    assert distinct_velocities(prompt) == 4
    assert distinct_velocities(flat, 8.0, 1) == 1
    scores = score_continuation(prompt, flat, flat, 1)
    assert (scores.distinct_velocities, scores.clip_distinct_velocities) == (1, 4)


# --- drum measures ---------------------------------------------------------------------------------

def test_a_groove_moved_by_a_sixteenth_keeps_its_kit_but_loses_the_grid():
    real = clip(groove(2, offset=8.0), is_drum=True)
    late = clip(groove(2, offset=8.0, shift=0.25), is_drum=True)
    assert kit_histogram_agreement(late, real, 8.0, 2) == pytest.approx(1.0)
    assert onset_grid_agreement(real, real, 8.0, 2) == pytest.approx(1.0)
    assert onset_grid_agreement(late, real, 8.0, 2) == 0.0  # eighths moved by a sixteenth: no position in common
    # Onsets on the four beats against the same plus the "and" of 1: 4 / (2 * sqrt(5)), kick + hat together is one onset.
    beats = clip([n(KICK, 8 + b, 0.25, channel=9) for b in range(4)], is_drum=True)
    busier = clip([*beats.notes, n(HAT, 8.0, 0.25, channel=9), n(HAT, 8.5, 0.25, channel=9)], is_drum=True)
    assert onset_grid_agreement(busier, beats, 8.0, 1) == pytest.approx(4 / (2 * math.sqrt(5)))


def test_kit_agreement_is_the_cosine_of_drum_pitch_counts():
    real = clip([n(KICK, 8, 0.25, channel=9), n(KICK, 10, 0.25, channel=9), n(SNARE, 9, 0.25, channel=9),
                 n(SNARE, 11, 0.25, channel=9)], is_drum=True)
    no_snare = clip([n(KICK, 8, 0.25, channel=9), n(KICK, 10, 0.25, channel=9), n(HAT, 9, 0.25, channel=9),
                     n(HAT, 11, 0.25, channel=9)], is_drum=True)
    assert kit_histogram_agreement(no_snare, real, 8.0, 1) == pytest.approx(0.5)  # (2*2) / (sqrt(8) * sqrt(8))
    assert kit_histogram_agreement(clip([], is_drum=True), real, 8.0, 1) == 0.0


def test_longest_drum_note_and_the_one_beat_rule():
    prompt = clip(groove(2), is_drum=True, length=8.0)
    real = clip(groove(1, offset=8.0), is_drum=True)
    stuck = clip([*groove(1, offset=8.0), n(49, 8.0, 2.0, channel=9)], is_drum=True)  # a crash held for two beats
    assert longest_drum_note(prompt) == 0.25
    assert longest_drum_note(stuck, 8.0, 1) == 2.0
    assert score_continuation(prompt, stuck, real, 1).long_drum_note
    assert not score_continuation(prompt, real, real, 1).long_drum_note
    exactly_one_beat = clip([*groove(1, offset=8.0), n(49, 8.0, 1.0, channel=9)], is_drum=True)
    assert not score_continuation(prompt, exactly_one_beat, real, 1).long_drum_note
    # A clip that has a three-beat crash allows the continuation's two-beat one.
    ringing_prompt = clip([*groove(2), n(49, 4.0, 3.0, channel=9)], is_drum=True, length=8.0)
    assert not score_continuation(ringing_prompt, stuck, real, 1).long_drum_note


def test_channel_10_notes_make_a_drum_track_even_without_the_flag():
    prompt = clip(groove(1), program=0, is_drum=False, length=4.0)
    assert is_drum_clip(prompt)
    assert not is_drum_clip(clip([n(60, 0)])) and not is_drum_clip(clip([]))
    scores = score_continuation(prompt, clip(groove(1, offset=4.0)), clip(groove(1, offset=4.0)), 1)
    assert scores.family == DRUMS and scores.is_drum
    assert scores.kit_histogram_agreement == pytest.approx(1.0) and scores.onset_grid_agreement == pytest.approx(1.0)
    assert scores.pitch_offset is None and scores.pitch_class_agreement is None and scores.voices_delta is None
    pitched = score_continuation(arpeggio_prompt(), clip([n(60, 8)]), clip([n(60, 8)]), 1)
    assert pitched.kit_histogram_agreement is None and pitched.longest_drum_note is None and not pitched.long_drum_note


# --- baselines and copying -------------------------------------------------------------------------

def test_loop_the_clip_copies_every_bar_and_matches_a_periodic_continuation():
    prompt = arpeggio_prompt()
    real = moved(prompt, 8.0).with_notes([*moved(prompt, 8.0).notes, *moved(prompt, 16.0).notes])  # A B A B
    looped = loop_clip(prompt, 4)
    assert continuation_start(prompt) == 8.0
    assert [(x.pitch, x.start) for x in looped.notes] == [(x.pitch, x.start) for x in real.notes]
    assert looped.length == 24.0
    assert copied_bars(prompt, looped, 4) == 1.0
    scores = score_continuation(prompt, looped, real, 4)
    assert scores.pitch_offset == 0.0 and scores.pitch_class_agreement == pytest.approx(1.0)
    assert scores.notes_per_bar_ratio == 1.0 and scores.voices_delta == 0.0 and scores.copied_bars == 1.0
    # Three bars of a two-bar loop: A B A, the last note cut at the continuation's end.
    three = loop_clip(clip([n(60, 0), n(62, 4, 8.0)], length=8.0), 3)
    assert [(x.pitch, x.start, x.duration) for x in three.notes] == [(60, 8.0, 1.0), (62, 12.0, 8.0), (60, 16.0, 1.0)]
    cut = loop_clip(clip([n(62, 4, 8.0)], length=8.0), 2)
    assert [(x.start, x.duration) for x in cut.notes] == [(12.0, 4.0)]


def test_repeat_last_bar_copies_the_last_bar_cut_at_the_bar_line():
    prompt = clip([n(60, 0), n(64, 4), n(67, 6, 4.0)], length=8.0)
    repeated = repeat_last_bar_clip(prompt, 2)
    assert [(x.pitch, x.start, x.duration) for x in repeated.notes] == [
        (64, 8.0, 1.0), (67, 10.0, 2.0), (64, 12.0, 1.0), (67, 14.0, 2.0)]
    assert copied_bars(prompt, repeated, 2) == 1.0


def test_repeat_last_bar_plays_what_segue_evals_baseline_plays():
    from training.eval_measures import repeat_last_bar

    prompt = clip([n(60, 0.5), n(64, 4), n(67, 6, 4.0), n(71, 7.999999, 0.5)], length=8.0)
    ours = repeat_last_bar_clip(prompt, 3)
    theirs = repeat_last_bar(prompt, 2, 3)
    assert [(x.pitch, x.velocity, x.duration) for x in ours.notes] == [(x.pitch, x.velocity, x.duration) for x in theirs.notes]
    assert [x.start for x in ours.notes] == pytest.approx([x.start for x in theirs.notes])


def test_copied_bars_ignores_velocity_and_empty_bars():
    prompt = arpeggio_prompt()
    first_bar_louder = [replace(x, start=x.start + 8, velocity=120) for x in prompt.notes[:4]]
    new_bar = [n(59, 12 + i) for i in range(4)]
    assert copied_bars(prompt, clip(first_bar_louder + new_bar), 2) == 0.5
    assert copied_bars(prompt, clip(first_bar_louder), 2) == 1.0  # the second bar is empty: it copies nothing
    assert copied_bars(prompt, clip(new_bar), 2) == 0.0
    # One note longer than in the clip, or a sixteenth late, is a new bar.
    longer = [replace(x, duration=1.5) if i == 0 else x for i, x in enumerate(first_bar_louder)]
    assert copied_bars(prompt, clip(longer), 1) == 0.0
    assert copied_bars(prompt, moved(clip(first_bar_louder), 0.25), 1) == 0.0
    # Onsets a hair off the grid round to it (1/48 beat).
    assert copied_bars(prompt, moved(clip(first_bar_louder), 0.001), 1) == 1.0


# --- meters and files ------------------------------------------------------------------------------

def test_a_6_8_clip_has_3_beat_bars():
    # Two bars of 6/8: dotted-quarter pulses (beats 0 and 1.5 of each bar).
    prompt = clip([n(60, 0, 1.5), n(64, 1.5, 1.5), n(62, 3, 1.5), n(65, 4.5, 1.5)], meter=(6, 8))
    assert prompt.beats_per_bar == 3.0 and prompt.bars == 2
    assert continuation_start(prompt) == 6.0
    looped = loop_clip(prompt, 2)
    assert [x.start for x in looped.notes] == [6.0, 7.5, 9.0, 10.5]
    assert copied_bars(prompt, looped, 2) == 1.0
    # In 6/8 the onsets fall on positions 0 and 18 of a 36-slot bar; a 4/4 grid would put bar 2 elsewhere.
    real = clip([n(67, 6, 1.5), n(69, 7.5, 1.5), n(67, 9, 1.5), n(69, 10.5, 1.5)], meter=(6, 8))
    assert onset_grid_agreement(looped, real, 6.0, 2) == pytest.approx(1.0)
    assert notes_per_bar_ratio(looped, real, 6.0, 2) == 1.0
    # Notes after two 6/8 bars (beat 12) are outside the window; in 4/4 two bars would reach beat 14.
    assert notes_per_bar_ratio(clip([*looped.notes, n(60, 12.5)], meter=(6, 8)), real, 6.0, 2) == 1.0


def test_a_3_4_prompt_is_continued_after_its_third_beat_bars():
    prompt = clip([n(60, 0), n(62, 1), n(64, 2), n(65, 3), n(67, 4), n(69, 5)], meter=(3, 4))
    assert continuation_start(prompt) == 6.0
    assert [x.start for x in repeat_last_bar_clip(prompt, 2).notes] == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    with pytest.raises(ValueError, match="bars would not line up"):
        score_continuation(prompt, clip([n(60, 6)], meter=(4, 4)), clip([n(60, 6)], meter=(3, 4)), 1)


def test_scores_survive_a_round_trip_through_midi_files(tmp_path):
    prompt = clip(groove(2), program=0, is_drum=True, length=8.0)
    real = clip(groove(2, offset=8.0), is_drum=True)
    late = clip(groove(2, offset=8.0, shift=0.25), is_drum=True)
    read = {name: read_clip(write_clip(tmp_path / f"{name}.mid", c)) for name, c in
            (("prompt", prompt), ("real", real), ("late", late))}
    assert read["prompt"].is_drum and all(x.channel == 9 for x in read["prompt"].notes)
    from_files = score_continuation(replace(read["prompt"], length=8.0), read["late"], read["real"], 2)
    assert from_files == score_continuation(prompt, late, real, 2)
    assert from_files.family == DRUMS and from_files.onset_grid_agreement == 0.0

    bass = clip([n(36, 0, 0.5), n(43, 1, 0.5), n(36, 2, 0.5), n(43, 3, 0.5)], program=33, length=4.0)
    bass_next = clip([n(38, 4, 0.5), n(45, 5, 0.5), n(38, 6, 0.5), n(45, 7, 0.5)], program=33)
    up = transposed(bass_next, 12)
    files = [read_clip(write_clip(tmp_path / f"bass{i}.mid", c)) for i, c in enumerate((bass, bass_next, up))]
    scores = score_continuation(replace(files[0], length=4.0), files[2], files[1], 1)
    assert scores.family == "bass" and scores.pitch_offset == pytest.approx(12.0)
    assert scores.pitch_class_agreement == pytest.approx(1.0) and scores.copied_bars == 0.0


def test_instrument_families_follow_general_midi():
    expected = {0: "piano", 7: "piano", 8: "chromatic percussion", 16: "organ", 24: "guitar", 31: "guitar", 32: "bass",
                39: "bass", 40: "strings", 48: "ensemble", 56: "brass", 64: "reed", 72: "pipe", 80: "synth lead",
                88: "synth pad", 96: "synth effects", 104: "ethnic", 112: "percussive", 120: "sound effects",
                127: "sound effects"}
    assert {p: instrument_family(p, False) for p in expected} == expected
    assert instrument_family(33, True) == DRUMS
    assert len(set(GM_FAMILIES)) == 16 and {instrument_family(p, False) for p in range(128)} == set(GM_FAMILIES)
    with pytest.raises(ValueError, match="outside 0-127"):
        instrument_family(128, False)


# --- summary and criteria --------------------------------------------------------------------------

def pitched(**changes) -> DawScores:
    """Scores of a pitched continuation that meets every criterion, with `changes`."""
    base = DawScores(family="piano", is_drum=False, bars=4, notes=16, real_notes=16, notes_per_bar_ratio=1.0,
                     distinct_velocities=6, clip_distinct_velocities=6, copied_bars=0.0, pitch_offset=1.0,
                     pitch_class_agreement=0.9, voices=2.0, clip_voices=2.0, voices_delta=0.0)
    return replace(base, **changes)


def drums(**changes) -> DawScores:
    base = DawScores(family=DRUMS, is_drum=True, bars=4, notes=64, real_notes=64, notes_per_bar_ratio=1.0,
                     distinct_velocities=2, clip_distinct_velocities=2, copied_bars=0.25, kit_histogram_agreement=0.95,
                     onset_grid_agreement=0.9, longest_drum_note=0.25, clip_longest_drum_note=0.25)
    return replace(base, **changes)


def verdicts_of(scores: DawScores) -> dict[str, tuple[float, bool]]:
    """{criterion without its "family, system: " prefix: (value, passed)} of one clip of one system."""
    return {v.criterion.split(": ", 1)[1]: (v.value, v.passed) for v in criteria_verdicts(summarize([(MODEL, scores)]))
            if v.criterion.startswith(f"{scores.family}, ")}


def test_every_criterion_passes_for_a_good_continuation():
    assert all(passed for _, passed in verdicts_of(pitched()).values())
    assert all(passed for _, passed in verdicts_of(drums()).values())
    assert len(verdicts_of(pitched())) == 6 and len(verdicts_of(drums())) == 4  # drums: no dynamic clips here


@pytest.mark.parametrize("field, good, bad, criterion", [
    ("pitch_offset", 4.0, 4.01, "mean |pitch offset| (semitones)"),
    ("pitch_class_agreement", 0.8, 0.79, "mean pitch-class agreement"),
    ("notes_per_bar_ratio", 0.8, 0.79, "median notes-per-bar ratio"),
    ("notes_per_bar_ratio", 1.25, 1.26, "median notes-per-bar ratio"),
    ("voices_delta", 0.5, 0.51, "mean voices minus the clip's"),
    ("voices_delta", -0.5, -0.51, "mean voices minus the clip's"),
    ("distinct_velocities", 4, 3, "median distinct velocities (clips with ≥ 4)"),
    ("copied_bars", 0.5, 0.51, "mean fraction of bars copied from the clip"),
])
def test_pitched_criteria_flip_at_their_thresholds(field, good, bad, criterion):
    assert verdicts_of(pitched(**{field: good}))[criterion] == (pytest.approx(good), True)
    assert verdicts_of(pitched(**{field: bad}))[criterion] == (pytest.approx(bad), False)


@pytest.mark.parametrize("changes_good, changes_bad, criterion", [
    ({"kit_histogram_agreement": 0.85}, {"kit_histogram_agreement": 0.84}, "mean kit agreement"),
    ({"longest_drum_note": 1.0}, {"longest_drum_note": 1.5},
     "continuations with a drum note over 1 beat (and over the clip's longest)"),
    ({"longest_drum_note": 2.0, "clip_longest_drum_note": 2.0}, {"longest_drum_note": 2.5, "clip_longest_drum_note": 2.0},
     "continuations with a drum note over 1 beat (and over the clip's longest)"),
    ({"notes_per_bar_ratio": 1.25}, {"notes_per_bar_ratio": 1.3}, "median notes-per-bar ratio"),
    ({"clip_distinct_velocities": 5, "distinct_velocities": 4}, {"clip_distinct_velocities": 5, "distinct_velocities": 3},
     "median distinct velocities (clips with ≥ 4)"),
])
def test_drum_criteria_flip_at_their_thresholds(changes_good, changes_bad, criterion):
    assert verdicts_of(drums(**changes_good))[criterion][1] is True
    assert verdicts_of(drums(**changes_bad))[criterion][1] is False


def test_dynamics_only_judge_continuations_of_dynamic_clips():
    flat_clip = pitched(clip_distinct_velocities=3, distinct_velocities=1)
    assert "median distinct velocities (clips with ≥ 4)" not in verdicts_of(flat_clip)
    rows = [(MODEL, flat_clip), (MODEL, pitched(distinct_velocities=5)), (MODEL, pitched(distinct_velocities=2)),
            (MODEL, pitched(clip_distinct_velocities=4, distinct_velocities=4))]  # exactly 4 is dynamic
    row = next(r for r in summarize(rows) if r.family == "piano")
    assert row.dynamic_clips == 3 and row.dynamic_distinct_velocities_median == 4.0  # median of 5, 2, 4
    assert row.distinct_velocities_median == 3.0  # median of 1, 5, 2, 4


def test_summary_groups_by_family_and_system_with_all_pitched_pooled():
    rows = [
        (LOOP_THE_CLIP, pitched(copied_bars=1.0)),
        (MODEL, pitched(pitch_offset=2.0, notes_per_bar_ratio=0.5)),
        (MODEL, pitched(pitch_offset=4.0, notes_per_bar_ratio=None)),
        (MODEL, pitched(family="bass", pitch_offset=9.0, notes_per_bar_ratio=2.0)),
        (MODEL, drums(longest_drum_note=3.0)),
        (MODEL, drums()),
        ("real continuation", pitched(pitch_offset=0.0)),
    ]
    summary = summarize(rows)
    order = [(r.family, r.system) for r in summary]
    assert order == [("piano", MODEL), ("piano", LOOP_THE_CLIP), ("piano", "real continuation"), ("bass", MODEL),
                     (ALL_PITCHED, MODEL), (ALL_PITCHED, LOOP_THE_CLIP), (ALL_PITCHED, "real continuation"), (DRUMS, MODEL)]
    by = {(r.family, r.system): r for r in summary}
    piano = by["piano", MODEL]
    assert piano.clips == 2 and piano.pitch_offset_mean == 3.0 and piano.notes_per_bar_ratio_median == 0.5  # None left out
    pooled = by[ALL_PITCHED, MODEL]
    assert pooled.clips == 3 and pooled.pitch_offset_mean == 5.0 and pooled.notes_per_bar_ratio_median == 1.25
    assert pooled.kit_histogram_agreement_mean is None and pooled.long_drum_notes is None
    kit = by[DRUMS, MODEL]
    assert kit.long_drum_notes == 1 and kit.longest_drum_note_max == 3.0 and kit.pitch_offset_mean is None
    assert by["piano", LOOP_THE_CLIP].copied_bars_mean == 1.0
    verdicts = {v.criterion: v for v in criteria_verdicts(summary)}
    assert not verdicts["piano, loop the clip: mean fraction of bars copied from the clip"].passed
    assert not verdicts["bass, model: mean |pitch offset| (semitones)"].passed
    assert verdicts["piano, model: mean |pitch offset| (semitones)"].passed
    assert not verdicts["drums, model: continuations with a drum note over 1 beat (and over the clip's longest)"].passed
    assert {v.criterion.split(":")[0] for v in criteria_verdicts(summary, systems=[MODEL])} == {
        "piano, model", "bass, model", f"{ALL_PITCHED}, model", "drums, model"}


def cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line)


def test_markdown_tables():
    summary = summarize([(MODEL, pitched()), (MODEL, drums())])
    table = markdown_table(summary).splitlines()
    assert len(table) == 2 + len(summary) == 5
    assert len({len(cells(line)) for line in table}) == 1  # "|pitch offset|" is escaped, not two more cells
    assert table[-1].startswith("| drums | model | 1 | — |")  # drums have no pitch offset
    verdicts = criteria_verdicts(summary)
    rendered = markdown_verdicts(verdicts).splitlines()
    assert len(rendered) == 2 + len(verdicts) and all(line.endswith("| pass |") for line in rendered[2:])
    assert {len(cells(line)) for line in rendered} == {6}  # four columns between the outer bars


def test_score_example_scores_the_model_against_both_baselines():
    prompt = arpeggio_prompt()
    real = clip([n(p, 8 + i) for i, p in enumerate([64, 67, 72, 76, 65, 69, 72, 77])])  # new bars, same texture
    rows = score_example(prompt, real, 2, {MODEL: real})  # a model that plays exactly the real next bars
    assert [system for system, _ in rows] == [MODEL, REPEAT_LAST_BAR, LOOP_THE_CLIP]
    scores = dict(rows)
    assert scores[MODEL].pitch_offset == 0.0 and scores[MODEL].copied_bars == 0.0
    assert scores[REPEAT_LAST_BAR].copied_bars == 1.0 and scores[LOOP_THE_CLIP].copied_bars == 1.0
    # Repeating D F A D' (mean pitch 67.5) against E G C' E' / F A C' F' (562 / 8 = 70.25).
    assert scores[REPEAT_LAST_BAR].pitch_offset == pytest.approx(70.25 - 67.5)
    verdicts = {v.criterion: v.passed for v in criteria_verdicts(summarize(rows))}
    assert all(passed for criterion, passed in verdicts.items() if criterion.startswith("piano, model"))
    assert not verdicts["piano, loop the clip: mean fraction of bars copied from the clip"]
