"""The ZeroMQ skin of the Service: one ROUTER socket, one I/O thread, JSON frames.

Wire format (docs/protocol.md has the full table): a client connects a DEALER socket and sends
one frame per request, a UTF-8 JSON object. The ROUTER sees `[identity, payload]` and every reply
goes back as `[identity, json]`, so one connection carries any number of streamed replies.

Why it is built this way:
- zmq sockets are not thread-safe, but the Service emits replies from its worker threads. Every
  reply (even the ones produced on the I/O thread, so their order is kept) goes into a queue, and
  a wake-up message on an inproc PAIR pipe (sent under a lock, the documented way to share a
  socket between threads) makes the I/O thread drain the queue onto the ROUTER.
- A client that goes away must free the engine at once. Two signals are used: a socket monitor
  reports EVENT_DISCONNECTED with the connection's file descriptor, and each request's frame
  carries the descriptor it arrived on (ZMQ_SRCFD), which maps a descriptor to an identity; and
  ROUTER_MANDATORY turns a reply to a vanished peer into EHOSTUNREACH instead of a silent drop.
  A client that stops reading fills its send high-water mark and is treated the same way.
- Nothing a client sends may stop the loop: bad frames are answered with `bad_request` and
  logged; a message over MAXMSGSIZE makes libzmq drop only that sender's connection.

    transport = ZmqTransport(service, port=5555); transport.start(); ...; transport.stop()
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from plugin_bridge import protocol
from plugin_bridge.service import Service

log = logging.getLogger("segue.zmq")

SEND_HWM = 20_000  # replies queued per client before it counts as "not reading" (a 64-bar x 16 stream fits)
RECV_HWM = 1_000  # requests queued per client before libzmq stops reading its connection
HANDSHAKE_MS = 2_000  # a connection that never completes the ZMTP handshake is dropped after this
HEARTBEAT_MS = 5_000  # ZMTP pings: a frozen or unplugged peer is disconnected after HEARTBEAT_TIMEOUT_MS
HEARTBEAT_TIMEOUT_MS = 15_000
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 30, 10, 3
POLL_MS = 500  # the loop also wakes this often to notice stop() even if a wake-up were lost
BATCH = 256  # requests read per turn before replies are flushed, so replies never starve
_REMEMBER_GONE = 1024  # identities logged as gone (identities are never reused, so this only bounds memory)

_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED


def client_name(identity: bytes) -> str:
    """The Service's name for a ZeroMQ peer: stable for one connection, safe in a file name."""
    return "zmq:" + identity.hex()


