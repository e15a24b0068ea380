"""The one typed request path: message bytes -> (Clip, ContinuationRequest, model), with the model's
`search` defaults filling what a client leaves out, for both transports; and a runtime that never
loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from engine.clip import Clip, Note
from engine.manifest import SearchDefaults
from engine.request import ContinuationRequest
from plugin_bridge import protocol
from plugin_bridge.options import continuation_options
from plugin_bridge.protocol import ProtocolError, clip_payload, decode_json, decode_osc_continue, parse_clip, parse_continue

CLIP = {"notes": [[60, 90, 0, 1], [64, 80, 1, 1], [67, 80, 2, 1.5, 3]], "tempo": 96, "time_signature": [3, 4], "length": 6}
MODELS = {"default": SearchDefaults(), "bright": SearchDefaults(temperature=1.2, top_p=1.0, bars=2)}


def search_for(name: str | None) -> SearchDefaults:
    if (name or "default") not in MODELS:
        raise KeyError(f"there is no model named {name!r} (available: {', '.join(MODELS)})")
    return MODELS[name or "default"]


def parse(**fields) -> protocol.ContinueRequest:
    return parse_continue({"type": "continue", "id": "r1", "clip": CLIP, **fields}, search_for)


def test_left_out_options_come_from_the_chosen_models_search_defaults():
    assert parse().request == ContinuationRequest.from_options(SearchDefaults())
    assert parse().request == ContinuationRequest()  # the engine's own defaults are that same table
    bright = parse(model="bright", bars=3)
    assert bright.model == "bright"
    assert (bright.request.temperature, bright.request.top_p, bright.request.bars) == (1.2, 1.0, 3)
    given = parse(temperature=0.5, top_k=7, seed=2**60, variations=2.0, constraints={"key": "D", "scale": "dorian"})
    assert (given.request.temperature, given.request.top_k, given.request.seed, given.request.variations) == (0.5, 7, 2**60, 2)
    assert given.request.constraints.key == "D"


def test_the_cli_and_the_protocol_build_the_same_request_from_the_same_options():
    from plugin_bridge.cli import build_parser

    args = build_parser().parse_args(["continue", "x.mid", "--bars", "2", "--top-k", "5", "--key", "C", "--scale", "major"])
    options = continuation_options(args)
    assert options == {"bars": 2, "top_k": 5, "constraints": {"key": "C", "scale": "major"}}
    assert parse(**options).request.top_k == 5 and parse(**options).request.constraints.scale == "major"
    assert continuation_options(build_parser().parse_args(["continue", "x.mid"])) == {}  # nothing given: model defaults


@pytest.mark.parametrize("field, value, message", [
    ("bars", 1e999, "bars must be a finite number"),
    ("variations", float("nan"), "variations must be a finite number"),
    ("top_k", 1e999, "top_k must be a finite number"),
    ("seed", 1e999, "seed must be a finite number"),
    ("beam_width", -1e999, "beam_width must be a finite number"),
    ("bars", 1.5, "bars must be a whole number, not 1.5"),
    ("bars", True, "bars must be a number, not bool"),
    ("bars", 65, "bars must be between 1 and 64, not 65"),
    ("seed", 2**64, "seed must be a whole number from 0 up"),
    ("mode", "greedy", "mode must be one of sample, beam, not 'greedy'"),
    ("mode", 3, "mode must be a string"),
    ("temperature", "hot", "temperature must be a number, not str"),
    ("constraints", {"colour": 1}, "unknown constraint"),
    ("constraints", [1], "constraints must be an object"),
])
def test_bad_options_are_bad_requests_naming_the_field(field, value, message):
    with pytest.raises(ProtocolError, match=message) as caught:
        parse(**{field: value})
    assert caught.value.code == protocol.BAD_REQUEST and caught.value.request_id == "r1"


def test_non_finite_and_huge_clip_numbers_are_bad_requests():
    for clip in ({**CLIP, "program": 1e999}, {**CLIP, "tempo": float("nan")}, {**CLIP, "notes": [[60, 90, 0, 1e999]]},
                 {**CLIP, "notes": [[60, 90, 1e300, 1]]}):
        with pytest.raises(ProtocolError) as caught:
            parse(clip=clip)
        assert caught.value.code in (protocol.BAD_REQUEST, protocol.BAD_CLIP), caught.value


@pytest.mark.parametrize("length, bars", [(16.0, 4), (16.002, 4), (16 + 2 / 96, 4), (16.03, 5), (15.998, 4), (16.5, 5)])
def test_an_explicit_length_is_rounded_to_bars_with_the_documented_allowance(length, bars):
    """A `length` up to 1/48 beat past a bar line ends there (docs/protocol.md section 3.6), exactly as
    a length left to default does: the request path and the file path share engine/clip.py's rule."""
    clip = parse_clip({**CLIP, "time_signature": [4, 4], "length": length}, "r1")
    assert isinstance(clip, Clip) and clip.length == length and clip.bars == bars
    ringing = parse_clip({**CLIP, "time_signature": [4, 4], "length": None, "notes": [[60, 90, 15, length - 15]]}, "r1")
    assert ringing.bars == bars


