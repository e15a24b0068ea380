"""Zero-wait Continue: `prepare` prefills a clip in the background; a continue of it starts at once.

Engine tests check that a kept prefill gives exactly the notes of a cold one (one track and a band,
sampling and beam search) and count the prompt prefills the decoder really runs. Server tests run a
real `Server` on 127.0.0.1 (random ports, the tiny model) and talk to it over real OSC and ZeroMQ
sockets; every receive has a timeout and the fixtures close what they open.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import clip_payload

from engine.generate import ContinuationRequest, NoteEvent, VariationDone
from engine.prefill_cache import PrefillCache, Prefilled, clip_digest
from engine.session import KVCache
from plugin_bridge import osc_messages as msgs
from plugin_bridge.client import ClientError, SegueClient
from plugin_bridge.osc_client import OscClient
from plugin_bridge.protocol import parse_clip
from plugin_bridge.server import Server

BAND = {"tempo": 100, "time_signature": [4, 4], "length": 8, "tracks": [
    {"name": "Piano", "program": 0, "notes": [[60 + (i * 5) % 12, 80, i * 0.5, 0.45] for i in range(16)]},
    {"name": "Bass", "program": 33, "notes": [[40, 90, 0, 3.5], [43, 90, 4, 3.5]]},
    {"name": "Drums", "is_drum": True, "notes": [[36 if i % 4 == 0 else 42, 100, i * 0.5, 0.1] for i in range(16)]}]}

REQUESTS = {
    "sample": ContinuationRequest(bars=2, variations=3, seed=7, temperature=1.0),
    "beam": ContinuationRequest(bars=1, variations=2, mode="beam", beam_width=3),
}


def outcome(events) -> list[tuple]:
    """Everything a stream produced, in order: each note and each finished track with its tokens."""
    result: list[tuple] = []
    for event in events:
        if isinstance(event, NoteEvent):
            result.append(("note", event.variation, event.track, event.note))
        else:
            assert isinstance(event, VariationDone)
            result.append(("done", event.variation, event.track, event.tokens, event.log_prob))
    return result


def record_prefills(monkeypatch, decoder) -> list[tuple[int, ...]]:
    """Record the tokens of every one-row decoder step that starts from an empty cache: the prefill of a
    prompt (or a row's history prefilled again when the context is full)."""
    prefills: list[tuple[int, ...]] = []
    step = decoder.step

    def recorded(ids, cache):
        ids = np.asarray(ids)
        if cache.length == 0 and ids.shape[0] == 1:
            prefills.append(tuple(int(i) for i in ids[0]))
        return step(ids, cache)

    monkeypatch.setattr(decoder, "step", recorded)
    return prefills


def transposed(payload: dict, semitones: int) -> dict:
    """The clip with every note moved by `semitones`."""
    return {**payload, "notes": [[note[0] + semitones, *note[1:]] for note in payload["notes"]]}


def prompt_of(generator, payload: dict) -> tuple[int, ...]:
    """The tokens a continue of this clip prefills (the same model as the server's: a copy of its folder)."""
    return generator.prefill(parse_clip(payload, "p"), PrefillCache(0)).ids


# --- the engine ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(REQUESTS))
@pytest.mark.parametrize("kind", ["one track", "band"])
def test_a_prepared_prompt_gives_the_notes_of_a_cold_one_without_a_prefill(generator, monkeypatch, kind, mode):
    clip = parse_clip(clip_payload(2) if kind == "one track" else BAND, "t")
    request = REQUESTS[mode]
    cold = outcome(generator.stream(clip, request))
    assert any(e[0] == "note" for e in cold) and any(e[0] == "done" for e in cold)

    prefills = PrefillCache()
    prepared = generator.prefill(clip, prefills)
    assert not prepared.reused and prefills.stats().misses == 1 and prefills.stats().entries == 1
    runs = record_prefills(monkeypatch, generator.decoder)
    assert outcome(generator.stream(clip, request, prefills=prefills)) == cold
    assert prepared.ids not in runs, "a continue of a prepared clip ran the prompt's prefill again"
    stats = prefills.stats()
    assert (stats.hits, stats.misses, stats.prompt_hits) == (1, 1, 1)

    # "Generate again": another seed or mode starts from the same kept prefill.
    again = ContinuationRequest(bars=1, variations=1, seed=99) if mode == "beam" else REQUESTS["beam"]
    assert outcome(generator.stream(clip, again, prefills=prefills)) == outcome(generator.stream(clip, again))
    assert runs.count(prepared.ids) == 1, "only the cold comparison run prefilled the prompt"


def test_a_continue_keeps_its_prefill_and_the_same_clip_sent_again_is_not_tokenized_again(generator, monkeypatch):
    payload = clip_payload(2)
    prefills = PrefillCache()
    first = outcome(generator.stream(parse_clip(payload, "a"), REQUESTS["sample"], prefills=prefills))
    prompt_ids = prompt_of(generator, payload)
    runs = record_prefills(monkeypatch, generator.decoder)
    tokenized: list[object] = []
    prompt = generator._prompt
    monkeypatch.setattr(generator, "_prompt", lambda arrangement: tokenized.append(arrangement) or prompt(arrangement))
    assert outcome(generator.stream(parse_clip(payload, "b"), REQUESTS["sample"], prefills=prefills)) == first
    assert prompt_ids not in runs and tokenized == []
    stats = prefills.stats()
    assert (stats.hits, stats.misses, stats.prompt_hits) == (1, 1, 1)


def test_a_prepared_continue_decodes_in_the_prefills_own_buffer_and_frees_it_for_the_next(generator, monkeypatch):
    """No copy of the prompt on the way to the first note: the continue steps on in the buffer the prepare
    prefilled, and leaves it for Generate again. Two at once: the second decodes on a copy. Same notes."""
    assert generator.decoder.shared, "the tiny test model is a shared-buffer export"
    clip = parse_clip(clip_payload(2), "t")
    one = ContinuationRequest(bars=2, variations=1, seed=5, temperature=1.0)
    cold = outcome(generator.stream(clip, one))
    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    pool = generator.decoder._pool
    taken: list[int] = []
    take = pool.take
    monkeypatch.setattr(pool, "take", lambda batch: taken.append(batch) or take(batch))
    for _ in range(2):  # Continue, then Generate again over what the first one wrote after the prompt
        assert outcome(generator.stream(clip, one, prefills=prefills)) == cold
    assert taken == [], "a prepared continue copied its prompt into a new buffer"
    assert prefills.stats().leases == 3  # the prepare's (its look ahead) and the two continues'

    first, second = generator.stream(clip, one, prefills=prefills), generator.stream(clip, one, prefills=prefills)
    together: tuple[list, list] = ([], [])
    for pair in itertools.zip_longest(first, second):  # the two streams step in turn
        for events, event in zip(together, pair, strict=True):
            if event is not None:
                events.append(event)
    assert outcome(together[0]) == cold and outcome(together[1]) == cold
    assert prefills.stats().leases == 4 and taken == [1], "the second stream copied the prompt into its own buffer"
    assert outcome(generator.stream(clip, one, prefills=prefills)) == cold
    assert prefills.stats().leases == 5 and taken == [1], "the buffer was not free again after both ended"


def model_runs_to_the_first_note(generator, monkeypatch, clip, request, prefills) -> tuple[int, list[tuple]]:
    """How many times a stream runs the model before its first note, and everything the stream produced."""
    runs = [0]
    run = generator.decoder._run

    def counted(*args):
        runs[0] += 1
        return run(*args)

    monkeypatch.setattr(generator.decoder, "_run", counted)
    events, first = [], None
    for event in generator.stream(clip, request, prefills=prefills):
        events.append(event)
        if first is None and isinstance(event, NoteEvent):
            first = runs[0]
    monkeypatch.setattr(generator.decoder, "_run", run)
    assert first is not None
    return first, outcome(events)


def test_prepare_runs_the_first_position_ahead_so_the_first_note_needs_one_model_call_less(generator, monkeypatch):
    clip = parse_clip(clip_payload(3), "t")
    greedy = ContinuationRequest(bars=2, variations=1, temperature=0.0)  # draws the most likely Position: the look ahead's
    _, cold = model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, None)
    without = PrefillCache()
    with monkeypatch.context() as patched:
        patched.setattr(generator, "_look_ahead", lambda arrangement, prefilled: None)
        generator.prefill(clip, without)
    runs_without, notes = model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, without)
    assert notes == cold and runs_without >= 2  # the Position (and its Program), the Pitch (and its guesses)

    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    ahead = prefills._hot[generator.cache_identity].ahead
    assert ahead is not None and generator.vocab.position_index[ahead.tokens[0]] >= 0
    for _ in range(2):  # Continue, then Generate again: the look ahead is still there
        assert model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, prefills) == (runs_without - 1, cold)
    assert prefills._hot[generator.cache_identity].ahead is ahead

    several = ContinuationRequest(bars=2, variations=2, temperature=0.0)  # two rows: no guess, the look ahead untouched
    assert outcome(generator.stream(clip, several, prefills=prefills)) == outcome(generator.stream(clip, several))
    assert model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, prefills) == (runs_without - 1, cold)


