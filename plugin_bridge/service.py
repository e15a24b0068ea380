"""The transport-independent generation service: validate, queue, run, stream, cancel.

Transports call `Service.handle(client, payload, emit)` with a decoded request dict and a function
that sends one reply dict back to that client. `emit` is called from worker threads: a transport
whose socket is not thread-safe must hand the reply to its own I/O thread (see the transports).

- hello and ping are answered at once on the caller's thread, so a busy engine never delays them;
- a continue request is validated at once (errors go straight back), then queued; a new request
  from the same client cancels that client's running or queued one;
- workers (a small fixed pool) stream note events as each note completes, write one `.mid` per
  variation for drag-and-drop, and finish with `finished`;
- cancel (or a client that went away) stops the generation within one decode step; a cancel that
  finds nothing to stop (the request already ended, or never ran) is a silent no-op, so a cancel
  crossing a `finished` on the wire never shows the musician an error;
- a prepare request (a clip the musician selected or is playing) is validated at once, then
  tokenized and prefilled by one background thread that yields to generation: it starts a prefill
  only while no continue request runs or waits. The result is kept in `prefills`
  (engine/prefill_cache.py, bounded in bytes, least recently used evicted), where a continue of the
  same clip finds it and starts decoding at once; every continue keeps its own prefill there too,
  so "generate again" skips it. A client has at most one prepare waiting: a newer one replaces it.
- a prepare that carries the continue's options (a shell may send the very request its Continue will
  send) also has its continuation drawn up to the first note on that thread and kept, one per client
  (plugin_bridge/head_start.py): the continue that asks exactly that takes it and its first note goes out
  at once. After a continue ends, the same clip and request get the next one, for "Generate again".

Every request ends with exactly one terminal reply (`finished`, `error` or `cancelled`): a job is
forgotten before its last reply is sent, and sending and cancelling take turns on the job's lock.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.clip import Arrangement, Clip
from engine.generate import ContinuationRequest, NoteEvent, RequestError, VariationDone
from engine.manifest import SearchDefaults
from engine.midi_file import write_tracks
from engine.prefill_cache import DEFAULT_MAX_BYTES, PrefillCache
from engine.provenance import Provenance
from plugin_bridge import head_start, protocol
from plugin_bridge.intake import Intake
from plugin_bridge.models import LoadedModel, ModelRegistry

log = logging.getLogger("segue.service")

Emit = Callable[[dict], None]

MAX_HEAD_STARTS = 4  # continuations kept drawn ahead, one per client, the oldest closed first (each holds a decode buffer)


def _nobody(event: dict) -> None:
    """The `emit` of the service's own prepares (the next head start after a continue): nobody asked, nobody is told."""


def server_version() -> str:
    """The installed package's version (pyproject.toml is the one place it is written)."""
    try:
        return importlib.metadata.version("segue")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def safe_emit(emit: Emit, event: dict) -> None:
    """Hand `event` to a transport; a transport that fails is logged, never raised into a worker or
    the I/O thread (the transports promise not to raise; this is the second line)."""
    try:
        emit(event)
    except Exception:
        log.error("a transport failed to send a %s reply for id %r:\n%s", event.get("type"), event.get("id"),
                  traceback.format_exc())


@dataclass(eq=False)  # identity, not field equality: the queue removes this very job
class Job:
    client: str
    request: protocol.ContinueRequest
    emit: Emit
    received: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Sending and cancelling take turns, so no event of a request ever follows its `cancelled`.
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False  # its terminal reply (`finished` or `error`) was sent: a later cancel says nothing
    client_left: bool = False  # the transport lost its client (client_gone): nothing is drawn ahead for it

    def send(self, event: dict, terminal: bool = False) -> bool:
        """Emit `event` unless the job was cancelled. False when it was."""
        with self.lock:
            if self.cancelled.is_set() or self.ended:
                return False
            safe_emit(self.emit, event)
            self.ended = terminal
            return True

    def cancel(self, tell_client: bool = True) -> bool:
        """Stop the job (and say so to its client). False when it had already stopped or ended: a
        cancel that found the job just before its `finished` went out must not add a `cancelled`."""
        with self.lock:
            if self.cancelled.is_set() or self.ended:
                self.cancelled.set()  # the generation loop may still poll it
                return False
            self.cancelled.set()
            if tell_client:
                safe_emit(self.emit, protocol.cancelled_event(self.request.id))
            return True


