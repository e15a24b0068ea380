"""Clip guidance: each continued track is pulled towards its clip's pitch classes, register and kit,
moving probability only between the notes allowed at a step."""

from __future__ import annotations

import numpy as np
import pytest

from engine.clip import Arrangement, Clip, Note
from engine.clip_guidance import REGISTER_MARGIN, TrackGuidance, guide, pitch_preference, steer_chord, token_preference
from engine.generate import ContinuationRequest, RequestError
from engine.grammar import ContinuationGrammar, Vocabulary
from engine.interleaved import InterleavedGrammar
from engine.provenance import Provenance
from engine.tokens import ClipTokenizer

TOKENIZER = ClipTokenizer.default()
VOCAB = Vocabulary.of(TOKENIZER)
E_MINOR_BASS = [40, 43, 47, 40, 45, 43, 40, 38]  # E G B E A G E D, low register


def test_pitch_classes_the_clip_never_plays_are_less_likely_than_those_it_plays():
    preference = pitch_preference(E_MINOR_BASS, is_drum=False)
    assert preference is not None and preference.shape == (128,)
    # Inside the register: E (most played) is preferred to G, G to an F (never played).
    assert preference[40] == pytest.approx(0.0)
    assert preference[40] > preference[43] > preference[41]
    # Within the clip's range a pitch class weighs the same in every octave.
    wide = pitch_preference([40, 52, 64, 43], is_drum=False)
    assert wide[40] == wide[52] == wide[64] == pytest.approx(0.0) and wide[55] == pytest.approx(wide[43])


def test_notes_far_outside_the_clips_register_lose_more_the_further_they_are():
    preference = pitch_preference(E_MINOR_BASS, is_drum=False)
    top = max(E_MINOR_BASS) + REGISTER_MARGIN
    e_above = [p for p in range(top + 1, 128) if p % 12 == 4]  # E, octave after octave above the margin
    assert all(preference[a] > preference[b] for a, b in zip(e_above, e_above[1:], strict=False))
    assert preference[e_above[0]] < preference[40] - 2  # an octave and more above the line: much less likely
    low = min(E_MINOR_BASS) - REGISTER_MARGIN  # 36, a C: inside the margin, as likely as any C
    assert preference[low] == pytest.approx(preference[48])
    assert preference[low - 12] < preference[low] - 5


def test_drum_guidance_follows_the_kit_and_ignores_pitch_classes():
    groove = [36, 42, 38, 42] * 4 + [46]  # kick, closed hat, snare; one open hat
    preference = pitch_preference(groove, is_drum=True)
    assert preference is not None
    assert preference[42] == pytest.approx(0.0)  # the most struck sound
    assert preference[42] > preference[36] > preference[46] > preference[56]  # cowbell: never struck
    assert preference[48] == pytest.approx(preference[56])  # every unplayed sound weighs the same, whatever its number


def test_strength_scales_and_zero_or_an_empty_clip_means_no_guidance():
    one = pitch_preference(E_MINOR_BASS, is_drum=False, strength=1.0)
    two = pitch_preference(E_MINOR_BASS, is_drum=False, strength=2.0)
    assert np.allclose(two, 2 * one)
    assert pitch_preference(E_MINOR_BASS, is_drum=False, strength=0.0) is None
    assert pitch_preference([], is_drum=True) is None


def after_one_note(grammar: ContinuationGrammar, pitch: int = 40) -> None:
    """Feed the opening and one note (E2 at the bar's first position) to `grammar`."""
    grammar.forced_opening()
    grammar.accept(int(np.flatnonzero(VOCAB.position_index == 0)[0]))
    grammar.accept(grammar.program_id)
    grammar.accept(int(np.flatnonzero(grammar.pitch_table == pitch)[0]))
    grammar.accept(int(np.flatnonzero(grammar.allowed())[0]))  # a velocity
    grammar.accept(int(np.flatnonzero(grammar.allowed())[0]))  # a duration


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_guidance_moves_probability_between_allowed_pitches_only(temperature):
    rng = np.random.default_rng(0)
    grammar = ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id((4, 4)), TOKENIZER.program_id(33, False),
                                  TOKENIZER.positions_per_bar((4, 4)), 2, ascending_chords=False)
    after_one_note(grammar)
    # After a note: another pitch at this position, a later Position or the next Bar may follow.
    allowed = grammar.allowed()
    pitches = allowed & (grammar.pitch_table >= 0)
    assert pitches.sum() > 10 and (allowed & ~pitches).any()
    logits = rng.normal(size=VOCAB.size).astype(np.float32)
    preference = token_preference(pitch_preference(E_MINOR_BASS, is_drum=False, strength=2.0), grammar.pitch_table)
    guided = guide(logits, allowed, preference, grammar.pitch_table, temperature)

    def probabilities(scores):
        scaled = np.where(allowed, scores / temperature, -np.inf)
        p = np.exp(scaled - scaled.max())
        return p / p.sum()

    before, after = probabilities(logits.astype(np.float64)), probabilities(guided)
    assert after[pitches].sum() == pytest.approx(before[pitches].sum(), rel=1e-9)  # whether a note comes: unchanged
    assert np.allclose(after[~pitches], before[~pitches])
    in_key = pitches & np.isin(grammar.pitch_table % 12, [4, 7, 11, 9, 2]) & (grammar.pitch_table >= 36) & (grammar.pitch_table <= 50)
    assert after[in_key].sum() > 2 * before[in_key].sum()  # which note: towards the clip's


