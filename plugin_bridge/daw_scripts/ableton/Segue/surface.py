"""The Segue control surface: continue the clip shown in Live's Clip View, in its style, into a new clip.

Live loads this as a MIDI Remote Script (Settings > Link, Tempo & MIDI > Control Surface: Segue).
A trigger from the controller chosen as its Input (config.py: CC 102 on channel 16 by default)
sends the clip to `segue serve` over OSC; the answer is read from Live's tick and written as a new
clip: in Session view into the next empty slot below the clip, in the Arrangement (Live 12) right
after it. A second trigger (CC 103) puts in the next variation, or asks for new ones.

While a clip is shown in the Clip View (config.PREPARE), the script sends it to the server as a
`prepare` with the very request the trigger will send (docs/protocol.md 3.9): selecting a clip, or
editing its notes, loop, markers or meter, is followed a few ticks later by one prepare, and the server
prefills the clip and draws its continuation up to the first note in the meantime, so the trigger's
continue starts at once.

The script speaks to Live the plain way every Remote Script can (the `c_instance` object and the
methods Live calls: `update_display` about ten times a second, `build_midi_map`, `receive_midi`),
without Ableton's private `_Framework`, which changes between Live versions. `schedule_message`
below works as the framework's does: a callback after a number of ticks, run on Live's main thread,
so the Live API is only ever touched there and nothing ever waits on the network.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import Live

from . import config
from .osc import SegueLink

if TYPE_CHECKING:  # annotations only: Live 11's Python 3.7 cannot evaluate these at run time
    from collections.abc import Callable
    from typing import Protocol

    from .osc import Event

    Note = tuple[int, int, float, float]  # pitch, velocity, start (beats from the clip start), duration

    class CInstance(Protocol):
        """What Live hands a Remote Script (the parts this script uses)."""

        def song(self) -> Live.Song.Song: ...

        def show_message(self, message: str) -> None: ...

        def log_message(self, message: str) -> None: ...

        def handle(self) -> int: ...

        def request_rebuild_midi_map(self) -> None: ...


PROTOCOL_VERSION = 1
PREPARE_DELAY_TICKS = 3  # a prepare follows the last change by this many ticks (~0.3 s): a drag of notes is one prepare
# What of the shown clip goes into its request, each a property Live tells listeners about.
WATCHED = ("notes", "loop_start", "loop_end", "looping", "start_marker", "end_marker", "signature_numerator",
           "signature_denominator")
PREPARE_LISTEN = 10.0  # seconds the tick keeps reading replies for an unanswered prepare (for the log)
BAR_TOLERANCE = 1.0 / 48  # the server counts a length this close past a bar line as ending on it (protocol 3.3)


@dataclass
class Settings:
    """config.py's values; a test passes its own."""

    host: str = config.SERVER_HOST
    port: int = config.SERVER_PORT
    bars: int | None = config.BARS
    variations: int | None = config.VARIATIONS
    temperature: float | None = config.TEMPERATURE
    seed: int | None = config.SEED
    model: str | None = config.MODEL
    trigger_channel: int = config.TRIGGER_CHANNEL
    continue_cc: int | None = config.CONTINUE_CC
    variation_cc: int | None = config.VARIATION_CC
    continue_note: int | None = config.CONTINUE_NOTE
    variation_note: int | None = config.VARIATION_NOTE
    hello_timeout: float = config.HELLO_TIMEOUT
    silence_timeout: float = config.SILENCE_TIMEOUT
    prepare: bool = config.PREPARE


