"""Constraints and beam search: zero violations over hundreds of continuations, no dead ends under
extreme constraints, musician-readable validation errors, and beam search that decodes, is
deterministic and never scores below greedy decoding."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from test_generate import four_bar_clip

from engine.assembler import NoteAssembler
from engine.clip import Clip, Note
from engine.constraints import Constraints, parse_key
from engine.generate import ContinuationRequest, NoteEvent, RequestError, VariationDone
from engine.grammar import ContinuationGrammar, Vocabulary
from engine.tokens import ClipTokenizer

TICKS = 480  # per beat: every generated start and length is a whole number of these


def violations(notes, constraints: Constraints, offset: float, beats_per_bar: float, bars: int) -> list[str]:
    """Every way `notes` break `constraints`, computed from the notes alone (not from the grammar)."""
    problems = []
    low, high = constraints.pitch_range
    v_low, v_high = constraints.velocity_range
    for n in notes:
        if n.pitch % 12 not in constraints.pitch_classes:
            problems.append(f"pitch {n.pitch} is not in {constraints.scale_name}")
        if not low <= n.pitch <= high:
            problems.append(f"pitch {n.pitch} is outside {low}-{high}")
        if not v_low <= n.velocity <= v_high:
            problems.append(f"velocity {n.velocity} is outside {v_low}-{v_high}")
    spans = [(round(n.start * TICKS), round(n.end * TICKS)) for n in notes]
    if constraints.max_polyphony is not None:
        for start, _ in spans:
            sounding = sum(1 for a, b in spans if a <= start < b)
            if sounding > constraints.max_polyphony:
                problems.append(f"{sounding} notes sound at beat {start / TICKS}")
    bar_ticks = round(beats_per_bar * TICKS)
    per_bar = Counter((start - round(offset * TICKS)) // bar_ticks for start, _ in spans)
    assert set(per_bar) <= set(range(bars)), "a note starts outside the continuation"
    for bar in range(bars):
        count = per_bar.get(bar, 0)
        if constraints.max_notes_per_bar is not None and count > constraints.max_notes_per_bar:
            problems.append(f"bar {bar} has {count} notes")
        if count < (constraints.min_notes_per_bar or 0):
            problems.append(f"bar {bar} has only {count} notes")
    return problems


COMBOS = [
    Constraints(key="D", scale="dorian"),
    Constraints(key="Bb", scale="blues", pitch_min=55, pitch_max=79),
    Constraints(pitch_min=62, pitch_max=66, velocity_min=30, velocity_max=60),
    Constraints(key="A", scale="harmonic_minor", max_polyphony=1),
    Constraints(max_polyphony=2, min_notes_per_bar=2, max_notes_per_bar=3),
    Constraints(key=7, scale="pentatonic_major", min_notes_per_bar=4, max_notes_per_bar=6, velocity_min=100),
    Constraints(pitch_min=60, pitch_max=60, max_polyphony=1, max_notes_per_bar=1, min_notes_per_bar=1),
]


@pytest.mark.parametrize("constraints", COMBOS, ids=[str(i) for i in range(len(COMBOS))])
def test_constraints_are_never_violated(generator, example_midi, constraints):
    checked = 0
    for seed in range(8):  # 7 combinations x 8 seeds x 4 variations = 224 continuations
        clip = four_bar_clip(example_midi[seed % len(example_midi)])  # 4/4, 3/4 and 6/8 in turn
        bars = 1 + seed % 3
        request = ContinuationRequest(bars=bars, variations=4, temperature=1.3, seed=seed, constraints=constraints)
        for done in generator.generate(clip, request):
            offset = clip.bars * clip.beats_per_bar
            assert violations(done.clip.notes, constraints, offset, clip.beats_per_bar, bars) == []
            assert sum(1 for t in done.tokens if t == generator.vocab.bar) == bars
            checked += 1
    assert checked == 32


EXTREMES = [
    Constraints(pitch_min=60, pitch_max=60, max_polyphony=1, max_notes_per_bar=1),
    Constraints(pitch_min=60, pitch_max=60, max_polyphony=1, max_notes_per_bar=1, min_notes_per_bar=1),
    Constraints(pitch_min=60, pitch_max=61, max_polyphony=1, min_notes_per_bar=8, velocity_min=127),
    Constraints(key="C", scale="major", pitch_min=60, pitch_max=72, max_polyphony=2, min_notes_per_bar=12, max_notes_per_bar=12),
    Constraints(pitch_min=21, pitch_max=108, max_polyphony=3, min_notes_per_bar=5),
    Constraints(key="F#", scale="pentatonic_minor", pitch_min=60, pitch_max=64, min_notes_per_bar=3, max_notes_per_bar=3),
]


def vocabulary_of(program_per_bar: bool) -> ClipTokenizer:
    """Today's vocabulary (a Program per bar) or the older one (a Program before every note)."""
    from miditok import REMI

    from engine.tokens import default_tokenizer_config

    config = default_tokenizer_config()
    config.program_changes = program_per_bar
    tokenizer = ClipTokenizer(REMI(config))
    assert tokenizer.program_per_bar is program_per_bar
    return tokenizer


