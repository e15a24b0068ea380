"""Load figures for `segue serve`: many clients at once, a client that never reads, connection churn and
floods, each followed by another client's ping. Prints a Markdown table for docs/reliability.md.

    python bench/load_server.py --models models            # the shipped default model
    python bench/load_server.py --models /tmp/tiny/models --clients 20 --variations 4

The server runs in this process (`Server`, both transports on 127.0.0.1, the real Service and model);
the clients are real ZeroMQ and UDP sockets. Server memory is this process's resident set (Linux
/proc/self/status), read before and after each case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from plugin_bridge.client import SegueClient  # noqa: E402
from plugin_bridge.server import Server  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def clip(bars: int = 4) -> dict:
    from conftest import clip_payload

    return clip_payload(bars)


def ping_ms(endpoint: str) -> float:
    with SegueClient(endpoint, timeout=5) as client:
        client.ping()  # connects
        started = time.perf_counter()
        client.ping()
        return (time.perf_counter() - started) * 1000


def notes_of(events: list[dict]) -> list[tuple]:
    return sorted((e["variation"], e["pitch"], e["start"], e["duration"]) for e in events if e["type"] == "note")


def many_clients(endpoint: str, clients: int, variations: int) -> str:
    """All at once, each with its own seed; then each seed alone: the notes must be the same."""
    results: dict[int, list[tuple]] = {}
    errors: list[str] = []

    def run(seed: int) -> None:
        try:
            with SegueClient(endpoint, timeout=120) as client:
                events = list(client.continue_stream(clip(), bars=4, variations=variations, seed=seed))
                results[seed] = notes_of(events)
        except Exception as exc:
            errors.append(f"{seed}: {exc}")

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = time.perf_counter() - started
    same = 0
    for seed in range(0, clients, max(1, clients // 5)):  # a fifth of them again, alone
        with SegueClient(endpoint, timeout=120) as client:
            same += notes_of(list(client.continue_stream(clip(), bars=4, variations=variations, seed=seed))) == results.get(seed)
    checked = len(range(0, clients, max(1, clients // 5)))
    return (f"{len(results)} of {clients} completed in {together:.1f} s, {len(errors)} errors; "
            f"{same} of {checked} identical to the same seed run alone")


def never_reads(endpoint: str, requests: int) -> str:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    before = rss_mb()
    for n in range(requests):
        sock.send(json.dumps({"type": "continue", "id": f"x{n}", "model": "m" * 64, "clip": clip(1)}).encode())
    time.sleep(2)
    during = ping_ms(endpoint)
    after = rss_mb()
    sock.close()
    return f"{requests:,} requests, no reads: RSS {before:.0f} -> {after:.0f} MB; another client's ping {during:.1f} ms"


def churn(endpoint: str, cycles: int) -> str:
    before = open_fds()
    ctx = zmq.Context.instance()
    for _ in range(cycles):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        sock.send(b'{"type":"ping","id":"c"}')
        sock.poll(2000)
        sock.close()
    time.sleep(1)
    return f"{cycles:,} connect-ping-close cycles: open descriptors {before} -> {open_fds()}"


def osc_flood(port: int, datagrams: int) -> str:
    rng = random.Random(0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(datagrams):
            sock.sendto(rng.randbytes(rng.randint(0, 512)), ("127.0.0.1", port))
    return f"{datagrams:,} random datagrams"


def zmq_flood(endpoint: str, frames: int) -> str:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    rng = random.Random(1)
    for n in range(frames):
        sock.send_multipart([rng.randbytes(rng.randint(0, 200)) for _ in range(1 + n % 3)])
    sock.close()
    return f"{frames:,} malformed messages"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--variations", type=int, default=4)
    args = parser.parse_args()
    server = Server(args.models, workers=2, watch=False).start()
    assert server.zmq is not None and server.osc is not None
    endpoint = server.zmq.endpoint
    rows = []
    try:
        cases = [
            ("20 clients x 4 variations at once", lambda: many_clients(endpoint, args.clients, args.variations)),
            ("a client that never reads", lambda: never_reads(endpoint, 20_000)),
            ("connection churn", lambda: churn(endpoint, 2_000)),
            ("OSC flood", lambda: osc_flood(server.osc.port, 100_000)),
            ("ZeroMQ flood", lambda: zmq_flood(endpoint, 10_000)),
        ]
        for name, case in cases:
            started = time.perf_counter()
            outcome = case()
            pings = [ping_ms(endpoint) for _ in range(5)]
            rows.append((name, outcome, time.perf_counter() - started, statistics.median(pings), max(pings)))
    finally:
        server.stop()
    print("| case | outcome | took (s) | ping after, median / max (ms) |")
    print("|---|---|---|---|")
    for name, outcome, took, median, worst in rows:
        print(f"| {name} | {outcome} | {took:.1f} | {median:.1f} / {worst:.1f} |")
    print(f"\nserver RSS at the end: {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