def continuation_start(length: float, last_onset: float, numerator: int, denominator: int) -> float:
    """The beat where the server starts the continuation (docs/protocol.md 3.6): the first bar line at
    or after the clip's end, a length at most 1/48 beat past a bar line ending on it; or the bar after
    the last note's onset, once that onset is on the model's grid (1/12 of the meter's beat with the
    default tokenizer), when that is later: a note a hair before the last bar line starts a new bar."""
    beats_per_bar = numerator * 4.0 / denominator
    full, overhang = divmod(length, beats_per_bar)
    bars = max(1, int(full) + (1 if overhang > BAR_TOLERANCE else 0))
    grid = 4.0 / denominator / 12
    onset_bar = int(math.floor(round(last_onset / grid) * grid / beats_per_bar + 1e-9)) + 1
    return beats_per_bar * max(bars, onset_bar)


class SegueError(Exception):
    """Something the musician should read: shown in Live's status bar."""


@dataclass
class Target:
    """Where a continuation goes, decided when it is asked for."""

    track: Live.Track.Track
    arrangement: bool
    slot_index: int  # Session: the source clip's slot; new clips go into the empty slots below it
    position: float  # Arrangement: the song beat where the continuation starts
    offset: float  # the beat of the source clip where the continuation starts (its first bar line after the clip)
    length: float  # beats of the new clip: the requested bars
    signature: tuple[int, int]
    name: str


@dataclass
class Job:
    """One continue request and what came back for it."""

    request: dict[str, Any]
    target: Target
    request_id: str = ""
    hello_id: str = ""
    hello_ok: bool = False
    started: float = 0.0
    last_event: float = 0.0
    notes: dict[int, list[Note]] = field(default_factory=dict)
    promised: dict[int, int] = field(default_factory=dict)  # variation -> notes the server says it sent
    variations: list[list[Note]] = field(default_factory=list)  # filled when the request is finished
    next_variation: int = 0
    written: Live.Clip.Clip | None = None