def test_a_clip_selected_again_after_another_is_as_ready_as_the_last_one(generator, monkeypatch):
    """Only one prompt per model keeps its own buffer: preparing (or continuing) a kept clip again makes it
    that one, with its look ahead, so going back to an earlier clip loses nothing."""
    first, second = parse_clip(clip_payload(3), "a"), parse_clip(clip_payload(2), "b")
    greedy = ContinuationRequest(bars=2, variations=1, temperature=0.0)
    _, first_cold = model_runs_to_the_first_note(generator, monkeypatch, first, greedy, None)
    _, second_cold = model_runs_to_the_first_note(generator, monkeypatch, second, greedy, None)
    prefills = PrefillCache()
    generator.prefill(first, prefills)
    runs_hot, notes = model_runs_to_the_first_note(generator, monkeypatch, first, greedy, prefills)
    assert notes == first_cold
    generator.prefill(second, prefills)  # the musician selects another clip: now that one is hot
    generator.prefill(first, prefills)  # ... and comes back to the first
    pool = generator.decoder._pool
    taken: list[int] = []
    take = pool.take
    monkeypatch.setattr(pool, "take", lambda batch: taken.append(batch) or take(batch))
    assert model_runs_to_the_first_note(generator, monkeypatch, first, greedy, prefills) == (runs_hot, first_cold)
    assert taken == [], "the clip selected again decoded on a copy of its prompt"
    # Continuing a kept clip that is not the hot one makes it hot too (the copy it needs anyway), so
    # Generate again on it starts in place.
    assert outcome(generator.stream(second, greedy, prefills=prefills)) == second_cold
    assert taken == [1]
    assert outcome(generator.stream(second, greedy, prefills=prefills)) == second_cold
    assert taken == [1]
    assert prefills.stats().misses == 2  # each prompt was prefilled once


