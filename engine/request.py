"""What a continuation request asks for, validated: the one definition the CLI, the protocol and the
engine share. Options a user leaves out come from the model's `search` defaults (engine/manifest.py).
No ONNX Runtime here, so a client can build and check a request without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.clip_guidance import MAX_STRENGTH
from engine.constraints import Constraints
from engine.manifest import SearchDefaults
from engine.sampling import SamplingParams

MAX_BARS = 64
MAX_VARIATIONS = 16
MAX_BEAM_WIDTH = 16
MODES = ("sample", "beam")
MAX_STAY_WITH_CLIP = MAX_STRENGTH


class RequestError(ValueError):
    """A request that cannot be served, with a sentence a musician understands.

    `code` says whose fault it is, for the server's error replies: the clip (`bad_clip`) or the
    request's parameters and constraints (`bad_request`)."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


_SEARCH = SearchDefaults()  # the one table of generation defaults; a model's manifest may carry its own


@dataclass(frozen=True)
class ContinuationRequest:
    bars: int = _SEARCH.bars
    variations: int = _SEARCH.variations
    temperature: float = _SEARCH.temperature
    top_k: int = _SEARCH.top_k
    top_p: float = _SEARCH.top_p
    seed: int | None = None
    constraints: Constraints = field(default_factory=Constraints)  # hard musical constraints (engine/constraints.py)
    mode: str = _SEARCH.mode  # "sample" | "beam" (the most likely continuations, see engine/generate.py)
    beam_width: int = _SEARCH.beam_width  # hypotheses kept per step in beam mode
    stay_with_clip: float = _SEARCH.stay_with_clip  # pull towards the clip's pitches, register, kit (engine/clip_guidance.py)

    @classmethod
    def from_options(cls, search: SearchDefaults, **options: object) -> ContinuationRequest:
        """The options a user or client gave (None = not given) over a model's `search` defaults,
        validated: the one way the CLI and the protocol turn options into a request."""
        given = {name: value for name, value in options.items() if value is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise RequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
        defaults = {f.name: getattr(search, f.name) for f in fields(search)}  # scalars: asdict's deep copy is not needed
        request = cls(**{**defaults, **given})
        request.validate()
        return request

    def validate(self) -> None:
        if not 1 <= self.bars <= MAX_BARS:
            raise RequestError(f"bars must be between 1 and {MAX_BARS}, not {self.bars}")
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise RequestError(f"variations must be between 1 and {MAX_VARIATIONS}, not {self.variations}")
        if self.mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, not {str(self.mode)[:40]!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be a whole number from 0 up, not {self.seed}")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise RequestError(f"beam width must be between 1 and {MAX_BEAM_WIDTH}, not {self.beam_width}")
        if not isinstance(self.stay_with_clip, (int, float)) or not 0 <= self.stay_with_clip <= MAX_STAY_WITH_CLIP:
            raise RequestError(f"stay_with_clip must be between 0 (the model alone) and {MAX_STAY_WITH_CLIP:g}, "
                               f"not {str(self.stay_with_clip)[:40]}")
        if self.mode == "beam" and self.variations > self.beam_width:
            raise RequestError(f"a beam of width {self.beam_width} finds at most {self.beam_width} variations; "
                               f"ask for fewer variations or a wider beam")
        try:
            self.sampling.validate()
            self.constraints.validate()
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from exc

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)
