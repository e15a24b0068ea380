"""Build a tiny Segue model from synthetic MIDI, the way a user builds a real one.

    python tests/make_tiny_model.py /tmp/tiny

Writes OUT/midi/*.mid (real MIDI files written with mido: melodies over bass lines in 4/4, 3/4
and 6/8, one track of piano; every fourth piece is a band instead: piano melody, electric bass and
a drum kit on three tracks, so the model has heard instruments told apart), trains the `tiny` preset on
them for a few dozen steps with `segue train`, and exports OUT/model with `export-onnx`. Used by the test
session; takes a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mido
import numpy as np

METERS = [(4, 4), (3, 4), (6, 8)]


BASS_PROGRAM = 33  # electric bass (finger)
KICK, HAT = 36, 42


def write_piece(path: Path, seed: int) -> None:
    """A short piece: a stepwise melody over a bass note per bar, with dynamics; a band on three
    tracks (melody, bass, drums) when seed % 4 == 1."""
    rng = np.random.default_rng(seed)
    numerator, denominator = METERS[seed % len(METERS)]
    tpq = 480
    beats_per_bar = numerator * 4 / denominator
    band = seed % 4 == 1  # 3/4, 6/8 and 4/4 bands in turn
    mid = mido.MidiFile(ticks_per_beat=tpq)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("time_signature", numerator=numerator, denominator=denominator, time=0))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(90 + 10 * (seed % 5)), time=0))
    track.append(mido.Message("program_change", program=0, time=0))
    events = []  # (tick, kind, pitch, velocity)
    bass_events = []
    drum_events = []
    root = 48 + int(rng.integers(0, 12))
    scale = [0, 2, 4, 5, 7, 9, 11]
    degree = 7
    for bar in range(8):
        bar_start = bar * beats_per_bar
        bass = root + scale[int(rng.integers(0, 7))] - 12
        (bass_events if band else events).extend(
            [(bar_start * tpq, 1, bass, 70), ((bar_start + beats_per_bar) * tpq - 1, 0, bass, 0)])
        for eighth in range(int(beats_per_bar * 2)):
            hit = (bar_start + eighth / 2) * tpq
            drum_events += [(hit, 1, KICK if eighth % 4 == 0 else HAT, 100 if eighth % 4 == 0 else 70),
                            (hit + tpq / 8, 0, KICK if eighth % 4 == 0 else HAT, 0)]
        step = 0.5 if denominator == 8 else (0.5 if rng.random() < 0.5 else 1.0)
        t = 0.0
        while t < beats_per_bar - 1e-9:
            degree = int(np.clip(degree + rng.integers(-2, 3), 0, 13))
            pitch = root + 12 + scale[degree % 7] + 12 * (degree // 7)
            velocity = int(np.clip(60 + 30 * np.sin(bar + t) + rng.integers(-8, 9), 20, 120))
            start = (bar_start + t) * tpq
            events += [(start, 1, pitch, velocity), (start + step * tpq * 0.9, 0, pitch, 0)]
            t += step
    write_events(track, events, channel=0)
    if band:
        bass_track = mido.MidiTrack([mido.Message("program_change", program=BASS_PROGRAM, channel=1, time=0)])
        write_events(bass_track, bass_events, channel=1)
        drum_track = mido.MidiTrack()
        write_events(drum_track, drum_events, channel=9)
        mid.tracks += [bass_track, drum_track]
    mid.save(str(path))


def write_events(track: mido.MidiTrack, events: list, channel: int) -> None:
    """(tick, on?, pitch, velocity) events as delta-timed note messages on one channel."""
    now = 0
    for tick, kind, pitch, velocity in sorted(events, key=lambda e: (e[0], e[1])):
        tick = int(round(tick))
        kind_name = "note_on" if kind else "note_off"
        track.append(mido.Message(kind_name, note=pitch, velocity=velocity, channel=channel, time=tick - now))
        now = tick


def write_corpus(folder: Path, count: int = 36) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"piece_{seed:03d}.mid"
        write_piece(path, seed)
        paths.append(path)
    return paths


def build(out: Path, steps: int = 40) -> Path:
    """Synthetic corpus -> trained tiny checkpoint -> exported model folder. Returns the folder."""
    from export.onnx_export import export_model
    from training.train import main as train_main

    out = Path(out)
    write_corpus(out / "midi")
    code = train_main(["--data", str(out / "midi"), "--preset", "tiny", "--out", str(out / "run"),
                       "--max-steps", str(steps), "--eval-every", str(steps), "--batch-size", "8",
                       "--val-fraction", "0.2", "--warmup", "5", "--lr", "3e-3", "--threads", "1",
                       "--dropout", "0.0", "--quiet"])
    if code != 0:
        raise RuntimeError("training the tiny model failed")
    export_model(out / "run" / "best.safetensors", out / "model")
    return out / "model"


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")))
