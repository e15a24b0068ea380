"""A prepared clip's continuation begun in the background, up to its first note: a head start.

A shell sends `prepare` with the very request its Continue will send (the JUCE shell does: bars,
variations, temperature, constraints, and a seed only when the musician fixed one). Once the clip is
prefilled, the prepare thread also draws that continuation's first tokens, up to its first note, and
keeps the stream there, suspended. A continue from the same client with the same clip, model and
options takes it: its first note goes out at once, and decoding goes on in the same stream. Anything
else closes it (its buffer is freed for the others).

The notes are the stream's own, so exactly those of a continue with its seed. A prepare that names no
seed gets one drawn here (as a continue without a seed gets one when it starts): a continue without a
seed then continues with that one, and its `.mid` provenance records it. A continue that names a seed
takes a head start begun with that same seed only.

Why: after a prepare, the first note still waited for tokens of the continuation's first bar and at
least one model call: 1.4 ms of work back to back on the shipped model, 2.5-3 ms on a machine coming
back from idle, as every continue does (a musician's click follows silence; docs/performance.md "Session
23"). The ostinato of bench/bench_prepare.py needed two calls (6.5 ms to its first note over OSC). Drawn
ahead, the first note costs the request's parsing and one hand-off to a worker.

The drawing stops at the first decode step after a continue starts waiting or running anywhere in the
server (generation goes first, as for prefills); a head start stopped short is thrown away. After a
continue ends, the service begins the next one for the same clip and request, so "Generate again" has
one too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from engine.clip import Arrangement, Clip
from engine.generate import ContinuationRequest, NoteEvent, RequestError, VariationDone, fresh_seed
from engine.prefill_cache import PrefillCache

log = logging.getLogger("segue.head_start")

Event = NoteEvent | VariationDone


class _StopWhen:
    """The `should_stop` a stream polls before each decode step, which can be pointed elsewhere: at the
    prepare's "a continue is waiting" while drawing ahead, at the continue's cancel flag afterwards."""

    def __init__(self, condition: Callable[[], bool]):
        self.condition = condition

    def __call__(self) -> bool:
        return self.condition()


@dataclass(eq=False)
class HeadStart:
    model: object  # the LoadedModel it was drawn with: a hot-swapped model's never serves the new one
    clip: Clip | Arrangement
    asked: ContinuationRequest  # as the prepare asked: seed None when the server chose it
    seed: int  # the seed the stream draws with
    events: list[Event]  # drawn, not yet sent
    stream: Iterator[Event] = field(repr=False)
    stop: _StopWhen = field(repr=False)

    @property
    def notes(self) -> int:
        return sum(isinstance(event, NoteEvent) for event in self.events)

    def serves(self, model: object, clip: Clip | Arrangement, request: ContinuationRequest) -> bool:
        """Whether a continue of `clip` on `model` asking `request` gets exactly this stream's notes."""
        return model is self.model and request == self.asked and (clip is self.clip or clip == self.clip)

    def resume(self, should_stop: Callable[[], bool]) -> Iterator[Event]:
        """The events drawn ahead, then the rest of the stream (polling `should_stop` from now on)."""
        self.stop.condition = should_stop
        try:
            while self.events:
                yield self.events.pop(0)
            yield from self.stream
        finally:
            self.close()

    def close(self) -> None:
        """End the stream where it is (its prompt's decode buffer is given back)."""
        self.stream.close()  # type: ignore[attr-defined]  # Generator.stream is a generator


def begin(model, clip: Clip | Arrangement, request: ContinuationRequest, prefills: PrefillCache,
          should_stop: Callable[[], bool]) -> HeadStart | None:
    """Draw `request`'s continuation of `clip` on `model` (a LoadedModel) up to its first note. None
    where there is nothing to keep: beam search (its notes come at its end), a request the model
    refuses (the continue will say why), or `should_stop` said stop first."""
    if request.mode != "sample":
        return None
    seed = request.seed if request.seed is not None else fresh_seed()
    stop = _StopWhen(should_stop)
    stream = model.generator.stream(clip, replace(request, seed=seed), should_stop=stop, prefills=prefills)
    events: list[Event] = []
    try:
        for event in stream:
            events.append(event)
            if isinstance(event, NoteEvent):
                break
    except RequestError as exc:
        log.debug("no head start: %s", exc)
        return None
    if should_stop():  # stopped short (or about to be): a continue decodes for itself
        stream.close()
        return None
    return HeadStart(model, clip, request, seed, events, stream, stop)