class ZmqTransport:
    """Serve `service` on a ROUTER socket bound to tcp://host:port (port 0 picks a free one)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, max_message: int = 1 << 20):
        self.service = service
        self.host = host
        self.requested_port = port
        self.max_message = max_message
        self._port: int | None = None
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._wake_rx: zmq.Socket | None = None
        self._wake_tx: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._outbox: queue.SimpleQueue[tuple[list[bytes], dict]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd_client: dict[int, bytes] = {}  # connection fd -> identity of the peer that sent on it
        self._client_fd: dict[bytes, int] = {}  # and back, so a stale entry never outlives a reconnect
        self._gone: OrderedDict[bytes, None] = OrderedDict()
        self._overflowed: OrderedDict[bytes, str | None] = OrderedDict()  # identity -> request whose replies are dropped
        self._srcfd_ok = True

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the ZeroMQ transport is not started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and start the I/O thread. Raises OSError naming the port when it cannot bind."""
        if self._thread is not None:
            raise RuntimeError("the ZeroMQ transport is already started")
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        try:
            self._configure(router)
            self._port = self._bind(router)
        except BaseException:
            router.close(linger=0)
            ctx.term()
            raise
        self._ctx, self._router = ctx, router
        self._monitor = router.get_monitor_socket(_MONITOR_EVENTS)
        address = f"inproc://segue-wake-{id(self):x}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.linger = 0
        self._wake_rx.bind(address)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.linger = 0
        self._wake_tx.connect(address)
        self._stopping.clear()
        self._wake_pending = False
        # The sockets move to the I/O thread here; Thread.start is the full memory barrier zmq asks for.
        self._thread = threading.Thread(target=self._loop, name="segue-zmq", daemon=True)
        self._thread.start()
        log.info("ZeroMQ transport listening on %s (max message %d bytes)", self.endpoint, self.max_message)

    def stop(self) -> None:
        """Stop the loop, close every socket without lingering and cancel the streams of our clients."""
        if self._thread is None:
            return
        self._stopping.set()
        with self._wake_lock:  # wake the loop even when a wake-up is already pending
            self._wake_tx.send(b"", zmq.NOBLOCK)
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # should not happen: the loop polls at most POLL_MS
            log.error("the ZeroMQ I/O thread did not stop within 5 s; destroying its sockets")
            self._ctx.destroy(linger=0)
        with self._wake_lock:
            self._wake_tx.close(linger=0)
            self._wake_tx = None
        self._ctx.term()
        self._thread = self._ctx = self._router = self._monitor = self._wake_rx = None
        for identity in set(self._fd_client.values()):
            self.service.client_gone(client_name(identity))
        self._fd_client.clear()
        self._client_fd.clear()
        log.info("ZeroMQ transport on port %s stopped", self._port)

    def __enter__(self) -> ZmqTransport:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _configure(self, router: zmq.Socket) -> None:
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        router.setsockopt(zmq.SNDHWM, SEND_HWM)
        router.setsockopt(zmq.RCVHWM, RECV_HWM)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        router.setsockopt(zmq.TCP_KEEPALIVE, 1)
        router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        router.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
        router.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)

    def _bind(self, router: zmq.Socket) -> int:
        try:
            if self.requested_port == 0:
                return router.bind_to_random_port(f"tcp://{self.host}")
            router.bind(f"tcp://{self.host}:{self.requested_port}")
            return self.requested_port
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"ZeroMQ port {self.requested_port} on {self.host} is already in use "
                                                f"(another `segue serve`?); choose another port") from exc
            raise OSError(exc.errno, f"cannot listen for ZeroMQ on {self.host}:{self.requested_port}: {exc}") from exc
        except zmq.ZMQBindError as exc:  # bind_to_random_port ran out of tries
            raise OSError(errno.EADDRINUSE, f"no free ZeroMQ port found on {self.host}: {exc}") from exc

    # --- replies from any thread ---------------------------------------------------------------------

    def _emitter(self, route: list[bytes]) -> Callable[[dict], None]:
        def emit(event: dict) -> None:
            self._outbox.put((route, event))
            self._wake()

        return emit

    def _wake(self) -> None:
        """At most one wake-up is ever in flight: the I/O thread clears the flag before it flushes,
        so a reply queued while the flag was still set is always in the queue it is about to flush."""
        with self._wake_lock:
            if self._wake_tx is None or self._wake_pending:  # stopped, or a flush is already due
                return
            self._wake_tx.send(b"", zmq.NOBLOCK)
            self._wake_pending = True

    # --- the I/O thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self._router, self._monitor, self._wake_rx):
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                try:
                    ready = dict(poller.poll(POLL_MS))
                    if self._wake_rx in ready:
                        with self._wake_lock:
                            self._drain(self._wake_rx)
                            self._wake_pending = False
                    self._read_monitor()
                    if self._router in ready:
                        self._read_requests()
                    self._flush()
                except zmq.ContextTerminated:  # stop() gave up waiting and destroyed the context
                    return
                except Exception:  # one bad turn must not end the server; log and keep serving
                    log.error("ZeroMQ loop error (still serving):\n%s", traceback.format_exc())
        finally:
            self._router.disable_monitor()
            for sock in (self._monitor, self._wake_rx, self._router):
                sock.close(linger=0)

    @staticmethod
    def _drain(sock: zmq.Socket) -> None:
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            sock.recv(zmq.NOBLOCK)

    def _read_monitor(self) -> None:
        """Handle every pending disconnect. Called before each request is mapped to its fd, because
        a closed fd number can be reused at once by a new connection: the monitor event for the old
        one is always queued before the new connection's first message, so draining first is exact."""
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] == zmq.EVENT_DISCONNECTED:
                identity = self._fd_client.pop(int(event["value"]), None)
                if identity is not None:
                    self._client_fd.pop(identity, None)
                    self._client_gone(identity, "disconnected")

    def _read_requests(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._read_monitor()
            self._remember_fd(frames[0])
            self._handle(frames)

    def _remember_fd(self, frame: zmq.Frame) -> None:
        if not self._srcfd_ok:
            return
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, ValueError) as exc:  # ZMQ_SRCFD is deprecated; a future libzmq may drop it
            self._srcfd_ok = False
            log.warning("this libzmq cannot tell which connection a message came on (%s); disconnects are noticed "
                        "only when a reply to the client fails", exc)
            return
        if fd < 0:
            return
        identity = frame.bytes
        previous = self._client_fd.get(identity)
        if previous is not None and previous != fd:  # a client that set its own routing id and reconnected
            self._fd_client.pop(previous, None)
        self._fd_client[fd] = identity
        self._client_fd[identity] = fd

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One ROUTER message -> the Service, or a bad_request reply saying what was wrong with it."""
        identity = frames[0].bytes
        route = [identity]
        if len(frames) == 3 and not frames[1].bytes:  # a REQ socket's envelope: answer it so REQ can read the error
            route = [identity, b""]
            self._reply_error(route, "this server streams several replies per request: connect a DEALER socket, not REQ")
            return
        if len(frames) != 2:
            self._reply_error(route, f"a request is exactly one frame holding a JSON object; this message had {len(frames) - 1}")
            return
        data = frames[1].bytes
        if not data:
            self._reply_error(route, "the request frame is empty; send a JSON object")
            return
        try:
            payload = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            self._reply_error(route, f"the request is not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        except (ValueError, RecursionError) as exc:
            self._reply_error(route, f"the request is not valid JSON ({str(exc)[:120]})")
            return
        self.service.handle(client_name(identity), payload, self._emitter(route))

    def _reply_error(self, route: list[bytes], message: str) -> None:
        log.warning("bad request from %s: %s", client_name(route[0]), message)
        self._outbox.put((route, protocol.error_event(None, protocol.BAD_REQUEST, message)))

    def _flush(self) -> None:
        """Send every queued reply, in the order the Service emitted them."""
        while True:
            try:
                route, event = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                data = json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:  # a Service bug: tell the client instead of dropping the reply
                log.error("cannot encode reply %r: %s", event, exc)
                data = json.dumps(protocol.error_event(event.get("id"), protocol.INTERNAL,
                                                       "the server produced a reply it could not encode")).encode("utf-8")
            if self._overflowed.get(route[0]) == event.get("id"):
                continue  # the rest of a stream already cut short: a gap in the middle would be worse than no tail
            try:
                self._router.send_multipart([*route, data], zmq.NOBLOCK)
            except zmq.Again:
                self._overflowed[route[0]] = event.get("id")
                if len(self._overflowed) > _REMEMBER_GONE:
                    self._overflowed.popitem(last=False)
                self._client_gone(route[0], f"not reading its replies ({SEND_HWM} queued)")
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                self._client_gone(route[0], "unreachable (it went away)")

    def _client_gone(self, identity: bytes, why: str) -> None:
        """Free the engine for this peer; log the first time only (its later replies fail the same way)."""
        client = client_name(identity)
        self.service.client_gone(client)
        if identity in self._gone:
            log.debug("client %s still gone: %s", client, why)
            return
        self._gone[identity] = None
        if len(self._gone) > _REMEMBER_GONE:
            self._gone.popitem(last=False)
        log.info("client %s %s; its request (if any) is cancelled", client, why)


def _reject_constant(name: str) -> float:
    """JSON has no NaN or Infinity; Python's json accepts them, the protocol does not."""
    raise ValueError(f"{name} is not a JSON number")
