"""Where a generated .mid came from, written into the file itself.

    record = Provenance.of(manifest_sha256, manifest, request, seed, variation, arrangement)
    write_tracks(path, clips, names, provenance=record)   # a MIDI text event at tick 0 of track 1
    read_provenance(path)                                  # -> Provenance, or None for other files

Every .mid Segue writes carries the model (name, the sha256 of its manifest, which names the sha256
of every file of the model, and its training-data fingerprint), the request (bars, variations,
sampling or beam settings, constraints), the seed the variation was drawn with, and the sha256 of
the prompt clip. `segue provenance FILE.mid` prints it, and with the prompt clip and the model it
generates the continuation again and compares it note for note.

The record is one MIDI text meta event whose text is `PREFIX` and compact JSON: DAWs keep text events
and show them, if at all, as a comment on the track; it is not a marker, so it adds nothing to the
arrangement's marker lane.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mido

from engine.clip import Arrangement, Clip
from engine.manifest import Manifest
from engine.request import ContinuationRequest

PREFIX = "segue-provenance "
SCHEMA = 1


@dataclass(frozen=True)
class Provenance:
    model_name: str
    manifest_sha256: str
    data_fingerprint: str | None
    seed: int | None  # what the variation was drawn with (None: beam search, which draws nothing)
    variation: int  # 1-based
    request: dict  # ContinuationRequest fields: bars, variations, temperature, top_k, top_p, mode, beam_width, stay_with_clip, constraints
    prompt_sha256: str  # of the prompt clip's notes, meter, tempo and tracks (`prompt_digest`)
    continued: list[int] = field(default_factory=list)  # 0-based tracks of the prompt that were continued
    variant: str = "fp32"  # the model file served (fp32, int8: the same weights, logits a hair apart)
    schema: int = SCHEMA

    @classmethod
    def of(cls, manifest_sha256: str, manifest: Manifest, request: ContinuationRequest, seed: int | None,
           variation: int, prompt: Clip | Arrangement, variant: str = "fp32") -> Provenance:
        arrangement = Arrangement.of(prompt) if isinstance(prompt, Clip) else prompt
        return cls(model_name=manifest.name, manifest_sha256=manifest_sha256,
                   data_fingerprint=manifest.training.data_fingerprint if manifest.training else None,
                   seed=seed, variation=variation, request=request_record(request),
                   prompt_sha256=prompt_digest(arrangement), continued=list(arrangement.continued), variant=variant)

    def to_text(self) -> str:
        return PREFIX + json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> Provenance | None:
        if not text.startswith(PREFIX):
            return None
        try:
            data = json.loads(text[len(PREFIX):])
            return cls(**data) if isinstance(data, dict) else None
        except (ValueError, TypeError):  # a damaged or foreign record is no record
            return None

    def rebuilt_request(self) -> ContinuationRequest:
        """The request that produced the file, seed included."""
        from engine.constraints import Constraints

        options = {name: value for name, value in self.request.items() if name != "constraints"}
        options.setdefault("stay_with_clip", 0.0)  # files made before clip guidance existed had none
        return ContinuationRequest(**options, seed=self.seed, constraints=Constraints.from_dict(self.request["constraints"]))


def request_record(request: ContinuationRequest) -> dict:
    constraints = {name: value for name, value in asdict(request.constraints).items() if value is not None}
    return {"bars": request.bars, "variations": request.variations, "temperature": request.temperature,
            "top_k": request.top_k, "top_p": request.top_p, "mode": request.mode, "beam_width": request.beam_width,
            "stay_with_clip": request.stay_with_clip, "constraints": constraints}


def prompt_digest(arrangement: Arrangement) -> str:
    """sha256 of the prompt: every track's notes (pitch, velocity, start, length), program, drum flag,
    the meter, tempo and length, and which tracks were continued."""
    tracks = [{"program": t.program, "drum": t.is_drum,
               "notes": sorted((n.pitch, n.velocity, round(n.start, 6), round(n.duration, 6)) for n in t.notes)}
              for t in arrangement.tracks]
    # The tempo to 0.01 BPM: a MIDI file stores microseconds per beat, so 110 BPM reads back as 110.00003.
    body = {"tracks": tracks, "meter": list(arrangement.time_signature), "tempo": round(arrangement.tempo, 2),
            "beats": round(arrangement.length_beats, 6), "continued": list(arrangement.continued)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stamp(path: Path, record: Provenance) -> None:
    """Add the record to a MIDI file written a moment ago (before it is moved into place)."""
    midi = mido.MidiFile(str(path))
    midi.tracks[0].insert(0, mido.MetaMessage("text", text=record.to_text(), time=0))
    midi.save(str(path))


def read_provenance(path: str | Path) -> Provenance | None:
    """The record of a .mid Segue wrote, or None (another program's file, or one whose record was removed)."""
    midi = mido.MidiFile(str(path))
    for track in midi.tracks:
        for message in track:
            if message.is_meta and message.type == "text":
                record = Provenance.from_text(message.text)
                if record is not None:
                    return record
    return None