def test_the_clip_length_limit_allows_the_same_overhang():
    assert parse_clip({**CLIP, "time_signature": [4, 4], "length": 4096.02}, "r1").bars == 1024
    with pytest.raises(ProtocolError) as caught:
        parse_clip({**CLIP, "length": 4096.03}, "r1")
    assert caught.value.code == protocol.TOO_LARGE and "4096.03 beats long" in caught.value.message


def test_an_unknown_model_is_named_and_its_name_is_not_echoed_unbounded():
    with pytest.raises(ProtocolError, match="no model named") as caught:
        parse(model="nope")
    assert caught.value.code == protocol.UNKNOWN_MODEL
    with pytest.raises(ProtocolError, match="at most 64") as caught:
        parse(model="x" * 1_000_000)
    assert len(caught.value.message) < 200


def test_error_messages_never_echo_a_huge_input():
    with pytest.raises(ProtocolError) as caught:
        parse(mode="m" * 1_000_000)
    assert len(caught.value.message) <= protocol.MAX_MESSAGE_CHARS
    with pytest.raises(ProtocolError) as caught:
        parse(constraints={"k" * 1_000_000: 1})
    assert len(caught.value.message) <= protocol.MAX_MESSAGE_CHARS


def test_clip_payload_and_parse_clip_are_inverses():
    clip = Clip((), 96.0, (3, 4), 6.0, 33, False).with_notes([Note(40, 100, 0.0, 0.5, 1), Note(47, 60, 1.5, 1.0, 1)])
    assert parse_clip(json.loads(json.dumps(clip_payload(clip))), "r") == clip
    drums = replace(clip, is_drum=True, program=0)
    assert parse_clip(clip_payload(drums), "r").is_drum


@pytest.mark.parametrize("data, message", [
    (b'{"type":"ping","id":"p","x":NaN}', "NaN is not a JSON number"),
    (b'{"bars":Infinity}', "Infinity is not a JSON number"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1,2]", "must be a JSON object"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    (b"{", "not valid JSON"),
])
def test_json_is_decoded_the_same_way_for_both_transports(data, message):
    with pytest.raises(ProtocolError, match=message) as caught:
        decode_json(data)
    assert caught.value.code == protocol.BAD_REQUEST


def test_osc_continue_json_takes_its_id_from_the_osc_message():
    body = json.dumps({"clip": CLIP, "bars": 2}).encode()
    payload = decode_osc_continue(body, "osc-7")
    assert (payload["type"], payload["id"]) == ("continue", "osc-7")
    assert parse_continue(payload, search_for).request.bars == 2
    with pytest.raises(ProtocolError, match="differs from the OSC id"):
        decode_osc_continue(json.dumps({"id": "other", "clip": CLIP}).encode(), "osc-7")
    with pytest.raises(ProtocolError, match="NaN"):
        decode_osc_continue(b'{"clip":{},"temperature":NaN}', "osc-7")


def test_the_runtime_never_imports_torch():
    """In a fresh interpreter where torch IS installed, the engine, the server and the client load
    without it (miditok would otherwise pull in torch through its PyTorch data helpers)."""
    import importlib.util

    assert importlib.util.find_spec("torch") is not None, "the test environment installs torch (.[train])"
    code = ("import sys\n"
            "import engine.generate, engine.midi_file, engine.render, plugin_bridge.server, plugin_bridge.service\n"
            "import plugin_bridge.zmq_transport, plugin_bridge.osc_transport, plugin_bridge.client, plugin_bridge.cli\n"
            "from engine.tokens import ClipTokenizer\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
            "import miditok.pytorch_data\n"  # and training code can still ask for the helpers explicitly
            "assert 'torch' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
