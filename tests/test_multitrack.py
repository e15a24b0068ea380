"""Multi-track clips: tracks kept apart from file to tokens to continuation and back to a file,
each continued in the context of all of them, with its program, name and drum flag."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import mido
import pytest

from engine.clip import Arrangement, Clip, ClipError, Note
from engine.generate import ContinuationRequest, NoteEvent, VariationDone
from engine.midi_file import read_clip, read_tracks, write_tracks

BASS, PIANO, FLUTE = 33, 0, 73  # GM: fingered bass, grand piano, flute


def band(bars: int = 4) -> list[Clip]:
    """A 4-track arrangement in 4/4: drums, bass, chords, melody (each with its own velocities)."""
    drums, bass, chords, melody = [], [], [], []
    for bar in range(bars):
        start = bar * 4.0
        for beat in range(4):
            drums.append(Note(36 if beat % 2 == 0 else 38, 100 - 8 * beat, start + beat, 0.25, 9))  # kick / snare
            drums += [Note(42, 60 + 10 * (eighth % 2), start + eighth / 2, 0.25, 9) for eighth in (2 * beat, 2 * beat + 1)]
            bass.append(Note(40 + (bar % 2) * 5, 90, start + beat, 0.9))
        chords += [Note(p, 70, start, 3.9) for p in (60, 64, 67)]
        melody += [Note(72 + (step + bar) % 5, 80 + step * 5, start + step, 0.9) for step in range(4)]
    common = {"tempo": 100.0, "time_signature": (4, 4), "length": bars * 4.0}
    return [Clip((), **common, program=0, is_drum=True, name="Drums").with_notes(drums),
            Clip((), **common, program=BASS, name="Bass").with_notes(bass),
            Clip((), **common, program=PIANO, name="Keys").with_notes(chords),
            Clip((), **common, program=FLUTE, name="Lead").with_notes(melody)]


@pytest.fixture
def band_file(tmp_path):
    return write_tracks(tmp_path / "band.mid", band(), ["Drums", "Bass", "Keys", "Lead"])


def test_tracks_stay_apart_from_file_to_arrangement(band_file):
    arrangement = read_tracks(band_file)
    assert [(t.name, t.program, t.is_drum) for t in arrangement.tracks] == [
        ("Drums", 0, True), ("Bass", BASS, False), ("Keys", PIANO, False), ("Lead", FLUTE, False)]
    assert arrangement.continued == (0, 1, 2, 3) and arrangement.bars == 4
    assert [len(t.notes) for t in arrangement.tracks] == [len(t.notes) for t in band()]
    assert all(n.channel == 9 for n in arrangement.tracks[0].notes)
    assert read_clip(band_file).notes  # the merged view still reads the same file


def test_tracks_that_disagree_on_meter_or_continue_nothing_are_refused():
    tracks = band()
    with pytest.raises(ClipError, match="share them"):
        Arrangement((tracks[0], Clip(tracks[1].notes, 120.0, (3, 4))), (0, 1)).validate()
    with pytest.raises(ClipError, match="no track is marked"):
        Arrangement(tuple(tracks), ()).validate()
    with pytest.raises(ClipError, match="distinct track numbers 1-4"):
        Arrangement(tuple(tracks), (4,)).validate()


def test_every_track_is_heard_in_one_token_stream(generator):
    arrangement = Arrangement(tuple(band()), (1,))
    prompt, bars = generator.prompt_tokens(arrangement)
    text = generator.tokenizer.tokens_to_text(prompt)
    assert bars == 4
    assert "Program_-1" in text and any(t.startswith("PitchDrum_") for t in text)  # the drums, as drums
    single, _ = generator.prompt_tokens(arrangement.tracks[1])
    assert len(prompt) > len(single)  # the context tracks are in the prompt


def test_each_continued_track_gets_its_own_notes_and_instrument(generator):
    arrangement = Arrangement(tuple(band()), (0, 1, 3))
    events = list(generator.stream(arrangement, ContinuationRequest(bars=2, variations=2, seed=4)))
    done = [e for e in events if isinstance(e, VariationDone)]
    assert sorted((d.variation, d.track) for d in done) == [(v, t) for v in (0, 1) for t in (0, 1, 3)]
    for d in done:
        track = arrangement.tracks[d.track]
        assert (d.clip.program, d.clip.is_drum, d.clip.name) == (track.program, track.is_drum, track.name)
        assert all(16.0 <= n.start < 24.0 for n in d.clip.notes)  # after the 4-bar clip, inside 2 bars
        streamed = [e.note for e in events if isinstance(e, NoteEvent) and (e.variation, e.track) == (d.variation, d.track)]
        assert all(a.start <= b.start for a, b in zip(streamed, streamed[1:], strict=False))  # streamed in onset order
        assert sorted(streamed, key=lambda n: (n.start, n.pitch)) == list(d.clip.notes)
        if track.is_drum:
            assert all(n.channel == 9 for n in d.clip.notes)
    again = list(generator.stream(arrangement, ContinuationRequest(bars=2, variations=2, seed=4)))
    assert again == events  # seeded: the same notes


def test_a_one_track_arrangement_is_exactly_the_clip(generator, example_midi):
    clip = read_clip(example_midi[0])
    request = ContinuationRequest(bars=2, variations=2, seed=9)
    assert list(generator.stream(Arrangement.of(clip), request)) == list(generator.stream(clip, request))


def test_unseen_programs_are_heard_as_a_seen_program_of_their_family(generator):
    seen = generator.decoder.manifest.seen_programs
    assert sorted(seen) == [-1, 0, 33]  # the tiny model heard piano, a fingered bass and drums
    assert generator.model_program(band()[1]) == BASS  # a program it heard is kept
    assert generator.model_program(replace(band()[1], program=34)) == BASS  # a picked bass: the bass it knows
    assert generator.model_program(band()[3]) == PIANO  # a flute it never heard, of a family it never heard: piano
    assert generator.model_program(band()[0]) == 0 and band()[0].is_drum  # drums stay drums (Program_-1 in the stream)


def segue(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_segue_continue_writes_every_track_back_with_its_instrument(band_file, tiny_model, tmp_path):
    result = segue("continue", band_file, "--bars", 2, "--variations", 2, "--seed", 1, "--out", tmp_path / "out",
                   "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    assert "track 1: Drums (drums, 48 notes, continued)" in result.stdout
    for number in (1, 2):
        path = tmp_path / "out" / f"band-continuation-{number}.mid"
        names = [message.name for track in mido.MidiFile(str(path)).tracks for message in track if message.type == "track_name"]
        assert names == [f"{name}: Segue continuation {number} of 2 (seed 1)" for name in ("Drums", "Bass", "Keys", "Lead")]
        assert [track.is_drum for track in mido_tracks(path)] == [True, False, False, False]
        assert [track.program for track in mido_tracks(path)] == [0, BASS, PIANO, FLUTE]
        assert sum(track.notes for track in mido_tracks(path)) > 0


def test_segue_continue_track_option_continues_only_the_chosen_tracks(band_file, tiny_model, tmp_path):
    result = segue("continue", band_file, "--bars", 2, "--seed", 1, "--track", 2, "--track", 4, "--out", tmp_path / "out",
                   "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    assert "track 1: Drums (drums, 48 notes, context)" in result.stdout
    assert [track.program for track in mido_tracks(tmp_path / "out" / "band-continuation-1.mid")] == [BASS, FLUTE]
    bad = segue("continue", band_file, "--track", 9, "--out", tmp_path / "bad", "--model", tiny_model)
    assert bad.returncode == 1 and "distinct track numbers 1-4" in bad.stderr and "Traceback" not in bad.stderr


class MidoTrack:
    def __init__(self, track: mido.MidiTrack):
        # A continued track may come back without notes (the model let it rest): its channel and
        # program are still in its program change.
        channels = {m.channel for m in track if m.type in ("note_on", "program_change")}
        self.is_drum = channels == {9}
        self.program = next((m.program for m in track if m.type == "program_change"), 0)
        self.notes = sum(1 for m in track if m.type == "note_on" and m.velocity > 0)


def mido_tracks(path) -> list[MidoTrack]:
    """The file's instrument tracks (notes or a program change), read by an independent library."""
    return [MidoTrack(t) for t in mido.MidiFile(str(path)).tracks
            if any(m.type in ("note_on", "program_change") for m in t)]


