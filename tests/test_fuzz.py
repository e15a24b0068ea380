"""Property-based fuzzing (hypothesis) of everything that reads untrusted bytes: the ZeroMQ message
decoder and request validation, the OSC datagram guard, MIDI reading and training ingest, and model
folder loading. Each may only refuse in its own documented way (ProtocolError, OscGuardError,
ClipError, a skip reason, ModelError), never with another exception, and never slowly.

`SEGUE_FUZZ_EXAMPLES=N` sets the examples per test (default 100, about two minutes in all on 2 cores);
docs/reliability.md records the long runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import clip_payload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.clip import ClipError
from engine.manifest import SearchDefaults
from plugin_bridge import osc_messages as msgs
from plugin_bridge import protocol

EXAMPLES = int(os.environ.get("SEGUE_FUZZ_EXAMPLES", "100"))
# deadline: no input may take over 1 s; derandomized and without a database, so CI runs the same cases every time
FUZZ = settings(max_examples=EXAMPLES, deadline=1000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values with the protocol's field names mixed in, and numbers at the edges (huge, tiny, negative, floats).
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, -1, 1e308]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
KEYS = st.sampled_from(["type", "id", "clip", "notes", "tracks", "tempo", "time_signature", "length", "program",
                        "drum", "name", "continue", "bars", "variations", "temperature", "top_k", "top_p", "seed",
                        "mode", "beam_width", "model", "constraints", "key", "scale", "pitch_min", "max_polyphony",
                        "min_notes_per_bar", "velocity_min"]) | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(KEYS, inner, max_size=8),
                    max_leaves=40)


def search_for(model):
    return SearchDefaults()


@FUZZ
@given(st.binary(max_size=2000))
def test_zeromq_bytes_decode_or_are_refused(data):
    try:
        payload = protocol.decode_json(data)
    except protocol.ProtocolError:
        return
    _parse(payload)


@FUZZ
@given(JSON)
def test_any_json_request_is_validated_or_refused(payload):
    _parse(payload)
    _parse({"type": "continue", "id": "f", "clip": payload})
    _parse({"type": "continue", "id": "f", "clip": clip_payload(1), **(payload if isinstance(payload, dict) else {})})


@FUZZ
@given(st.lists(st.lists(NUMBERS, max_size=6), max_size=30), JSON)
def test_notes_of_any_shape_are_validated_or_refused(notes, extra):
    clip = {"notes": notes, "tempo": 120, "time_signature": [4, 4]}
    if isinstance(extra, dict):
        clip.update(extra)
    _parse({"type": "continue", "id": "n", "clip": clip, "bars": 1})


def _parse(payload) -> None:
    try:
        started = time.perf_counter()
        protocol.parse_continue(payload, search_for)
    except protocol.ProtocolError as exc:
        assert len(exc.message) <= protocol.MAX_MESSAGE_CHARS  # never echoes unbounded input
    finally:
        assert time.perf_counter() - started < 1.0


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([b"", b"/segue/continue\x00", b"#bundle\x00"]))
def test_osc_datagrams_pass_the_guard_or_are_refused(data, head):
    from plugin_bridge.osc_guard import OscGuardError, check_datagram
    from plugin_bridge.osc_transport import _messages

    datagram = head + data
    try:
        check_datagram(datagram, 65000)
    except OscGuardError:
        return
    for message in _messages(datagram):  # a datagram the guard passed parses without surprises
        assert isinstance(message.address, str)


@FUZZ
@given(st.data())
def test_osc_continue_bodies_decode_or_are_refused(data):
    body = data.draw(st.binary(max_size=500) | JSON.map(lambda v: json.dumps(v).encode()))
    try:
        payload = protocol.decode_osc_continue(body, "o", msgs.CONTINUE)
    except protocol.ProtocolError:
        return
    _parse(payload)


@pytest.fixture(scope="module")
def midi_seed(tmp_path_factory) -> bytes:
    from test_multitrack import band

    from engine.midi_file import write_tracks

    return write_tracks(tmp_path_factory.mktemp("fuzz") / "band.mid", band(2), ["Drums", "Bass", "Keys", "Lead"]).read_bytes()


def _mutations(seed: bytes):
    """Byte flips, cuts, insertions and chunk-length lies on a real multi-track file."""
    return st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])),
                    min_size=1, max_size=8)


def _mutate(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for position, value, kind in edits:
        position %= max(1, len(data))
        if kind == "set":
            data[position] = value
        elif kind == "cut":
            del data[position:position + value % 64 + 1]
        else:
            data[position:position] = bytes([value]) * (value % 16 + 1)
    return bytes(data)


@FUZZ
@given(st.data())
def test_damaged_midi_is_read_or_refused_with_one_sentence(midi_seed, tmp_path, data):
    from engine.midi_file import read_tracks

    path = tmp_path / "fuzzed.mid"
    path.write_bytes(_mutate(midi_seed, data.draw(_mutations(midi_seed))))
    try:
        read_tracks(path)
    except ClipError as exc:
        assert str(exc) and "\n" not in str(exc)


def test_a_time_signature_of_four_over_zero_is_refused_in_a_sentence(midi_seed, tmp_path):
    """Found by the long run: one byte of the meter event changed gives 4/0, and dividing by it escaped."""
    from engine.midi_file import read_tracks

    path = tmp_path / "four-over-zero.mid"
    path.write_bytes(_mutate(midi_seed, [(27, 8, "set")]))
    with pytest.raises(ClipError, match="impossible time signature 4/0"):
        read_tracks(path)


@FUZZ
@given(st.data())
def test_damaged_midi_in_a_training_folder_is_skipped_with_a_reason(midi_seed, tiny_model, tmp_path, data):
    from training.data import ingest_file

    path = tmp_path / "fuzzed.mid"
    path.write_bytes(_mutate(midi_seed, data.draw(_mutations(midi_seed))))
    result = ingest_file(path, str(tiny_model / "tokenizer.json"))  # never raises, by contract
    assert (result.tokens is None) == bool(result.reason)


@FUZZ
@given(JSON)
def test_any_manifest_is_loaded_or_refused_with_model_error(tiny_model, tmp_path_factory, manifest_json):
    from engine.manifest import ModelError, verify_model_folder

    folder = tmp_path_factory.mktemp("model")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    real = json.loads((folder / "manifest.json").read_text())
    for body in (manifest_json, {**real, "model": manifest_json}, {**real, "files": manifest_json},
                 {**real, "search": manifest_json}):
        (folder / "manifest.json").write_text(json.dumps(body))
        try:
            verify_model_folder(folder)
        except ModelError:
            pass
