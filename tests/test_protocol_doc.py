"""docs/protocol.md cannot silently fall behind the code.

Every list checked here is read from the code (module constants, the OSC reply table, the dicts the
reply builders return, the `MAX_*` limits), never written out in the test: add an address, a reply
type, an error code or a limit to the code without documenting it, and this fails.
"""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import pytest

from plugin_bridge import osc_messages
from plugin_bridge.osc_transport import OscTransport

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), "docs/protocol.md is missing"
    return DOC.read_text(encoding="utf-8")


def table_rows(text: str) -> list[list[str]]:
    """Every markdown table row as its list of stripped cells (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not re.fullmatch(r"\|[\s|:-]+\|", line):
            rows.append([cell.strip() for cell in line[1:-1].split("|")])
    return rows


def module_ast(relative: str) -> ast.Module:
    return ast.parse((ROOT / relative).read_text(encoding="utf-8"))


# --- what the code defines ------------------------------------------------------------------------

def osc_request_addresses() -> dict[str, str]:
    """Module-level constants of osc_messages that hold a /segue/ address: name -> address."""
    return {name: value for name, value in vars(osc_messages).items()
            if name.isupper() and isinstance(value, str) and value.startswith(osc_messages.PREFIX) and value != osc_messages.PREFIX}


def osc_request_arity() -> dict[str, int]:
    """Address -> argument count, from the transport's own handler table (the count it enforces)."""
    transport = OscTransport(service=None)  # not started: no socket is opened
    return {address: len(names.split()) for address, (names, _) in transport._handlers.items()}


def reply_types() -> set[str]:
    """The `type` of every reply dict literal built in protocol.py and service.py (hello is built there)."""
    types = set()
    for relative in ("plugin_bridge/protocol.py", "plugin_bridge/service.py"):
        for node in ast.walk(module_ast(relative)):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant) \
                            and isinstance(value.value, str):
                        types.add(value.value)
    return types


def error_codes() -> dict[str, str]:
    """Upper-case module-level string constants of protocol.py: the error codes (name -> code)."""
    codes = {}
    for node in module_ast("plugin_bridge/protocol.py").body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                codes[name] = node.value.value
    return codes


def chunk_error_codes() -> set[str]:
    """Codes the OSC upload bookkeeping raises by literal: ChunkError(code, ...) and self._refuse(key, code, ...)."""
    codes = set()
    for node in ast.walk(module_ast("plugin_bridge/osc_chunks.py")):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "ChunkError" and node.args:
            arg = node.args[0]
        elif isinstance(func, ast.Attribute) and func.attr == "_refuse" and len(node.args) > 1:
            arg = node.args[1]
        else:
            continue
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            codes.add(arg.value)
    return codes


_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.LShift: operator.lshift}


def _int_value(node: ast.AST) -> int | None:
    """A constant integer expression (`20_000`, `8 * 1024`, `1 << 20`), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _int_value(node.left), _int_value(node.right)
        return None if left is None or right is None else _OPS[type(node.op)](left, right)
    return None


LIMIT_MODULES = ("plugin_bridge/protocol.py", "plugin_bridge/osc_messages.py", "plugin_bridge/osc_guard.py",
                 "engine/generate.py")


def max_limits() -> dict[str, int]:
    """Every module-level `MAX_*` integer constant of the modules that define the protocol's limits."""
    limits = {}
    for relative in LIMIT_MODULES:
        for node in module_ast(relative).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id.startswith("MAX_"):
                value = _int_value(node.value)
                if value is not None:
                    limits[f"{relative}:{node.targets[0].id}"] = value
    return limits


# --- the checks -----------------------------------------------------------------------------------

def test_the_code_tables_are_found():
    """Guards the parsing itself: an empty list would make every check below pass vacuously."""
    assert len(osc_request_addresses()) >= 5 and len(osc_messages.REPLIES) >= 8
    assert set(osc_request_addresses().values()) == set(osc_request_arity())
    assert {"note", "done", "finished", "error", "cancelled", "pong", "hello"} <= reply_types()
    assert len(error_codes()) >= 7 and chunk_error_codes()
    assert len(max_limits()) >= 8


def test_every_osc_request_address_is_documented_with_its_arguments(doc):
    rows = table_rows(doc)
    arity = osc_request_arity()
    for name, address in osc_request_addresses().items():
        assert f"`{address}`" in doc, f"{name} = {address!r} (osc_messages.py) is not in docs/protocol.md"
        tag_sets = [re.findall(r"`(,[a-zA-Z]+)`", " ".join(row)) for row in rows if row and row[0] == f"`{address}`"]
        documented = {tags for found in tag_sets for tags in found if tags.startswith(",i")}
        assert documented, f"no table row starting with `{address}` gives its request type tags"
        for tags in documented:
            assert len(tags) - 1 == arity[address], \
                f"{address}: the doc's type tags {tags} have {len(tags) - 1} arguments, the server takes {arity[address]}"


