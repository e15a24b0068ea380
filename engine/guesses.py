"""What a one-track stream feeds the model on a guess (Generator._guess), and how its guesses have fared.

A guessed token goes into the same model call as the token just drawn; the model still draws every
token from its own distribution, so a guess changes no note. One that comes true saves the call the
model would have taken for it; one that does not is written over by the next call, at the cost of one
more position in a call that reads a few already (a few per cent of a call). So a row guesses a kind
of token while enough of its guesses of that kind come true: for Velocity and Duration, judged on every
note written (`NoteHabits`), for the Position where a note ends on the guesses
fed (`GuessRecord`).

`NoteHabits` guesses a note's Velocity and Duration from what the stream's own notes have done: the
last one; the last one at the same place in the beat and the same place in its chord (the third note
of a chord on the off-beat: a chorale's voices, an ostinato's accents); and, for Durations, the most
common of the last eight. Every way is scored on every note as it is written, and the guess is the
one that came true most often so far (the last one while they tie). What that saves on the bundled
examples: docs/performance.md, "Session 9".
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

GUESS_TRIAL = 8  # guesses of a kind a row makes before its hit rate decides whether it goes on guessing ...
GUESS_MIN_RATE = 0.15  # ... which it does while at least this share came true (a miss costs a few % of a call)
# A Position guess is made after every note, and after a chord's inner notes it is bound to miss (another
# Pitch comes). Each position more in a call costs about 5 % of a one-position call (the shipped model after
# 300-600 positions: bench/bench_guesses.py --widths), a hit saves the whole call: it pays while a tenth of
# them come true.
POSITION_GUESS_MIN_RATE = 0.1
RECENT_NOTES = 8  # the window of the "most common Duration" guess


@dataclass
class GuessRecord:
    """How a row's guesses of one kind of token (Velocity, Duration, Position) have fared. It goes on
    guessing Positions while at least `min_rate` of them came true (or fewer than GUESS_TRIAL were made);
    Velocity and Duration are judged on every note instead (NoteHabits), the records kept for the benches."""

    made: int = 0
    right: int = 0

    def worth_it(self, min_rate: float = GUESS_MIN_RATE) -> bool:
        return self.made < GUESS_TRIAL or self.right >= min_rate * self.made


class _Ways:
    """The ways of guessing one kind of token (Velocity or Duration), each scored on every note written:
    the last one, the last one at the same place in the beat and chord, and (`most_common`) the most
    common of the last RECENT_NOTES."""

    def __init__(self, positions_per_beat: int, last: int, most_common: bool):
        self.positions_per_beat = positions_per_beat
        self.last = last  # -1 for none yet
        self.hits = [0, 0, 0] if most_common else [0, 0]  # per way, in that order
        self.seen = 0
        self._at: dict[tuple[int, int], int] = {}  # (place in the beat, place in the chord) -> token
        self._on_beat: dict[int, int] = {}  # place in the beat -> token
        self._recent: deque[int] = deque(maxlen=RECENT_NOTES)
        self._counts: Counter[int] = Counter()

    def worth_guessing(self) -> bool:
        """Whether the best way came true for at least GUESS_MIN_RATE of the notes so far (or fewer than
        GUESS_TRIAL were written). Scored on every note, fed or not, so a row that stopped guessing during
        a stretch of erratic notes starts again when its notes settle."""
        return self.seen < GUESS_TRIAL or max(self.hits) >= GUESS_MIN_RATE * self.seen

    def guess(self, position: int, rank: int) -> int:
        """The way that came true most often so far (the first of equals: the last one while they tie)."""
        hits = self.hits
        best = max(range(len(hits)), key=hits.__getitem__)
        if best == 1:
            return self._same_place(position, rank)
        return self._most_common() if best == 2 else self.last

    def saw(self, token: int, position: int, rank: int) -> None:
        """Score each way on the `token` the stream wrote, then remember it."""
        hits = self.hits
        hits[0] += self.last == token
        hits[1] += self._same_place(position, rank) == token
        if len(hits) > 2:
            hits[2] += self._most_common() == token
            if len(self._recent) == RECENT_NOTES:
                self._counts[self._recent[0]] -= 1
            self._recent.append(token)
            self._counts[token] += 1
        self.seen += 1
        self.last = token
        beat = position % self.positions_per_beat
        self._at[beat, rank] = token
        self._on_beat[beat] = token

    def _same_place(self, position: int, rank: int) -> int:
        beat = position % self.positions_per_beat
        found = self._at.get((beat, rank))
        return self._on_beat.get(beat, self.last) if found is None else found

    def _most_common(self) -> int:
        return self._counts.most_common(1)[0][0] if self._recent else self.last


class NoteHabits:
    """What a stream's notes have done so far, as it is written: the guesses of the next note's Velocity
    and Duration (`position` in its bar, the `rank`-th note from 1 at that position), and the shortest
    note begun at the current position (where its chord moves on)."""

    def __init__(self, positions_per_beat: int, velocity: int = -1, duration: int = -1):
        self.velocities = _Ways(positions_per_beat, velocity, most_common=False)  # the prompt's last, to begin with
        self.durations = _Ways(positions_per_beat, duration, most_common=True)
        self.shortest_here: int | None = None  # time units of the shortest note begun at this position

    @property
    def duration(self) -> int:
        """The last Duration token written (-1: none yet)."""
        return self.durations.last

    def moved(self) -> None:
        """A Position or Bar: the notes from here on begin later."""
        self.shortest_here = None

    def saw_velocity(self, token: int, position: int, rank: int) -> None:
        self.velocities.saw(token, position, rank)

    def saw_duration(self, token: int, units: int, position: int, rank: int) -> None:
        self.durations.saw(token, position, rank)
        self.shortest_here = units if self.shortest_here is None else min(self.shortest_here, units)
