"""The interleaved grammar: several tracks' continuations written as one stream, as the model learned a band."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.assembler import NoteAssembler
from engine.clip import Arrangement, Clip, Note
from engine.constraints import Constraints
from engine.grammar import ContinuationGrammar, Vocabulary
from engine.interleaved import PRESENCE_CAP, PRESENCE_WEIGHT, RUNS_PER_POSITION, BandAssembler, InterleavedGrammar
from engine.tokens import ClipTokenizer

TOKENIZER = ClipTokenizer.default()
VOCAB = Vocabulary.of(TOKENIZER)
METER = (4, 4)
BAND = [(-1, True), (33, False), (0, False), (73, False)]  # drums, bass, piano, flute


def band_grammar(bars: int, constraints: Constraints | None = None, tracks=BAND) -> InterleavedGrammar:
    grammars = [ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id(METER), TOKENIZER.program_id(program, drum),
                                    TOKENIZER.positions_per_bar(METER), bars, drum, constraints,
                                    longest_note=VOCAB.units_per_position * TOKENIZER.positions_per_beat if drum else None,
                                    ascending_chords=False)
                for program, drum in tracks]
    return InterleavedGrammar(grammars)


def random_walk(grammar: InterleavedGrammar, rng: np.random.Generator, limit: int = 4000) -> tuple[list[int], list[int]]:
    """Tokens chosen at random among the allowed ones until the grammar ends; and the track of each."""
    tokens = grammar.forced_opening()
    owners = [0, 0]
    while len(tokens) < limit:
        allowed = np.flatnonzero(grammar.allowed())
        assert len(allowed), f"dead end after {TOKENIZER.tokens_to_text(tokens[-12:])}"
        token = int(rng.choice(allowed))
        if not grammar.accept(token):
            assert grammar.done
            return tokens, owners
        tokens.append(token)
        owners.append(grammar.active_track)
    raise AssertionError("the grammar never ended")


def notes_by_track(tokens: list[int], owners: list[int], tracks=BAND) -> dict[int, list[Note]]:
    assembler = BandAssembler([NoteAssembler(TOKENIZER, METER, 0.0, channel=9 if drum else 0) for _, drum in tracks])
    out: dict[int, list[Note]] = {i: [] for i in range(len(tracks))}
    for token, owner in zip(tokens, owners, strict=True):
        note = assembler.feed(token, owner)
        if note is not None:
            out[owner].append(note)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_end_after_the_bars_asked_and_every_note_belongs_to_its_track(seed):
    rng = np.random.default_rng(seed)
    grammar = band_grammar(bars=3)
    tokens, owners = random_walk(grammar, rng)
    assert tokens.count(VOCAB.bar) == 3
    notes = notes_by_track(tokens, owners)
    assert sum(map(len, notes.values())) > 0
    for index, (_program, drum) in enumerate(BAND):
        for note in notes[index]:
            assert 0 <= note.start < 12
            assert (note.channel == 9) == drum
            if drum:
                assert note.duration <= 1.0  # the drum Duration cap of each track holds in the band stream
    # miditok reads the stream back as the same band: each note under its track's Program.
    score = TOKENIZER.decode_to_score(tokens)
    decoded = {(-1 if t.is_drum else int(t.program)): len(t.notes) for t in score.tracks if len(t.notes)}
    assert decoded == {BAND[i][0]: len(n) for i, n in notes.items() if n}


@pytest.mark.parametrize("seed", range(4))
def test_every_note_is_under_its_tracks_program_and_the_first_note_of_a_bar_is_always_named(seed):
    rng = np.random.default_rng(11 + seed)
    tokens, owners = random_walk(band_grammar(bars=4), rng)
    kinds = TOKENIZER.kinds
    last_program = None
    named_in_bar = False
    runs: Counter = Counter()
    for token, owner in zip(tokens, owners, strict=True):
        if token == kinds.bar:
            named_in_bar = False
            runs.clear()
        elif token in kinds.position:
            runs.clear()
        elif token in kinds.program:
            runs[owner] += 1
            assert runs[owner] <= RUNS_PER_POSITION  # one return to a position at most, never an endless alternation
            assert token != last_program or not named_in_bar  # named again only when the instrument changes, or per bar
            last_program, named_in_bar = token, True
        elif token in kinds.pitch or token in kinds.pitch_drum:
            assert named_in_bar  # never a note of an unnamed instrument
            assert last_program == TOKENIZER.program_id(BAND[owner][0], BAND[owner][1])
    # Chords in any order, but no pitch twice at one position of one track (a DAW would merge them).
    for track_notes in notes_by_track(tokens, owners).values():
        starts = [(round(n.start * 48), n.pitch) for n in track_notes]
        assert len(starts) == len(set(starts))


@pytest.mark.parametrize("seed", range(8))
def test_constraints_hold_for_every_track_and_random_streams_never_dead_end(seed):
    rng = np.random.default_rng(100 + seed)
    constraints = Constraints(min_notes_per_bar=int(rng.integers(1, 4)), max_notes_per_bar=int(rng.integers(4, 9)),
                              max_polyphony=int(rng.integers(1, 4)), pitch_min=36, pitch_max=84, velocity_min=40,
                              velocity_max=100)
    tracks = BAND[1:] if seed % 2 else BAND
    grammar = band_grammar(bars=2, constraints=constraints, tracks=tracks)
    tokens, owners = random_walk(grammar, rng)
    notes = notes_by_track(tokens, owners, tracks)
    for index, (_, drum) in enumerate(tracks):
        for bar in range(2):
            in_bar = [n for n in notes[index] if bar * 4 <= n.start < (bar + 1) * 4]
            assert constraints.min_notes_per_bar <= len(in_bar) <= constraints.max_notes_per_bar, (index, bar)
        for note in notes[index]:
            assert 40 <= note.velocity <= 100
            if not drum:
                assert 36 <= note.pitch <= 84
                sounding = sum(1 for other in notes[index] if other.start <= note.start < other.end - 1e-6)  # float beats: a tick of slack
                assert sounding <= constraints.max_polyphony


def test_tracks_sharing_a_program_cannot_share_a_stream():
    grammars = [ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id(METER), TOKENIZER.program_id(0, False),
                                    TOKENIZER.positions_per_bar(METER), 2, ascending_chords=False) for _ in range(2)]
    with pytest.raises(ValueError, match="distinct Program"):
        InterleavedGrammar(grammars)


def test_the_generator_writes_a_band_as_one_stream_and_splits_tracks_of_one_program(generator):
    drums = Clip((Note(36, 100, 0, 0.25, 9), Note(42, 80, 1, 0.25, 9)), program=0, is_drum=True, name="Kit", length=8)
    bass = Clip((Note(40, 90, 0, 1), Note(43, 90, 4, 1)), program=33, name="Bass", length=8)
    keys = Clip((Note(60, 70, 0, 2), Note(64, 70, 4, 2)), program=0, name="Keys", length=8)
    other_kit = Clip((Note(38, 90, 2, 0.25, 9),), program=0, is_drum=True, name="Kit 2", length=8)
    arrangement = Arrangement((drums, bass, keys, other_kit), (0, 1, 2, 3))
    program_of = {i: generator.tokenizer.program_id(generator.model_program(t), t.is_drum)
                  for i, t in enumerate(arrangement.tracks)}
    groups = generator.track_groups(arrangement)
    assert sorted(t for g in groups for t in g) == [0, 1, 2, 3]
    for group in groups:  # no stream holds two tracks the model would hear as one Program
        assert len({program_of[t] for t in group}) == len(group)
    assert groups[0][0] == 0 and 3 not in groups[0]  # the second kit goes to a stream of its own
    assert len(groups) == Counter(program_of.values()).most_common(1)[0][1]  # as few streams as the programs allow
    assert max(len(g) for g in groups) >= 2  # the band is interleaved, not one stream per track


def test_beam_search_writes_a_band_without_alternating_instruments_at_one_position(generator):
    """A search maximises likelihood, and switching instruments back and forth at one position is
    cheap for a small model: the grammar bounds it (RUNS_PER_POSITION)."""
    drums = Clip(tuple(Note(36 if i % 2 == 0 else 42, 90, i * 0.5, 0.25, 9) for i in range(16)), program=0, is_drum=True,
                 length=8)
    keys = Clip(tuple(Note(60 + (i % 3) * 4, 70, i * 1.0, 1.0) for i in range(8)), program=0, length=8)
    from engine.generate import ContinuationRequest, VariationDone

    done = [e for e in generator.stream(Arrangement((drums, keys), (0, 1)),
                                        ContinuationRequest(bars=2, variations=1, mode="beam", beam_width=3))
            if isinstance(e, VariationDone)]
    assert sorted(d.track for d in done) == [0, 1]
    tokens = list(done[0].tokens)
    assert done[0].tokens == done[1].tokens  # one stream wrote both tracks
    kinds = generator.tokenizer.kinds
    runs: Counter = Counter()
    for token in tokens:
        if token == kinds.bar or token in kinds.position:
            runs.clear()
        elif token in kinds.program:
            runs[token] += 1
            assert runs[token] <= RUNS_PER_POSITION


def test_presence_guidance_nudges_a_part_that_falls_behind_its_density_in_the_clip():
    grammars = [ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id(METER), TOKENIZER.program_id(program, drum),
                                    TOKENIZER.positions_per_bar(METER), 2, drum, ascending_chords=False)
                for program, drum in BAND[:2]]
    grammar = InterleavedGrammar(grammars, notes_per_bar=[8.0, 2.0])  # drums 8 a bar, bass 2 a bar
    grammar.forced_opening()
    drums, bass = (TOKENIZER.program_id(p, d) for p, d in BAND[:2])
    assert grammar.presence_bias() is None  # nothing owed before the first position
    half_bar = TOKENIZER.token_id(f"Position_{TOKENIZER.positions_per_bar(METER) // 2}")
    grammar.accept(half_bar)
    bias = grammar.presence_bias()
    assert bias is not None and bias[drums] > bias[bass] > 0  # half a bar in: ~4 drum notes and ~1 bass note owed
    assert np.count_nonzero(bias) == 2  # only the Program tokens are nudged; pitches stay the model's
    grammar.accept(bass)
    for token in (TOKENIZER.token_id("Pitch_40"), TOKENIZER.token_id("Velocity_91"), TOKENIZER.token_id("Duration_1.0.12")):
        grammar.accept(token)
    after = grammar.presence_bias()
    assert after is not None and after[bass] < bias[bass]  # playing pays the debt back
    assert after[drums] <= PRESENCE_CAP * PRESENCE_WEIGHT  # a long silence is nudged, never forced


def test_a_lagging_drum_part_that_played_last_carries_its_presence_to_its_own_next_hit():
    grammars = [ContinuationGrammar(VOCAB, TOKENIZER.time_sig_id(METER), TOKENIZER.program_id(program, drum),
                                    TOKENIZER.positions_per_bar(METER), 2, drum, ascending_chords=False)
                for program, drum in BAND[:2]]
    grammar = InterleavedGrammar(grammars, notes_per_bar=[16.0, 2.0])  # sixteenth hi-hats, a bass of two notes
    grammar.forced_opening()
    drums, bass = (TOKENIZER.program_id(p, d) for p, d in BAND[:2])
    kick, hat = (int(np.flatnonzero(VOCAB.drum_value == sound)[0]) for sound in (36, 42))
    grammar.accept(TOKENIZER.token_id("Position_0"))
    grammar.accept(drums)
    for token in (kick, TOKENIZER.token_id("Velocity_91"), TOKENIZER.token_id("Duration_0.1.12")):
        grammar.accept(token)
    grammar.accept(TOKENIZER.token_id(f"Position_{TOKENIZER.positions_per_bar(METER) // 2}"))
    bias = grammar.presence_bias()  # half a bar in, one hit played of about eight owed
    assert bias is not None and bias[drums] > 0
    assert bias[hat] == bias[drums] and bias[kick] == bias[drums]  # its implied next hits are its bid too
    assert bias[TOKENIZER.token_id("Pitch_40")] == 0  # a pitched part's notes are not nudged