def test_every_osc_reply_address_is_documented_with_its_type_tags(doc):
    rows = table_rows(doc)
    for address, (tags, names) in osc_messages.REPLIES.items():
        assert f"`{address}`" in doc, f"the reply address {address} (osc_messages.REPLIES) is not in docs/protocol.md"
        matching = [row for row in rows if row and row[0] == f"`{address}`" and f"`,{tags}`" in row]
        assert matching, f"no table row documents the reply {address} with its type tags ,{tags}"
        arguments = matching[0][-1]
        for name in names:
            assert name in arguments, f"the reply {address} row does not name its argument {name!r}"


def test_every_reply_type_has_a_row(doc):
    documented = {row[0] for row in table_rows(doc) if row}
    for kind in sorted(reply_types() | {address[len(osc_messages.PREFIX):] for address in osc_messages.REPLIES}):
        assert f"`{kind}`" in documented, f"the reply type {kind!r} has no table row (first cell `{kind}`) in docs/protocol.md"


def test_every_error_code_has_a_row(doc):
    documented = {row[0] for row in table_rows(doc) if row}
    for name, code in error_codes().items():
        assert f"`{code}`" in documented, f"protocol.{name} = {code!r} has no row in the error-code table of docs/protocol.md"
    for code in chunk_error_codes():
        assert code in error_codes().values(), f"osc_chunks.py raises {code!r}, which protocol.py does not define"


def test_every_max_limit_is_in_the_doc(doc):
    for where, value in max_limits().items():
        spellings = {f"{value}", f"{value:,}"}
        assert any(re.search(rf"(?<![\d,.]){re.escape(s)}(?![\d,])", doc) for s in spellings), \
            f"{where} = {value} does not appear in docs/protocol.md"


def test_the_ping_datagram_in_the_doc_is_exact(doc):
    dgram = osc_messages.build_message(osc_messages.PING, "is", [9001, "p1"])
    assert dgram.hex(" ") in doc, "the hex bytes of /segue/ping 9001 \"p1\" in docs/protocol.md are not what the code builds"
    pong = osc_messages.encode_reply({"type": "pong", "id": "p1"})
    assert pong.hex(" ") in doc


# --- fields, sections and bytes ---------------------------------------------------------------------

def reply_fields() -> dict[str, set[str]]:
    """Reply type -> the keys of the dict literals that build it in protocol.py and service.py."""
    fields: dict[str, set[str]] = {}
    for relative in ("plugin_bridge/protocol.py", "plugin_bridge/service.py"):
        for node in ast.walk(module_ast(relative)):
            if not isinstance(node, ast.Dict):
                continue
            keys = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            kind = keys.get("type")
            if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
                fields.setdefault(kind.value, set()).update(set(keys) - {"type"})
    return fields


