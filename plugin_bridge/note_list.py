"""A clip message's note list -> engine Notes: checked, and remembered for a clip sent again.

A shell sends the same clip several times: `prepare` when the musician selects it, `continue` when
they press the button, again for "Generate again". Building the Notes is most of a clip's parse
(about 1.5 us a note: a frozen dataclass sets each field through object.__setattr__), so the
Notes of the last few note lists are kept by their content. The key is the list itself as tuples,
taken only after every value has been checked to be a plain int or float in range: `True`, `1` and
`1.0` compare equal in a tuple but only the last two are valid, and they make the same Note.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from engine.clip import Note

KEPT_LISTS = 32  # note lists remembered (a list of 1,000 notes holds about 200 KB of tuples and Notes)
_BOUND = 1e9  # abs(v) < 1e9 refuses NaN and infinity too; math.isfinite raised OverflowError on an
# integer of 400 digits (found by bench/fuzz_long.py)


class NoteListError(ValueError):
    """Note `index` of the list is not [pitch, velocity, start, duration(, channel)] numbers."""

    def __init__(self, index: int):
        super().__init__(f"clip note {index} must be [pitch, velocity, start, duration(, channel)] numbers")
        self.index = index


_kept: OrderedDict[tuple, tuple[Note, ...]] = OrderedDict()
_lock = threading.Lock()


def notes_of(notes_in: list) -> tuple[Note, ...]:
    """`notes_in` (each [pitch, velocity, start, duration, channel?] or an object with those names) ->
    Notes, in the order given (not yet range-checked: Clip.validate does that). NoteListError names
    the first entry that is not a list of 4 or 5 finite numbers."""
    key = _plain_key(notes_in)
    if key is not None:
        with _lock:
            known = _kept.get(key)
            if known is not None:
                _kept.move_to_end(key)
                return known
    notes = tuple(_note(raw, index) for index, raw in enumerate(notes_in))  # a tuple: shared, never changed
    if key is not None:
        with _lock:
            _kept[key] = notes
            while len(_kept) > KEPT_LISTS:
                _kept.popitem(last=False)
    return notes


def _plain_key(notes_in: list) -> tuple | None:
    """The list as a tuple of tuples when every note is a list of 4 or 5 plain ints and floats in range
    (what JSON and OSC clients send); None otherwise (notes as objects, or something to refuse)."""
    for raw in notes_in:
        kind = type(raw)
        if (kind is not list and kind is not tuple) or not 4 <= len(raw) <= 5:
            return None
        for value in raw:
            kind = type(value)
            if (kind is not int and kind is not float) or not -_BOUND < value < _BOUND:
                return None
    return tuple(map(tuple, notes_in))


def _note(raw: Any, index: int) -> Note:
    if isinstance(raw, dict):
        raw = [raw.get("pitch"), raw.get("velocity"), raw.get("start"), raw.get("duration"), raw.get("channel", 0)]
    if not isinstance(raw, (list, tuple)) or len(raw) not in (4, 5) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < _BOUND for v in raw):
        raise NoteListError(index)
    pitch, velocity, start, duration, *rest = raw
    return Note(int(pitch), int(velocity), float(start), float(duration), int(rest[0]) if rest else 0)
