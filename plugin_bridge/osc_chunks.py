"""Reassembly of continue requests that arrive in numbered chunks over UDP.

A clip's JSON can be larger than one datagram (and much larger than the 9216 bytes macOS lets a
program send by default), so clients split it: `/segue/continue/chunk reply_port id index count data`.
This module holds the partial uploads, keyed by (client, request id), and is strict about limits,
because every byte it holds was sent by someone else: total size, number of chunks, uploads per
client, bytes held overall, and a timeout after which a stalled upload is dropped. It is pure
bookkeeping with an injectable clock (no sockets, no threads) so it can be tested exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn


@dataclass(frozen=True)
class UploadLimits:
    """Limits on chunked uploads (documented in docs/protocol.md)."""

    max_bytes: int = 1024 * 1024  # one request's JSON, all chunks together
    max_chunks: int = 1024
    timeout_s: float = 10.0  # since the upload's last chunk
    max_per_client: int = 4  # unfinished uploads one client may have at once
    max_uploads: int = 64  # unfinished uploads of all clients together (one process can open thousands of reply ports)
    max_total_bytes: int = 16 * 1024 * 1024  # held for all clients together


class ChunkError(ValueError):
    """A chunk that cannot be accepted; `code` is a protocol error code. The upload is dropped."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ChunkIgnored(Exception):
    """A late chunk of an upload that was already refused or expired: its client has been told once."""


@dataclass
class Upload:
    count: int
    dest: Any  # where replies for this upload go (opaque to this module)
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    last_seen: float = 0.0


@dataclass(frozen=True)
class Expired:
    client: str
    request_id: str
    received: int
    count: int
    dest: Any


class ChunkAssembler:
    """Collects chunks per (client, request id) and returns the whole payload when the last one arrives.

    An upload that was refused or expired leaves a marker for `timeout_s`: chunks of it that were
    already in flight (any index but 0) are then ignored quietly instead of starting a new upload
    that could only expire with a second, confusing error. Index 0 always starts afresh, so a
    client that reuses its ids can send a corrected request at once.
    """

    MAX_MARKERS = 1024

    def __init__(self, limits: UploadLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or UploadLimits()
        self._clock = clock
        self._uploads: dict[tuple[str, str], Upload] = {}
        self._per_client: dict[str, int] = {}  # unfinished uploads per client: counted, never scanned
        self._refused: dict[tuple[str, str], float] = {}  # key -> when its marker lapses (insertion-ordered)
        self._held = 0

    def add(self, client: str, request_id: str, index: int, count: int, data: bytes,
            dest: Any = None) -> tuple[bytes | None, int]:
        """Store one chunk. Returns (the whole payload or None, chunks received so far).

        Raises `ChunkError` (and forgets the upload) for a chunk that breaks the rules, and
        `ChunkIgnored` for a late chunk of an upload already refused. A chunk that repeats one
        already stored with the same bytes is a retransmission and is accepted quietly.
        """
        limits = self.limits
        key = (client, request_id)
        now = self._clock()
        if key in self._refused:
            if index != 0 and self._refused[key] > now:
                raise ChunkIgnored(f"chunk {index} of the refused upload {request_id!r}")
            del self._refused[key]
        if not request_id:
            raise ChunkError("bad_request", "a chunked continue request needs an id")
        if count < 1:
            self._refuse(key, "bad_request", f"chunk count must be at least 1, not {count}")
        if count > limits.max_chunks:
            self._refuse(key, "too_large", f"an upload may have at most {limits.max_chunks} chunks, not {count}")
        if not 0 <= index < count:
            self._refuse(key, "bad_request", f"chunk index {index} is out of range for {count} chunks (0..{count - 1})")
        upload = self._uploads.get(key)
        if upload is None:
            pending = self._per_client.get(client, 0)
            if pending >= limits.max_per_client:
                self._refuse(key, "busy", f"this client already has {pending} unfinished uploads; finish or cancel "
                             f"one first (unfinished uploads expire after {limits.timeout_s:g} s)")
            if len(self._uploads) >= limits.max_uploads:
                self._refuse(key, "busy", f"the server is holding {len(self._uploads)} unfinished uploads, its limit; "
                             "try again in a moment")
            upload = self._uploads[key] = Upload(count, dest)
            self._per_client[client] = pending + 1
        if upload.count != count:
            self._refuse(key, "bad_request", f"chunk {index} says {count} chunks but the upload started with {upload.count}")
        if index in upload.parts:
            if upload.parts[index] != data:
                self._refuse(key, "bad_request", f"chunk {index} arrived twice with different data")
            upload.last_seen = now
            return None, len(upload.parts)
        if upload.size + len(data) > limits.max_bytes:
            self._refuse(key, "too_large", f"the chunked request is over {limits.max_bytes} bytes; "
                         "send fewer or shorter notes")
        if self._held + len(data) > limits.max_total_bytes:
            self._refuse(key, "busy", "the server is holding too many unfinished uploads; try again in a moment")
        upload.parts[index] = data
        upload.size += len(data)
        upload.last_seen = now
        upload.dest = dest
        self._held += len(data)
        if len(upload.parts) < count:
            return None, len(upload.parts)
        payload = b"".join(upload.parts[i] for i in range(count))
        self._drop(key)
        return payload, count

    def cancel(self, client: str, request_id: str | None) -> list[str]:
        """Forget this client's unfinished upload with `request_id` (all of them when None). Returns the ids dropped."""
        keys = [k for k in self._uploads if k[0] == client and (request_id is None or k[1] == request_id)]
        for key in keys:
            self._drop(key)
        return [k[1] for k in keys]

    def expire(self) -> list[Expired]:
        """Drop uploads that have been silent longer than the timeout; return them so their clients can be told."""
        now = self._clock()
        stale = [(k, u) for k, u in self._uploads.items() if now - u.last_seen > self.limits.timeout_s]
        for key, _ in stale:
            self._drop(key)
            self._mark(key, now)
        self._refused = {k: t for k, t in self._refused.items() if t > now}
        return [Expired(k[0], k[1], len(u.parts), u.count, u.dest) for k, u in stale]

    @property
    def pending(self) -> int:
        return len(self._uploads)

    @property
    def held_bytes(self) -> int:
        return self._held

    def _refuse(self, key: tuple[str, str], code: str, message: str) -> NoReturn:
        self._drop(key)
        self._mark(key, self._clock())
        raise ChunkError(code, message)

    def _mark(self, key: tuple[str, str], now: float) -> None:
        self._refused.pop(key, None)
        self._refused[key] = now + self.limits.timeout_s
        while len(self._refused) > self.MAX_MARKERS:
            del self._refused[next(iter(self._refused))]

    def _drop(self, key: tuple[str, str]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            self._held -= upload.size
            left = self._per_client[key[0]] - 1
            if left:
                self._per_client[key[0]] = left
            else:
                del self._per_client[key[0]]