def test_a_stream_that_ends_while_another_decodes_in_the_buffer_leaves_that_one_alone(generator):
    """Only the lessee frees the buffer's positions: a stream cancelled before its first step, and one
    that starts meanwhile, must not free or overwrite what the decoding stream wrote there."""
    clip = parse_clip(clip_payload(2), "t")
    one = ContinuationRequest(bars=2, variations=1, seed=4, temperature=1.0)
    cold = outcome(generator.stream(clip, one))
    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    decoding = generator.stream(clip, one, prefills=prefills)
    events = [next(decoding)]  # it holds the buffer and has written its first steps after the prompt
    assert list(generator.stream(clip, one, should_stop=lambda: True, prefills=prefills)) == []  # cancelled at once
    meanwhile = generator.stream(clip, one, prefills=prefills)
    started = [next(meanwhile)]  # it steps now: it must not write where `decoding` wrote
    events += list(decoding)
    assert outcome(events) == cold
    assert outcome(started + list(meanwhile)) == cold


def test_threads_preparing_continuing_and_cancelling_the_same_clips_all_get_the_cold_notes(generator):
    """The server's workers and its prepare thread share one PrefillCache: leases, promotions and look aheads
    under real threads, with streams closed after their first note (a cancel), never change a note."""
    import random

    clips = [parse_clip(clip_payload(seed), str(seed)) for seed in (2, 3)]
    requests = [ContinuationRequest(bars=2, variations=v, seed=s, temperature=1.0) for s in (1, 2) for v in (1, 2)]
    cold = {(c, r): outcome(generator.stream(clips[c], requests[r])) for c in range(2) for r in range(len(requests))}
    prefills = PrefillCache()
    wrong: list[tuple] = []

    def musician(number: int) -> None:
        chance = random.Random(number)
        for _ in range(8):
            c, r = chance.randrange(2), chance.randrange(len(requests))
            if chance.random() < 0.4:
                generator.prefill(clips[c], prefills)
            cancel = chance.random() < 0.3
            events = []
            stream = generator.stream(clips[c], requests[r], prefills=prefills)
            for event in stream:
                events.append(event)
                if cancel and isinstance(event, NoteEvent):
                    stream.close()
                    break
            got = outcome(events)
            if got != cold[(c, r)][:len(got)] or (not cancel and len(got) != len(cold[(c, r)])):
                wrong.append((number, c, r, cancel))

    threads = [threading.Thread(target=musician, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []
    assert prefills.stats().misses <= 4 and prefills.stats().leases > 0


def test_a_look_ahead_the_continue_does_not_draw_costs_nothing_but_itself(generator, monkeypatch):
    """A look ahead whose Position is not drawn: the drawn token is written over it (same notes as cold, no
    more model calls than without it), it is dropped, and the next prepare computes it again."""
    clip = parse_clip(clip_payload(3), "t")
    greedy = ContinuationRequest(bars=2, variations=1, temperature=0.0)
    _, cold = model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, None)
    look_ahead = generator._look_ahead

    def second_best(arrangement, prefilled):  # the look ahead of a model that ranks the drawn Position lower
        logits = prefilled.logits.copy()
        grammar = generator._grammar(clip, greedy)
        grammar.forced_opening()
        logits[0, int(np.argmax(np.where(grammar.allowed(), logits[0], -np.inf)))] = -np.inf
        return look_ahead(arrangement, replace(prefilled, logits=logits))

    prefills = PrefillCache()
    monkeypatch.setattr(generator, "_look_ahead", second_best)
    generator.prefill(clip, prefills)
    hot = prefills._hot[generator.cache_identity]
    assert hot.ahead is not None
    runs, notes = model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, prefills)
    assert notes == cold
    assert hot.ahead is None and not hot.leased
    monkeypatch.setattr(generator, "_look_ahead", look_ahead)
    generator.prefill(clip, prefills)  # the musician selects the clip again
    assert hot.ahead is not None
    assert model_runs_to_the_first_note(generator, monkeypatch, clip, greedy, prefills) == (runs - 1, cold)


