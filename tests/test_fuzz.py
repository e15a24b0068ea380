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
    from plugin_bridge.osc_guard import OscGuardError, read_datagram

    datagram = head + data
    try:
        messages = read_datagram(datagram, 65000)
    except OscGuardError:
        return
    # What the guard read is what python-osc reads from the same datagram, which it parses without surprises.
    # (repr: a NaN argument reads alike but is not equal to itself)
    assert repr([(m.address, list(m.params)) for m in messages]) == repr(python_osc_messages(datagram))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["/segue/continue", "/segue/ping", "/a/b"]),
                          st.lists(st.integers(-2**31, 2**31 - 1) | st.floats(width=32, allow_nan=False)
                                   | st.text(max_size=40).filter(lambda t: "\x00" not in t) | st.binary(min_size=1, max_size=40)
                                   | st.booleans() | st.none(), max_size=6)), min_size=1, max_size=3), st.booleans())
def test_the_guard_reads_what_python_osc_builds(messages, bundled):
    """Messages built by python-osc (alone or in a bundle) read back by the guard as python-osc reads them."""
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder

    from plugin_bridge.osc_guard import read_datagram

    built = []
    for address, args in messages:
        builder = OscMessageBuilder(address)
        for arg in args:
            builder.add_arg(arg)
        built.append(builder.build())
    if bundled or len(built) > 1:
        bundle = OscBundleBuilder(IMMEDIATELY)
        for message in built:
            bundle.add_content(message)  # type: ignore[arg-type]
        datagram = bundle.build().dgram
    else:
        datagram = built[0].dgram
    read = [(m.address, list(m.params)) for m in read_datagram(datagram, 65000)]
    assert repr(read) == repr(python_osc_messages(datagram))
    assert [address for address, _ in read] == [address for address, _ in messages]


def python_osc_messages(datagram: bytes) -> list[tuple[str, list]]:
    """python-osc's reading of a datagram: each message's address and arguments, bundles flattened."""
    from pythonosc.osc_bundle import OscBundle
    from pythonosc.osc_message import OscMessage

    def walk(item) -> list[tuple[str, list]]:
        if isinstance(item, OscBundle):
            return [m for content in item for m in walk(content)]
        return [(item.address, list(item.params))]

    return walk(OscBundle(datagram) if OscBundle.dgram_is_bundle(datagram) else OscMessage(datagram))


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


@pytest.mark.parametrize("where", ["note", "tempo", "length", "temperature"])
def test_an_integer_too_large_for_a_float_is_a_bad_request(where):
    """Found by bench/fuzz_long.py: JSON allows an integer of 400 digits; converting it to a float (or
    math.isfinite on it) raised OverflowError out of parse_continue on both transports."""
    huge = "1" + "0" * 400
    note = f"[60,90,0,{huge}]" if where == "note" else "[60,90,0,1]"
    clip = f'{{"notes":[{note}],"tempo":{huge if where == "tempo" else 120},"length":{huge if where == "length" else 4}}}'
    body = f'{{"clip":{clip},"temperature":{huge if where == "temperature" else 1}}}'.encode()
    payload = protocol.decode_osc_continue(body, "o", msgs.CONTINUE)
    with pytest.raises(protocol.ProtocolError) as refused:
        protocol.parse_continue(payload, search_for)
    assert refused.value.code == protocol.BAD_REQUEST and (where in refused.value.message or "clip note 0" in refused.value.message)


def test_a_reply_with_arguments_of_the_wrong_type_never_raises_out_of_the_client_decoder():
    """Found by bench/fuzz_long.py: a done reply whose first_note_ms is a string, or a hello whose model list
    is an int32 or JSON nested deeper than the parser's recursion limit, raised TypeError/RecursionError
    out of osc_client.decode_datagram (a client must survive anything that reaches its port)."""
    from plugin_bridge.osc_client import decode_datagram

    done = decode_datagram(msgs.build_message("/segue/done", "sisiss", ["c", 0, "/tmp/x.mid", 3, "x", "y"]))
    assert done is not None and done["type"] == "done"
    for models in (2, "[" * 30000):
        tags = "sis" + ("i" if isinstance(models, int) else "s") + "ss"
        hello = decode_datagram(msgs.build_message("/segue/hello", tags, ["h", 1, "0.1", models, "default", "i"]))
        assert hello is not None and hello["models"] == []


def test_a_clip_refusal_quoting_a_huge_number_stays_within_the_message_limit():
    """Found by bench/fuzz_long.py: program -1e307 is a whole number, so it became a 308-digit integer that
    the clip's refusal quoted in full, past MAX_MESSAGE_CHARS (an error reply must never echo unbounded input)."""
    for clip in ({"notes": [[60, 90, 0, 1]], "program": -1e307}, {"tracks": [{"notes": [[60, 90, 0, 1]], "program": -1e307}]}):
        with pytest.raises(protocol.ProtocolError) as refused:
            protocol.parse_continue({"id": "c", "clip": clip}, search_for)
        assert refused.value.code == protocol.BAD_CLIP
        assert len(refused.value.message) <= protocol.MAX_MESSAGE_CHARS


def test_a_huge_time_signature_numerator_is_refused_in_a_short_sentence():
    """Found by bench/fuzz_long.py: a numerator of 10**299 passed the protocol and the engine quoted it back
    in a 446-character refusal; a meter's numerator is one byte in a MIDI file."""
    for clip in ({"notes": [[60, 90, 0, 1]], "time_signature": [10**299, 4]}, {"notes": [[60, 90, 0, 1]], "time_signature": [256, 4]}):
        try:
            request = protocol.parse_continue({"id": "c", "clip": clip}, search_for)
        except protocol.ProtocolError as refused:
            assert len(refused.message) <= protocol.MAX_MESSAGE_CHARS
            continue
        with pytest.raises(ClipError) as refused_later:
            request.clip.validate()
        assert len(str(refused_later.value)) <= protocol.MAX_MESSAGE_CHARS