# --- over the protocol ------------------------------------------------------------------------------

def test_a_multi_track_clip_round_trips_through_the_protocol():
    from plugin_bridge.protocol import clip_payload, parse_clip

    arrangement = Arrangement(tuple(band()), (1, 3))
    payload = clip_payload(arrangement)
    assert [t["continue"] for t in payload["tracks"]] == [False, True, False, True]
    parsed = parse_clip(payload, "r")
    assert isinstance(parsed, Arrangement) and parsed.continued == (1, 3)
    assert [(t.name, t.program, t.is_drum, t.notes) for t in parsed.tracks] == \
        [(t.name, t.program, t.is_drum, t.notes) for t in arrangement.tracks]
    assert clip_payload(Arrangement.of(band()[1]))["program"] == BASS  # one track travels as a plain clip


@pytest.mark.parametrize("tracks, code, message", [
    ([], "bad_request", "non-empty list of track objects"),
    ([{"notes": [], "continue": True}], "bad_clip", "no notes to continue"),
    ([{"notes": [[60, 90, 0, 1]], "continue": "yes"}], "bad_request", "continue must be true or false"),
    ([{"notes": [[60, 90, 0, 1]], "continue": False}], "bad_clip", "no track is marked to continue"),
    ([{"notes": [[60, 90, 0, 1]]}] * 17, "too_large", "at most 16"),
    ([{"notes": [[60, 90, 0, 1]], "program": 1e999}], "bad_request", "program must be a finite number"),
])
def test_bad_tracks_are_refused_with_a_reason(tracks, code, message):
    from plugin_bridge.protocol import ProtocolError, parse_clip

    with pytest.raises(ProtocolError, match=message) as caught:
        parse_clip({"tempo": 100, "time_signature": [4, 4], "tracks": tracks}, "r")
    assert caught.value.code == code


