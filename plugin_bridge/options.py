"""Command-line options shared by `segue continue`, `segue client` and `segue serve`, and the
ports they meet on: one definition, so the local and the served paths cannot drift apart.

Continuation options default to None, meaning "not given": the model's own `search` defaults
(engine/manifest.py) fill them, in `segue continue` and on the server alike.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.clip import Arrangement

DEFAULT_OSC_PORT = 9100
DEFAULT_ZMQ_PORT = 5555
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_ZMQ_PORT}"

SAMPLING_OPTIONS = ("bars", "variations", "temperature", "top_k", "top_p", "seed")
CONSTRAINT_OPTIONS = ("key", "scale", "pitch_min", "pitch_max", "max_polyphony", "max_notes_per_bar",
                      "min_notes_per_bar", "velocity_min", "velocity_max")


def add_continuation_args(p: argparse.ArgumentParser) -> None:
    """The clip and the musical options shared by `segue continue` and `segue client continue`."""
    p.add_argument("clip", type=Path, help="the MIDI file to continue")
    p.add_argument("--track", type=int, action="append", metavar="N",
                   help="continue track N of the file (1 = the first track with notes; repeat for several); the other "
                        "tracks are heard as context. Default: every track")
    p.add_argument("--bars", type=int, help="how many bars to add (1-64; default from the model, usually 4)")
    p.add_argument("--variations", type=int, help="how many different continuations (1-16, default 1)")
    p.add_argument("--temperature", type=float,
                   help="0 = always the most likely note, 1 = as trained, higher = wilder (default from the model, usually 0.9)")
    p.add_argument("--top-k", type=int, help="only choose among the K most likely tokens (0 = off, the usual default)")
    p.add_argument("--top-p", type=float, help="only choose among the most likely tokens covering this probability "
                   "(1 = off; default from the model, usually 0.95)")
    p.add_argument("--seed", type=int, help="same seed, same clip, same settings = same notes")
    p.add_argument("--mode", choices=("sample", "beam"),
                   help="sample = varied ideas; beam = the most likely continuations (default sample)")
    p.add_argument("--beam-width", type=int, help="how many candidates beam mode keeps (default 5)")
    p.add_argument("--stay-with-clip", type=float, metavar="S",
                   help="how strongly notes keep to the clip's key, register, drum kit and chord sizes: 0 = the model alone, "
                        "1 = the usual default, up to 2 (tight)")
    limits = p.add_argument_group("constraints", "limits every generated note obeys")
    limits.add_argument("--key", help="tonic of the key, e.g. C, F#, Bb")
    limits.add_argument("--scale", help="scale in that key, e.g. major, minor")
    limits.add_argument("--pitch-min", type=int, help="lowest MIDI pitch allowed (60 = middle C)")
    limits.add_argument("--pitch-max", type=int, help="highest MIDI pitch allowed")
    limits.add_argument("--max-polyphony", type=int, help="most notes sounding at once")
    limits.add_argument("--max-notes-per-bar", type=int, help="most notes started in one bar")
    limits.add_argument("--min-notes-per-bar", type=int, help="fewest notes started in every bar (pairs well with --mode beam)")
    limits.add_argument("--velocity-min", type=int, help="softest velocity allowed (1-127)")
    limits.add_argument("--velocity-max", type=int, help="loudest velocity allowed (1-127)")


def read_arrangement(path: Path, tracks: list[int] | None) -> Arrangement:
    """The MIDI file's tracks, continuing those numbered in `tracks` (1-based, as printed) or all of
    them. ClipError names the file's problem or the track numbers that do not exist."""
    from engine.midi_file import read_tracks

    arrangement = read_tracks(path)
    if tracks:
        arrangement = replace(arrangement, continued=tuple(sorted({n - 1 for n in tracks})))
        arrangement.validate()
    return arrangement


def continuation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed options -> the continue request's fields, in protocol form; options left out are not
    included, so the model's defaults apply (constraints as a name -> value object)."""
    options = {name: getattr(args, name) for name in (*SAMPLING_OPTIONS, "mode", "beam_width", "stay_with_clip")}
    constraints = {name: getattr(args, name) for name in CONSTRAINT_OPTIONS if getattr(args, name) is not None}
    if constraints:
        options["constraints"] = constraints
    return {k: v for k, v in options.items() if v is not None}