def test_balance_favours_what_the_continuation_has_played_less_than_the_clip_did():
    guidance = TrackGuidance.of(E_MINOR_BASS, False, 1.0, VOCAB.pitch_value)
    assert guidance is not None
    e2, g2 = int(np.flatnonzero(VOCAB.pitch_value == 40)[0]), int(np.flatnonzero(VOCAB.pitch_value == 43)[0])
    fresh = guidance.token_bias(np.zeros(128))
    only_e = np.zeros(128)
    only_e[40] = 6  # six E's in a row, against three in eight in the clip
    after = guidance.token_bias(only_e)
    assert after[e2] < fresh[e2] and after[g2] > fresh[g2]
    assert after[g2] > after[e2]  # G, which the clip plays and the continuation has not, now comes first
    assert TrackGuidance.of(E_MINOR_BASS, False, 0.0, VOCAB.pitch_value) is None


def test_the_grammar_counts_the_notes_it_plays_for_guidance_without_sharing_them_with_copies():
    grammar = ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id((4, 4)), TOKENIZER.program_id(33, False),
                                  TOKENIZER.positions_per_bar((4, 4)), 2, ascending_chords=False)
    grammar.guidance = TrackGuidance.of(E_MINOR_BASS, False, 1.0, grammar.pitch_table)
    after_one_note(grammar, pitch=43)
    assert grammar.played[43] == 1
    before = np.array(grammar.preference)
    probe = grammar.copy()
    e3 = int(np.flatnonzero(VOCAB.pitch_value == 52)[0])  # another note at this position: E3
    probe.accept(e3)
    assert probe.played[52] == 1 and grammar.played[52] == 0
    assert probe.preference[e3] < before[e3]
    assert np.array_equal(grammar.preference, before)


def bass_clip() -> Clip:
    notes = tuple(Note(pitch, 90, beat * 1.0, 0.9) for beat, pitch in enumerate(E_MINOR_BASS * 2))
    return Clip(notes, 110.0, (4, 4), 16.0, program=33)


def share_in_clip_classes(done, clip: Clip) -> float:
    classes = {n.pitch % 12 for n in clip.notes}
    notes = [n for d in done for n in d.clip.notes]
    return sum(n.pitch % 12 in classes for n in notes) / max(1, len(notes))


def test_a_continuation_keeps_closer_to_the_clips_key_and_register_with_guidance(generator):
    clip = bass_clip()
    free = generator.generate(clip, ContinuationRequest(bars=4, variations=8, seed=1, temperature=1.2, stay_with_clip=0))
    guided = generator.generate(clip, ContinuationRequest(bars=4, variations=8, seed=1, temperature=1.2, stay_with_clip=2))
    assert share_in_clip_classes(guided, clip) > share_in_clip_classes(free, clip)
    low, high = min(E_MINOR_BASS) - REGISTER_MARGIN, max(E_MINOR_BASS) + REGISTER_MARGIN

    def outside(done):
        notes = [n for d in done for n in d.clip.notes]
        return sum(not low <= n.pitch <= high for n in notes) / max(1, len(notes))

    assert outside(guided) < outside(free) or outside(free) == 0.0


def test_each_track_of_a_band_is_guided_by_its_own_clip(generator):
    bass = bass_clip()
    lead = Clip(tuple(Note(pitch, 80, beat * 1.0, 0.9) for beat, pitch in enumerate([72, 74, 77, 79] * 4)),
                110.0, (4, 4), 16.0, program=73)
    band = Arrangement((bass, lead), (0, 1))
    grammar = generator._group_grammar(band, (0, 1), ContinuationRequest(stay_with_clip=1.0))
    table = VOCAB.pitch_value
    prefs = [g.preference for g in grammar.tracks]
    assert all(p is not None for p in prefs)
    e2, c5 = int(np.flatnonzero(table == 40)[0]), int(np.flatnonzero(table == 72)[0])
    assert prefs[0][e2] > prefs[0][c5] and prefs[1][c5] > prefs[1][e2]


def test_stay_with_clip_outside_its_range_is_refused(generator):
    for value in (-0.5, 2.5):
        with pytest.raises(RequestError, match="stay_with_clip must be between 0"):
            list(generator.stream(bass_clip(), ContinuationRequest(stay_with_clip=value)))


