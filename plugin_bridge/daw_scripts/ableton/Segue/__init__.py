"""Segue for Ableton Live: continue the selected clip in style, from a MIDI Remote Script.

Copy this folder (`Segue`) into Live's Remote Scripts folder, pick "Segue" as a Control Surface in
Settings > Link, Tempo & MIDI, and start `segue serve`; docs/hosts-live.md walks through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .surface import SegueSurface

if TYPE_CHECKING:
    from .surface import CInstance


def create_instance(c_instance: CInstance) -> SegueSurface:
    """Live calls this once when the control surface is selected."""
    return SegueSurface(c_instance)
