"""OSC over UDP: the transport for shells that live inside a host (JUCE plugin, Live, Max, REAPER).

    transport = OscTransport(service, port=9000).start()   # binds 127.0.0.1:9000
    ...
    transport.stop()

Thin by design (docs/ARCHITECTURE.md): receive a datagram, guard it, parse it, call
`Service.handle`, send the replies. It owns a plain UDP socket and one receive thread instead of
python-osc's servers, because those servers hang on a 20-byte bundle, sleep until a bundle's
timetag, let `UnicodeDecodeError` escape and cut datagrams at 8192 bytes (../shared/guide/RELIABILITY.md).
Here every datagram is read by `osc_guard.read_datagram`, which refuses what python-osc would choke
on and returns the messages it walked (python-osc only builds the replies), bundle timetags
are ignored (contents act at once; the server never sleeps), and each datagram and each message
is handled inside its own try so that one bad packet costs one error reply and one log line.

Every request names its reply port, so a client that cannot choose its source port (JUCE's
OSCSender, Max's udpsend) still gets its replies: they go to (sender host, reply_port) from a
separate send socket, so send errors can never disturb the receive loop. The service's identity
for the client is `osc:<host>:<reply_port>`. The address table is in docs/protocol.md and
`osc_messages.py`.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from plugin_bridge import osc_messages as msgs
from plugin_bridge import protocol
from plugin_bridge.osc_chunks import ChunkAssembler, ChunkError, ChunkIgnored, UploadLimits
from plugin_bridge.osc_guard import OscGuardError, OscReceived, peek_head, read_datagram

log = logging.getLogger("segue.osc")

UDP_MAX_PAYLOAD = 65507  # IPv4: 65535 - 8 (UDP header) - 20 (IP header)
_RECV_BUFFER = 65536  # larger than any UDP payload, so the kernel never cuts a datagram silently
_POLL_S = 0.2  # how often the receive loop looks at its stop flag and at stalled uploads


class ServiceLike(Protocol):
    def handle(self, client: str, payload: object, emit: Callable[[dict], None]) -> None: ...

    def handle_bytes(self, client: str, raw: bytes, decode: Callable[[bytes], object], emit: Callable[[dict], None],
                     request_id: str | None = None) -> None: ...


Emit = Callable[[dict], None]
Dest = tuple[str, int]


class _Throttle:
    """At most `limit` log lines per `window_s` for one noisy cause (a flood of garbage must not flood the log)."""

    def __init__(self, limit: int = 20, window_s: float = 10.0, what: str = "refused datagrams"):
        self.limit, self.window_s, self.what = limit, window_s, what
        self._start, self._count, self._suppressed = 0.0, 0, 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._start > self.window_s:
                if self._suppressed:
                    log.warning("%d more %s were not logged in the last %.0f s", self._suppressed, self.what, self.window_s)
                self._start, self._count, self._suppressed = now, 0, 0
            self._count += 1
            if self._count > self.limit:
                self._suppressed += 1
                return False
            return True


class OscTransport:
    """Serve `service` over OSC/UDP on host:port (127.0.0.1 by default; port 0 picks a free one)."""

    def __init__(self, service: ServiceLike, host: str = "127.0.0.1", port: int = 0, max_datagram: int = 65000,
                 upload_limits: UploadLimits | None = None):
        if not 64 <= max_datagram <= UDP_MAX_PAYLOAD:
            raise ValueError(f"max_datagram must be between 64 and {UDP_MAX_PAYLOAD} bytes, not {max_datagram}")
        self.service = service
        self.host = host
        self.requested_port = port
        self.max_datagram = max_datagram
        self._uploads = ChunkAssembler(upload_limits)
        self._uploads_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._send_sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._refusals = _Throttle()
        self._send_failures = _Throttle(limit=5, what="failed sends")
        self._emit_failures = _Throttle(limit=5, what="failed replies")
        self._expiries = _Throttle(limit=10, what="expired uploads")
        # address -> (argument names, handler); the argument count is checked before the handler runs
        self._handlers: dict[str, tuple[str, Callable[[str, Dest, str, list, Emit], None]]] = {
            msgs.PING: ("reply_port id", self._on_ping),
            msgs.HELLO: ("reply_port id", self._on_hello),
            msgs.CANCEL: ("reply_port id", self._on_cancel),
            msgs.CONTINUE: ("reply_port id json", self._on_continue),
            msgs.CONTINUE_CHUNK: ("reply_port id index count data", self._on_chunk),
            msgs.PREPARE: ("reply_port id json", self._on_prepare),
            msgs.PREPARE_CHUNK: ("reply_port id index count data", self._on_prepare_chunk),
        }

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> OscTransport:
        """Bind the UDP port and start the receive thread. Raises OSError naming the port if it is taken."""
        if self._thread is not None:
            raise RuntimeError("this OSC transport is already started")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self.requested_port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as exc:
            raise OSError(exc.errno, f"cannot listen for OSC on {self.host!r}: the address does not resolve ({exc})") from exc
        sock = socket.socket(family, socket.SOCK_DGRAM)
        # Deliberately neither SO_REUSEADDR nor SO_REUSEPORT: two servers on one UDP port would each get
        # a random share of the requests. On Windows ask for exclusive use, so no other program can join.
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise OSError(exc.errno, f"UDP port {self.requested_port} on {self.host} is already in use "
                                         "(another Segue server or OSC program?); stop it or choose another port") from exc
            raise OSError(exc.errno, f"cannot listen for OSC on {self.host} UDP port {self.requested_port}: "
                                     f"{exc.strerror or exc}") from exc
        try:  # a burst of chunks must not overflow the kernel buffer; best effort (the OS may cap it)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        except OSError as exc:
            log.debug("could not enlarge the OSC receive buffer: %s", exc)
        sock.settimeout(_POLL_S)
        send_sock = self._reply_socket(family, sockaddr)
        self._sock, self._send_sock = sock, send_sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._receive_loop, name=f"segue-osc-{self.port}", daemon=True)
        self._thread.start()
        log.info("OSC listening on %s UDP port %d (datagrams up to %d bytes)", self.host, self.port, self.max_datagram)
        return self

    @staticmethod
    def _reply_socket(family: int, listen_address: tuple) -> socket.socket:
        """The socket replies leave from: bound at once to the listening address's host (loopback by
        default) on a free port. Left unbound, the first `sendto` would bind it to every interface, open
        to datagrams from anywhere that nobody reads; bound here, it takes only what the listener would,
        with the smallest receive buffer, and the receive loop discards whatever arrives (`_drain_replies`)."""
        send_sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            send_sock.bind((listen_address[0], 0, *listen_address[2:]))
            send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel rounds up to its minimum
        except OSError:
            send_sock.close()
            raise
        send_sock.settimeout(1.0)
        return send_sock

    def _drain_replies(self) -> None:
        """Discard datagrams sent to the reply socket: no client should send there, and unread they would
        sit in kernel memory. Reads only while select() says one is waiting (Python waits out a timed
        socket's timeout before any recv, MSG_DONTWAIT or not), so the receive loop never blocks here."""
        send_sock = self._send_sock
        if send_sock is None:
            return
        try:
            for _ in range(1024):  # bounded: a flood cannot keep the receive loop here
                if not select.select([send_sock], [], [], 0)[0]:
                    return
                send_sock.recv(1)  # this thread is the only reader, so a waiting datagram is still there
        except (OSError, ValueError):  # closed by stop(), or a queued ICMP error: nothing to keep
            return

    @property
    def port(self) -> int:
        """The UDP port actually bound (useful with port=0)."""
        if self._sock is None:
            raise RuntimeError("the OSC transport is not started")
        return self._sock.getsockname()[1]

    def stop(self) -> None:
        """Stop receiving, join the receive thread and close both sockets. Safe to call twice.

        Invariant: when stop() returns both sockets are closed, even if waking or joining the
        thread failed; a reply emitted afterwards is dropped by `_send`, never raised."""
        self._stop.set()
        try:
            if self._thread is not None and self._sock is not None and self._send_sock is not None:
                try:  # wake the receive loop now instead of at its next poll
                    self._send_sock.sendto(b"", self._sock.getsockname())
                except OSError as exc:  # it wakes within _POLL_S anyway
                    log.debug("could not wake the OSC receive loop: %s", exc)
            if self._thread is not None:
                self._thread.join(timeout=5)
                if self._thread.is_alive():
                    log.error("the OSC receive thread did not stop within 5 s")
        finally:
            self._thread = None
            sock, self._sock = self._sock, None
            try:
                if sock is not None:
                    sock.close()
            finally:
                with self._send_lock:  # a reply being sent right now finishes first; later ones find None
                    send_sock, self._send_sock = self._send_sock, None
                    if send_sock is not None:
                        send_sock.close()

    def __enter__(self) -> OscTransport:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- receiving ---------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        next_expiry = time.monotonic() + _POLL_S
        while not self._stop.is_set():
            if time.monotonic() >= next_expiry:
                self._expire_uploads()
                self._drain_replies()
                next_expiry = time.monotonic() + _POLL_S
            try:
                data, sender = sock.recvfrom(_RECV_BUFFER)
            except TimeoutError:
                continue
            except ConnectionResetError:  # Windows reports an earlier ICMP "port unreachable" here
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("OSC receive failed: %s; still listening", exc)
                time.sleep(0.05)
                continue
            if self._stop.is_set():
                return
            self.handle_datagram(data, sender)

    def handle_datagram(self, data: bytes, sender: tuple) -> None:
        """Act on one received datagram from `sender` (host, port, ...). Never raises."""
        try:
            self._datagram(data, sender)
        except Exception:  # a bug here must cost one packet, never the receive loop
            log.exception("internal error on a datagram from %s; the server keeps running", sender[:2])

    def _datagram(self, data: bytes, sender: tuple) -> None:
        if len(data) > self.max_datagram:
            self._refuse(data, sender, protocol.TOO_LARGE,
                         f"the datagram is {len(data)} bytes; at most {self.max_datagram} are accepted. "
                         f"Send large clips in pieces with {msgs.CONTINUE_CHUNK}")
            return
        try:
            messages = read_datagram(data, self.max_datagram)
        except OscGuardError as exc:
            self._refuse(data, sender, protocol.BAD_REQUEST, f"malformed OSC packet: {exc.reason}")
            return
        for message in messages:
            try:
                self._message(message, sender)
            except Exception:
                log.exception("internal error on %s from %s", message.address, sender[:2])

    def _refuse(self, data: bytes, sender: tuple, code: str, message: str) -> None:
        """Log a refused datagram and, when its head names a reply port, tell the client why."""
        head = peek_head(data)
        if self._refusals.allow():
            log.warning("refused a %d-byte datagram from %s: %s", len(data), sender[:2], message)
        if head is not None:
            _, reply_port, request_id = head
            self._emitter((sender[0], reply_port))(protocol.error_event(request_id, code, message))

    def _message(self, message: OscReceived, sender: tuple) -> None:
        args = list(message.params)
        reply_port = _as_int(args[0]) if args else None
        if reply_port is None or not 1 <= reply_port <= 65535:
            if self._refusals.allow():
                log.warning("dropped %s from %s: its first argument must be the reply port (int 1..65535)",
                            message.address, sender[:2])
            return
        dest: Dest = (sender[0], reply_port)
        client = f"osc:{sender[0]}:{reply_port}"
        emit = self._emitter(dest)
        request_id = args[1] if len(args) > 1 and isinstance(args[1], str) and len(args[1]) <= protocol.MAX_ID_LENGTH else ""
        try:
            entry = self._handlers.get(message.address)
            if entry is None:
                raise protocol.ProtocolError(protocol.UNKNOWN_TYPE, f"unknown OSC address {message.address!r} "
                                             f"(known: {', '.join(sorted(self._handlers))})")
            names, handler = entry
            request_id = _id_arg(message.address, args)
            if len(args) != len(names.split()):
                raise protocol.ProtocolError(protocol.BAD_REQUEST, f"{message.address} takes {len(names.split())} "
                                             f"arguments ({names}), not {len(args)}", request_id)
            handler(client, dest, request_id, args, emit)
        except protocol.ProtocolError as exc:
            emit(protocol.error_event(exc.request_id or request_id, exc.code, exc.message))
        except Exception as exc:
            log.exception("internal error on %s from %s", message.address, client)
            emit(protocol.error_event(request_id, protocol.INTERNAL, f"the server hit an internal error ({type(exc).__name__})"))

    # --- handlers: (client, dest, request_id, args, emit) ------------------------------------------

    def _on_ping(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        self.service.handle(client, {"type": "ping", "id": request_id}, emit)

    def _on_hello(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        self.service.handle(client, {"type": "hello", "id": request_id}, emit)

    def _on_cancel(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        with self._uploads_lock:
            dropped = self._uploads.cancel(client, request_id or None)
        for upload_id in dropped:
            emit(protocol.cancelled_event(upload_id))
        if not (dropped and request_id):  # the request was not an unfinished upload: let the service cancel it
            self.service.handle(client, {"type": "cancel", "id": request_id}, emit)

    def _on_continue(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        self._submit(client, request_id, _payload_bytes(args[2], "json"), emit)

    def _on_prepare(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        self._submit(client, request_id, _payload_bytes(args[2], "json"), emit, "prepare")

    def _on_prepare_chunk(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit) -> None:
        self._on_chunk(client, dest, request_id, args, emit, "prepare")

    def _on_chunk(self, client: str, dest: Dest, request_id: str, args: list, emit: Emit, kind: str = "continue") -> None:
        index, count = _as_int(args[2]), _as_int(args[3])
        if index is None or count is None:
            raise protocol.ProtocolError(protocol.BAD_REQUEST, "chunk index and count must be integers", request_id)
        data = _payload_bytes(args[4], "data")
        try:
            with self._uploads_lock:
                payload, received = self._uploads.add(client, request_id, index, count, data, dest)
        except ChunkError as exc:
            raise protocol.ProtocolError(exc.code, exc.message, request_id) from None
        except ChunkIgnored as exc:
            log.debug("ignored %s from %s", exc, client)
            return
        self._send(msgs.chunk_ack(request_id, index, received, count), dest)
        if payload is not None:  # the address of the last chunk decides what the upload was
            self._submit(client, request_id, payload, emit, kind)

    def _submit(self, client: str, request_id: str, raw: bytes, emit: Emit, kind: str = "continue") -> None:
        """A complete continue (or prepare) request, one message or reassembled chunks -> the service, which
        decodes it by the protocol's rules (the same JSON rules as ZeroMQ: no NaN, no Infinity) here if it is
        small, else on its intake thread; a bad body is answered with an error either way."""
        address = msgs.PREPARE if kind == "prepare" else msgs.CONTINUE
        self.service.handle_bytes(client, raw, lambda data: protocol.decode_osc_continue(data, request_id, address, kind),
                                  emit, request_id)

    def _expire_uploads(self) -> None:
        with self._uploads_lock:
            expired = self._uploads.expire()
        for upload in expired:
            if self._expiries.allow():
                log.warning("dropped the unfinished upload %r from %s: %d of %d chunks, silent for %.0f s",
                            upload.request_id, upload.client, upload.received, upload.count, self._uploads.limits.timeout_s)
            self._emitter(upload.dest)(protocol.error_event(
                upload.request_id, protocol.BAD_REQUEST,
                f"the upload stopped after {upload.received} of {upload.count} chunks and was dropped "
                f"after {self._uploads.limits.timeout_s:g} s without a chunk; send it again"))

    # --- sending -----------------------------------------------------------------------------------

    def _emitter(self, dest: Dest) -> Emit:
        """The `emit` the service calls (from worker threads) for replies to `dest`. Never raises:
        an exception here would land in a worker thread that can do nothing about it, so anything
        that goes wrong (even after stop()) costs that one reply and a rate-limited log line."""

        def emit(event: dict) -> None:
            try:
                data = msgs.encode_reply(event)
                if data is not None:
                    self._send(data, dest)
            except Exception:
                if self._emit_failures.allow():
                    log.exception("could not send the reply %.200r to %s", event, dest)

        return emit

    def _send(self, data: bytes, dest: Dest) -> None:
        """Send one datagram; failures (client gone, buffer full) are logged, never raised."""
        try:
            with self._send_lock:  # stop() closes the socket under this lock, so it is never closed mid-send
                sock = self._send_sock
                if sock is None:
                    log.debug("reply to %s after the transport stopped; dropped", dest)
                    return
                sock.sendto(data, dest)
        except OSError as exc:
            if self._send_failures.allow():
                log.warning("could not send a reply to %s:%s (%s)", dest[0], dest[1], exc)


def _as_int(value: Any) -> int | None:
    """An OSC integer argument: int32/int64, or a float with no fraction (Pd and some Max objects send floats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _id_arg(address: str, args: list) -> str:
    if len(args) < 2:
        raise protocol.ProtocolError(protocol.BAD_REQUEST, f"{address} needs the reply port and a request id")
    value = args[1]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > protocol.MAX_ID_LENGTH:
        raise protocol.ProtocolError(protocol.BAD_REQUEST, f"the request id (argument 2 of {address}) must be a string "
                                     f"of at most {protocol.MAX_ID_LENGTH} characters")
    return value


def _payload_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise protocol.ProtocolError(protocol.BAD_REQUEST, f"{name} must be a string (or a blob of UTF-8 bytes)")
