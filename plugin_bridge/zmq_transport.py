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
- Stopping cannot leak: the loop checks a stopping flag at least every POLL_MS, so the wake-up
  stop() sends is only a nudge (the loop may already have closed its end: zmq.Again is expected);
  the join and the closing of every socket and the context run in `finally`. The `emit` handed to
  the Service never raises into its worker threads, before, during or after stop().

    transport = ZmqTransport(service, port=5555); transport.start(); ...; transport.stop()
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from plugin_bridge import protocol
from plugin_bridge.service import Service
from plugin_bridge.zmq_curve import CurveServer

log = logging.getLogger("segue.zmq")

SEND_HWM = 20_000  # replies queued per client before it counts as "not reading" (a 64-bar x 16 stream fits)
RECV_HWM = 1_000  # requests queued per client before libzmq stops reading its connection
HANDSHAKE_MS = 2_000  # a connection that never completes the ZMTP handshake is dropped after this
HEARTBEAT_MS = 5_000  # ZMTP pings: a frozen or unplugged peer is disconnected after HEARTBEAT_TIMEOUT_MS
HEARTBEAT_TIMEOUT_MS = 15_000
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 30, 10, 3
POLL_MS = 500  # the loop also wakes this often to notice stop() even if a wake-up were lost
BATCH = 256  # requests read per turn before replies are flushed, so replies never starve
_REMEMBER_GONE = 1024  # identities logged as gone (never reused within one run, so this only bounds memory)

_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED
DESCRIPTORS_KEPT_FREE = 128  # for model files, clips, the OSC sockets and the engine, whatever the clients hold
MAX_CONNECTIONS = 4096