@pytest.mark.parametrize("program_per_bar", [True, False])
@pytest.mark.parametrize("meter", [(4, 4), (6, 8), (2, 4), (7, 8)])
def test_no_dead_ends_under_extreme_constraints(meter, program_per_bar):
    """Walk the grammar alone with adversarial choices (the latest position, the highest pitch, the
    longest note, as often as allowed): something is always allowed and nothing is ever broken, and
    miditok reads the stream as the same notes the assembler streamed."""
    tokenizer = vocabulary_of(program_per_bar)
    vocab = Vocabulary.of(tokenizer)
    rng = np.random.default_rng(sum(meter))
    beats_per_bar = meter[0] * 4 / meter[1]
    for constraints in EXTREMES:
        for greed in (0.0, 0.5, 0.9, 1.0):
            grammar = ContinuationGrammar(vocab, tokenizer.time_sig_id(meter), tokenizer.program_id(0, False),
                                          tokenizer.positions_per_bar(meter), 3, False, constraints)
            assembler = NoteAssembler(tokenizer, meter)
            stream = grammar.forced_opening()
            for token in stream:
                assembler.feed(token)
            notes = []
            while True:
                candidates = np.flatnonzero(grammar.allowed())
                assert len(candidates), f"dead end expecting {grammar.expect.value} under {constraints}"
                token = int(candidates[-1] if rng.random() < greed else rng.choice(candidates))
                if not grammar.accept(token):
                    break
                stream.append(token)
                note = assembler.feed(token)
                if note is not None:
                    notes.append(note)
            assert violations(notes, constraints, 0.0, beats_per_bar, 3) == []
            text = tokenizer.tokens_to_text(stream)
            programs = sum(1 for t in text if t.startswith("Program_"))
            if program_per_bar:  # once per bar that has notes, never per note
                assert programs == len({int(n.start // beats_per_bar) for n in notes})
            else:
                assert programs == len(notes)
            score = tokenizer.decode_to_score(stream)
            read = sorted((n.pitch, n.time) for track in score.tracks for n in track.notes)
            tpq = tokenizer.ticks_per_quarter
            assert read == sorted((n.pitch, round(n.start * tpq)) for n in notes)


def test_grammar_copy_is_independent(generator):
    tokenizer = generator.tokenizer
    grammar = ContinuationGrammar(generator.vocab, tokenizer.time_sig_id((4, 4)), tokenizer.program_id(0, False),
                                  tokenizer.positions_per_bar((4, 4)), 1, constraints=Constraints(max_polyphony=1))
    grammar.forced_opening()
    before = grammar.allowed().copy()
    clone = grammar.copy()
    for kind in (tokenizer.kinds.position, {tokenizer.program_id(0, False): 0}, tokenizer.kinds.pitch,
                 tokenizer.kinds.velocity, tokenizer.kinds.duration):
        clone.accept(max(t for t in kind if clone.allowed()[t]))
    assert clone._ends and not grammar._ends
    assert (grammar.allowed() == before).all()


@pytest.mark.parametrize("fields, message", [
    ({"pitch_min": 80, "pitch_max": 60}, "pitch range 80-60 is empty"),
    ({"key": "C", "scale": "lydian#9"}, "unknown scale 'lydian#9'; choose from major, minor, harmonic_minor"),
    ({"key": "H"}, "unknown key 'H'; write a tonic such as C, F#, Bb"),
    ({"key": 12}, "unknown key 12"),
    ({"scale": "dorian"}, "the scale 'dorian' needs a key"),
    ({"pitch_max": 130}, "highest pitch 130 is outside 0-127"),
    ({"velocity_min": 0}, "lowest velocity 0 is outside 1-127"),
    ({"velocity_min": 100, "velocity_max": 50}, "velocity range 100-50 is empty"),
    ({"max_polyphony": 0}, "at most 0 notes at once leaves nothing to play"),
    ({"max_notes_per_bar": 0}, "at most 0 notes per bar leaves nothing to play"),
    ({"min_notes_per_bar": 5, "max_notes_per_bar": 3}, "at least 5 and at most 3 notes per bar cannot both hold"),
    ({"key": "F#", "scale": "pentatonic_major", "pitch_min": 60, "pitch_max": 60},
     "no note of F# pentatonic major lies in the pitch range 60-60"),
    ({"pitch_min": "60"}, "pitch_min must be a whole number, not '60'"),
])
def test_invalid_constraints_are_explained(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Constraints(**fields).validate()


def test_from_dict_names_unknown_keys_and_reads_the_protocol_shape():
    with pytest.raises(ValueError, match="unknown constraint\\(s\\) 'colour', 'mood'; known: key, scale"):
        Constraints.from_dict({"key": "C", "mood": "sad", "colour": "blue"})
    with pytest.raises(ValueError, match="pitch range 80-60 is empty"):
        Constraints.from_dict({"pitch_min": 80, "pitch_max": 60})
    c = Constraints.from_dict({"key": "Bb", "scale": "minor", "pitch_min": 48.0, "max_polyphony": None})
    assert c.pitch_min == 48 and c.max_polyphony is None
    assert c.pitch_classes == {10, 0, 1, 3, 5, 6, 8}
    assert Constraints.from_dict({}) == Constraints()


def test_key_names():
    assert [parse_key(k) for k in ("C", "c#", "Db", "F#", "Bb", "B", "Cb", "E#", 11, "G♭")] == [0, 1, 1, 6, 10, 11, 11, 5, 11, 6]
    assert Constraints(key="E", scale="pentatonic_minor").pitch_classes == {4, 7, 9, 11, 2}
    assert Constraints(key="D").scale_name == "D major"


@pytest.mark.parametrize("constraints, message", [
    (Constraints(pitch_min=0, pitch_max=10), "no pitch this model knows lies in 0-10"),
    (Constraints(min_notes_per_bar=100, max_polyphony=1),
     "at least 100 notes per bar do not fit: a bar of this meter has room for 48"),
    (Constraints(velocity_min=9, velocity_max=10), "no velocity step of this model lies in 9-10"),
    (Constraints(max_polyphony=-1), "at most -1 notes at once"),
])
def test_impossible_requests_are_refused(generator, example_midi, constraints, message):
    clip = four_bar_clip(example_midi[0])  # 4/4
    with pytest.raises(RequestError, match=message):
        list(generator.stream(clip, ContinuationRequest(constraints=constraints)))


# --- beam search ------------------------------------------------------------------------------


@pytest.mark.parametrize("request_kwargs, message", [
    ({"mode": "nucleus"}, "mode must be one of sample, beam, not 'nucleus'"),
    ({"mode": "beam", "beam_width": 0}, "beam width must be between 1 and 16, not 0"),
    ({"mode": "beam", "beam_width": 17}, "beam width must be between 1 and 16, not 17"),
    ({"mode": "beam", "beam_width": 5, "variations": 6}, "a beam of width 5 finds at most 5 variations"),
])
def test_bad_beam_requests_are_refused(generator, example_midi, request_kwargs, message):
    with pytest.raises(RequestError, match=message):
        list(generator.stream(four_bar_clip(example_midi[0]), ContinuationRequest(**request_kwargs)))


def test_beam_sequences_decode_with_exact_bar_counts_and_are_deterministic(generator, example_midi):
    tokenizer = generator.tokenizer
    for index in range(6):
        clip = four_bar_clip(example_midi[index])
        bars = 1 + index % 3
        # A minimum density keeps the search from its favourite answer on this tiny model, empty bars.
        request = ContinuationRequest(bars=bars, variations=3, mode="beam", beam_width=4, seed=index,
                                      constraints=Constraints(min_notes_per_bar=2, max_polyphony=2))
        found = generator.generate(clip, request)
        again = generator.generate(clip, replace(request, seed=index + 100))
        assert [d.tokens for d in found] == [d.tokens for d in again]  # no randomness, the seed is unused
        assert len({d.tokens for d in found}) == 3  # the three best distinct hypotheses
        scores = [d.log_prob for d in found]
        assert scores == sorted(scores, reverse=True)
        for done in found:
            assert sum(1 for t in done.tokens if t == tokenizer.kinds.bar) == bars
            score = tokenizer.decode_to_score(done.tokens)
            assert sum(len(t.notes) for t in score.tracks) == len(done.clip.notes)
            offset = clip.bars * clip.beats_per_bar
            assert violations(done.clip.notes, request.constraints, offset, clip.beats_per_bar, bars) == []


@pytest.mark.parametrize("constraints", [Constraints(), Constraints(min_notes_per_bar=3), Constraints(key="C", max_polyphony=1)])
def test_beam_scores_at_least_its_greedy_path(generator, example_midi, constraints):
    """Width 1 follows the most likely allowed token at every step (beam search's greedy path, scored
    on the masked distribution; sample mode's greedy also weighs chords by a lookahead, so it is a
    different decoder); width 5 never scores below it."""
    for index in (0, 3):  # 4/4 clips, cut to two bars: the continuation fits the tiny model's context, so it can be scored
        full = four_bar_clip(example_midi[index])
        clip = Clip(tuple(n for n in full.notes if n.start < 8.0), full.tempo, full.time_signature, 8.0, full.program)
        one_request = ContinuationRequest(bars=1, mode="beam", beam_width=1, constraints=constraints)
        one = generator.generate(clip, one_request)[0]
        one_score = generator.log_prob(clip, one_request, one.tokens)
        assert one.log_prob == pytest.approx(one_score, abs=1e-3)
        assert generator.generate(clip, one_request)[0].tokens == one.tokens
        beam_request = ContinuationRequest(bars=1, mode="beam", beam_width=5, constraints=constraints)
        five = generator.generate(clip, beam_request)[0]
        five_score = generator.log_prob(clip, beam_request, five.tokens)
        assert five_score == pytest.approx(five.log_prob, abs=1e-3)  # the search ranks by what the scorer computes
        assert five_score >= one_score - 1e-4


def test_beam_streams_each_variation_at_the_end(generator, example_midi):
    clip = four_bar_clip(example_midi[0])
    request = ContinuationRequest(bars=2, variations=2, mode="beam", beam_width=3, constraints=Constraints(min_notes_per_bar=1))
    events = list(generator.stream(clip, request))
    kinds = [(type(e).__name__, e.variation) for e in events]
    done_at = [i for i, e in enumerate(events) if isinstance(e, VariationDone)]
    assert [events[i].variation for i in done_at] == [0, 1]
    assert all(k == ("NoteEvent", 0) for k in kinds[:done_at[0]])
    assert all(k == ("NoteEvent", 1) for k in kinds[done_at[0] + 1:done_at[1]])
    for i in done_at:
        streamed = [e.note for e in events if isinstance(e, NoteEvent) and e.variation == events[i].variation]
        assert sorted(streamed, key=lambda n: (n.start, n.pitch)) == list(events[i].clip.notes)
    assert list(generator.stream(clip, request, should_stop=lambda: True)) == []  # cancelled: nothing


def test_beam_survives_the_context_filling_up(generator):
    notes = [Note(60 + (i % 12), 80, i * 0.25, 0.25) for i in range(64 * 16)]
    clip = Clip(tuple(notes), time_signature=(4, 4))
    request = ContinuationRequest(bars=8, mode="beam", beam_width=3, constraints=Constraints(min_notes_per_bar=6))
    done = generator.generate(clip, request)[0]
    prompt, _ = generator.prompt_tokens(clip)
    assert len(prompt) + len(done.tokens) > generator.decoder.max_context  # the cache was cut and refilled
    assert sum(1 for t in done.tokens if t == generator.vocab.bar) == 8
    assert violations(done.clip.notes, request.constraints, 64 * 4, 4.0, 8) == []


def test_no_two_notes_of_one_pitch_overlap(generator, example_midi):
    """Overlapping same-pitch notes are ambiguous in MIDI files; the grammar never writes them."""
    from engine.clip import Clip
    from engine.generate import ContinuationRequest
    from engine.midi_file import read_clip

    cases = [Constraints(), Constraints(pitch_min=60, pitch_max=62), Constraints(pitch_min=64, pitch_max=64, min_notes_per_bar=2),
             Constraints(pitch_min=60, pitch_max=61, max_polyphony=3, min_notes_per_bar=3)]
    checked = 0
    for index, constraints in enumerate(cases):
        clip = read_clip(example_midi[index])
        clip = Clip(clip.notes, clip.tempo, clip.time_signature, None, clip.program)
        for seed in range(12):
            request = ContinuationRequest(bars=3, variations=2, temperature=1.5, seed=seed, constraints=constraints)
            for done in generator.generate(clip, request):
                notes = sorted(done.clip.notes, key=lambda n: (n.pitch, n.start))
                for a, b in zip(notes, notes[1:], strict=False):
                    if a.pitch == b.pitch:
                        assert b.start >= a.end - 1e-9, (constraints, seed, a, b)
                if constraints.min_notes_per_bar:
                    bar = clip.beats_per_bar
                    start = clip.bars * bar
                    counts = [sum(1 for n in done.clip.notes if start + k * bar <= n.start < start + (k + 1) * bar) for k in range(3)]
                    assert min(counts) >= constraints.min_notes_per_bar, counts
                checked += 1
    assert checked == 96


def _recent_repeats(pitches: list[int], window: int) -> int:
    """How many notes repeat a pitch played among the `window` notes before them."""
    return sum(1 for i, p in enumerate(pitches) if p in pitches[max(0, i - window):i])


def test_beam_search_is_kept_from_looping(generator, example_midi, monkeypatch):
    """The repetition penalty is what keeps beam search's most likely continuation from being one chord
    or one pitch over and over: without it the same search repeats more."""
    import engine.beam as beam

    found = {}
    for penalty in (0.0, beam.REPEAT_PENALTY):
        monkeypatch.setattr(beam, "REPEAT_PENALTY", penalty)
        repeats = 0
        for path in example_midi[:4]:
            clip = four_bar_clip(path)
            done = generator.generate(clip, ContinuationRequest(bars=4, mode="beam", beam_width=4,
                                                                constraints=Constraints(min_notes_per_bar=2)))[0]
            pitches = [n.pitch for n in sorted(done.clip.notes, key=lambda n: (n.start, n.pitch))]
            repeats += _recent_repeats(pitches, beam.REPEAT_WINDOW)
        found[penalty] = repeats
    assert found[beam.REPEAT_PENALTY] < found[0.0], found