OLD_REQUEST = {"bars": 4, "variations": 1, "temperature": 0.9, "top_k": 0, "top_p": 0.95, "mode": "sample",
               "beam_width": 5, "constraints": {}}


def test_a_record_from_before_guidance_rebuilds_the_request_that_made_it():
    old = Provenance("default", "ab" * 32, None, 7, 1, dict(OLD_REQUEST), "cd" * 32)
    assert old.rebuilt_request().stay_with_clip == 0.0  # made by an engine without guidance
    new = Provenance.from_text(Provenance("default", "ab" * 32, None, 7, 1, {**OLD_REQUEST, "stay_with_clip": 1.5},
                                          "cd" * 32).to_text())
    assert new is not None and new.rebuilt_request().stay_with_clip == 1.5


def test_chords_larger_than_the_clips_largest_are_discouraged_and_others_left_alone():
    line = TrackGuidance.of(E_MINOR_BASS, False, 1.0, VOCAB.pitch_value, onsets=[float(b) for b in range(8)])
    triads = TrackGuidance.of([60, 64, 67] * 4, False, 1.0, VOCAB.pitch_value, onsets=[float(b // 3) for b in range(12)])
    assert line is not None and triads is not None
    assert line.chord_growth(1) < 0.1  # a bass line played one note at a time: no second note
    assert triads.chord_growth(1) is None and triads.chord_growth(2) is None  # chords the clip plays: the model's
    assert triads.chord_growth(3) < 0.2 and triads.chord_growth(4) < 0.2  # larger than any of the clip's
    kit = TrackGuidance.of([36, 42] * 8, True, 1.0, VOCAB.drum_value, onsets=[float(b // 2) for b in range(16)])
    assert kit is not None and kit.chord_growth(2) is None  # hits of a kit are not a chord


@pytest.mark.parametrize("target", [0.05, 0.5, 0.95])
def test_steering_a_chord_only_ever_lowers_the_odds_of_another_note(target):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=VOCAB.size) * 2
    allowed = rng.random(VOCAB.size) < 0.5
    notes = VOCAB.pitch_value >= 0
    inside = allowed & notes
    logits[notes] += np.logaddexp.reduce(logits[allowed & ~notes]) - np.logaddexp.reduce(logits[inside])  # p = 1/2

    def probabilities(scores):
        p = np.exp(np.where(allowed, scores, -np.inf) - scores[allowed].max())
        return p / p.sum()

    before = probabilities(logits)
    p = before[inside].sum()
    assert 0.1 < p < 0.9  # the three targets fall below, near and above the model's odds
    after = probabilities(steer_chord(logits, allowed, notes, target, weight=1.0))
    assert after[inside].sum() == pytest.approx(min(p, target))  # weight 1: the clip's rate, if lower
    assert np.allclose(after[inside] / after[inside].sum(), before[inside] / before[inside].sum())
    others = allowed & ~notes
    assert np.allclose(after[others] / after[others].sum(), before[others] / before[others].sum())
    halfway = probabilities(steer_chord(logits, allowed, notes, target, weight=0.5))[inside].sum()
    assert min(p, target) - 1e-9 <= halfway <= p + 1e-9


def test_a_band_track_returning_to_a_position_counts_as_growing_its_chord():
    grammars = [ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id((4, 4)), TOKENIZER.program_id(program, drum),
                                    TOKENIZER.positions_per_bar((4, 4)), 2, drum, ascending_chords=False,
                                    longest_note=VOCAB.units_per_position * TOKENIZER.positions_per_beat if drum else None)
                for program, drum in ((33, False), (-1, True))]
    grammars[0].guidance = TrackGuidance.of(E_MINOR_BASS, False, 1.0, grammars[0].pitch_table, [float(b) for b in range(8)])
    band = InterleavedGrammar(grammars)
    band.forced_opening()
    band.accept(int(np.flatnonzero(VOCAB.position_index == 0)[0]))
    assert band.chord_steers == []  # nobody has played here yet
    band.accept(grammars[0].program_id)
    band.accept(int(np.flatnonzero(VOCAB.pitch_value == 40)[0]))
    band.accept(int(np.flatnonzero(band.allowed())[0]))  # velocity
    band.accept(int(np.flatnonzero(band.allowed())[0]))  # duration
    (notes, target, weight), = band.chord_steers  # another bass pitch here
    assert notes[int(np.flatnonzero(VOCAB.pitch_value == 43)[0])] and not notes[grammars[1].program_id] and target < 0.1
    band.accept(grammars[1].program_id)  # the drums play at the same position
    band.accept(int(np.flatnonzero(VOCAB.drum_value == 36)[0]))
    band.accept(int(np.flatnonzero(band.allowed())[0]))
    band.accept(int(np.flatnonzero(band.allowed())[0]))
    (notes, target, _), = band.chord_steers  # the bass coming back here would add to its chord
    assert np.flatnonzero(notes).tolist() == [grammars[0].program_id] and target < 0.1
