"""juce_stub/include/segue_protocol.h cannot silently fall behind the Python protocol code.

Every value checked here is read from the code (module constants, the OSC reply table, the
transport's handler table, dataclass and signature defaults, the scale table), never written out
in the test; the request type tags, which live only in comments in the code, are compared with
docs/protocol.md, which tests/test_protocol_doc.py keeps in step with the code. Change the protocol
in Python without changing the header and this names the macro to fix. The header must also
compile as C and C++, and the plugin must take every /segue/ address from it.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_protocol_doc import error_codes, osc_request_addresses, osc_request_arity, table_rows

from engine import request as engine_request
from engine.constraints import SCALES
from engine.sampling import SamplingParams
from plugin_bridge import options, osc_guard, osc_messages, protocol
from plugin_bridge.osc_chunks import UploadLimits
from plugin_bridge.osc_client import OscClient

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "juce_stub" / "include" / "segue_protocol.h"
PLUGIN_SOURCES = sorted((ROOT / "juce_stub" / "source").glob("*.[ch]*"))


def header_macros() -> dict[str, str | int | float]:
    """Every `#define SEGUE_...` of the header with its value as Python (string, int or float)."""
    macros: dict[str, str | int | float] = {}
    for line in HEADER.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#define\s+(SEGUE_\w+)\s+(.+?)\s*(/\*.*\*/)?\s*$", line)
        if not match:
            continue
        name, text = match.group(1), match.group(2)
        if text.startswith('"'):
            macros[name] = json.loads(text)
        elif re.fullmatch(r"-?\d+", text):
            macros[name] = int(text)
        else:
            macros[name] = float(text)
    return macros


@pytest.fixture(scope="module")
def header() -> dict[str, str | int | float]:
    assert HEADER.is_file(), f"{HEADER} is missing"
    return header_macros()


def doc_request_tags(address: str) -> str:
    """The first request type tags (`,i…`) of the address's row in docs/protocol.md."""
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for row in table_rows(doc):
        if row and row[0] == f"`{address}`":
            tags = [t for t in re.findall(r"`(,[a-zA-Z]+)`", " ".join(row)) if t.startswith(",i")]
            if tags:
                return tags[0]
    raise AssertionError(f"docs/protocol.md has no request row for {address}")


def test_the_header_is_parsed(header):
    """Guards the parsing: an empty or half-read header would make the checks below pass vacuously."""
    defines = [line for line in HEADER.read_text().splitlines() if re.match(r"#define SEGUE_\w+\s+\S", line)]
    assert len(header) == len(defines) > 80


def test_versions_ports_and_prefix(header):
    assert header["SEGUE_PROTOCOL_VERSION"] == protocol.PROTOCOL_VERSION
    assert header["SEGUE_DEFAULT_OSC_PORT"] == options.DEFAULT_OSC_PORT
    assert header["SEGUE_OSC_PREFIX"] == osc_messages.PREFIX


def test_request_addresses_and_type_tags(header):
    addresses = osc_request_addresses()
    arity = osc_request_arity()
    in_header = {n[len("SEGUE_OSC_"):] for n in header if n.startswith("SEGUE_OSC_") and not n.startswith("SEGUE_OSC_REPLY_")}
    assert in_header - {"PREFIX"} == set(addresses), "the header's request addresses differ from osc_messages.py"
    for name, address in addresses.items():
        assert header[f"SEGUE_OSC_{name}"] == address, f"SEGUE_OSC_{name} should be {address!r}"
        tags = header[f"SEGUE_TAGS_{name}"]
        assert isinstance(tags, str) and tags.startswith(",is"), f"SEGUE_TAGS_{name}: every request starts reply_port, id"
        assert len(tags) - 1 == arity[address], f"SEGUE_TAGS_{name} has {len(tags) - 1} arguments; the server takes {arity[address]}"
        assert tags == doc_request_tags(address), f"SEGUE_TAGS_{name} differs from docs/protocol.md"


def test_replies_with_their_tags_fields_and_argument_positions(header):
    replies = {address[len(osc_messages.PREFIX):].upper(): (address, tags, names)
               for address, (tags, names) in osc_messages.REPLIES.items()}
    assert {n[len("SEGUE_OSC_REPLY_"):] for n in header if n.startswith("SEGUE_OSC_REPLY_")} == set(replies)
    positions = {n for n in header if re.fullmatch(r"SEGUE_[A-Z_]+_ARG_[A-Z_]+", n)}
    expected_positions = set()
    for key, (address, tags, names) in replies.items():
        assert header[f"SEGUE_OSC_REPLY_{key}"] == address
        assert header[f"SEGUE_TAGS_REPLY_{key}"] == tags, f"SEGUE_TAGS_REPLY_{key} should be {tags!r}"
        assert header[f"SEGUE_FIELDS_REPLY_{key}"] == " ".join(names)
        for index, field in enumerate(names):
            macro = f"SEGUE_{key}_ARG_{field.upper()}"
            expected_positions.add(macro)
            assert header.get(macro) == index, f"{macro} should be {index} ({address} ,{tags}: {' '.join(names)})"
    assert positions == expected_positions, f"argument positions for no reply field: {sorted(positions - expected_positions)}"