def test_a_meter_the_model_lacks_is_refused_by_prefill_as_by_stream(generator):
    from engine.request import RequestError

    clip = parse_clip(clip_payload(2, meter=(5, 16)), "m")
    with pytest.raises(RequestError) as by_stream:
        list(generator.stream(clip, REQUESTS["sample"], prefills=PrefillCache()))
    prefills = PrefillCache()
    with pytest.raises(RequestError) as by_prefill:
        generator.prefill(clip, prefills)
    assert by_prefill.value.code == by_stream.value.code == "bad_clip"
    assert str(by_prefill.value) == str(by_stream.value) and "5/16" in str(by_prefill.value)
    assert prefills.stats().entries == 0


# --- the cache itself -------------------------------------------------------------------------------

def fake_prefill(tokens: int, fill: float = 1.0, layers: int = 2) -> tuple[np.ndarray, KVCache]:
    tensors = tuple(np.full((1, 2, tokens, 4), fill, dtype=np.float32) for _ in range(2 * layers))
    return np.full((1, 10), fill, dtype=np.float32), KVCache(tensors)


@pytest.mark.parametrize("rest, lent", [(1, 48), (8, 32), (3, 32), (2, 48)])
def test_a_kept_prompt_lends_whole_steps_and_leaves_the_rest_the_model_needs(rest, lent):
    """A 50-token prompt whose first 48 tokens are a kept one's, lent in steps of 16: 48 positions when the
    model can take any rest (ONNX Runtime's runs), 32 when it must compute at least 3 or 8 itself (the
    native path's attention: OnnxDecoder.prefill_rest)."""
    cache = PrefillCache()
    cache.fetch("m", range(48), lambda: fake_prefill(48))
    seen: list[int] = []

    def extend(prefix: KVCache) -> tuple[np.ndarray, KVCache]:
        seen.append(prefix.length)
        return fake_prefill(50, fill=2.0)

    got = cache.fetch("m", [*range(48), 7, 7], lambda: fake_prefill(50, fill=3.0), extend=extend, align=16, rest=rest)
    assert seen == [lent] and got.prefix_reused == lent


def test_lru_eviction_under_a_byte_bound_and_entries_larger_than_the_bound_are_not_kept():
    one = Prefilled.kept(list(range(8)), *fake_prefill(8), 0.0).nbytes
    cache = PrefillCache(max_bytes=int(2.5 * one))
    for first in (0, 100, 200):
        cache.fetch("m", range(first, first + 8), lambda: fake_prefill(8))
    assert cache.stats().entries == 2 and cache.stats().evictions == 1 and cache.stats().bytes <= cache.max_bytes
    assert cache.get("m", range(0, 8)) is None  # the least recently used went first
    assert cache.get("m", range(100, 108)) is not None  # now the most recent: 200.. goes next
    cache.fetch("m", range(300, 308), lambda: fake_prefill(8))
    assert cache.get("m", range(200, 208)) is None and cache.get("m", range(100, 108)) is not None
    assert cache.get("other model", range(100, 108)) is None  # keyed by the model too

    huge = cache.fetch("m", range(1000, 1100), lambda: fake_prefill(100))  # larger than the whole bound
    assert not huge.reused and huge.cache.length == 100 and cache.get("m", range(1000, 1100)) is None
    assert cache.stats().entries == 2
    nothing = PrefillCache(max_bytes=0)
    nothing.fetch("m", range(8), lambda: fake_prefill(8))
    assert nothing.stats().entries == 0 and nothing.stats().bytes == 0