class SegueSurface:
    """The object Live talks to. `link` is made from the settings unless a test passes one."""

    def __init__(self, c_instance: CInstance, settings: Settings | None = None, link: SegueLink | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._c = c_instance
        self.settings = settings or Settings()
        self._clock = clock
        self.link = link or SegueLink(self.settings.host, self.settings.port, clock=clock)
        self._scheduled: list[tuple[int, Callable[[], None]]] = []
        self._ticking = False
        self.job: Job | None = None  # running, or the last finished one (for "another variation")
        self.running = False
        self.prepared: dict[str, Any] | None = None  # the request last sent as a prepare
        self.prepare_ids: list[str] = []  # the prepares' ids, to tell their replies apart
        self._prepare_sent = 0.0  # when the last prepare went, while it is unanswered; 0: none is
        self._watched: Live.Clip.Clip | None = None  # the clip whose WATCHED properties we listen to
        self._changes = 0  # selections and edits seen; a scheduled prepare runs only if none came after it
        self.log(f"Segue ready: OSC replies on 127.0.0.1:{self.link.reply_port}, "
                 f"server {self.settings.host}:{self.settings.port}")
        if self.settings.prepare:
            self.song().view.add_detail_clip_listener(self._selection_changed)
            self._selection_changed()

    # --- what Live calls ---------------------------------------------------------------------------

    def disconnect(self) -> None:
        """Live is closing the script (or the set): stop what the server does for us, let go of Live's
        listeners and close the socket."""
        if self.settings.prepare:
            view = self.song().view
            if view.detail_clip_has_listener(self._selection_changed):
                view.remove_detail_clip_listener(self._selection_changed)
            self._watch(None)
        if self.running:
            self.link.cancel("")
        self.link.close()

    def update_display(self) -> None:
        """Live's tick (about every 100 ms, on its main thread): run the scheduled callbacks that are due."""
        due = [callback for ticks, callback in self._scheduled if ticks <= 1]
        self._scheduled = [(ticks - 1, callback) for ticks, callback in self._scheduled if ticks > 1]
        for callback in due:
            try:
                callback()
            except Exception as exc:  # a bug must not stop Live's tick; it goes to Log.txt and the status bar
                self.log(f"Segue: {exc}\n{traceback.format_exc()}")
                self.show(f"Segue stopped on an error ({type(exc).__name__}: {exc}); see Live's Log.txt")
                self.running = False

    def schedule_message(self, delay_in_ticks: int, callback: Callable[[], None]) -> None:
        """Call `callback` from Live's tick after `delay_in_ticks` ticks (1 = the next tick)."""
        self._scheduled.append((max(1, delay_in_ticks), callback))

    def build_midi_map(self, midi_map_handle: int) -> None:
        """Ask Live to pass the trigger messages to `receive_midi` (and not on to tracks)."""
        s = self.settings
        for number in (s.continue_cc, s.variation_cc):
            if number is not None:
                Live.MidiMap.forward_midi_cc(self._c.handle(), midi_map_handle, s.trigger_channel, number)
        for number in (s.continue_note, s.variation_note):
            if number is not None:
                Live.MidiMap.forward_midi_note(self._c.handle(), midi_map_handle, s.trigger_channel, number)

    def receive_midi(self, midi_bytes: tuple[int, ...]) -> None:
        """A trigger: a control change above 0 or a note-on, on the trigger channel."""
        if len(midi_bytes) < 3 or midi_bytes[0] & 0x0F != self.settings.trigger_channel or midi_bytes[2] == 0:
            return
        kind, number, s = midi_bytes[0] & 0xF0, midi_bytes[1], self.settings
        if (kind == 0xB0 and number == s.continue_cc) or (kind == 0x90 and number == s.continue_note):
            self.continue_selected()
        elif (kind == 0xB0 and number == s.variation_cc) or (kind == 0x90 and number == s.variation_note):
            self.another_variation()

    def refresh_state(self) -> None:
        pass

    def connect_script_instances(self, instanciated_scripts: Any) -> None:
        pass

    def can_lock_to_devices(self) -> bool:
        return False

    def lock_to_device(self, device: Any) -> None:
        pass

    def unlock_from_device(self, device: Any) -> None:
        pass

    def toggle_lock(self) -> None:
        pass

    def set_appointed_device(self, device: Any) -> None:
        pass

    def restore_bank(self, bank: Any) -> None:
        pass

    def port_settings_changed(self) -> None:
        pass

    def suggest_input_port(self) -> str:
        return ""

    def suggest_output_port(self) -> str:
        return ""

    def suggest_map_mode(self, cc_no: int, channel: int) -> int:
        return Live.MidiMap.MapMode.absolute

    def supports_pad_translation(self) -> bool:
        return False

    def song(self) -> Live.Song.Song:
        return self._c.song()

    # --- messages ----------------------------------------------------------------------------------

    def show(self, message: str) -> None:
        """Live's status bar, and Log.txt."""
        self._c.show_message(message)
        self.log(message)

    def log(self, message: str) -> None:
        self._c.log_message(message)

    # --- the two actions ---------------------------------------------------------------------------

    def continue_selected(self) -> None:
        """Continue the clip shown in the Clip View."""
        try:
            request, target = self.read_selected()
        except SegueError as exc:
            self.show(str(exc))
            return
        self._start(Job(request, target))

    def another_variation(self) -> None:
        """Write the next variation of the last request; when none is left, ask for new ones."""
        job = self.job
        if job is None:
            self.show("Segue: continue a clip first (select it and send the continue trigger)")
            return
        if self.running:
            self.show(f"Segue is still working on '{job.target.name}'...")
            return
        if job.next_variation < len(job.variations):
            self._write(job, job.next_variation)
            return
        again = Job(job.request, job.target, written=job.written)
        self._start(again)

    # --- prepare: the clip sent ahead of the trigger ---------------------------------------------------

    def _selection_changed(self) -> None:
        """Live: another clip is shown in the Clip View (or none). Listen to it instead; prepare it soon."""
        self._watch(self.song().view.detail_clip)
        self._changed()

    def _clip_changed(self) -> None:
        """Live: the shown clip's notes, loop, markers or meter were edited."""
        self._changed()

    def _watch(self, clip: Live.Clip.Clip | None) -> None:
        """Listen to `clip`'s WATCHED properties (none: to no clip's) instead of the previous clip's."""
        old, self._watched = self._watched, None
        if old is not None:
            try:
                for name in WATCHED:
                    if getattr(old, f"{name}_has_listener")(self._clip_changed):
                        getattr(old, f"remove_{name}_listener")(self._clip_changed)
            except RuntimeError:  # Live: the clip was deleted, and its listeners with it
                pass
        if clip is not None and clip.is_midi_clip:
            for name in WATCHED:
                getattr(clip, f"add_{name}_listener")(self._clip_changed)
            self._watched = clip

    def _changed(self) -> None:
        # Live's notifications may not change the set, and come by the dozen while notes are dragged:
        # the prepare runs from the tick, after PREPARE_DELAY_TICKS without another change.
        self._changes += 1
        changes = self._changes
        self.schedule_message(PREPARE_DELAY_TICKS, lambda: self._prepare_if_settled(changes))

    def _prepare_if_settled(self, changes: int) -> None:
        if changes != self._changes:
            return  # a later change has its own prepare scheduled
        # Sent even while a continue runs: the server prepares after it, and then skips drawing that
        # continue's request again, so the edited clip's head start is the one it keeps.
        try:
            request, _ = self.read_selected()
        except SegueError:
            return  # nothing to prepare (no clip, an audio clip, no notes): the trigger will say so
        if request == self.prepared:
            return
        self.prepared = request
        self.prepare_ids = self.prepare_ids[-7:] + [self.link.send_prepare(request)]
        self._prepare_sent = self._clock()
        self._keep_ticking()

    # --- reading the clip ----------------------------------------------------------------------------

    def read_selected(self) -> tuple[dict[str, Any], Target]:
        """The continue request for the Clip View's clip, and where its continuation goes."""
        song = self.song()
        clip = song.view.detail_clip
        if clip is None:
            raise SegueError("Segue: select a MIDI clip first (click it so it shows in the Clip View)")
        if not clip.is_midi_clip:
            raise SegueError(f"Segue: '{clip.name}' is an audio clip; select a MIDI clip")
        numerator, denominator = clip.signature_numerator, clip.signature_denominator
        beats_per_bar = numerator * 4.0 / denominator
        period = clip.length  # the loop, or start to end marker
        origin = clip.loop_start if clip.looping else clip.start_marker
        span = clip.end_time - clip.start_time if clip.is_arrangement_clip else period
        notes: list[list[float]] = []
        for note in clip.get_notes_extended(0, 128, origin, period):
            if note.mute:
                continue
            start = note.start_time - origin
            repeat = 0
            while start + repeat * period < span - 1e-9:  # a looped arrangement clip plays its loop again
                velocity = min(127, max(1, int(round(note.velocity))))
                notes.append([note.pitch, velocity, round(start + repeat * period, 6), round(note.duration, 6)])
                repeat += 1
                if not clip.is_arrangement_clip:
                    break
        if not notes:
            raise SegueError(f"Segue: '{clip.name}' has no notes to continue (muted notes are left out)")
        notes.sort(key=lambda n: (n[2], n[0]))
        track, slot_index = self._locate(song, clip)
        bars = self.settings.bars or 4
        offset = continuation_start(span, notes[-1][2], numerator, denominator)
        target = Target(track=track, arrangement=clip.is_arrangement_clip, slot_index=slot_index,
                        position=clip.start_time + offset if clip.is_arrangement_clip else 0.0, offset=offset,
                        length=bars * beats_per_bar, signature=(numerator, denominator), name=clip.name)
        if target.arrangement and not hasattr(track, "create_midi_clip"):
            raise SegueError("Segue: continuing Arrangement clips needs Live 12; in Live 11 use a Session clip")
        drums = any(device.can_have_drum_pads for device in track.devices)
        payload: dict[str, Any] = {"notes": notes, "tempo": round(song.tempo, 6), "time_signature": [numerator, denominator],
                                   "length": round(span, 6), "is_drum": drums}
        request: dict[str, Any] = {"clip": payload}
        s = self.settings
        for name, value in (("bars", s.bars), ("variations", s.variations), ("temperature", s.temperature),
                            ("seed", s.seed), ("model", s.model)):
            if value is not None:
                request[name] = value
        return request, target

    @staticmethod
    def _locate(song: Live.Song.Song, clip: Live.Clip.Clip) -> tuple[Live.Track.Track, int]:
        """The clip's track, and its slot index (Session) or -1 (Arrangement)."""
        for track in song.tracks:
            if clip.is_arrangement_clip:
                if any(other == clip for other in track.arrangement_clips):
                    return track, -1
            else:
                for index, slot in enumerate(track.clip_slots):
                    if slot.has_clip and slot.clip == clip:
                        return track, index
        raise SegueError(f"Segue: cannot find the track of '{clip.name}' (clips in a group track's own slots are not supported)")

    # --- talking to the server ---------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        now = self._clock()
        job.started = job.last_event = now
        job.hello_id = self.link.hello()
        job.request_id = self.link.send_continue(job.request)
        self.job, self.running = job, True
        if self.settings.prepare:  # the server draws this request ahead again when it is done (Generate again)
            self.prepared = job.request
        self.show(f"Segue: continuing '{job.target.name}'...")
        self._keep_ticking()

    def _keep_ticking(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.schedule_message(1, self._tick)

    def _tick(self) -> None:
        """Read what the server sent; keep ticking while a request runs or a prepare is unanswered."""
        self._ticking = False
        for event in self.link.poll():
            self._on_event(event)
        job = self.job
        if job is None or not self.running:
            if self.link.uploading or (self._prepare_sent and self._clock() - self._prepare_sent < PREPARE_LISTEN):
                self._keep_ticking()
            return
        now = self._clock()
        if not job.hello_ok and now - job.started > self.settings.hello_timeout:
            self._fail(f"Segue: no server answers at {self.settings.host}:{self.settings.port}. "
                       "Start it in a terminal with: segue serve", cancel=False)
            return
        if now - job.last_event > self.settings.silence_timeout:
            self._fail(f"Segue: the server sent nothing for {self.settings.silence_timeout:g} s; try again "
                       "(is `segue serve` still running?)", cancel=True)
            return
        self._ticking = True
        self.schedule_message(1, self._tick)

    def _fail(self, message: str, cancel: bool) -> None:
        if cancel and self.job is not None:
            self.link.cancel(self.job.request_id)
        self.running = False
        self.show(message)

    def _on_event(self, event: Event) -> None:
        kind, event_id = event.get("type"), str(event.get("id", ""))
        if event_id in self.prepare_ids:
            if event_id == self.prepare_ids[-1]:
                self._prepare_sent = 0.0
            if kind == "prepared":
                self.log(f"Segue: the server prepared the shown clip ({event.get('tokens')} tokens); "
                         "the continue trigger starts at once")
            elif kind == "error":  # the trigger's continue will meet the same problem and show it
                self.log(f"Segue: the server could not prepare the shown clip: {event.get('message')}")
                self.prepared = None  # so that the same request is sent again after a fix
            return
        job = self.job
        if job is None or not self.running:
            return  # a late reply for a request that is over
        if event_id == job.hello_id and kind == "hello":
            job.hello_ok = True
            if event.get("protocol") != PROTOCOL_VERSION:
                self._fail(f"Segue: the server speaks protocol {event.get('protocol')}; this script speaks "
                           f"{PROTOCOL_VERSION}. Update the script from the Segue you run", cancel=True)
            return
        if event_id != job.request_id:
            return
        job.hello_ok = True  # anything from the server proves it is there
        job.last_event = self._clock()
        if kind == "note":
            note = (int(event["pitch"]), int(event["velocity"]), float(event["start"]), float(event["duration"]))
            job.notes.setdefault(int(event["variation"]), []).append(note)
        elif kind == "done":
            job.promised[int(event["variation"])] = int(event["notes"])
        elif kind == "finished":
            self.running = False
            count = int(event["variations"])
            job.variations = [sorted(job.notes.get(k, []), key=lambda n: (n[2], n[0])) for k in range(count)]
            lost = sum(max(0, job.promised.get(k, 0) - len(v)) for k, v in enumerate(job.variations))
            if lost:
                self.log(f"Segue: {lost} note(s) were lost on the way from the server (UDP); the .mid files it "
                         "wrote have them all")
            self._write(job, 0)
        elif kind == "error":
            self._fail("Segue: " + str(event.get("message", "the server reported an error")), cancel=False)
        elif kind == "cancelled":
            self._fail("Segue: the request was cancelled", cancel=False)

    # --- writing the continuation --------------------------------------------------------------------

    def _write(self, job: Job, variation: int) -> None:
        """Put `variation` into a new clip at the job's target."""
        target = job.target
        notes = job.variations[variation]
        if target.arrangement:
            clip = self._arrangement_clip(job)
            bar = int(round(target.position / (target.signature[0] * 4.0 / target.signature[1]))) + 1
            where = f"at bar {bar}"
        else:
            clip, slot = self._session_clip(target)
            where = f"in slot {slot + 1}"
        if clip is None:
            return
        count = len(job.variations)
        clip.name = f"Segue {variation + 1}/{count} {target.name}"
        clip.signature_numerator, clip.signature_denominator = target.signature
        specs = []
        for pitch, velocity, start, duration in notes:
            at = start - target.offset
            if at < -1e-6 or at >= target.length:
                continue
            at = max(0.0, at)
            length = min(duration, target.length - at)
            specs.append(Live.Clip.MidiNoteSpecification(pitch=pitch, start_time=at, duration=length,
                                                         velocity=float(velocity)))
        clip.add_new_notes(tuple(specs))
        job.written = clip
        job.next_variation = variation + 1
        more = "; the variation trigger puts in the next" if job.next_variation < count else \
            "; the variation trigger asks for new ones"
        self.show(f"Segue: variation {variation + 1} of {count} ({len(specs)} notes) {where} of track "
                  f"'{target.track.name}'{more}")

    def _session_clip(self, target: Target) -> tuple[Live.Clip.Clip | None, int]:
        """A new clip in the first empty slot below the source clip (a new scene at the end when there is none)."""
        slots = target.track.clip_slots
        for index in range(target.slot_index + 1, len(slots)):
            if not slots[index].has_clip:
                return slots[index].create_clip(target.length), index
        self.song().create_scene(-1)
        slots = target.track.clip_slots
        return slots[len(slots) - 1].create_clip(target.length), len(slots) - 1

    def _arrangement_clip(self, job: Job) -> Live.Clip.Clip | None:
        """A new clip right after the source clip. The previous variation is replaced when it is still where
        it was put; anything else in the way is left alone (and so is the previous variation) and reported."""
        target = job.target
        track, start, end = target.track, target.position, target.position + target.length
        previous = None
        for other in track.arrangement_clips:
            if job.written is not None and other == job.written and abs(other.start_time - start) < 1e-6:
                previous = other
            elif other.start_time < end - 1e-6 and other.end_time > start + 1e-6:
                self.show(f"Segue: '{other.name}' is in the way right after '{target.name}' on track '{track.name}'; "
                          "move it and send the variation trigger")
                return None
        if previous is not None:
            track.delete_clip(previous)
        return track.create_midi_clip(start, target.length)
