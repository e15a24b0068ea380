"""Generation: cached decoding equals uncached, every sequence decodes with exactly the bars asked for,
seeds reproduce, long prompts are cut at a bar."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from engine.clip import Arrangement, Clip, Note
from engine.constraints import Constraints
from engine.generate import ContinuationRequest, NoteEvent, RequestError, VariationDone
from engine.grammar import ContinuationGrammar
from engine.midi_file import read_clip
from engine.sampling import SamplingParams, sample


def four_bar_clip(path) -> Clip:
    clip = read_clip(path)
    length = 4 * clip.beats_per_bar
    return Clip(tuple(n for n in clip.notes if n.start < length), clip.tempo, clip.time_signature, length, clip.program)


def test_cached_decoding_equals_uncached(generator):
    decoder = generator.decoder
    ids = np.random.default_rng(3).integers(0, decoder.vocab_size, (2, 48))
    logits, cache = decoder.step(ids[:, :8], decoder.empty_cache(2))
    for t in range(8, 48):
        full, _ = decoder.step(ids[:, :t], decoder.empty_cache(2))
        assert np.abs(full - logits).max() <= 1e-4, t
        logits, cache = decoder.step(ids[:, t:t + 1], cache)


def test_hundred_sequences_decode_with_exact_bar_counts(generator, example_midi):
    tokenizer = generator.tokenizer
    checked = 0
    for index in range(25):
        clip = four_bar_clip(example_midi[index % len(example_midi)])
        bars = 1 + index % 6
        request = ContinuationRequest(bars=bars, variations=4, temperature=1.3, seed=index)
        for done in generator.generate(clip, request):
            assert sum(1 for t in done.tokens if t == tokenizer.kinds.bar) == bars
            score = tokenizer.decode_to_score(done.tokens)  # miditok decodes every sequence
            decoded = sorted((n.pitch, n.time) for t in score.tracks for n in t.notes)
            assert len(decoded) == len(done.clip.notes)
            offset = clip.bars * clip.beats_per_bar
            end = offset + bars * clip.beats_per_bar
            assert all(offset <= n.start < end for n in done.clip.notes)
            checked += 1
    assert checked == 100


def test_streamed_notes_are_the_final_notes_in_order(generator, example_midi):
    clip = four_bar_clip(example_midi[0])
    events = list(generator.stream(clip, ContinuationRequest(bars=4, variations=3, seed=11)))
    for variation in range(3):
        streamed = [e.note for e in events if isinstance(e, NoteEvent) and e.variation == variation]
        done = [e for e in events if isinstance(e, VariationDone) and e.variation == variation]
        assert len(done) == 1
        assert sorted(streamed, key=lambda n: (n.start, n.pitch)) == list(done[0].clip.notes)
        assert [n.start for n in streamed] == sorted(n.start for n in streamed)  # onsets never go back in time
        last_note = max(i for i, e in enumerate(events) if isinstance(e, NoteEvent) and e.variation == variation)
        assert events.index(done[0]) > last_note


def test_same_seed_same_notes_other_seed_other_notes(generator, example_midi):
    clip = four_bar_clip(example_midi[1])
    first = generator.generate(clip, ContinuationRequest(bars=4, variations=2, seed=7, temperature=1.0))
    again = generator.generate(clip, ContinuationRequest(bars=4, variations=2, seed=7, temperature=1.0))
    other = generator.generate(clip, ContinuationRequest(bars=4, variations=2, seed=8, temperature=1.0))
    assert [d.clip.notes for d in first] == [d.clip.notes for d in again]
    assert [d.clip.notes for d in first] != [d.clip.notes for d in other]
    assert first[0].clip.notes != first[1].clip.notes  # variations differ from each other
    # Variation 1 of seed 7 does not depend on how many variations were asked for.
    three = generator.generate(clip, ContinuationRequest(bars=4, variations=3, seed=7, temperature=1.0))
    assert three[1].clip.notes == first[1].clip.notes


def test_greedy_is_deterministic_without_a_seed(generator, example_midi):
    clip = four_bar_clip(example_midi[2])
    a = generator.generate(clip, ContinuationRequest(bars=2, temperature=0.0))
    b = generator.generate(clip, ContinuationRequest(bars=2, temperature=0.0))
    assert a[0].clip.notes == b[0].clip.notes


def test_a_grammar_asked_for_again_is_a_fresh_copy_of_the_kept_one(generator, example_midi):
    clip = four_bar_clip(example_midi[0])
    request = ContinuationRequest(bars=2, seed=3)
    first = generator._grammar(clip, request)
    first.forced_opening()  # moves this one's state on
    again = generator._grammar(clip, request)
    assert again is not first and again.bars_started == 0 and first.bars_started == 1
    built = ContinuationGrammar(generator.vocab, again.time_sig_id, again.program_id, again.positions_per_bar, 2)
    assert again.allowed().tolist() == built.allowed().tolist() and again.expect is built.expect
    limited = generator._grammar(clip, ContinuationRequest(bars=2, constraints=Constraints(pitch_max=60)))
    assert limited.constraints.pitch_max == 60 and again.constraints.pitch_max is None
    impossible = ContinuationRequest(bars=2, constraints=Constraints(key="C", scale="major", pitch_min=61, pitch_max=61))
    for _ in range(2):  # refused every time: a grammar that could not be built is never kept
        with pytest.raises(RequestError, match="no note of C major"):
            generator._grammar(clip, impossible)


def test_long_prompt_is_cut_at_a_bar_keeping_the_end(generator):
    # 4 notes a beat for 64 bars: far beyond the tiny model's 256-token context.
    notes = [Note(60 + (i % 12), 80, i * 0.25, 0.25) for i in range(64 * 16)]
    clip = Clip(tuple(notes), time_signature=(4, 4))
    prompt, bars = generator.prompt_tokens(clip)
    assert bars == 64
    assert len(prompt) <= generator.max_prompt_tokens
    assert prompt[0] == generator.vocab.bar
    full = generator.tokenizer.encode_clip(clip)
    assert full[-len(prompt):] == prompt
    done = generator.generate(clip, ContinuationRequest(bars=8, seed=1))[0]
    assert all(n.start >= 64 * 4 for n in done.clip.notes)
    assert sum(1 for t in done.tokens if t == generator.vocab.bar) == 8


def test_limits_are_never_violated(generator, example_midi):
    clip = four_bar_clip(example_midi[3])
    limits = Constraints(pitch_min=60, pitch_max=72, velocity_min=40, velocity_max=90)
    for seed in range(10):
        done = generator.generate(clip, ContinuationRequest(bars=4, variations=2, seed=seed, temperature=1.5, constraints=limits))
        for d in done:
            assert all(60 <= n.pitch <= 72 and 40 <= n.velocity <= 90 for n in d.clip.notes)


@pytest.mark.parametrize("request_kwargs, message", [
    ({"bars": 0}, "bars must be between 1 and 64"),
    ({"bars": 10000}, "bars must be between 1 and 64"),
    ({"variations": 0}, "variations"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top-p"),
])
def test_bad_requests_are_refused(generator, example_midi, request_kwargs, message):
    clip = four_bar_clip(example_midi[0])
    with pytest.raises(RequestError, match=message):
        list(generator.stream(clip, ContinuationRequest(**request_kwargs)))


def test_empty_clip_is_refused(generator):
    with pytest.raises(RequestError, match="no notes"):
        list(generator.stream(Clip(()), ContinuationRequest()))


def test_sampling_respects_mask_top_k_and_greedy():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    allowed = np.array([False, True, True, True, True])
    assert sample(logits, allowed, SamplingParams(temperature=0.0), rng) == 1
    picks = {sample(logits, allowed, SamplingParams(temperature=2.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, allowed, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert picks == {1}


def test_unseen_instrument_is_played_to_the_model_as_a_trained_one(generator, example_midi):
    from dataclasses import replace

    clip = replace(four_bar_clip(example_midi[0]), program=40)  # violin; the tiny model saw piano, bass and drums
    assert sorted(generator.decoder.manifest.seen_programs) == [-1, 0, 33]
    prompt, _ = generator.prompt_tokens(clip)
    text = generator.tokenizer.tokens_to_text(prompt)
    assert "Program_0" in text and "Program_40" not in text
    done = generator.generate(clip, ContinuationRequest(bars=2, seed=5))[0]
    assert done.clip.program == 40
    assert "Program_40" not in generator.tokenizer.tokens_to_text(done.tokens)


class ChordHappyDecoder:
    """A hand-written 'model' for the chord lookahead: after every note it wants another note at
    the same position (Program), but after Program it only ever wants pitch 60. Under the grammar
    (pitches rise inside a chord) that note is impossible once 60 is played, so a decoder that
    renormalises would stack ever higher notes; the lookahead must see that no allowed pitch is
    likely and move on instead."""

    max_context = 4096
    manifest = SimpleNamespace(seen_programs={})  # trained on no particular instrument: programs pass through

    def __init__(self, tokenizer):
        from engine.session import KVCache

        self.KVCache = KVCache
        self.vocab_size = tokenizer.vocab_size
        kinds = tokenizer.kinds
        size = tokenizer.vocab_size
        self.table = np.zeros((size, size), dtype=np.float32)  # next-token logits by last token
        after_duration = np.full(size, -30.0, dtype=np.float32)
        for token in kinds.program:
            after_duration[token] = 5.0
            self.table[token] = -20.0
            self.table[token, tokenizer.token_id("Pitch_60")] = 10.0
        for token in kinds.position:
            after_duration[token] = 3.0
        after_duration[kinds.bar] = 0.0
        for token in kinds.duration:
            self.table[token] = after_duration

    def empty_cache(self, batch: int = 1):
        return self.KVCache((np.zeros((batch, 1, 0, 1), np.float32),))

    def step(self, ids, cache):
        ids = np.asarray(ids)
        grown = np.zeros((ids.shape[0], 1, cache.length + ids.shape[1], 1), np.float32)
        return self.table[ids[:, -1]], self.KVCache((grown,))


def test_chord_lookahead_moves_on_when_no_allowed_pitch_is_likely():
    from collections import Counter

    from engine.generate import Generator
    from engine.tokens import ClipTokenizer

    tokenizer = ClipTokenizer.default()
    generator = Generator(ChordHappyDecoder(tokenizer), tokenizer)
    clip = Clip((Note(60, 90, 0.0, 1.0), Note(62, 90, 1.0, 1.0)), time_signature=(4, 4))
    onsets = Counter()
    for seed in range(20):
        for done in generator.generate(clip, ContinuationRequest(bars=2, variations=2, temperature=1.0, seed=seed)):
            onsets.update(Counter(round(n.start, 4) for n in done.clip.notes).values())
    assert onsets and set(onsets) == {1}, onsets  # never a second note stacked on an onset


def test_a_clip_ending_a_tick_past_a_bar_line_is_continued_from_that_bar_line(generator, example_midi):
    """A DAW writes note-offs and end-of-track a tick or two late: 16.002 beats is a 4-bar clip, and
    the continuation starts at beat 16, not a bar later; a real overhang (16.5) is a fifth bar."""
    from dataclasses import replace

    clip = four_bar_clip(example_midi[0])
    late = replace(clip, length=16.002)
    assert late.bars == 4 and replace(clip, length=16.5).bars == 5
    ringing = clip.with_notes([*clip.notes[:-1], replace(clip.notes[-1], duration=16.002 - clip.notes[-1].start)])
    for prompt in (late, replace(ringing, length=None)):
        done = generator.generate(prompt, ContinuationRequest(bars=1, seed=2, constraints=Constraints(min_notes_per_bar=1)))[0]
        assert done.clip.notes and all(16.0 <= n.start < 20.0 for n in done.clip.notes)


def test_a_model_of_the_older_vocabulary_still_continues(model_copy, example_midi):
    """Models trained before the Program-per-bar vocabulary (`program_changes` false in their
    tokenizer.json: a Program before every note) keep working: the grammar writes their stream."""
    import dataclasses
    import hashlib
    import json

    from engine.generate import Generator
    from engine.manifest import load_manifest

    tokenizer_file = model_copy / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    data["config"]["program_changes"] = False  # the same vocabulary; only where Program tokens go differs
    tokenizer_file.write_text(json.dumps(data))
    manifest = load_manifest(model_copy)
    files = {**manifest.files, "tokenizer.json": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()}
    (model_copy / "manifest.json").write_text(dataclasses.replace(manifest, files=files).to_json())
    generator = Generator.load(model_copy)
    assert not generator.tokenizer.program_per_bar
    clip = four_bar_clip(example_midi[0])
    done = generator.generate(clip, ContinuationRequest(bars=2, seed=3, constraints=Constraints(min_notes_per_bar=2)))[0]
    text = generator.tokenizer.tokens_to_text(done.tokens)
    notes = sum(1 for t in text if t.startswith("Pitch_"))
    assert notes == len(done.clip.notes) >= 4
    assert sum(1 for t in text if t.startswith("Program_")) == notes  # one before every note, as that model learned
    prompt, _ = generator.prompt_tokens(clip)
    prompt_text = generator.tokenizer.tokens_to_text(prompt)
    assert prompt_text.count("Program_0") == sum(1 for t in prompt_text if t.startswith("Pitch_"))


def test_forced_tokens_go_into_the_model_with_the_token_before_them(generator, example_midi, monkeypatch):
    """A token the grammar forces (the Program after a bar's first Position, the TimeSig after a Bar) is
    fed in the same decode step as the sampled token before it: fewer steps (one fewer before the first
    note), and the same continuation as feeding every token on its own, since a forced token is never
    drawn."""
    decoder = generator.decoder
    widths: list[int] = []
    real_step = decoder.step

    def counting_step(ids, cache):
        widths.append(ids.shape[1])
        return real_step(ids, cache)

    monkeypatch.setattr(decoder, "step", counting_step)
    monkeypatch.setattr(type(generator), "_guess", lambda self, row, length: [])  # steps of forced tokens only
    clip = four_bar_clip(example_midi[0])
    request = ContinuationRequest(bars=4, variations=1, seed=7)
    merged = generator.generate(clip, request)[0]
    merged_widths = widths[1:]  # after the prompt's prefill
    forced_in_steps = sum(w - 1 for w in merged_widths)
    assert forced_in_steps >= 4, "every bar's TimeSig after its Bar is forced"
    assert set(merged_widths) <= {1, 2, 3}

    widths.clear()

    def one_at_a_time(self, row, fed, length):
        return iter(())

    monkeypatch.setattr(type(generator), "_forced", one_at_a_time)
    single = generator.generate(clip, request)[0]
    assert set(widths[1:]) == {1}
    assert single.tokens == merged.tokens and single.clip.notes == merged.clip.notes
    assert len(widths) - 1 == len(merged_widths) + forced_in_steps


def _model_calls(generator, monkeypatch) -> list[int]:
    """Counts every model call of the generator's decoder (its width: the tokens fed)."""
    decoder = generator.decoder
    widths: list[int] = []
    real_forward = type(decoder).forward

    def counting_forward(self, ids, cache, *args, **kwargs):
        widths.append(ids.shape[1])
        return real_forward(self, ids, cache, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", counting_forward)
    return widths


def test_a_guessed_velocity_and_duration_are_fed_with_the_pitch_and_change_no_token(generator, example_midi, monkeypatch):
    """After a Pitch the row's last Velocity and Duration are fed too, on a guess: the model still draws
    each from its own distribution, each guess that comes true saves a model call, and the first that
    does not is written over with the rest (no call more than without guessing). The continuation is
    the same as with no guessing, and so it is with a Velocity guess that is always wrong."""
    import engine.generate as generate_module

    real_guess = generate_module.Generator._guess
    vocab = generator.vocab
    widths = _model_calls(generator, monkeypatch)
    rows = []

    def watched(self, row, length):
        rows.append(row)
        return real_guess(self, row, length)

    def wrong_guess(self, row, length):
        right = real_guess(self, row, length)
        if not right:
            return []
        others = np.flatnonzero(row.grammar.allowed() & (vocab.velocity_value >= 0))
        others = others[others != right[0]]
        return [int(others[0])] + right[1:] if len(others) else []  # a wrong Velocity, then the Duration guess

    hits = 0
    for seed in (3, 11):
        clip = four_bar_clip(example_midi[seed % len(example_midi)])
        request = ContinuationRequest(bars=4, variations=1, seed=seed)
        widths.clear()
        monkeypatch.setattr(generate_module.Generator, "_guess", watched)
        guessing = generator.generate(clip, request)[0]
        row = rows[-1]
        guessed = (row.velocity_guesses, row.duration_guesses, row.position_guesses)
        calls_guessing, right = len(widths), sum(g.right for g in guessed)
        assert row.velocity_guesses.made > 0 and any(w >= 2 for w in widths[1:]), "no step fed a guess"
        assert row.position_guesses.made > 0, "no step fed the Position where the note ends"

        widths.clear()
        monkeypatch.setattr(generate_module.Generator, "_guess", lambda self, row, length: [])
        plain = generator.generate(clip, request)[0]
        assert plain.tokens == guessing.tokens and plain.clip.notes == guessing.clip.notes
        assert calls_guessing == len(widths) - right, "each guess that came true saves one call, a miss costs none"
        hits += right

        monkeypatch.setattr(generate_module.Generator, "_guess", wrong_guess)
        wrong = generator.generate(clip, request)[0]
        assert wrong.tokens == plain.tokens and wrong.clip.notes == plain.clip.notes
    assert hits > 0, "no guess came true on either clip"


def _row_of(generator, grammar):
    """A one-track row of `grammar`, as _stream_samples makes it (no notes written yet)."""
    from engine.generate import _Row
    from engine.guesses import NoteHabits

    assembler = generator._band_assembler(Arrangement.of(Clip((Note(60, 80, 0.0, 1.0),))), (0,), 0.0)
    return _Row(0, (0,), grammar, assembler, np.random.default_rng(0), [], [],
                habits=NoteHabits(generator.tokenizer.positions_per_beat))


def test_the_position_guessed_after_a_note_is_where_it_ends(generator):
    """After a note, the step also feeds the Position where it ends, where the next note of a line starts:
    only on the grid; at the bar line the next bar's opening (Bar, its forced TimeSig, Position 0 and the
    bar's forced Program), except at the Bar that ends the continuation; nothing past the bar line, nor
    where the vocabulary puts a Program before every note (it would take a step of its own). Within a
    chord, the shortest note begun at its position decides: that is where the chord moves on."""
    vocab = generator.vocab
    assert vocab.program_per_bar
    grammar = generator._grammar(Clip((Note(60, 80, 0.0, 1.0),)), ContinuationRequest(bars=2))
    grammar.forced_opening()
    row = _row_of(generator, grammar)
    unit = vocab.units_per_position
    durations = {int(vocab.duration_units[t]): t for t in np.flatnonzero(vocab.duration_mask)}
    position_of = {int(vocab.position_index[t]): t for t in np.flatnonzero(vocab.position_index >= 0)}
    opening = [vocab.bar, grammar.time_sig_id, position_of[0], grammar.program_id]
    grammar.position = 2
    seen = set()
    for units, duration in durations.items():
        end, off_grid = divmod(2 * unit + units, unit)
        expected = ([] if off_grid or end > grammar.positions_per_bar else
                    opening if end == grammar.positions_per_bar else [position_of[end]])
        assert generator._where_it_ends(row, duration) == expected, (units, end)
        seen.add(len(expected))
    assert seen == {0, 1, 4}, "the tiny vocabulary has durations that end within the bar, at its end and past it"
    on_grid = sorted(u for u in durations if u % unit == 0 and 2 + u // unit < grammar.positions_per_bar)
    assert len(on_grid) >= 2
    short, long = on_grid[0], on_grid[-1]
    row.habits.shortest_here = short  # a shorter note of this chord ends first
    assert generator._where_it_ends(row, durations[long]) == [position_of[2 + short // unit]]
    row.habits.moved()  # a new position: its own notes only
    assert generator._where_it_ends(row, durations[long]) == [position_of[2 + long // unit]]
    to_bar_line = (grammar.positions_per_bar - 2) * unit
    assert generator._where_it_ends(row, durations[to_bar_line]) == opening
    grammar.bars_started = grammar.bars  # the last bar: its Bar ends the continuation
    assert generator._where_it_ends(row, durations[to_bar_line]) == []
    grammar.bars_started = 1
    row.position_guesses.made, row.position_guesses.right = 100, 0  # they keep missing: no more
    assert generator._where_it_ends(row, durations[long]) == []
    row.position_guesses.made = 0
    generator.vocab = replace(vocab, program_per_bar=False)  # a Program before every note: no Position guess
    try:
        assert generator._where_it_ends(row, durations[long]) == []
    finally:
        generator.vocab = vocab


def test_a_row_guesses_velocity_and_duration_the_way_its_notes_bear_out():
    """NoteHabits scores each way of guessing on every note: the last one for a plain line, the same
    place in the beat and chord for voices with rhythms of their own (a chorale's), the most common of
    the last eight for a line that breaks its run now and then; and velocity accents that repeat each
    beat (an ostinato's) by place in the beat."""
    from engine.guesses import NoteHabits

    def written(habits, notes):  # (position, rank, velocity, duration): guesses made before each, then scored
        right_velocity = right_duration = 0
        for position, rank, velocity, duration in notes:
            if rank == 1:
                habits.moved()
            right_velocity += habits.velocities.guess(position, rank) == velocity
            right_duration += habits.durations.guess(position, rank) == duration
            habits.saw_velocity(velocity, position, rank)
            habits.saw_duration(duration, duration, position, rank)
        return right_velocity, right_duration

    line = [(p, 1, 90, 6) for p in range(0, 48 * 4, 6)]  # eighths, one velocity
    habits = NoteHabits(12, 90, 6)
    assert written(habits, line) == (len(line), len(line))

    # Voices: on each beat a bass of a quarter and two upper notes of an eighth; an eighth on the off-beat.
    chorale = []
    for beat in range(16):
        chorale += [(beat * 12, 1, 80, 12), (beat * 12, 2, 80, 6), (beat * 12, 3, 80, 6), (beat * 12 + 6, 1, 80, 6)]
    habits = NoteHabits(12, 80, 6)
    _, right = written(habits, chorale)
    assert right >= len(chorale) - 8, "the same place in beat and chord: every voice's rhythm after the first beats"
    last = NoteHabits(12, 80, 6)
    last.durations.hits = [10**6, 0, 0]  # as if 'the last one' had always been right: it stays the guess
    _, right_last = written(last, chorale)
    assert right_last < right - len(chorale) // 4

    # Accents: the first sixteenth of each beat louder.
    ostinato = [(p, 1, 110 if p % 12 == 0 else 70, 3) for p in range(0, 48 * 4, 3)]
    habits = NoteHabits(12, 70, 3)
    velocity_right, _ = written(habits, ostinato)
    assert velocity_right >= len(ostinato) - 8

    # Mostly eighths, a quarter now and then at no fixed place: the most common of the last eight.
    durations = [6, 6, 6, 12, 6, 6, 12, 6, 6, 6, 6, 12, 6, 6, 6, 12, 6, 12, 6, 6, 6, 6, 12, 6] * 3
    broken, start = [], 0
    for duration in durations:
        broken.append((start % 48, 1, 90, duration))
        start += duration
    habits = NoteHabits(12, 90, 6)
    _, right = written(habits, broken)
    assert right >= durations.count(6) - 4 and habits.durations.hits[2] > habits.durations.hits[0]


def test_a_row_stops_guessing_when_its_guesses_keep_missing(generator, example_midi, monkeypatch):
    """Guessing costs little, but not nothing. Velocity and Duration: once GUESS_TRIAL notes are written, a
    row guesses a kind only while the best way of guessing it came true for at least GUESS_MIN_RATE of
    its notes, scored on every note, so a row that stopped during erratic notes starts again when they
    settle. Positions: a row whose Position guesses came true less than POSITION_GUESS_MIN_RATE of the
    time (after GUESS_TRIAL of them) feeds no more of them."""
    import engine.generate as generate_module
    from engine.grammar import Expect
    from engine.guesses import GUESS_MIN_RATE, GUESS_TRIAL, NoteHabits

    rows = []
    real_guess = generate_module.Generator._guess

    def watched(self, row, length):
        rows.append(row)
        return real_guess(self, row, length)

    monkeypatch.setattr(generate_module.Generator, "_guess", watched)
    generator.generate(four_bar_clip(example_midi[0]), ContinuationRequest(bars=8, variations=1, seed=2))
    monkeypatch.setattr(generate_module.Generator, "_guess", real_guess)
    row = rows[-1]
    velocities = [int(t) for t in np.flatnonzero(generator.vocab.velocity_value >= 0)]
    assert len(velocities) >= 12, "the tiny vocabulary has enough velocity steps for notes no guess bears out"
    habits = NoteHabits(generator.tokenizer.positions_per_beat)
    for index, velocity in enumerate(velocities[:12]):  # every note another velocity, at another place
        habits.saw_velocity(velocity, index * 5 % 48, 1)
    assert not habits.velocities.worth_guessing()
    row.habits = habits
    row.grammar.expect = Expect.VELOCITY
    row.grammar.position = 0
    row.grammar._mask = None  # (the state set by hand: its mask again)
    assert generator._guess(row, 0) == []
    while not habits.velocities.worth_guessing():  # then the notes settle on one velocity
        habits.saw_velocity(velocities[0], 0, 1)
    assert max(habits.velocities.hits) >= GUESS_MIN_RATE * habits.velocities.seen
    assert generator._guess(row, 0)[:1] == [velocities[0]]

    row.position_guesses.made, row.position_guesses.right = GUESS_TRIAL, 0
    assert not row.position_guesses.worth_it(generate_module.POSITION_GUESS_MIN_RATE)