def test_error_codes(header):
    in_header = {n[len("SEGUE_ERROR_"):]: v for n, v in header.items()
                 if n.startswith("SEGUE_ERROR_") and "_ARG_" not in n}
    assert in_header == error_codes(), "the header's error codes differ from plugin_bridge/protocol.py"


def test_limits(header):
    code = {}
    for module in (protocol, osc_messages, engine_request, osc_guard):
        code.update({name: value for name, value in vars(module).items() if name.startswith("MAX_") and isinstance(value, int)})
    for name, value in header.items():
        if name.startswith("SEGUE_MAX_"):
            assert name[len("SEGUE_"):] in code, f"{name} names no MAX_ constant of the protocol code"
            assert value == code[name[len("SEGUE_"):]], f"{name} is {value}; the code says {code[name[len('SEGUE_'):]]}"
    for module in (protocol, osc_messages, engine_request):
        for name, value in vars(module).items():
            if name.startswith("MAX_") and isinstance(value, int):
                assert header.get(f"SEGUE_{name}") == value, f"{module.__name__}.{name} = {value} is missing from the header"


def test_upload_limits_and_client_pacing(header):
    limits = UploadLimits()
    assert header["SEGUE_UPLOAD_MAX_BYTES"] == limits.max_bytes
    assert header["SEGUE_UPLOAD_MAX_CHUNKS"] == limits.max_chunks
    assert header["SEGUE_UPLOAD_MAX_PER_CLIENT"] == limits.max_per_client
    assert header["SEGUE_UPLOAD_TIMEOUT_S"] == limits.timeout_s
    defaults = {name: p.default for name, p in inspect.signature(OscClient.__init__).parameters.items()}
    assert header["SEGUE_CLIENT_MAX_DATAGRAM"] == defaults["max_datagram"]
    assert header["SEGUE_CLIENT_WINDOW"] == defaults["window"]
    assert header["SEGUE_CLIENT_ACK_TIMEOUT_S"] == defaults["ack_timeout"]
    assert header["SEGUE_CLIENT_RETRIES"] == defaults["retries"]
    assert header["SEGUE_CLIENT_SILENCE_S"] == defaults["timeout"]


def test_request_values(header):
    assert header["SEGUE_SCALES"].split("|") == list(SCALES)
    top = float(header["SEGUE_TEMPERATURE_MAX"])
    SamplingParams(temperature=top).validate()
    with pytest.raises(ValueError):
        SamplingParams(temperature=top + 1e-6).validate()


def test_the_header_compiles_as_c_and_cpp(tmp_path):
    for compiler, language in (("cc", "c"), ("c++", "c++")):
        if shutil.which(compiler) is None:
            pytest.fail(f"{compiler} not found: install a C/C++ compiler (apt-get install g++)")
        source = tmp_path / f"check.{'c' if language == 'c' else 'cpp'}"
        source.write_text('#include "segue_protocol.h"\n#include "segue_protocol.h"\n'
                          "int main(void) { return SEGUE_PROTOCOL_VERSION - 1 + SEGUE_NOTE_ARG_PITCH - 2; }\n")
        result = subprocess.run([compiler, "-x", language, "-Wall", "-Werror", "-I", str(HEADER.parent), str(source),
                                 "-o", str(tmp_path / "check")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"segue_protocol.h does not compile as {language}:\n{result.stderr}"
        assert subprocess.run([str(tmp_path / "check")], timeout=30).returncode == 0


def test_the_plugin_takes_its_addresses_from_the_header():
    assert PLUGIN_SOURCES, "no plugin sources found under juce_stub/source"
    assert any('#include "segue_protocol.h"' in p.read_text() for p in PLUGIN_SOURCES)
    for path in PLUGIN_SOURCES:
        text = path.read_text()
        assert "/segue/" not in text, f"{path.name} spells out an OSC address; use the macros of segue_protocol.h"
        assert not re.search(r'"(bad_request|bad_clip|unknown_model|unknown_type|too_large|busy|internal)"', text), \
            f"{path.name} spells out an error code; use SEGUE_ERROR_*"