def test_kept_arrays_are_read_only_copies_of_the_prompt_positions():
    logits, cache = fake_prefill(8)
    store = PrefillCache()
    given = store.fetch("m", range(8), lambda: (logits, cache))
    assert not given.reused and given.logits is logits  # the caller decodes from what the model returned
    kept = store.get("m", range(8))
    assert kept is not None and kept.reused and kept.ids == tuple(range(8))
    assert not kept.logits.flags.writeable and all(not t.flags.writeable for t in kept.cache.tensors)
    logits[:] = 5.0  # whoever holds the model's own arrays cannot change what is kept
    assert float(kept.logits[0, 0]) == 1.0
    with pytest.raises(ValueError):
        kept.cache.tensors[0][0, 0, 0, 0] = 2.0
    assert kept.cache.repeat(3).batch == 3  # decoding starts from new arrays


def test_two_threads_needing_one_prefill_compute_it_once():
    cache = PrefillCache()
    release, calls = threading.Event(), []

    def slow():
        calls.append(1)
        assert release.wait(10)
        return fake_prefill(8)

    results: list[Prefilled] = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch("m", range(8), slow))) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(results) == 2 and sorted(r.reused for r in results) == [False, True]
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)


def test_clip_digest_is_the_content():
    a, b = parse_clip(clip_payload(2), "a"), parse_clip(clip_payload(2), "b")
    from engine.clip import Arrangement

    assert clip_digest(Arrangement.of(a)) == clip_digest(Arrangement.of(b))
    moved = clip_payload(2)
    moved["notes"][3][2] += 0.001
    assert clip_digest(Arrangement.of(parse_clip(moved, "c"))) != clip_digest(Arrangement.of(a))
    louder = clip_payload(2)
    louder["notes"][0][1] += 1
    assert clip_digest(Arrangement.of(parse_clip(louder, "d"))) != clip_digest(Arrangement.of(a))
    band = parse_clip(BAND, "e")
    muted = parse_clip({**BAND, "tracks": [{**t, "continue": t["name"] != "Bass"} for t in BAND["tracks"]]}, "f")
    assert clip_digest(band) != clip_digest(muted)


def edited_at_the_end(payload: dict) -> dict:
    """The clip with its last note a semitone higher: what a musician changes before pressing Continue again."""
    notes = [list(note) for note in payload["notes"]]
    last = max(range(len(notes)), key=lambda i: (notes[i][2], notes[i][0]))
    notes[last][0] += 1
    return {**payload, "notes": notes}


def fed_positions(monkeypatch, decoder) -> list[int]:
    """The positions of every model call of `decoder` (steps and forwards), in order."""
    fed: list[int] = []
    forward = decoder.forward

    def counted(ids, cache, *args, **kwargs):
        fed.append(int(np.asarray(ids).shape[1]))
        return forward(ids, cache, *args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counted)
    return fed


@pytest.mark.parametrize("variant", ["fp32", "int8"])
@pytest.mark.parametrize("change", ["last bar edited", "clip grown"])
def test_a_clip_that_begins_like_a_kept_one_is_prefilled_only_from_where_it_changed(int8_model, monkeypatch, variant,
                                                                                    change):
    from engine.generate import Generator

    generator = Generator.load(int8_model, variant=variant)
    chunk = generator.decoder.prefill_chunk
    assert chunk > 0
    before_payload = clip_payload(4) if change == "last bar edited" else clip_payload(2)
    after_payload = edited_at_the_end(before_payload) if change == "last bar edited" else clip_payload(4)
    before, after = parse_clip(before_payload, "b"), parse_clip(after_payload, "a")
    cold = generator.prefill(after, PrefillCache(0))
    prefills = PrefillCache()
    kept = generator.prefill(before, prefills)
    same = next(i for i, (x, y) in enumerate(zip(kept.ids + (-1,), cold.ids, strict=False)) if x != y)
    expected = min(same, len(cold.ids) - generator.decoder.prefill_rest, len(kept.ids)) // chunk * chunk
    assert expected >= chunk, "the two prompts should share at least one whole run of positions"

    fed = fed_positions(monkeypatch, generator.decoder)
    warm = generator.prefill(after, prefills)
    assert warm.ids == cold.ids and not warm.reused
    assert warm.prefix_reused == expected and prefills.stats().prefix_hits == 1
    assert fed[0] == len(cold.ids) - expected, "the kept prompt's positions were computed again"
    # Bit for bit the cold prefill: ONNX Runtime's int8 matmuls quantize each run of positions as a whole,
    # so there this holds only because the reused positions end on a run's boundary; the native ones
    # quantize each position on its own, and the rest is long enough to be attended as the whole was
    # (OnnxDecoder._runs).
    assert np.array_equal(warm.logits, cold.logits)
    for reused, computed in zip(warm.cache.tensors, cold.cache.tensors, strict=True):
        assert np.array_equal(reused, computed)
    again = generator.prefill(after, prefills)
    assert again.reused and again.prefix_reused == 0, "a prompt found whole reuses nothing from another"

    # A continue of the changed clip, given only the old clip's prefill, reuses it the same way and
    # writes the cold notes.
    request = ContinuationRequest(bars=2, variations=2, seed=5)
    only_before = PrefillCache()
    generator.prefill(before, only_before)
    assert outcome(generator.stream(after, request, prefills=only_before)) == outcome(generator.stream(after, request))
    assert only_before.stats().prefix_hits == 1