def test_the_service_streams_each_tracks_notes_and_writes_one_file_per_variation(service):
    from test_service import Inbox

    from plugin_bridge.protocol import clip_payload

    inbox = Inbox()
    clip = clip_payload(Arrangement(tuple(band()), (0, 1)))
    service.handle("a", {"type": "continue", "id": "m", "clip": clip, "bars": 2, "variations": 2, "seed": 5}, inbox)
    events = inbox.until("finished", "m")
    assert [e["type"] for e in events].count("done") == 2 and events[-1]["variations"] == 2
    for variation in (0, 1):
        notes = [e for e in events if e["type"] == "note" and e["variation"] == variation]
        assert {e["track"] for e in notes} <= {0, 1}
        done = next(e for e in events if e["type"] == "done" and e["variation"] == variation)
        assert done["notes"] == len(notes)
        tracks = [t for t in mido.MidiFile(done["path"]).tracks if any(m.type == "track_name" for m in t)]
        assert [next(m.name for m in t if m.type == "track_name") for t in tracks] == \
            [f"{name}: Segue default continuation {variation + 1} of 2" for name in ("Drums", "Bass")]
        for index, track in enumerate(tracks):
            pitches = sorted(m.note for m in track if m.type == "note_on" and m.velocity > 0)
            assert pitches == sorted(e["pitch"] for e in notes if e["track"] == index)
            assert all(m.channel == 9 for m in track if m.type == "note_on") == (index == 0 or not pitches)


@pytest.mark.parametrize("longest_hit", [0.25, 2.0])
def test_drum_notes_last_a_beat_at_most_unless_the_clip_has_longer(generator, longest_hit):
    """A drum continuation never holds a hit longer than one beat, or than the clip's longest hit."""
    drums = band()[0]
    drums = drums.with_notes([*drums.notes[:-1], Note(49, 110, drums.notes[-1].start, longest_hit, 9)])
    cap = max(1.0, longest_hit)
    lengths = []
    for seed in range(6):
        done = generator.generate(drums, ContinuationRequest(bars=2, seed=seed, temperature=1.5, top_p=1.0))[0]
        lengths += [n.duration for n in done.clip.notes]
    assert lengths and max(lengths) <= cap + 1e-9
    grammar = generator._grammar(drums, ContinuationRequest(bars=1))
    longest_allowed = grammar._duration_len.max() / (generator.vocab.units_per_position * generator.tokenizer.positions_per_beat)
    assert longest_allowed == pytest.approx(cap)  # the cap is the rule, not the sampled luck