@dataclass(eq=False)  # identity: the prepare queue removes this very job
class PrepareJob:
    client: str
    request: protocol.PrepareRequest
    emit: Emit
    received: float = field(default_factory=time.perf_counter)
    client_left: bool = False  # the transport lost its client while it ran: its head start is not kept


def new_instance_id() -> str:
    """A random id for one server start (16 hex digits): `hello` carries it, so a shell that sees it
    change knows the server restarted and that the requests it was waiting for are gone."""
    return secrets.token_hex(8)


class Service:
    def __init__(self, registry: ModelRegistry, clips_dir: Path, workers: int = 2, max_queue: int = 32,
                 prefill_cache_bytes: int = DEFAULT_MAX_BYTES, head_starts: bool = True):
        """`head_starts`: draw prepared continuations ahead (plugin_bridge/head_start.py); False: compute
        nothing but what is asked (the prefill of a prepare, the continue itself)."""
        self.instance = new_instance_id()
        self.head_starts = head_starts
        self.prefills = PrefillCache(prefill_cache_bytes)  # prepared (and already continued) prompts, by their tokens
        self.registry = registry
        self.clips_dir = Path(clips_dir)
        self.max_queue = max_queue
        # Jobs waiting for a worker, oldest first. A job leaves it the moment it is cancelled or
        # replaced, so the queue holds live work only: a client replacing its request 40 times a
        # second takes one slot, never 40, and nobody else is told `busy` because of it.
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # client -> its latest job (waiting or running)
        self._running = 0  # continue jobs a worker is generating right now
        self._prepares: deque[PrepareJob] = deque()  # waiting prepare jobs, oldest first (one per client)
        self._prepare_of: dict[str, PrepareJob] = {}  # client -> its waiting prepare job
        self._head_starts: dict[str, head_start.HeadStart] = {}  # client -> its continuation drawn ahead, oldest first
        self._preparing: PrepareJob | None = None  # the prepare the prepare thread runs now
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._prepare_ready = threading.Condition(self._lock)  # a prepare may start: one waits and no continue runs
        self._closing = False
        self._workers = [threading.Thread(target=self._work, name=f"segue-worker-{i}", daemon=True) for i in range(workers)]
        self._workers.append(threading.Thread(target=self._prepare_work, name="segue-prepare", daemon=True))
        for worker in self._workers:
            worker.start()
        registry.on_swap(self._model_swapped)
        # Large requests are decoded and checked there, not on a transport's I/O thread (intake.py).
        self.intake = Intake(self._handle_now)
        log.info("service instance %s started with %d workers", self.instance, workers)

    # --- entry points for transports -----------------------------------------------------------------

    def handle(self, client: str, payload: object, emit: Emit) -> None:
        """One decoded request: acted on now, or after the client's requests queued in the intake. Never raises."""
        self.intake.submit(client, payload, emit)

    def handle_bytes(self, client: str, raw: bytes, decode: Callable[[bytes], object], emit: Emit,
                     request_id: str | None = None) -> None:
        """One request as received: decoded with `decode` (which raises protocol.ProtocolError) now if small,
        else on the intake thread. Never raises."""
        self.intake.submit_bytes(client, raw, decode, emit, request_id)

    def _handle_now(self, client: str, payload: object, emit: Emit) -> None:
        """Act on one decoded request (protocol.decode_json's dict). Never raises: every problem becomes an error reply."""
        request_id = None
        try:
            request_id = protocol.request_id_of(payload)
            kind = payload.get("type") if isinstance(payload, dict) else None  # request_id_of refused non-objects
            if kind == "ping":
                safe_emit(emit, protocol.pong_event(request_id))
            elif kind == "hello":
                safe_emit(emit, self.hello(request_id))
            elif kind == "continue":
                self._submit(client, protocol.parse_continue(payload, self._search_for), emit)
            elif kind == "prepare":
                self._submit_prepare(client, protocol.parse_prepare(payload, self._search_for), emit)
            elif kind == "cancel":
                self.cancel(client, request_id or None)
            else:
                raise protocol.ProtocolError(protocol.UNKNOWN_TYPE, f"unknown message type {kind!r}", request_id)
        except protocol.ProtocolError as exc:
            safe_emit(emit, protocol.error_event(exc.request_id or request_id, exc.code, exc.message))
        except Exception as exc:  # a bug must answer the client and be logged, never kill the transport
            log.error("request from %s failed: %s\n%s", client, exc, traceback.format_exc())
            safe_emit(emit, protocol.error_event(request_id, protocol.INTERNAL,
                                                 f"the server hit an internal error ({type(exc).__name__})"))

    def hello(self, request_id: str = "") -> dict:
        return {"type": "hello", "id": request_id, "protocol": protocol.PROTOCOL_VERSION, "server": server_version(),
                "models": self.registry.describe(), "default_model": self._default_name(), "instance": self.instance}

    def cancel(self, client: str, request_id: str | None) -> bool:
        """Cancel the client's job and its waiting prepare (only those with `request_id`, when given).
        True if one was cancelled.

        Nothing to cancel is not an error: the request may have finished while the cancel was on its
        way (its `finished`, `error` or `cancelled` is its one terminal reply), so no reply is sent.
        A prepare that has started is not stopped (its prefill is one model call): its `prepared` follows."""
        with self._lock:
            job = self._jobs.get(client)
            if job is not None and (not request_id or job.request.id == request_id):
                self._drop(job)
            else:
                job = None
            prepare = self._prepare_of.get(client)
            if prepare is not None and (not request_id or prepare.request.id == request_id):
                self._drop_prepare(prepare)
            else:
                prepare = None
        stopped = False
        if prepare is not None:
            safe_emit(prepare.emit, protocol.cancelled_event(prepare.request.id))
            stopped = True
        if job is not None and job.cancel():
            return True
        if stopped:
            return True
        if request_id:
            log.debug("client=%s cancel id=%s: nothing running under that id (already ended?); no reply", client, request_id)
        return False

    def drawn_ahead(self) -> int:
        """How many clients have a continuation drawn ahead, waiting for their continue (head_start.py)."""
        with self._lock:
            return len(self._head_starts)

    def client_gone(self, client: str) -> None:
        """The transport lost this client: free the engine without replying."""
        with self._lock:
            job = self._jobs.get(client)
            if job is not None:
                self._drop(job)
                job.client_left = True
            prepare = self._prepare_of.get(client)
            if prepare is not None:
                self._drop_prepare(prepare)
            if self._preparing is not None and self._preparing.client == client:
                self._preparing.client_left = True
            head = self._head_starts.pop(client, None)
        if job is not None:
            job.cancel(tell_client=False)
        if head is not None:
            head.close()

    def close(self) -> None:
        self.registry.off_swap(self._model_swapped)
        self.intake.close()
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._waiting.clear()
            self._prepares.clear()
            self._prepare_of.clear()
            self._closing = True
            self._work_ready.notify_all()
            self._prepare_ready.notify_all()
        for job in jobs:
            job.cancel(tell_client=False)
        for worker in self._workers:
            worker.join(timeout=5)
        with self._lock:
            heads = list(self._head_starts.values())
            self._head_starts.clear()
        for head in heads:
            head.close()

    # --- internals -----------------------------------------------------------------------------------

    def _default_name(self) -> str | None:
        try:
            return self.registry.get(None).name
        except KeyError:
            return None

    def _search_for(self, model: str | None) -> SearchDefaults:
        """The generation defaults of the model a request names (KeyError with a sentence when there is none)."""
        try:
            return self.registry.get(model).manifest.search
        except KeyError:
            available = ", ".join(self.registry.names()) or "none"
            raise KeyError(f"there is no model named {model!r} (available: {available})") from None

    def _submit(self, client: str, request: protocol.ContinueRequest, emit: Emit) -> None:
        job = Job(client, request, emit)
        with self._lock:
            previous = self._jobs.get(client)
            others = len(self._waiting) - (previous is not None and any(j is previous for j in self._waiting))
            if others >= self.max_queue:  # the client's own waiting request is replaced, so it does not count
                raise protocol.ProtocolError(protocol.BUSY, "the server is busy with other requests; try again in a moment",
                                             request.id)
            if previous is not None:
                self._drop(previous)
            self._jobs[client] = job
            self._waiting.append(job)
            self._work_ready.notify()
        if previous is not None:
            previous.cancel()  # a new request from the same client replaces its old one

    def _drop(self, job: Job) -> None:
        """Forget a job that is being cancelled: its slot in the queue is free at once. Holds the lock."""
        if self._jobs.get(job.client) is job:
            del self._jobs[job.client]
        try:
            self._waiting.remove(job)  # by identity: Job compares by identity (eq=False)
        except ValueError:
            pass  # already running
        if not self._waiting and not self._running:
            self._prepare_ready.notify()  # the engine is idle: a waiting prepare may start

    def _next_job(self) -> Job | None:
        """The oldest waiting job, once there is one (counted as running); None when the service is closing."""
        with self._lock:
            while not self._waiting and not self._closing:
                self._work_ready.wait()
            if self._closing:
                return None
            self._running += 1
            return self._waiting.popleft()

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as exc:
                log.error("request %s from %s failed: %s\n%s", job.request.id, job.client, exc, traceback.format_exc())
                self._end(job, protocol.error_event(job.request.id, protocol.INTERNAL,
                                                    f"generation failed inside the server ({type(exc).__name__}); "
                                                    "the server keeps running"))
            finally:
                self._forget(job)
                with self._lock:
                    self._running -= 1
                    if not self._running and not self._waiting:
                        self._prepare_ready.notify()

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.client) is job:
                del self._jobs[job.client]

    def _end(self, job: Job, event: dict) -> bool:
        """Send a job's terminal reply (`finished` or `error`). The job is forgotten first, so a cancel
        arriving from now on finds nothing and stays silent; one that came earlier already sent
        `cancelled`, and then `job.send` drops this reply (False): either way exactly one terminal reply."""
        self._forget(job)
        return job.send(event, terminal=True)

    def _run(self, job: Job) -> None:
        request = job.request
        try:
            model = self.registry.get(request.model)  # resolved per request: hot-swap happens between requests
        except KeyError:
            self._end(job, protocol.error_event(request.id, protocol.UNKNOWN_MODEL, f"model {request.model!r} was removed"))
            return
        spec = request.request
        started = time.perf_counter()
        first_note = None
        variations = 0
        continued = 1 if isinstance(request.clip, Clip) else len(request.clip.continued)
        finished_tracks: dict[int, list[VariationDone]] = {}  # variation -> its continued tracks done so far
        with self._lock:
            head = self._head_starts.pop(job.client, None)
        if head is not None and not head.serves(model, request.clip, spec):
            head.close()  # another clip, model or request: its buffer goes back before this one's prefill
            head = None
        if head is not None:
            events = head.resume(job.cancelled.is_set)
        else:
            events = model.generator.stream(request.clip, spec, should_stop=job.cancelled.is_set, prefills=self.prefills)
        try:
            for event in events:
                now_ms = (time.perf_counter() - job.received) * 1000
                if isinstance(event, NoteEvent):
                    first_note = now_ms if first_note is None else first_note
                    reply = protocol.note_event(request.id, event.variation, event.note, event.track)
                else:
                    tracks = finished_tracks.setdefault(event.variation, [])
                    tracks.append(event)
                    if len(tracks) < continued:
                        continue  # a variation is done (one .mid, one `done`) when all its tracks are
                    tracks.sort(key=lambda d: d.track)
                    path = self._write(job, model, tracks, spec)
                    reply = protocol.done_event(request.id, event.variation, str(path), sum(len(d.clip.notes) for d in tracks),
                                                first_note, now_ms)
                    variations += 1
                if not job.send(reply):
                    break
        except RequestError as exc:  # found only against the model: a meter it lacks, constraints it cannot meet
            self._end(job, protocol.error_event(request.id, exc.code, str(exc)))
            return
        finally:
            events.close()  # type: ignore[attr-defined]  # a generator: one cancelled mid-stream gives its buffer back now
        total = (time.perf_counter() - job.received) * 1000
        self._draw_again(job)
        if job.cancelled.is_set() or not self._end(job, protocol.finished_event(request.id, variations, total)):
            log.info("client=%s id=%s model=%s bars=%d cancelled after %.0f ms", job.client, request.id, model.name, spec.bars, total)
            return
        log.info("client=%s id=%s model=%s bars=%d variations=%d first_note_ms=%s total_ms=%.0f queue_ms=%.0f head_start=%s",
                 job.client, request.id, model.name, spec.bars, spec.variations,
                 "-" if first_note is None else f"{first_note:.1f}", total, (started - job.received) * 1000,
                 "yes" if head is not None else "no")

    def _draw_again(self, job: Job) -> None:
        """After a continue, the same clip and request drawn ahead again (on the prepare thread, once the
        engine is idle), for the musician's "Generate again": unless the client has sent something newer."""
        request = job.request
        with self._lock:
            newer = job.client in self._prepare_of or self._jobs.get(job.client) not in (None, job)
            busy = len(self._prepares) >= MAX_HEAD_STARTS  # a busy server: its clients' own prepares first
            if not self.head_starts or self._closing or newer or busy or job.client_left:
                return
            again = protocol.PrepareRequest(f"{request.id}+again", request.clip, request.model, request.request)
            again_job = PrepareJob(job.client, again, _nobody)
            self._prepare_of[job.client] = again_job
            self._prepares.append(again_job)

    # --- prepare ------------------------------------------------------------------------------------

    def _submit_prepare(self, client: str, request: protocol.PrepareRequest, emit: Emit) -> None:
        job = PrepareJob(client, request, emit)
        with self._lock:
            previous = self._prepare_of.get(client)
            if previous is None and len(self._prepares) >= self.max_queue:
                raise protocol.ProtocolError(protocol.BUSY, "the server is busy preparing other clips; try again in a moment",
                                             request.id)
            if previous is not None:
                self._drop_prepare(previous)
            self._prepare_of[client] = job
            self._prepares.append(job)
            self._prepare_ready.notify()
        if previous is not None:  # the musician moved on to another clip before this one was prepared
            safe_emit(previous.emit, protocol.cancelled_event(previous.request.id))

    def _drop_prepare(self, job: PrepareJob) -> None:
        """Forget a waiting prepare job. Holds the lock."""
        if self._prepare_of.get(job.client) is job:
            del self._prepare_of[job.client]
        try:
            self._prepares.remove(job)
        except ValueError:
            pass  # already taken by the prepare thread

    def _next_prepare(self) -> PrepareJob | None:
        """The oldest waiting prepare once no continue job runs or waits (generation goes first); None when closing."""
        with self._lock:
            while not self._closing and (not self._prepares or self._waiting or self._running):
                self._prepare_ready.wait()
            if self._closing:
                return None
            job = self._prepares.popleft()
            del self._prepare_of[job.client]
            self._preparing = job
            return job

    def _prepare_work(self) -> None:
        while True:
            job = self._next_prepare()
            if job is None:
                return
            try:
                self._prepare(job)
            except Exception as exc:
                log.error("prepare %s from %s failed: %s\n%s", job.request.id, job.client, exc, traceback.format_exc())
                safe_emit(job.emit, protocol.error_event(job.request.id, protocol.INTERNAL,
                                                         f"preparing the clip failed inside the server ({type(exc).__name__}); "
                                                         "the server keeps running"))
            finally:
                with self._lock:
                    self._preparing = None

    def _prepare(self, job: PrepareJob) -> None:
        """Tokenize and prefill one clip into `prefills`, then answer `prepared` (or `error`: what a continue would get)."""
        request = job.request
        try:
            model = self.registry.get(request.model)
        except KeyError:
            safe_emit(job.emit, protocol.error_event(request.id, protocol.UNKNOWN_MODEL, f"model {request.model!r} was removed"))
            return
        started = time.perf_counter()
        try:
            prefilled = model.generator.prefill(request.clip, self.prefills)
        except RequestError as exc:  # a meter the model lacks, a bar longer than its context: as a continue is told
            safe_emit(job.emit, protocol.error_event(request.id, exc.code, str(exc)))
            return
        prefill_ms = 0.0 if prefilled.reused else prefilled.prefill_ms
        drawn = self._begin_head_start(job, model, request.clip, request.continuation)
        now = time.perf_counter()
        safe_emit(job.emit, protocol.prepared_event(request.id, model.name, len(prefilled.ids), prefilled.reused, prefill_ms,
                                                    (now - job.received) * 1000))
        stats = self.prefills.stats()
        log.info("client=%s id=%s model=%s %s tokens=%d cached=%s reused_from_another=%d prefill_ms=%.1f head_start=%s "
                 "total_ms=%.0f wait_ms=%.0f (cache: %d prompts, %.1f of %.0f MB)", job.client, request.id, model.name,
                 "drawn again" if job.emit is _nobody else "prepared", len(prefilled.ids), "yes" if prefilled.reused else "no",
                 prefilled.prefix_reused, prefill_ms, f"{drawn} note(s)" if drawn is not None else "no",
                 (now - job.received) * 1000, (started - job.received) * 1000,
                 stats.entries, stats.bytes / 2**20, stats.max_bytes / 2**20)

    def _generation_waits(self) -> bool:
        """A continue waits or runs (or the service is closing): what stops a head start being drawn.
        Read without the lock: a step late at worst."""
        return bool(self._waiting or self._running or self._closing)

    def _begin_head_start(self, job: PrepareJob, model: LoadedModel, clip: Clip | Arrangement,
                          continuation: ContinuationRequest | None) -> int | None:
        """The prepared continuation drawn up to its first note and kept for the client's continue: the notes
        drawn, None when there is none to keep. The client's earlier one is closed either way (it moved on
        to this clip: one per client, each holds a decode buffer); so is this one when the client left
        while it was drawn."""
        client = job.client
        with self._lock:
            earlier = self._head_starts.pop(client, None)
        if earlier is not None:
            earlier.close()
        if continuation is None or not self.head_starts:
            return None
        try:
            head = head_start.begin(model, clip, continuation, self.prefills, self._generation_waits)
        except Exception:  # a bug here costs the head start, never the prepare: the continue decodes for itself
            log.exception("drawing the continuation of a prepared clip failed; the prepare stands")
            head = None
        if head is None:
            return None
        closed = []
        with self._lock:  # (only this thread adds one: the client has none now)
            if job.client_left:
                closed.append(head)
            else:
                self._head_starts[client] = head
            while len(self._head_starts) > MAX_HEAD_STARTS:
                closed.append(self._head_starts.pop(next(iter(self._head_starts))))
        for old in closed:
            old.close()
        return None if job.client_left else head.notes

    def _model_swapped(self, old: LoadedModel, new: LoadedModel) -> None:
        """A model folder was replaced: the old model's prefills and head starts can never be used again."""
        with self._lock:
            stale = [client for client, head in self._head_starts.items() if head.model is old]
            heads = [self._head_starts.pop(client) for client in stale]
        for head in heads:
            head.close()
        before, after = old.generator.cache_identity, new.generator.cache_identity
        if before != after:
            dropped = self.prefills.forget(before)
            if dropped:
                log.info("model %s replaced: %d prepared prompts of the old one dropped", new.name, dropped)

    def _write(self, job: Job, model: LoadedModel, tracks: list[VariationDone], spec: ContinuationRequest) -> Path:
        """One variation's continued tracks as one .mid (a track each), for drag-and-drop, with its provenance."""
        safe_client = re.sub(r"[^A-Za-z0-9_.-]", "_", job.client)[:40] or "client"
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", job.request.id)[:40]
        number = tracks[0].variation + 1
        path = self.clips_dir / f"{safe_client}-{safe_id}-v{number}.mid"
        name = f"Segue {model.name} continuation {number} of {spec.variations}"
        names = [name] if len(tracks) == 1 else [f"{d.clip.name}: {name}" for d in tracks]
        generator = model.generator
        record = Provenance.of(generator.manifest_sha256, generator.decoder.manifest, spec, tracks[0].seed, number,
                               job.request.clip, generator.decoder.variant)
        return write_tracks(path, [d.clip for d in tracks], names, provenance=record)