def test_the_rest_of_a_prompt_runs_on_the_session_a_whole_prefill_would_use(tiny_model, monkeypatch):
    """With a prefill session of its own (SEGUE_PREFILL_THREADS), a prompt goes there whole; so does
    its rest after a lent beginning, even when the rest alone is shorter than a prefill."""
    from engine.generate import Generator
    from engine.session import PREFILL_MIN_TOKENS

    monkeypatch.setenv("SEGUE_PREFILL_THREADS", "2")
    generator = Generator.load(tiny_model)
    decoder = generator.decoder
    assert decoder.prefill_session is not None
    before = parse_clip(clip_payload(4), "b")
    after = parse_clip(edited_at_the_end(clip_payload(4)), "a")
    prefills = PrefillCache()
    generator.prefill(before, prefills)
    sessions = []
    run = decoder._run
    monkeypatch.setattr(decoder, "_run", lambda binding, ids, positions, session, last=None:
                        sessions.append((ids.shape[1], session)) or run(binding, ids, positions, session, last))
    warm = generator.prefill(after, prefills)
    rest = len(warm.ids) - warm.prefix_reused
    assert 0 < rest < PREFILL_MIN_TOKENS, "the edit should leave a rest shorter than a prefill"
    assert sessions[0] == (rest, decoder.prefill_session)


def test_clips_that_differ_within_the_first_run_share_nothing(generator):
    a, b = clip_payload(4), transposed(clip_payload(4), 1)
    prefills = PrefillCache()
    generator.prefill(parse_clip(a, "a"), prefills)
    other = generator.prefill(parse_clip(b, "b"), prefills)
    assert other.prefix_reused == 0 and prefills.stats().prefix_hits == 0
    assert other.ids == prompt_of(generator, b)


# --- a real server on loopback ----------------------------------------------------------------------

@pytest.fixture
def serve(models_dir, tmp_path, monkeypatch):
    """Start a Server (OSC and ZeroMQ on random loopback ports) with the given prefill memory; every
    server and client made is closed after the test. `.prefills` records the prefills the model ran.
    `head_starts=False` for tests that count the prefill cache's uses exactly: after each continue the
    server draws the next head start (plugin_bridge/head_start.py), a use of the cache at a moment of its own."""
    made: list[Server] = []
    clients: list = []

    def start(prefill_cache_mb: float = 256, head_starts: bool = True) -> SimpleNamespace:
        server = Server(models_dir, clips_dir=tmp_path / "clips", watch=False, prefill_cache_mb=prefill_cache_mb,
                        head_starts=head_starts).start()
        made.append(server)
        assert server.osc is not None and server.zmq is not None
        osc = OscClient("127.0.0.1", server.osc.port, timeout=60)
        zmq_client = SegueClient(f"tcp://127.0.0.1:{server.zmq.port}", timeout=60)
        clients.extend([osc, zmq_client])
        runs = record_prefills(monkeypatch, server.registry.get(None).generator.decoder)
        return SimpleNamespace(server=server, osc=osc, zmq=zmq_client, prefills=runs, cache=server.service.prefills)

    yield start
    for client in clients:
        client.close()
    for server in made:
        server.stop()


