"""Tokens -> finished notes, one note as soon as its Duration token arrives.

The assembler walks the same REMI stream the grammar produces and keeps the musical clock:
the bar it is in, that bar's meter, and the current position. It yields a `Note` (in beats,
relative to `offset_beats`) the moment the note's last token is seen, which is what lets the
server stream notes while the model is still generating.
"""

from __future__ import annotations

from engine.clip import Note
from engine.tokens import ClipTokenizer


class NoteAssembler:
    def __init__(self, tokenizer: ClipTokenizer, meter: tuple[int, int], offset_beats: float = 0.0, channel: int = 0):
        self.tok = tokenizer
        self.kinds = tokenizer.kinds
        self.tpq = tokenizer.ticks_per_quarter
        self.offset = offset_beats
        self.channel = channel
        self.meter = meter
        self.bar_start: int | None = None  # ticks of the current bar's start; None before the first Bar
        self.next_bar_start = 0
        self.position = 0
        self.pitch: int | None = None
        self.velocity: int | None = None

    def feed(self, token: int) -> Note | None:
        k = self.kinds
        if token == k.bar:
            self.bar_start = self.next_bar_start
            self.position = 0
            self.next_bar_start = self.bar_start + self.tok.bar_ticks(self.meter)
        elif token in k.time_sig:
            self.meter = k.time_sig[token]
            if self.bar_start is not None:
                self.next_bar_start = self.bar_start + self.tok.bar_ticks(self.meter)
        elif token in k.position:
            self.position = k.position[token]
        elif token in k.pitch or token in k.pitch_drum:
            self.pitch = k.pitch.get(token, k.pitch_drum.get(token))
        elif token in k.velocity:
            self.velocity = k.velocity[token]
        elif token in k.duration and self.pitch is not None and self.bar_start is not None:
            ticks = self.tok.duration_ticks(k.duration[token], self.meter)
            start = (self.bar_start + self.tok.position_ticks(self.position, self.meter)) / self.tpq
            note = Note(self.pitch, self.velocity or 64, self.offset + start, ticks / self.tpq, self.channel)
            self.pitch = None
            return note
        return None
