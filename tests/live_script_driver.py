"""Run the Live Remote Script in another Python (Live 11 embeds 3.7) against a running `segue serve`.

    python3.7 tests/live_script_driver.py SCRIPTS_DIR OSC_PORT

Standard library only, Python 3.7 syntax. A fake `Live` module and a Session View with one track:
slot 1 holds a 2-bar clip, shown in the Clip View, slot 2 is empty. Ticks as Live does until the
script's prepare of the shown clip is answered (at most 10 s), sends the continue trigger, ticks until
the script is idle, and prints one JSON object: the status-bar messages, the log and the new clip
(name, length, notes). tests/test_live_script.py runs it and checks the notes against the server's .mid.
"""

import json
import sys
import time
import types


class NoteSpec:
    def __init__(self, pitch, start_time, duration, velocity=100.0, mute=False):
        self.pitch, self.start_time, self.duration, self.velocity, self.mute = pitch, start_time, duration, velocity, mute


class Note:
    def __init__(self, pitch, start_time, duration, velocity, mute=False):
        self.pitch, self.start_time, self.duration, self.velocity, self.mute = pitch, start_time, duration, velocity, mute


class Clip:
    def __init__(self, length, notes=(), name=""):
        self.name, self.length, self.looping, self.loop_start, self.start_marker = name, length, True, 0.0, 0.0
        self.loop_end = self.end_marker = length
        self.signature_numerator, self.signature_denominator = 4, 4
        self.is_midi_clip, self.is_arrangement_clip = True, False
        self.start_time, self.end_time = 0.0, length
        self.notes = [Note(*n) for n in notes]
        self.added = []
        self.listeners = []  # every property's together: the script adds one callback to each it watches

    def __getattr__(self, name):
        if name.startswith("add_") and name.endswith("_listener"):
            return self.listeners.append
        if name.startswith("remove_") and name.endswith("_listener"):
            return self.listeners.remove
        if name.endswith("_has_listener"):
            return lambda callback: callback in self.listeners
        raise AttributeError(name)

    def get_notes_extended(self, from_pitch, pitch_span, from_time, time_span):
        return [n for n in self.notes if from_time <= n.start_time < from_time + time_span]

    def add_new_notes(self, specs):
        self.added.extend(specs)


class View:
    def __init__(self, clip):
        self.detail_clip, self.listeners = clip, []

    def add_detail_clip_listener(self, callback):
        self.listeners.append(callback)

    def remove_detail_clip_listener(self, callback):
        self.listeners.remove(callback)

    def detail_clip_has_listener(self, callback):
        return callback in self.listeners


class Slot:
    def __init__(self, clip=None):
        self.clip = clip

    @property
    def has_clip(self):
        return self.clip is not None

    def create_clip(self, length):
        self.clip = Clip(length)
        return self.clip


class Track:
    def __init__(self, name, slots):
        self.name, self.clip_slots, self.arrangement_clips = name, slots, []
        self.devices = [types.SimpleNamespace(can_have_drum_pads=False)]


class CInstance:
    def __init__(self, song):
        self._song, self.messages, self.logged = song, [], []

    def song(self):
        return self._song

    def show_message(self, message):
        self.messages.append(message)

    def log_message(self, message):
        self.logged.append(message)

    def handle(self):
        return 1

    def request_rebuild_midi_map(self):
        pass


def main(scripts_dir, port):
    live = types.ModuleType("Live")
    live.Clip = types.SimpleNamespace(MidiNoteSpecification=NoteSpec)
    live.MidiMap = types.SimpleNamespace(forward_midi_cc=lambda *a: True, forward_midi_note=lambda *a: True,
                                         MapMode=types.SimpleNamespace(absolute=0))
    sys.modules["Live"] = live
    sys.path.insert(0, scripts_dir)
    import Segue

    source = Clip(8.0, [(60, 0.0, 1.0, 90), (64, 1.0, 1.0, 80), (67, 2.0, 1.0, 80), (72, 3.0, 1.5, 100),
                        (48, 0.0, 4.0, 70), (65, 6.0, 2.0, 85)], name="Riff")
    track = Track("Keys", [Slot(source), Slot()])
    song = types.SimpleNamespace(tracks=[track], tempo=120.0, view=View(source))
    c = CInstance(song)
    surface = Segue.surface.SegueSurface(c, Segue.surface.Settings(port=port, bars=2, variations=1, seed=9))
    reply_port = surface.link.reply_port
    deadline = time.monotonic() + 10
    while not any("prepared" in line for line in c.logged) and time.monotonic() < deadline:
        surface.update_display()
        time.sleep(0.01)
    surface.receive_midi((0xBF, 102, 127))
    deadline = time.monotonic() + 60
    while (surface.running or surface._scheduled) and time.monotonic() < deadline:
        surface.update_display()
        time.sleep(0.01)
    surface.disconnect()
    new = track.clip_slots[1].clip
    print(json.dumps({"python": list(sys.version_info[:2]), "messages": c.messages, "logged": c.logged,
                      "reply_port": reply_port, "listeners": len(song.view.listeners) + len(source.listeners),
                      "clip": None if new is None else {
                          "name": new.name, "length": new.length,
                          "notes": [[s.pitch, s.velocity, s.start_time, s.duration] for s in new.added]}}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