def osc_outcome(client: OscClient, request_id: str) -> tuple[list[tuple], dict]:
    """The notes of one OSC continue and its terminal event."""
    notes = []
    for event in client.stream(request_id):
        if event["type"] == "note":
            notes.append(tuple(event[k] for k in ("variation", "track", "pitch", "velocity", "start", "duration", "channel")))
        terminal = event
    assert terminal["type"] == "finished", terminal
    return notes, terminal


def reply(client: OscClient, request_id: str) -> dict:
    events = list(client.stream(request_id))
    assert len(events) == 1, events
    return events[0]


@pytest.mark.parametrize("clip", ["one track", "band"])
def test_prepare_then_continue_over_osc_gives_the_cold_notes_without_a_prefill(serve, generator, clip):
    s = serve(head_starts=False)
    payload = clip_payload(4) if clip == "one track" else BAND
    prompt = prompt_of(generator, payload)
    request = {"clip": payload, "bars": 2, "variations": 3, "seed": 11}
    cold, _ = osc_outcome(s.osc, s.osc.continue_clip(request))
    assert cold and s.prefills.count(prompt) == 1
    s.cache.clear()  # forget it: the next continue would otherwise find the prefill the cold one kept

    prepared = reply(s.osc, s.osc.prepare_clip({"clip": payload}))
    assert prepared["type"] == "prepared" and prepared["model"] == "default" and prepared["cached"] is False
    assert prepared["tokens"] > 10
    assert prepared["tokens"] == len(prompt) and prepared["total_ms"] >= prepared["prefill_ms"] > 0
    assert s.prefills.count(prompt) == 2
    before = s.cache.stats()
    warm, _ = osc_outcome(s.osc, s.osc.continue_clip(request))
    assert warm == cold
    assert s.prefills.count(prompt) == 2, "the continue of a prepared clip ran its prefill"
    after = s.cache.stats()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_generate_again_over_zmq_reuses_the_prefill_of_the_first_continue(serve, generator):
    s = serve(head_starts=False)
    payload = clip_payload(3)
    first = list(s.zmq.continue_stream(payload, bars=2, seed=1))
    second = list(s.zmq.continue_stream(payload, bars=1, seed=2, mode="beam"))
    assert first[-1]["type"] == second[-1]["type"] == "finished"
    assert s.prefills.count(prompt_of(generator, payload)) == 1
    prepared = s.zmq.prepare(payload)
    assert prepared["cached"] is True and prepared["prefill_ms"] == 0
    assert s.prefills.count(prompt_of(generator, payload)) == 1
    stats = s.cache.stats()
    assert (stats.entries, stats.misses, stats.hits) == (1, 1, 2)


def test_eviction_under_a_tiny_memory_bound(serve, generator):
    a, b = clip_payload(2), transposed(clip_payload(3), 1)  # no beginning in common: each prefilled whole
    sizes = [generator.prefill(parse_clip(p, "x"), PrefillCache()).nbytes for p in (a, b)]
    s = serve(prefill_cache_mb=max(sizes) * 1.5 / 2**20)  # room for one of them, never two
    assert s.zmq.prepare(a)["cached"] is False
    assert s.zmq.prepare(b)["cached"] is False
    stats = s.cache.stats()
    assert (stats.entries, stats.evictions) == (1, 1) and stats.bytes <= stats.max_bytes
    assert s.zmq.prepare(b)["cached"] is True
    assert s.zmq.prepare(a)["cached"] is False  # it was evicted: prefilled again, and b goes
    assert s.zmq.prepare(a)["cached"] is True and s.cache.stats().evictions == 2
    prompts = [prompt_of(generator, p) for p in (a, b)]
    assert [s.prefills.count(p) for p in prompts] == [2, 1]
    events = list(s.zmq.continue_stream(b, bars=1, seed=3))  # b is not there any more: prefilled cold
    assert events[-1]["type"] == "finished" and [s.prefills.count(p) for p in prompts] == [2, 2]


MALFORMED = {  # address, type tags and arguments after the reply port and the id, the error code, words of its message
    "not JSON": (msgs.PREPARE, "s", ["{clip"], "bad_request", "the prepare request is not valid JSON"),
    "an argument missing": (msgs.PREPARE, "", [], "bad_request", "/segue/prepare takes 3 arguments (reply_port id json), not 2"),
    "a continue sent to prepare": (msgs.PREPARE, "s", ['{"type":"continue","clip":{}}'], "bad_request",
                                   "the JSON says type 'continue' but was sent to /segue/prepare"),
    "no clip": (msgs.PREPARE, "s", ["{}"], "bad_request", "clip must be an object"),
    "a clip without notes": (msgs.PREPARE, "s", ['{"clip":{"notes":[]}}'], "bad_clip", "no notes"),
    "a bad note": (msgs.PREPARE, "s", ['{"clip":{"notes":[[60,0,0,1]]}}'], "bad_clip", "velocity 0"),
    "an unknown model": (msgs.PREPARE, "s", ['{"clip":{"notes":[[60,90,0,1]]},"model":"nope"}'], "unknown_model", "nope"),
    "a chunk count of 0": (msgs.PREPARE_CHUNK, "iis", [0, 0, "{}"], "bad_request", "chunk count must be at least 1"),
}


