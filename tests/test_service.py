"""The transport-independent Service: streaming, cancel, replacement, errors, hot-swap, tamper refusal."""

from __future__ import annotations

import gc
import json
import queue
import re
import shutil
import threading
import time
import weakref

from conftest import clip_payload

from plugin_bridge.models import ModelRegistry


class Inbox:
    """Collects the replies the service emits to one client (emit is called from worker threads)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def __call__(self, event: dict) -> None:
        self.q.put(event)

    def until(self, kind: str, request_id: str, timeout: float = 30.0) -> list[dict]:
        events, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            events.append(event)
            if event["type"] in (kind, "error") and event.get("id") == request_id:
                return events
        raise AssertionError(f"no {kind} for {request_id} within {timeout} s; got {[e['type'] for e in events]}")


def test_continue_streams_notes_then_done_then_finished(service):
    inbox = Inbox()
    service.handle("a", {"type": "continue", "id": "r1", "clip": clip_payload(), "bars": 4, "variations": 2, "seed": 3}, inbox)
    events = inbox.until("finished", "r1")
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "finished" and kinds.count("done") == 2 and "error" not in kinds
    for variation in (0, 1):
        notes = [e for e in events if e["type"] == "note" and e["variation"] == variation]
        done = next(e for e in events if e["type"] == "done" and e["variation"] == variation)
        assert done["notes"] == len(notes) > 0
        assert kinds.index("done") > kinds.index("note")
        assert all(16.0 <= n["start"] < 32.0 for n in notes)
        from engine.midi_file import read_clip

        written = read_clip(done["path"])
        assert sorted((n.pitch, round(n.start, 4)) for n in written.notes) == \
               sorted((n["pitch"], round(n["start"], 4)) for n in notes)


def test_errors_name_the_problem_and_the_request(service):
    inbox = Inbox()
    service.handle("a", {"type": "continue", "id": "x", "clip": clip_payload(), "bars": 10000}, inbox)
    error = inbox.until("error", "x")[-1]
    assert error["code"] == "bad_request" and "bars must be between 1 and 64" in error["message"]
    service.handle("a", {"type": "continue", "id": "y", "clip": {"notes": []}}, inbox)
    assert inbox.until("error", "y")[-1]["code"] == "bad_clip"
    service.handle("a", {"type": "continue", "id": "z", "clip": clip_payload(), "model": "nope"}, inbox)
    assert "available: default" in inbox.until("error", "z")[-1]["message"]
    service.handle("a", {"type": "dance", "id": "w"}, inbox)
    assert inbox.until("error", "w")[-1]["code"] == "unknown_type"
    service.handle("a", ["not", "an", "object"], inbox)
    assert inbox.until("error", "")[-1]["code"] == "bad_request"


def test_cancel_and_replacement(service):
    inbox = Inbox()
    long = {"type": "continue", "clip": clip_payload(), "bars": 64, "variations": 16, "temperature": 1.5}
    service.handle("a", {**long, "id": "slow"}, inbox)
    time.sleep(0.05)
    service.handle("a", {"type": "cancel", "id": "slow"}, inbox)
    events = inbox.until("cancelled", "slow", timeout=5)
    assert events[-1]["type"] == "cancelled"
    # A new request from the same client replaces its running one.
    service.handle("a", {**long, "id": "first"}, inbox)
    time.sleep(0.05)
    service.handle("a", {"type": "continue", "id": "second", "clip": clip_payload(), "bars": 1, "seed": 1}, inbox)
    events = inbox.until("finished", "second")
    assert any(e["type"] == "cancelled" and e["id"] == "first" for e in events)
    assert not any(e["type"] == "finished" and e["id"] == "first" for e in events)


def test_hello_lists_models_and_versions(service):
    inbox = Inbox()
    service.handle("a", {"type": "hello", "id": "h"}, inbox)
    hello = inbox.until("hello", "h")[-1]
    assert hello["protocol"] == 1 and hello["server"] and hello["default_model"] == "default"
    assert [m["name"] for m in hello["models"]] == ["default"]
    assert len(hello["models"][0]["data_fingerprint"]) == 64
    assert re.fullmatch(r"[0-9a-f]{16}", hello["instance"]) and hello["instance"] == service.instance


def test_hello_lists_the_meters_of_each_models_tokenizer_and_they_are_the_ones_it_accepts(service, tiny_model):
    """`meters` is read from the model's own tokenizer (its TimeSig tokens), ordered by denominator:
    a listed meter is continued, one that is not listed is refused with the same list."""
    from engine.tokens import ClipTokenizer

    inbox = Inbox()
    service.handle("a", {"type": "hello", "id": "h"}, inbox)
    meters = inbox.until("hello", "h")[-1]["models"][0]["meters"]
    time_sigs = ClipTokenizer.from_file(tiny_model).kinds.time_sig.values()
    assert sorted(map(tuple, meters)) == sorted(set(time_sigs)) and len(meters) == len(set(time_sigs)) > 3
    assert meters == sorted(meters, key=lambda m: (m[1], m[0]))
    assert [7, 8] in meters and [5, 16] not in meters
    service.handle("a", {"type": "continue", "id": "in", "clip": clip_payload(2, meter=(7, 8)), "bars": 1, "seed": 1}, inbox)
    assert inbox.until("finished", "in")[-1]["type"] == "finished"
    service.handle("a", {"type": "continue", "id": "out", "clip": clip_payload(2, meter=(5, 16)), "bars": 1}, inbox)
    error = inbox.until("error", "out")[-1]
    assert error["code"] == "bad_clip" and ", ".join(f"{n}/{d}" for n, d in meters) in error["message"]


def test_every_service_start_has_its_own_instance_id(models_dir, tmp_path):
    """A restarted server is a new Service: its hello carries a new instance id."""
    from plugin_bridge.service import Service

    registry = ModelRegistry(models_dir)
    registry.scan()
    ids = []
    for _ in range(3):
        service = Service(registry, tmp_path / "clips", workers=1)
        try:
            inbox = Inbox()
            service.handle("a", {"type": "hello", "id": "h"}, inbox)
            ids.append(inbox.until("hello", "h")[-1]["instance"])
        finally:
            service.close()
    registry.stop()
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def quiet(inbox: Inbox, client: str, service, timeout: float = 5.0) -> list[dict]:
    """Everything the service sends this client before the answer to a ping sent now (replies to one
    client keep their order, so what a cancel would have answered arrives before the pong)."""
    service.handle(client, {"type": "ping", "id": "barrier"}, inbox)
    return inbox.until("pong", "barrier", timeout)[:-1]


def test_a_cancel_that_finds_nothing_running_is_answered_with_nothing(service):
    """After `finished`, after an `error` found by the worker, for an id that never ran, and a second
    cancel of a cancelled request: no reply at all, never an error for the musician to see."""
    inbox = Inbox()
    service.handle("a", {"type": "continue", "id": "done", "clip": clip_payload(1), "bars": 1, "seed": 1}, inbox)
    assert inbox.until("finished", "done")[-1]["type"] == "finished"
    service.handle("a", {"type": "cancel", "id": "done"}, inbox)
    assert quiet(inbox, "a", service) == []
    service.handle("a", {"type": "continue", "id": "bad", "clip": clip_payload(1, meter=(5, 16)), "bars": 1}, inbox)
    assert inbox.until("error", "bad")[-1]["code"] == "bad_clip"
    service.handle("a", {"type": "cancel", "id": "bad"}, inbox)
    service.handle("a", {"type": "cancel", "id": "never-sent"}, inbox)
    service.handle("a", {"type": "cancel", "id": ""}, inbox)
    assert quiet(inbox, "a", service) == []
    long = {"type": "continue", "id": "long", "clip": clip_payload(), "bars": 64, "variations": 16}
    service.handle("a", long, inbox)
    service.handle("a", {"type": "cancel", "id": "long"}, inbox)
    service.handle("a", {"type": "cancel", "id": "long"}, inbox)
    assert [e["type"] for e in inbox.until("cancelled", "long") if e.get("id") == "long"][-1] == "cancelled"
    assert [e for e in quiet(inbox, "a", service) if e["type"] != "note"] == []


def test_a_cancel_racing_the_end_of_its_request_gives_exactly_one_terminal_reply_and_no_error(service):
    """Cancels sent at the moment short requests finish, across the window where the worker has sent
    the last `done` but not yet `finished`: each request ends with one `finished` or one `cancelled`."""
    inbox = Inbox()
    events: list[dict] = []

    def until_terminal(request_id: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                events.append(inbox.q.get(timeout=0.05))
            except queue.Empty:
                continue
            if events[-1]["type"] in ("finished", "cancelled", "error") and events[-1]["id"] == request_id:
                return
        raise AssertionError(f"{request_id} never ended")

    for n in range(40):
        request_id = f"r{n}"
        service.handle("a", {"type": "continue", "id": request_id, "clip": clip_payload(1), "bars": 1, "seed": n}, inbox)
        if n % 2:  # half the time the cancel chases the `done`, half the time it races the whole request
            events.extend(inbox.until("done", request_id))
        time.sleep(0.0005 * (n % 5))
        service.handle("a", {"type": "cancel", "id": request_id}, inbox)
        until_terminal(request_id)
    events.extend(quiet(inbox, "a", service))
    time.sleep(0.2)  # a second terminal reply, if there were one, would be sent by now
    while not inbox.q.empty():
        events.append(inbox.q.get())
    terminals: dict[str, list[str]] = {}
    for event in events:
        if event["type"] in ("finished", "cancelled", "error"):
            terminals.setdefault(event["id"], []).append(event["type"])
    assert len(terminals) == 40 and all(kinds in (["finished"], ["cancelled"]) for kinds in terminals.values()), terminals


def test_a_length_a_tick_past_a_bar_line_does_not_move_the_continuation(service):
    """The 16.002-beat end-of-track of a 4-bar clip (a DAW a tick late): the continuation starts at
    beat 16, not a bar later; 16.03 (more than 1/48 beat over) is a fifth bar, so it starts at 20."""
    inbox = Inbox()
    for request_id, length, first_beat in (("late", 16.002, 16.0), ("over", 16.03, 20.0)):
        service.handle("a", {"type": "continue", "id": request_id, "clip": {**clip_payload(4), "length": length}, "bars": 1,
                             "seed": 2, "constraints": {"min_notes_per_bar": 1}}, inbox)
        events = inbox.until("finished", request_id)
        starts = [e["start"] for e in events if e["type"] == "note"]
        assert events[-1]["type"] == "finished" and starts, events[-1]
        assert all(first_beat <= start < first_beat + 4 for start in starts), (length, starts)


def swap_in_retrained(tiny_model, models_dir, tmp_path) -> dict:
    """As export-onnx updates a folder: a new one staged beside it (the same model, its manifest named
    "retrained") moved in place of models/default. Returns that manifest."""
    staged = tmp_path / "staged"
    shutil.copytree(tiny_model, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["name"] = "retrained"
    (staged / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(models_dir / "default")
    shutil.move(staged, models_dir / "default")
    return manifest


def test_hot_swap_and_tampered_folder_refused(models_dir, tiny_model, tmp_path):
    registry = ModelRegistry(models_dir)
    registry.scan()
    old = registry.get("default")
    # A new model folder dropped in is picked up.
    shutil.copytree(tiny_model, models_dir / "second")
    assert registry.scan() == ["second"]
    # An updated folder (export-onnx swaps a new folder in) replaces the old generator.
    manifest = swap_in_retrained(tiny_model, models_dir, tmp_path)
    assert registry.scan() == ["default"]
    assert registry.get("default") is not old and registry.get("default").manifest.name == "retrained"
    serving = registry.get("default")
    # A tampered update is refused with a reason, and the model already serving keeps serving.
    onnx = models_dir / "default" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 3] ^= 0x10
    onnx.write_bytes(bytes(data))
    manifest["name"] = "tampered"
    (models_dir / "default" / "manifest.json").write_text(json.dumps(manifest))
    assert registry.scan() == []
    assert registry.get("default") is serving
    assert "does not match the sha256" in registry.refused()["default"]


def test_loaded_models_are_kept_off_the_cyclic_collector_and_a_replaced_one_is_still_freed(models_dir, tiny_model, tmp_path):
    """A scan that loads a model freezes what is alive, so the collector's full collections walk none of it
    (35-45 ms for the shipped default otherwise, bench/bench_gc_pause.py); a model replaced by a newer load
    of its folder while a request still holds it is freed once that request lets go, even where its
    objects hold a reference cycle: nothing is frozen until then, and the watcher's next scan collects it
    and freezes again."""
    registry = ModelRegistry(models_dir)
    registry.scan()
    old = registry.get("default")
    walked = {id(o) for o in gc.get_objects()}
    assert id(old.generator) not in walked and id(old.generator.decoder) not in walked and gc.get_freeze_count() > 0
    old.generator.decoder.owner = old.generator  # a cycle through the old model (a listener, a closure would do)
    gone = weakref.ref(old.generator)
    swap_in_retrained(tiny_model, models_dir, tmp_path)
    assert registry.scan() == ["default"]  # `old` is still held, as by a stream that started on it
    assert id(registry.get("default").generator) in {id(o) for o in gc.get_objects()}  # not frozen meanwhile
    del old
    assert registry.scan() == []  # the watcher's next look
    assert gone() is None
    assert id(registry.get("default").generator) not in {id(o) for o in gc.get_objects()}
    registry.stop()


def test_garbage_left_in_cycles_at_a_load_is_freed_not_frozen(models_dir):
    """What is already garbage when a scan freezes the heap (cycles a load left behind) is collected first,
    not kept for good (the automatic collector is held off here, so only the scan's own collection runs)."""
    class Leftover:
        pass

    leftover = Leftover()
    leftover.itself = leftover  # type: ignore[attr-defined]
    gone = weakref.ref(leftover)
    del leftover
    registry = ModelRegistry(models_dir)
    gc.disable()
    try:
        assert gone() is not None  # garbage, but no collection has run
        assert registry.scan() == ["default"]
        assert gone() is None
    finally:
        gc.enable()
        registry.stop()


def test_a_replaced_model_kept_for_good_stops_the_collections_after_a_while(models_dir, tiny_model, tmp_path, monkeypatch):
    """Should something keep a replaced model for good, the scans stop collecting after SETTLE_SCANS and
    freeze the heap with it, rather than run a full collection at every watcher tick."""
    monkeypatch.setattr(ModelRegistry, "SETTLE_SCANS", 3)
    registry = ModelRegistry(models_dir)
    registry.scan()
    kept = registry.get("default")
    swap_in_retrained(tiny_model, models_dir, tmp_path)
    assert registry.scan() == ["default"]
    walked = lambda: {id(o) for o in gc.get_objects()}  # noqa: E731
    assert registry.scan() == [] and id(registry.get("default").generator) in walked()  # second scan: still waiting
    assert registry.scan() == [] and id(registry.get("default").generator) not in walked()  # the third: frozen
    assert kept.generator is not None
    registry.stop()


def test_no_cancelled_after_finished_when_the_next_request_follows_at_once(service):
    inbox = Inbox()
    for n in range(30):
        service.handle("a", {"type": "continue", "id": f"r{n}", "clip": clip_payload(1), "bars": 1, "seed": n}, inbox)
        events = inbox.until("finished", f"r{n}")
        assert not any(e["type"] == "cancelled" for e in events)
    time.sleep(0.2)
    leftovers = []
    while not inbox.q.empty():
        leftovers.append(inbox.q.get())
    assert not any(e["type"] == "cancelled" for e in leftovers)


def test_bad_values_get_the_right_error_code_not_internal(service):
    inbox = Inbox()
    cases = {
        "meter": ({"clip": clip_payload(1, meter=(5, 16))}, "bad_clip", "5/16 is not supported"),
        "seed": ({"clip": clip_payload(), "seed": -3}, "bad_request", "seed"),
        "scale": ({"clip": clip_payload(), "constraints": {"key": "C", "scale": ["major"]}}, "bad_request", "scale"),
        "far": ({"clip": {**clip_payload(), "notes": [[60, 90, 400000.0, 1.0, 0]], "length": None}}, "too_large", "beats long"),
        "beam": ({"clip": clip_payload(), "beam_width": 100}, "bad_request", "beam width"),
        "range": ({"clip": clip_payload(), "constraints": {"pitch_min": 0, "pitch_max": 10}}, "bad_request", "no pitch"),
    }
    for name, (fields, code, words) in cases.items():
        service.handle("a", {"type": "continue", "id": name, **fields}, inbox)
        error = inbox.until("error", name)[-1]
        assert error["type"] == "error" and error["code"] == code and words in error["message"], (name, error)


def test_replaced_requests_free_their_queue_slot_at_once(models_dir, tmp_path):
    """One client replacing its request 40 times while the only worker is busy takes one queue slot,
    not 40: another client is still served, never told `busy` (a cancelled job leaves the queue)."""
    registry = ModelRegistry(models_dir)
    registry.scan()
    from plugin_bridge.service import Service

    service = Service(registry, tmp_path / "clips", workers=1, max_queue=4)
    started, release = threading.Event(), threading.Event()
    try:
        busy_one, replacer, third = Inbox(), Inbox(), Inbox()
        service.handle("c", {"type": "continue", "id": "long", "clip": clip_payload(), "bars": 64, "variations": 16}, busy_one)
        for number in range(40):
            service.handle("a", {"type": "continue", "id": f"a{number}", "clip": clip_payload(), "bars": 1}, replacer)
        service.handle("b", {"type": "continue", "id": "b", "clip": clip_payload(), "bars": 1, "seed": 1}, third)
        events = third.until("finished", "b", timeout=120)
        assert events[-1]["type"] == "finished", events[-1]
        assert replacer.until("finished", "a39", timeout=120)[-1]["type"] == "finished"
        # The other clients fill the queue to its bound while the worker is held on a first one (its first
        # reply blocks until released: the tiny model's long request can otherwise finish, its context full,
        # before the queue is filled on a loaded machine); then a newcomer is told busy, with the request's id.
        def held(event: dict) -> None:
            started.set()
            release.wait(timeout=60)

        service.handle("d", {"type": "continue", "id": "d", "clip": clip_payload(), "bars": 64, "variations": 16}, held)
        assert started.wait(timeout=60), "the worker never started the first request"
        for name in "efg":
            service.handle(name, {"type": "continue", "id": name, "clip": clip_payload(), "bars": 64, "variations": 16}, Inbox())
        service.handle("c", {"type": "continue", "id": "long2", "clip": clip_payload(), "bars": 64, "variations": 16}, Inbox())
        late = Inbox()
        service.handle("h", {"type": "continue", "id": "h", "clip": clip_payload(), "bars": 1}, late)
        reply = late.until("error", "h")[-1]
        assert reply["code"] == "busy", reply
    finally:
        release.set()
        service.close()
        registry.stop()


def test_bad_model_folders_are_refused_one_by_one_and_retried_when_they_change(models_dir, tiny_model, tmp_path):
    """A manifest with an empty model section, a deeply nested one, an extra file, a symbolic link
    and a folder linked from outside are each refused with a reason while the good model serves;
    a folder copied manifest-first is refused mid-copy and loaded once the copy completes."""
    def copy_with(name: str, change) -> None:
        folder = models_dir / name
        shutil.copytree(tiny_model, folder)
        change(folder)

    def manifest_edit(edit):
        def change(folder):
            manifest = json.loads((folder / "manifest.json").read_text())
            edit(manifest)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return change

    copy_with("empty-model", manifest_edit(lambda m: m.update(model={})))
    copy_with("nested", lambda f: (f / "manifest.json").write_text("[" * 50_000 + "]" * 50_000))
    copy_with("extra", lambda f: (f / "notes.txt").write_text("hello"))
    copy_with("linked-file", lambda f: ((f / "tokenizer.json").unlink(), (f / "tokenizer.json").symlink_to(tiny_model / "tokenizer.json")))
    outside = tmp_path / "outside"
    shutil.copytree(tiny_model, outside)
    (models_dir / "linked-folder").symlink_to(outside, target_is_directory=True)
    late = models_dir / "late"
    late.mkdir()
    shutil.copy(tiny_model / "manifest.json", late / "manifest.json")  # the copy has only begun

    registry = ModelRegistry(models_dir)
    assert registry.scan() == ["default"]
    refused = registry.refused()
    assert "missing 'n_layer'" in refused["empty-model"]
    assert "too deeply" in refused["nested"]
    assert "does not list: notes.txt" in refused["extra"]
    assert "symbolic link" in refused["linked-file"]
    assert "outside" in refused["linked-folder"]
    assert "missing" in refused["late"]
    assert registry.scan() == []  # nothing changed: nothing is tried again
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(tiny_model / name, late / name)
    assert registry.scan() == ["late"]  # the finished copy is loaded
    registry.stop()


def test_the_session_is_built_from_the_bytes_that_were_verified(tiny_model, monkeypatch):
    import onnxruntime

    from engine.generate import Generator

    seen = []
    real = onnxruntime.InferenceSession

    def recording(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    generator = Generator.load(tiny_model)
    assert len(seen) == 1 and isinstance(seen[0], bytes)
    verified = (tiny_model / "model.onnx").read_bytes()
    from engine import last_positions, native_attention

    # The same bytes, rewritten at load: the attention nodes to the native operator (where it builds),
    # then the last_positions input.
    expected = native_attention.rewrite(verified)[0] if generator.decoder.attention.startswith("native") else verified
    assert seen[0] == last_positions.rewrite(expected)[0]
    assert seen[0] != verified


def test_a_cancel_that_found_the_job_just_before_its_finished_went_out_adds_nothing():
    """The interleaving the suite once caught under load: the cancel takes the job from the table,
    the worker sends `finished`, then the cancel reaches the job. The job itself must refuse."""
    from plugin_bridge import protocol
    from plugin_bridge.service import Job

    sent: list[dict] = []
    from engine.manifest import SearchDefaults

    request = protocol.parse_continue({"type": "continue", "id": "r1", "clip": clip_payload(1)}, lambda model: SearchDefaults())
    job = Job("c", request, sent.append)
    assert job.send(protocol.finished_event("r1", 1, 5.0), terminal=True)
    assert job.cancel() is False
    assert [e["type"] for e in sent] == ["finished"]
    assert job.send({"type": "note", "id": "r1"}) is False  # nothing after the terminal reply either
