"""`segue serve` as a musician starts it: both transports up, clients served, clear refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import clip_payload

from plugin_bridge.client import SegueClient
from plugin_bridge.osc_client import OscClient


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(process: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("segue serving"):
            return line
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read()}")
    raise AssertionError("server did not come up")


def test_serve_answers_both_transports_and_stops_cleanly(models_dir, tmp_path):
    zmq_port, osc_port = free_port(), free_port(socket.SOCK_DGRAM)
    process = serve("--models", models_dir, "--zmq-port", zmq_port, "--osc-port", osc_port, "--clips-dir", tmp_path / "clips")
    try:
        banner = wait_ready(process)
        assert f"127.0.0.1:{zmq_port}" in banner and f"127.0.0.1:{osc_port}" in banner and "default" in banner
        with SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=30) as client:
            assert client.hello()["models"][0]["name"] == "default"
            events = list(client.continue_stream(clip_payload(), bars=2, variations=2, seed=4))
            assert events[-1]["type"] == "finished"
            paths = [e["path"] for e in events if e["type"] == "done"]
            assert len(paths) == 2 and all(os.path.exists(p) and p.startswith(str(tmp_path / "clips")) for p in paths)
        with OscClient("127.0.0.1", osc_port, timeout=30) as osc:
            assert osc.request("ping")["type"] == "pong"
            request_id = osc.continue_clip({"clip": clip_payload(), "bars": 1, "seed": 2})
            replies = list(osc.stream(request_id))
            assert replies[-1]["type"] == "finished" and any(r["type"] == "note" for r in replies)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    # One log line per request: client, model, bars, time to first note, total.
    lines = [line for line in err.splitlines() if "first_note_ms=" in line]
    assert len(lines) == 2 and all("model=default" in line and "total_ms=" in line for line in lines)


def test_port_in_use_is_a_clear_refusal(models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", "--models", str(models_dir),
                                 "--zmq-port", str(port), "--osc-port", str(free_port(socket.SOCK_DGRAM)),
                                 "--clips-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"port {port}" in result.stderr and "already in use" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--allow-remote"),
    (["--models", "/nonexistent/models"], "no usable model"),
])
def test_refusals(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", "--clips-dir", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_tampered_folder_dropped_in_is_refused_while_serving(models_dir, tiny_model, tmp_path):
    import shutil

    zmq_port = free_port()
    process = serve("--models", models_dir, "--zmq-port", zmq_port, "--osc-port", free_port(socket.SOCK_DGRAM),
                    "--clips-dir", tmp_path / "clips")
    try:
        wait_ready(process)
        staged = tmp_path / "bad"
        shutil.copytree(tiny_model, staged)
        data = bytearray((staged / "model.onnx").read_bytes())
        data[1000] ^= 0xFF
        (staged / "model.onnx").write_bytes(bytes(data))
        shutil.move(staged, models_dir / "evil")
        time.sleep(2.5)  # the watcher polls every second
        with SegueClient(f"tcp://127.0.0.1:{zmq_port}", timeout=30) as client:
            assert [m["name"] for m in client.hello()["models"]] == ["default"]
            assert list(client.continue_stream(clip_payload(), bars=1, seed=1))[-1]["type"] == "finished"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert "model evil refused" in err and "model.onnx does not match the sha256" in err
    assert json.loads((models_dir / "default" / "manifest.json").read_text())["parity"]["passed"]