def test_malformed_prepares_get_a_clear_error_and_the_server_keeps_serving(serve):
    s = serve(head_starts=False)
    for number, (name, (address, tags, args, code, words)) in enumerate(MALFORMED.items()):
        request_id = f"m{number}"
        s.osc.send(address, "s" + tags, [request_id, *args])
        error = reply(s.osc, request_id)
        assert error["type"] == "error" and error["code"] == code and words in error["message"], (name, error)
    s.osc.send(msgs.PREPARE, "ss", ["", '{"clip":{"notes":[[60,90,0,1]]}}'])
    assert reply(s.osc, "") == {"type": "error", "id": "", "code": "bad_request", "message": "a prepare request needs an id"}
    with pytest.raises(ClientError) as info:
        s.zmq.prepare({"notes": "many"})
    assert info.value.code == "bad_request" and "clip.notes must be a list" in str(info.value)
    assert s.prefills == [] and s.cache.stats().entries == 0

    assert s.osc.request("ping")["type"] == "pong" and s.zmq.ping() < 5
    big = {"notes": [[48 + (i * 7) % 36, 40 + i % 80, round(i * 0.04, 2), 0.123456789] for i in range(400)], "length": 16}
    assert len(json.dumps(big)) > 8000  # over one datagram of OscClient: sent as /segue/prepare/chunk pieces
    prepared = reply(s.osc, s.osc.prepare_clip({"clip": big}))
    assert prepared["type"] == "prepared" and prepared["cached"] is False
    osc_outcome(s.osc, s.osc.continue_clip({"clip": big, "bars": 1, "seed": 2}))  # ends with finished
    assert s.cache.stats().misses == 1 and s.cache.stats().hits == 1


def test_a_meter_the_model_lacks_is_refused_with_the_error_a_continue_gets(serve):
    s = serve()
    clip = clip_payload(2, meter=(5, 16))
    with pytest.raises(ClientError) as prepared:
        s.zmq.prepare(clip)
    with pytest.raises(ClientError) as continued:
        list(s.zmq.continue_stream(clip, bars=1))
    assert prepared.value.code == continued.value.code == "bad_clip"
    assert prepared.value.message == continued.value.message and "5/16" in prepared.value.message
    osc_error = reply(s.osc, s.osc.prepare_clip({"clip": clip}, "o"))
    assert (osc_error["code"], osc_error["message"]) == ("bad_clip", prepared.value.message)
    assert s.cache.stats().entries == 0 and s.osc.request("ping")["type"] == "pong"


def test_prepares_wait_for_generation_and_a_newer_one_replaces_a_waiting_one(serve):
    """One OSC client: a long continue runs; prepares sent meanwhile wait (the newer replacing the older,
    a cancel dropping one); the last is prepared only after the continue has ended."""
    s = serve()
    client = s.osc
    client.continue_clip({"clip": clip_payload(2), "bars": 64, "variations": 16, "seed": 1}, "long")
    events = []
    while not events or events[-1]["type"] != "note":
        event = client.receive(30)
        assert event is not None and event["id"] == "long", event
        events.append(event)
    for number, payload in enumerate([clip_payload(3), clip_payload(4), BAND]):
        client.prepare_clip({"clip": payload}, f"p{number}")
    client.cancel("p2")  # only the waiting prepare: the continue has another id
    client.prepare_clip({"clip": clip_payload(1)}, "p3")
    client.cancel("long")
    seen: dict[str, list[str]] = {}
    order = []
    while "prepared" not in seen.get("p3", []):
        event = client.receive(60)
        assert event is not None, seen
        if event["type"] in ("note", "done"):
            continue
        seen.setdefault(event["id"], []).append(event["type"])
        order.append((event["id"], event["type"]))
    assert seen == {"p0": ["cancelled"], "p1": ["cancelled"], "p2": ["cancelled"], "long": ["cancelled"], "p3": ["prepared"]}
    assert order.index(("long", "cancelled")) < order.index(("p3", "prepared"))
    assert s.cache.stats().misses == 2  # the long continue's prompt and p3's: nothing was prefilled for the others
