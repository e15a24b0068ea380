"""Render a .mid file to a .wav with FluidSynth and a General MIDI soundfont, so a person can listen.

    segue render clip.mid [--out clip.wav] [--soundfont /usr/share/sounds/sf2/FluidR3_GM.sf2]

Used by `segue render`, `segue continue --render` and the audio section of `segue eval`. FluidSynth
runs as a command (`fluidsynth -ni -F out.wav -r 44100 SOUNDFONT FILE.mid`), not as a library
binding, so Segue itself needs no audio dependency. FluidSynth exits 0 even when it cannot read
the soundfont and writes a silent file when nothing plays, so the soundfont is checked before and
the result after: it must be a readable WAV whose RMS is above silence.
On Debian/Ubuntu: apt-get install -y fluidsynth fluid-soundfont-gm
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = "apt-get install -y fluidsynth fluid-soundfont-gm"
SAMPLE_RATE = 44100
# FluidSynth's default gain (0.2) is quiet for one instrument; 0.5 is a comfortable level without clipping chords.
GAIN = 0.5
SILENCE_RMS = 1e-4  # of full scale; a rendered note is orders of magnitude louder
RENDER_TIMEOUT_S = 300


class RenderError(RuntimeError):
    """Audio that could not be rendered, with a sentence that says why and what to do."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    seconds: float
    rms: float  # of full scale (0-1)


def soundfont_path(soundfont: str | Path | None = None) -> Path:
    """The soundfont to use: the one given, else $SEGUE_SOUNDFONT, else the Debian GM soundfont; it must exist."""
    path = Path(soundfont or os.environ.get("SEGUE_SOUNDFONT") or DEFAULT_SOUNDFONT)
    if not path.is_file():
        raise RenderError(f"soundfont {path} does not exist: install the General MIDI soundfont with "
                          f"`{INSTALL_HINT}` or pass --soundfont PATH")
    return path


def fluidsynth_binary() -> str:
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise RenderError(f"fluidsynth is not installed: install it with `{INSTALL_HINT}`")
    return binary


def wav_level(path: str | Path) -> tuple[float, float]:
    """(duration in seconds, RMS of all samples as a fraction of full scale) of a PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, frames, rate = wav.getsampwidth(), wav.getnframes(), wav.getframerate()
            data = wav.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise RenderError(f"{path} is not a readable WAV file ({exc})") from exc
    if width == 1:  # 8-bit WAV is unsigned
        samples = np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0
    elif width == 3:  # 24-bit: widen each little-endian triple to 32 bits
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        packed = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8 | raw[:, 2].astype(np.int32) << 16)
        samples = np.where(packed >= 1 << 23, packed - (1 << 24), packed).astype(np.float64)
    else:
        samples = np.frombuffer(data, dtype={2: "<i2", 4: "<i4"}[width]).astype(np.float64)
    full_scale = float(1 << (8 * width - 1))
    rms = float(np.sqrt(np.mean(np.square(samples)))) / full_scale if len(samples) else 0.0
    return frames / rate if rate else 0.0, rms


def render_midi(midi: str | Path, wav: str | Path | None = None, soundfont: str | Path | None = None,
                sample_rate: int = SAMPLE_RATE) -> Rendered:
    """Render `midi` to `wav` (default: beside it, same name) and check the result is audible."""
    midi = Path(midi)
    if not midi.is_file():
        raise RenderError(f"{midi} does not exist")
    wav = Path(wav) if wav is not None else midi.with_suffix(".wav")
    binary = fluidsynth_binary()
    font = soundfont_path(soundfont)
    wav.parent.mkdir(parents=True, exist_ok=True)
    # -ni: no shell, no MIDI input; -F: render to file as fast as possible; -O s16 -T wav: 16-bit PCM,
    # which the `wave` module reads back for the silence check.
    command = [binary, "-ni", "-q", "-g", str(GAIN), "-r", str(sample_rate), "-O", "s16", "-T", "wav", "-F", str(wav),
               str(font), str(midi)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"fluidsynth took longer than {RENDER_TIMEOUT_S} s to render {midi}") from exc
    if done.returncode != 0 or not wav.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RenderError(f"fluidsynth could not render {midi}: {detail[-1] if detail else f'exit code {done.returncode}'}")
    seconds, rms = wav_level(wav)
    if rms <= SILENCE_RMS:
        raise RenderError(f"{wav} is silent (RMS {rms:.1e}): {midi} has no audible notes with soundfont {font}")
    return Rendered(wav, seconds, rms)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segue render", description="Render a MIDI file to a WAV file with FluidSynth and a "
                                "General MIDI soundfont, so you can listen without a DAW.")
    p.add_argument("midi", type=Path, help="the .mid file to render")
    p.add_argument("--out", type=Path, help="the .wav file to write (default: beside the .mid, same name)")
    p.add_argument("--soundfont", type=Path, help=f"a .sf2 soundfont (default: $SEGUE_SOUNDFONT or {DEFAULT_SOUNDFONT})")
    p.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help=f"samples per second (default {SAMPLE_RATE})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rendered = render_midi(args.midi, args.out, args.soundfont, args.sample_rate)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{rendered.path}  ({rendered.seconds:.1f} s, RMS {rendered.rms:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
