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