class _LogLimit:
    """At most `limit` log lines per `window_s` for one cause, counting the ones held back, so a
    failure repeated by every reply of a stream is seen once without flooding the log."""

    def __init__(self, limit: int = 5, window_s: float = 10.0):
        self.limit, self.window_s = limit, window_s
        self._start, self._count, self._suppressed = float("-inf"), 0, 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._start > self.window_s:
                self._start, self._count = now, 0
            self._count += 1
            if self._count > self.limit:
                self._suppressed += 1
                return False
            return True

    def take_suppressed(self) -> int:
        """How many lines were held back since the last call (reported in the next line that is logged)."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files towards its hard limit (64k at most), where the
    system allows it; returns the soft limit in force. Many systems start programs at 1,024, which a
    thousand idle local connections exhaust."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.info("could not raise the open-file limit from %d: %s", soft, exc)
    return 1 << 16 if soft == resource.RLIM_INFINITY else soft


def connection_cap(descriptor_limit: int) -> int:
    """How many ZeroMQ connections to accept under `descriptor_limit` open files."""
    return max(16, min(MAX_CONNECTIONS, descriptor_limit - DESCRIPTORS_KEPT_FREE))


def client_name(identity: bytes) -> str:
    """The Service's name for a ZeroMQ peer: stable for one connection, safe in a file name.

    The identity is the peer's routing id: the one it set itself (ZMQ_ROUTING_ID), else the 5 bytes
    libzmq's ROUTER makes up, a zero byte and a 32-bit big-endian counter that goes up by one per new
    connection and starts from libzmq's unseeded `rand()`. The counter never repeats within one run,
    but every run starts it at the same value (0x6b8b4567 with glibc), so the names of one server
    run come back in the next one: `zmq:006b8b4567`, `zmq:006b8b4568`, ... (docs/protocol.md 3.7)."""
    return "zmq:" + identity.hex()


class ZmqTransport:
    """Serve `service` on a ROUTER socket bound to tcp://host:port (port 0 picks a free one)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, max_message: int = 1 << 20,
                 max_connections: int | None = None, curve: CurveServer | None = None):
        """`curve`: admit only clients whose CURVE public key is allowed (plugin_bridge/zmq_curve.py)."""
        self.service = service
        self.curve = curve
        self._authenticator: ThreadAuthenticator | None = None
        # Connections beyond this many are shut as soon as they are accepted (the connected keep being
        # served): at the descriptor limit libzmq would spin on a failing accept() and starve everyone.
        # Well below the process's descriptor limit, which start-up raises where the system allows.
        self.max_connections = max_connections or connection_cap(raise_descriptor_limit())
        self._connections = 0
        self._refused_connections = _LogLimit()
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
        self._emit_log = _LogLimit()  # emit() must never raise into a worker thread: it logs instead
        self._dropped_log = _LogLimit()
        self._bad_request_log = _LogLimit(limit=20)

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
        try:  # a failed start leaves nothing open: destroy closes every socket this context made
            router = ctx.socket(zmq.ROUTER)
            self._configure(router)
            if self.curve is not None:  # before bind: the mechanism is fixed when the socket listens
                self._authenticator = self.curve.apply(ctx, router)
            self._port = self._bind(router)
            monitor = router.get_monitor_socket(_MONITOR_EVENTS)
            address = f"inproc://segue-wake-{id(self):x}"
            wake_rx = ctx.socket(zmq.PAIR)
            wake_rx.linger = 0
            wake_rx.bind(address)
            wake_tx = ctx.socket(zmq.PAIR)
            wake_tx.linger = 0
            wake_tx.connect(address)
        except BaseException:
            self._stop_authenticator()
            ctx.destroy(linger=0)
            raise
        self._ctx, self._router, self._monitor, self._wake_rx, self._wake_tx = ctx, router, monitor, wake_rx, wake_tx
        self._stopping.clear()
        self._wake_pending = False
        # The sockets move to the I/O thread here; Thread.start is the full memory barrier zmq asks for.
        self._thread = threading.Thread(target=self._loop, name="segue-zmq", daemon=True)
        self._thread.start()
        log.info("ZeroMQ transport listening on %s (max message %d bytes)", self.endpoint, self.max_message)

    def stop(self) -> None:
        """Stop the loop, close every socket without lingering and cancel the streams of our clients.

        Invariant: when stop() returns, the I/O thread has been joined and every socket and the
        context are closed, whatever the wake-up or the loop did; nothing here raises because the
        I/O thread already closed its end. Safe to call twice."""
        thread, ctx = self._thread, self._ctx
        if thread is None or ctx is None:
            return
        self._stopping.set()
        try:
            self._nudge()
            thread.join(timeout=5)
            if thread.is_alive():  # should not happen: the loop polls at most POLL_MS
                log.error("the ZeroMQ I/O thread did not stop within 5 s; destroying its sockets under it")
        finally:
            with self._wake_lock:  # emitters look at _wake_tx under this lock: after this none sends on it
                self._wake_tx = None
            self._stop_authenticator()
            try:
                # destroy, not term: it closes what is still open (our end of the wake-up pipe, and any
                # socket the loop could not close), so it never waits forever on a forgotten socket
                ctx.destroy(linger=0)
            finally:
                self._thread = self._ctx = self._router = self._monitor = self._wake_rx = None
                clients = set(self._fd_client.values())
                self._fd_client.clear()
                self._client_fd.clear()
                for identity in clients:
                    self.service.client_gone(client_name(identity))
                log.info("ZeroMQ transport on port %s stopped", self._port)

    def _stop_authenticator(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()  # its thread and ZAP socket, before the context is destroyed
            self._authenticator = None

    def _nudge(self) -> None:
        """Wake the loop so it sees the stopping flag now rather than at its next poll (within POLL_MS).

        Only a nudge: the I/O thread may already have seen the flag and closed its end, which makes
        the send fail with zmq.Again; the flag and the join are what stop the loop."""
        with self._wake_lock:  # sent even when a wake-up is already pending, so the loop wakes at once
            if self._wake_tx is None:
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("no wake-up for the stopping ZeroMQ loop (%s); it stops at its next poll", exc)

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
        """The `emit` the Service calls (from worker threads) for replies to `route`. Never raises:
        an exception here would land in a worker thread that can do nothing about it. After stop()
        replies are dropped (the clients' streams were cancelled), with a rate-limited log line."""

        def emit(event: dict) -> None:
            try:
                if self._stopping.is_set():
                    if self._dropped_log.allow():
                        log.debug("reply %s for %s after the transport stopped; dropped",
                                  event.get("type"), client_name(route[0]))
                    return
                self._outbox.put((route, event))
                self._wake()
            except Exception:
                if self._emit_log.allow():
                    log.exception("could not queue a reply for %s (%d such failures since the last line not logged)",
                                  client_name(route[0]), self._emit_log.take_suppressed())

        return emit

    def _wake(self) -> None:
        """At most one wake-up is ever in flight: the I/O thread clears the flag before it flushes,
        so a reply queued while the flag was still set is always in the queue it is about to flush."""
        with self._wake_lock:
            if self._wake_tx is None or self._wake_pending:  # stopped, or a flush is already due
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # the I/O thread has closed its end: it is stopping, and its queue goes with it
                return
            self._wake_pending = True

    # --- the I/O thread ------------------------------------------------------------------------------

    def _io_sockets(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
        """The router, its monitor and the wake-up receiver: they exist from start() until the I/O thread ends."""
        assert self._router is not None and self._monitor is not None and self._wake_rx is not None, \
            "the I/O thread runs only between start() and the end of its own loop"
        return self._router, self._monitor, self._wake_rx

    def _loop(self) -> None:
        router, monitor, wake_rx = self._io_sockets()
        poller = zmq.Poller()
        for sock in (router, monitor, wake_rx):
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                try:
                    ready = dict(poller.poll(POLL_MS))
                    if wake_rx in ready:
                        with self._wake_lock:
                            self._drain(wake_rx)
                            self._wake_pending = False
                    self._read_monitor()
                    if router in ready:
                        self._read_requests()
                    self._flush()
                except zmq.ContextTerminated:  # stop() gave up waiting and destroyed the context
                    return
                except Exception:  # one bad turn must not end the server; log and keep serving
                    log.error("ZeroMQ loop error (still serving):\n%s", traceback.format_exc())
        finally:  # each close on its own: one failing must not leave the others open (ctx.term would hang)
            try:
                router.disable_monitor()
            except zmq.ZMQError as exc:
                log.debug("could not disable the ZeroMQ socket monitor: %s", exc)
            for sock in (monitor, wake_rx, router):
                try:
                    sock.close(linger=0)
                except Exception:
                    log.exception("could not close a ZeroMQ socket of the I/O thread")

    @staticmethod
    def _readable(sock: zmq.Socket) -> bool:
        return bool(int(sock.get(zmq.EVENTS)) & zmq.POLLIN)

    @classmethod
    def _drain(cls, sock: zmq.Socket) -> None:
        while cls._readable(sock):
            sock.recv(zmq.NOBLOCK)

    def _read_monitor(self) -> None:
        """Handle every pending connect and disconnect. Called before each request is mapped to its fd,
        because a closed fd number can be reused at once by a new connection: the monitor event for the
        old one is always queued before the new connection's first message, so draining first is exact."""
        _, monitor, _ = self._io_sockets()
        while self._readable(monitor):
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._connections += 1
                if self._connections > self.max_connections:
                    self._refuse_connection(int(event["value"]))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._connections = max(0, self._connections - 1)
                identity = self._fd_client.pop(int(event["value"]), None)
                if identity is not None:
                    self._client_fd.pop(identity, None)
                    self._client_gone(identity, "disconnected")

    def _refuse_connection(self, fd: int) -> None:
        """Shut a connection just accepted over the limit. libzmq owns the descriptor, so it is not
        closed here (its number could be reused under libzmq): shutdown makes libzmq's next read see
        the end of the stream, and libzmq closes it and reports the disconnect, which the count follows.
        Only a TCP socket on our own port is touched: by the time the event is read, a descriptor
        number may already belong to something else."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            ours = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            if ours and sock.getsockname()[1] == self.port:
                sock.shutdown(socket.SHUT_RDWR)
                if self._refused_connections.allow():
                    log.warning("refused a ZeroMQ connection: %d open, the limit is %d (connected clients are still "
                                "served; %d refusals since the last line not logged)", self._connections - 1,
                                self.max_connections, self._refused_connections.take_suppressed())
        except OSError as exc:
            log.debug("could not shut the refused connection on fd %d: %s", fd, exc)
        finally:
            sock.detach()

    def _read_requests(self) -> None:
        router, _, _ = self._io_sockets()
        for _ in range(BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
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
        # Decoded here when small, else on the service's intake thread, so this loop never waits on it.
        self.service.handle_bytes(client_name(identity), data, protocol.decode_json, self._emitter(route))

    def _reply_error(self, route: list[bytes], message: str) -> None:
        if self._bad_request_log.allow():  # a flood of malformed frames must not flood the log
            log.warning("bad request from %s: %s (%d such lines since the last one not logged)", client_name(route[0]),
                        message, self._bad_request_log.take_suppressed())
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
                self._io_sockets()[0].send_multipart([*route, data], zmq.NOBLOCK)
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

