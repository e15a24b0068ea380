"""Optional CURVE authentication for ZeroMQ: allowed keys get in, plaintext and unknown keys never do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plugin_bridge.client import SegueClient, ServerUnreachable
from plugin_bridge.server import Server
from plugin_bridge.zmq_curve import CurveClient, CurveError, CurveServer, make_keys


@pytest.fixture
def keys(tmp_path) -> Path:
    folder = tmp_path / "keys"
    for name in ("server", "laptop", "stranger"):
        make_keys(name, folder)
    allowed = tmp_path / "clients"
    allowed.mkdir()
    (allowed / "laptop.key").write_bytes((folder / "laptop.key").read_bytes())
    return folder


@pytest.fixture
def curve_server(models_dir, tmp_path, keys):
    server = Server(models_dir, clips_dir=tmp_path / "clips", watch=False,
                    curve=CurveServer(keys / "server.key_secret", tmp_path / "clients")).start()
    yield server
    server.stop()


def client(server: Server, curve: CurveClient | None) -> SegueClient:
    assert server.zmq is not None
    return SegueClient(server.zmq.endpoint, timeout=5, connect_timeout=1.5, curve=curve)


def test_an_allowed_client_is_served(curve_server, keys):
    with client(curve_server, CurveClient(keys / "server.key", keys / "laptop.key_secret")) as allowed:
        assert allowed.hello()["protocol"] == 1
        events = list(allowed.continue_stream(_clip(), bars=1, seed=3))
        assert events[-1]["type"] == "finished"


@pytest.mark.parametrize("who", ["plaintext", "unknown key", "wrong server key"])
def test_plaintext_and_unknown_clients_never_get_a_connection(curve_server, keys, who):
    curve = {"plaintext": None,
             "unknown key": CurveClient(keys / "server.key", keys / "stranger.key_secret"),
             "wrong server key": CurveClient(keys / "stranger.key", keys / "laptop.key_secret")}[who]
    with client(curve_server, curve) as refused, pytest.raises(ServerUnreachable):
        refused.ping()
    # and the server goes on serving the allowed client
    with client(curve_server, CurveClient(keys / "server.key", keys / "laptop.key_secret")) as allowed:
        assert allowed.ping() >= 0


def test_bad_key_files_are_refused_in_a_sentence(keys, tmp_path):
    with pytest.raises(CurveError, match="only a public key"):
        CurveServer(keys / "server.key", tmp_path / "clients")
    with pytest.raises(CurveError, match="not a ZeroMQ key file"):
        (tmp_path / "junk").write_text("hello")
        CurveServer(tmp_path / "junk", tmp_path / "clients")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CurveError, match="no client public key"):
        CurveServer(keys / "server.key_secret", empty)


def test_segue_keys_and_the_command_line_options(tmp_path, models_dir):
    out = tmp_path / "k"
    made = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "keys", "server", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (out / "server.key").exists() and (out / "server.key_secret").stat().st_mode & 0o077 == 0  # private
    half = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(models_dir),
                           "--curve-secret", str(out / "server.key_secret")], capture_output=True, text=True, timeout=60)
    assert half.returncode == 1 and "--curve-clients" in half.stderr


def _clip() -> dict:
    from conftest import clip_payload

    return clip_payload(1)