def model_fields() -> set[str]:
    """The keys of the dict `LoadedModel.describe` returns: one entry of `hello.models`."""
    for node in ast.walk(module_ast("plugin_bridge/models.py")):
        if isinstance(node, ast.FunctionDef) and node.name == "describe":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.Dict):
                    return {k.value for k in inner.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("LoadedModel.describe returns no dict literal")


def test_every_field_of_every_reply_is_named_in_its_row(doc):
    rows = table_rows(doc)
    fields = reply_fields()
    assert {"instance", "models", "default_model"} <= fields["hello"], "the parsing of hello's fields broke"
    for kind, names in fields.items():
        candidates = [" ".join(row[1:]) for row in rows if row and row[0] == f"`{kind}`"]
        assert any(all(f"`{name}`" in text for name in names) for text in candidates), \
            f"no table row for the reply `{kind}` names all its fields {sorted(names)}"
    documented = {row[0] for row in rows if row}
    for name in model_fields():
        assert f"`{name}`" in documented, f"hello.models[].{name} (models.py describe) has no row in section 3.5"


def heading_numbers(doc: str) -> dict[str, str]:
    """Section number -> heading text, for every `## N.` and `### N.M` heading."""
    return {m[1]: m[2] for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+)$", doc, re.M)}


def prose(doc: str) -> str:
    """The doc without fenced code blocks and inline code (examples, not references)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", doc, flags=re.M | re.S))


def test_every_section_reference_names_a_section_that_exists(doc):
    sections = heading_numbers(doc)
    assert {"1", "3.6", "6.4", "10"} <= set(sections), "the heading parser found too little"
    text = prose(doc)
    references = re.findall(r"\bsections? (\d+(?:\.\d+)?)", text)
    references += [number for pair in re.findall(r"\bsections (\d+(?:\.\d+)?) and (\d+(?:\.\d+)?)", text) for number in pair]
    assert len(references) > 20
    for number in references:
        assert number in sections, f"docs/protocol.md refers to section {number}, which does not exist"
    # A bare "(3.2)" would be a reference without the word; say "section 3.2" so this test sees it.
    bare = re.findall(r"\(((?:[1-9]|10)\.\d)\)", text)
    assert not bare, f"write bare references as 'section N.M': {bare}"
    for anchor in re.findall(r"\]\(#([^)]+)\)", doc):  # the contents line
        slugs = {re.sub(r"[^a-z0-9 -]", "", f"{n} {t}".lower()).replace(" ", "-") for n, t in sections.items()}
        assert anchor in slugs, f"the link #{anchor} matches no heading"


def hex_example(doc: str, address: str) -> tuple[str, str, int, bytes, list[tuple[int, int, str, str]]]:
    """The example block that starts with `address`: (tags, arguments text, stated size, the bytes of its
    hex lines, and its field lines as (offset, size, field, description))."""
    match = re.search(rf"^```\n({re.escape(address)} (,\w+) (.*?)\s+\((\d+) bytes\))\n(.*?)^```", doc, re.M | re.S)
    assert match, f"docs/protocol.md has no byte example starting with {address}"
    _, tags, arguments, size, body = match.groups()
    data = bytes.fromhex("".join(re.findall(r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} ?)+)", body, re.M)))
    names = "|".join(["address", "type tags", *map(re.escape, osc_messages.REPLIES[address][1])])
    fields = [(int(o), int(n), f, d) for o, n, f, d in re.findall(rf"^\s*(\d+)\s+(\d+)\s+({names})\s+(.+)$", body, re.M)]
    return tags, arguments, int(size), data, fields


@pytest.mark.parametrize("address", ["/segue/note", "/segue/done"])
def test_the_note_and_done_datagrams_in_the_doc_are_exact(doc, address):
    """The reply is rebuilt from the example's first line with the server's own encoder; its bytes,
    its size, and each field's offset, size and content must be what the doc shows."""
    import shlex
    import struct

    tags, arguments, size, data, fields = hex_example(doc, address)
    expected_tags, names = osc_messages.REPLIES[address]
    assert tags == "," + expected_tags
    convert = {"s": str, "i": int, "f": float}
    values = [convert[tag](text) for tag, text in zip(expected_tags, shlex.split(arguments), strict=True)]
    event = {"type": address[len(osc_messages.PREFIX):], **dict(zip(names, values, strict=True))}
    built = osc_messages.encode_reply(event)
    assert built == data, f"the hex of {address} in docs/protocol.md is not what encode_reply builds:\n{built.hex(' ')}"
    assert len(built) == size
    assert [f for _, _, f, _ in fields] == ["address", "type tags", *names], "the field lines do not list every field in order"
    offset = 0
    for field_offset, field_size, field, description in fields:
        assert field_offset == offset, f"{address} {field}: offset {field_offset} in the doc, {offset} in the bytes"
        raw = built[offset:offset + field_size]
        if field in ("address", "type tags"):
            text = address if field == "address" else tags
            assert raw == text.encode() + b"\0" * (field_size - len(text)) and f'"{text}"' in description
        else:
            tag = expected_tags[names.index(field)]
            if tag == "s":
                text = raw.rstrip(b"\0").decode()
                assert raw == text.encode() + b"\0" * (field_size - len(text.encode())) and f'"{text}"' in description
            elif tag == "i":
                assert field_size == 4 and description == f"int32 {struct.unpack('>i', raw)[0]}"
            else:
                assert field_size == 4 and description.startswith(f"float32 0x{raw.hex()} = {struct.unpack('>f', raw)[0]!r}")
        offset += field_size
    assert offset == len(built)


def test_the_chunk_overhead_in_the_doc_is_what_the_encoder_adds(doc):
    """Section 6.4's table, row by row, against /segue/continue/chunk datagrams built by the real encoder
    for every id length of the row and pieces of 1 to 12 bytes, as a string and as a blob."""
    rows = [row for row in table_rows(doc) if len(row) == 4 and re.fullmatch(r"\d+(–\d+)?", row[0])
            and re.fullmatch(r"\d+", row[1])]
    assert len(rows) >= 3, "the chunk overhead table of section 6.4 is missing"
    assert any(row[0].endswith("64") for row in rows), "the table must reach the longest id (64 characters)"
    for first_cell, header, string_extra, blob_extra in rows:
        low, _, high = first_cell.partition("–")
        for id_bytes in range(int(low), int(high or low) + 1):
            request_id = "c" * id_bytes
            head = len(osc_messages.build_message(osc_messages.CONTINUE_CHUNK, "isiis", [9100, request_id, 3, 4, ""])) - 4
            assert head == int(header), f"an id of {id_bytes} bytes: the header is {head} bytes, the doc says {header}"
            assert head == 44 + 4 * -(-(id_bytes + 1) // 4), "the formula in section 6.4"
            strings = {len(osc_messages.build_message(osc_messages.CONTINUE_CHUNK, "isiis", [9100, request_id, 3, 4, "x" * n]))
                       - head - n for n in range(1, 13)}
            blobs = {len(osc_messages.build_message(osc_messages.CONTINUE_CHUNK, "isiib", [9100, request_id, 3, 4, b"x" * n]))
                     - head - n for n in range(1, 13)}
            assert f"{min(strings)}–{max(strings)}" == string_extra and f"{min(blobs)}–{max(blobs)}" == blob_extra
