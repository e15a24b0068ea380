"""MMA (Musical MIDI Accompaniment) as a renderer of backing tracks: its groove library and its binary.

MMA turns a text file of chords into multi-track MIDI with one of its library "grooves" (drums, bass,
chords, arpeggios, strings...). This module only talks to MMA: it finds the binary and the library,
reads what every library file defines (`scan_library`, cached: about a minute for the whole
library on two cores), and renders one song text to a `.mid` file (`render`). What to render, and
the corpus around it, live in `training.daw_corpus`.

Facts about MMA 21.09 this module relies on, found by experiment:
- Its humanisation is random and unseeded by default: the same file renders to different bytes.
  `RndSeed N` at the top of a song makes the output byte-for-byte reproducible.
- `Time N` is quarter notes per bar, independent of `TimeSig`, the meter written into the MIDI. A few
  grooves disagree with their own meter (`Time 3` with the default 4/4; `Time 2` beats of triplets
  with `TimeSig 6 8`), so each groove's `Time` and `TimeSig` are probed and `meter_fix` says how to
  write a MIDI file whose bar lines fall where the groove's bars do.
- `Use FILE` loads one library file; after it `Groove NAME` picks that file's groove even when
  another library file defines the same name (casio/, stdlib/ and yamaha/ all have a JazzWaltz).
- An error stops MMA with exit status 1 and an `Error:` line on stdout; warnings are `Warning:`
  lines, continued on indented lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MMA_TIMEOUT_S = 60
# MMA warns about its missing plugin folder on every run (Debian ships none): not about our song.
_NOISE = ("PLUGIN '", "Input file parsed successfully", "No midi file generated")
_LIBRARY_CANDIDATES = ("/usr/share/mma/lib", "/usr/local/share/mma/lib", "/opt/mma/lib")
SCAN_FORMAT = 3  # bump when the scan's output changes meaning, to invalidate cached scans


class MMAError(RuntimeError):
    pass


def find_mma() -> str:
    """The `mma` executable: `$SEGUE_MMA`, else `mma` on the PATH."""
    path = os.environ.get("SEGUE_MMA") or shutil.which("mma")
    if not path:
        message = "MMA (Musical MIDI Accompaniment) is not installed: `apt-get install mma`, or set SEGUE_MMA to its executable"
        raise MMAError(message)
    return path


def find_library(mma: str | None = None) -> Path:
    """MMA's groove library folder: `$SEGUE_MMA_LIB`, else beside the executable, else the usual places."""
    if os.environ.get("SEGUE_MMA_LIB"):
        return Path(os.environ["SEGUE_MMA_LIB"])
    candidates = []
    if mma:
        candidates.append(Path(os.path.realpath(mma)).parent.parent / "share" / "mma" / "lib")
    candidates.extend(Path(c) for c in _LIBRARY_CANDIDATES)
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*/*.mma")):
            return candidate
    raise MMAError(f"MMA's groove library was not found (looked in {', '.join(map(str, candidates))}); set SEGUE_MMA_LIB")


def mma_version(mma: str) -> str:
    result = _run([mma, "-v"], "")
    lines = [line for line in _lines(result.stdout + result.stderr) if not line.startswith("Warning")]
    return lines[-1].strip() if lines else "unknown"


def _run(args: list[str], stdin: str, timeout: float = MMA_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(args, input=stdin, capture_output=True, text=True, encoding="latin-1", timeout=timeout, env=env)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def messages(output: str, kind: str) -> list[str]:
    """MMA's `Warning:` or `Error:` messages in `output`, each joined with its continuation lines."""
    found: list[str] = []
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(f"{kind}:"):
            current = [line[len(kind) + 1:].strip()]
            found.append("")
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
        if current is not None:
            found[-1] = " ".join(current)
    return [m for m in found if not any(noise in m for noise in _NOISE)]


# --- the library --------------------------------------------------------------------------------

_INTRO = re.compile(r"intro", re.I)
_END = re.compile(r"End|END|end$")  # not the "end" inside DescendingJazz
_FILL = re.compile(r"fill|break", re.I)
# Style files that are not music to learn: click tracks, count-ins, the empty groove.
EXCLUDED_FAMILIES = frozenset({"metronome", "count", "none"})


@dataclass(frozen=True)
class Groove:
    """One `DefGroove` of the library, with what a probe of MMA said about it."""

    name: str
    file: str  # library file without `.mma`, relative to the library: "stdlib/ballad"
    role: str  # main | intro | fill | end
    description: str
    seq_size: int  # bars in its repeating pattern
    quarters_per_bar: float  # MMA's `Time`
    time_signature: tuple[int, int]  # MMA's `TimeSig`, what it writes into the MIDI file
    tracks: tuple[str, ...]

    @property
    def library(self) -> str:
        return self.file.split("/", 1)[0]

    @property
    def family(self) -> str:
        return family_of(self.file)

    @property
    def key(self) -> str:
        return f"{self.file}:{self.name}"

    @property
    def has_drums(self) -> bool:
        return any(t.startswith("DRUM") for t in self.tracks)

    @property
    def meter_fix(self) -> tuple[tuple[int, int], float] | None:
        """(meter, time scale) that make one MIDI bar hold one groove bar; None when the groove can't be notated."""
        return meter_fix(self.quarters_per_bar, self.time_signature, self._named_68)

    @property
    def beat_quarters(self) -> float:
        """MMA quarters per notated beat: MMA's `Tempo` is this many times the beats per minute."""
        return beat_quarters(self.quarters_per_bar, self.time_signature, self._named_68)

    @property
    def compound(self) -> bool:
        fix = self.meter_fix
        return fix is not None and fix[0][1] == 8 and fix[0][0] % 3 == 0 and fix[0][0] > 3

    @property
    def _named_68(self) -> bool:
        return self.file.rsplit("/", 1)[-1].startswith("68")


def family_of(file: str) -> str:
    """The style family of a library file: its name without folder, punctuation and trailing numbers.

    casio/jazzwaltz, stdlib/jazzwaltz and yamaha/jazzwaltz are one family (the same style by
    different hands); so are blues, blues68 and blues128; 16beat1 and 16beat2. The held-out split is
    made of whole families, so no variant of a held-out style is trained on.
    """
    stem = file.rsplit("/", 1)[-1].lower()
    stem = re.sub(r"[^a-z0-9]", "", stem)
    return re.sub(r"(?<=[a-z])\d+$", "", stem) or stem


def role_of(name: str, description: str) -> str:
    if _INTRO.search(name):
        return "intro"
    if _FILL.search(name):
        return "fill"
    if _END.search(name):
        return "end"
    # pflib names its sections rock1A, rock1FA (fill), rock1E (ending): the description says which.
    lead = description.lower()
    if re.search(r"\bfill(-in)?\b", lead) and re.search(r"[a-z0-9]F[A-D]$", name):
        return "fill"
    if re.search(r"\bending\b", lead) and re.search(r"[a-z0-9]E$", name):
        return "end"
    return "main"


def meter_fix(quarters: float, signature: tuple[int, int], named_68: bool = False) -> tuple[tuple[int, int], float] | None:
    """How to notate a groove whose bars are `quarters` long and whose MIDI meter is `signature`.

    Returns (meter, scale): multiply MIDI time by `scale` (done by changing ticks per quarter, so
    no note moves in seconds) and write `meter`; None when no supported meter fits. Cases met in
    MMA's library: Time 2 with 6/8 counts two dotted-quarter beats of triplets as two quarters (scale
    1.5 turns its triplet eighths into the eighths of 6/8); Time 4 with 6/8 is the same in 12/8; Time 6
    with 6/8 writes each eighth as a quarter (scale 0.5); Time 3 with MMA's default 4/4 is a waltz
    (3/4). `named_68`: a file called "68..." that sets no TimeSig means 6/8.
    """
    numerator, denominator = signature
    if named_68 and signature == (4, 4) and quarters != 4:
        numerator, denominator = signature = (6, 8)
    sig_quarters = numerator * 4 / denominator
    if abs(sig_quarters - quarters) < 1e-6:
        return signature, 1.0
    if denominator == 8 and numerator % 3 == 0 and float(quarters).is_integer() and int(quarters) * 3 in (6, 9, 12):
        return (int(quarters) * 3, 8), 1.5
    if denominator == 8 and abs(numerator - quarters) < 1e-6:
        return signature, 0.5
    if float(quarters).is_integer() and 1 <= quarters <= 7:
        return (int(quarters), 4), 1.0
    return None


def beat_quarters(quarters: float, signature: tuple[int, int], named_68: bool = False) -> float:
    """MMA quarter notes in one beat of the notated meter (a dotted quarter in 6/8, 9/8, 12/8)."""
    fix = meter_fix(quarters, signature, named_68)
    if fix is None:
        return 1.0
    (numerator, denominator), scale = fix
    compound = denominator == 8 and numerator % 3 == 0 and numerator > 3
    return (1.5 if compound else 4 / denominator) / scale


def _library_files(library: Path, only: list[str] | None = None) -> list[str]:
    files = sorted(str(p.relative_to(library).with_suffix("")) for p in library.glob("*/*.mma"))
    if only is not None:
        wanted = {o.removesuffix(".mma") for o in only}
        missing = wanted - set(files)
        if missing:
            raise MMAError(f"not in MMA's library {library}: {', '.join(sorted(missing))}")
        files = [f for f in files if f in wanted]
    return files


@dataclass
class FileScan:
    """What one library file defines, or why it could not be read."""

    file: str
    sha256: str
    grooves: list[Groove] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # groove name (or "*" for the file) -> reason


def _file_sha(library: Path, file: str) -> str:
    return hashlib.sha256((library / f"{file}.mma").read_bytes()).hexdigest()


def scan_file(mma: str, library: Path, file: str) -> FileScan:
    """Ask MMA what a library file defines: groove names, descriptions and tracks (`-Djs`), then
    each groove's `Time`, `TimeSig` and sequence size (loading it and printing MMA's own macros).
    A groove MMA cannot load is recorded with the reason; the scan goes on with the next one."""
    path = library / f"{file}.mma"
    scan = FileScan(file, _file_sha(library, file))
    result = _run([mma, "-Djs", str(path)], "")
    start = result.stdout.find("\n[")
    try:
        described = json.loads(result.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        described = None
    if not isinstance(described, list):
        errors = messages(result.stdout + result.stderr, "Error")
        scan.failures["*"] = errors[0] if errors else "MMA could not describe this file"
        return scan
    probed: dict[int, tuple[str, str, str]] = {}
    pending = list(range(len(described)))
    while pending:
        lines = [f"Use {path}"]
        for index in pending:
            lines += [f"Groove {described[index]['groove']}", f"Print SEGUE {index} $_Time $_TimeSig $_SeqSize"]
        result = _run([mma, "-n", "-"], "\n".join(lines) + "\n")
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 5 and parts[0] == "SEGUE":
                probed[int(parts[1])] = (parts[2], parts[3], parts[4])
        done = [i for i in pending if i in probed]
        rest = pending[len(done):] if done == pending[:len(done)] else []
        if result.returncode == 0 or not rest:
            break
        errors = messages(result.stdout + result.stderr, "Error")
        scan.failures[described[rest[0]]["groove"]] = errors[0] if errors else f"MMA exited with status {result.returncode}"
        pending = rest[1:]
    # MMA's groove names are case-insensitive and a later DefGroove replaces an earlier one of the
    # same name (stdlib/popballad defines PopBallad2Plus twice): keep the definition MMA would use.
    last = {str(info["groove"]).upper(): index for index, info in enumerate(described)}
    for index, info in enumerate(described):
        name = str(info["groove"])
        if last[name.upper()] != index:
            continue
        if index not in probed:
            scan.failures.setdefault(name, "not reached: MMA stopped on an earlier groove of this file")
            continue
        q, sig, size = probed[index]
        try:
            numerator, denominator = (int(x) for x in sig.split("/"))
            groove = Groove(
                name=name,
                file=file,
                role=role_of(name, str(info.get("description", ""))),
                description=" ".join(str(info.get("description", "")).split()),
                seq_size=int(size),
                quarters_per_bar=float(q),
                time_signature=(numerator, denominator),
                tracks=tuple(sorted(str(t["track"]) for t in info.get("tracks", []))),
            )
        except (ValueError, KeyError) as exc:
            scan.failures[name] = f"unexpected probe output {q!r} {sig!r} {size!r}: {exc}"
            continue
        scan.grooves.append(groove)
    return scan


@dataclass
class Library:
    root: Path
    mma_version: str
    files: list[FileScan]

    @property
    def grooves(self) -> list[Groove]:
        return [g for f in self.files for g in f.grooves]

    @property
    def failures(self) -> dict[str, str]:
        """'file:groove' (or 'file:*') -> why MMA could not load it."""
        return {f"{f.file}:{name}": reason for f in self.files for name, reason in f.failures.items()}

    def sha256(self, file: str) -> str:
        return next(f.sha256 for f in self.files if f.file == file)


def _scan_to_json(scan: FileScan) -> dict:
    return {"file": scan.file, "sha256": scan.sha256, "failures": scan.failures,
            "grooves": [asdict(g) for g in scan.grooves]}


def _scan_from_json(data: dict) -> FileScan:
    grooves = [Groove(**{**g, "time_signature": tuple(g["time_signature"]), "tracks": tuple(g["tracks"])}) for g in data["grooves"]]
    return FileScan(data["file"], data["sha256"], grooves, dict(data["failures"]))


def scan_library(mma: str | None = None, library: Path | None = None, cache: Path | None = None,
                 files: list[str] | None = None, workers: int = 2, progress=None) -> Library:
    """Scan every library file (or `files`), reusing the cached scan of files whose bytes and MMA
    version are unchanged. `progress(done, total)` is called as files finish."""
    mma = mma or find_mma()
    library = Path(library) if library else find_library(mma)
    version = mma_version(mma)
    names = _library_files(library, files)
    cached: dict[str, FileScan] = {}
    if cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("format") == SCAN_FORMAT and data.get("mma_version") == version and data.get("library") == str(library):
                cached = {d["file"]: _scan_from_json(d) for d in data["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            cached = {}
    todo = [f for f in names if f not in cached or cached[f].sha256 != _file_sha(library, f)]
    scans = {f: cached[f] for f in names if f not in todo}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # the work is in MMA's processes
        for done, scan in enumerate(pool.map(lambda f: scan_file(mma, library, f), todo), 1):
            scans[scan.file] = scan
            if progress:
                progress(done, len(todo))
    result = Library(library, version, [scans[f] for f in names])
    if cache and todo:
        merged = {**cached, **scans}
        cache.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": SCAN_FORMAT, "mma_version": version, "library": str(library),
                   "files": [_scan_to_json(merged[f]) for f in sorted(merged)]}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, cache)
    return result


# --- rendering ----------------------------------------------------------------------------------

@dataclass
class RenderResult:
    ok: bool
    seconds: float
    warnings: list[str]
    error: str = ""


def render(song: str, out: Path, mma: str | None = None, timeout: float = MMA_TIMEOUT_S) -> RenderResult:
    """Render an MMA song text to `out` (written only when MMA succeeds, never half-written)."""
    mma = mma or find_mma()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segue-mma-") as tmp:
        target = Path(tmp) / "song.mid"
        try:
            result = _run([mma, "-f", str(target), "-"], song, timeout=timeout)
        except subprocess.TimeoutExpired:
            return RenderResult(False, time.perf_counter() - started, [], f"MMA took longer than {timeout:.0f} s")
        output = result.stdout + result.stderr
        warnings = messages(output, "Warning")
        if result.returncode != 0 or not target.exists():
            errors = messages(output, "Error")
            reason = errors[0] if errors else (output.strip().splitlines() or [f"MMA exited with status {result.returncode}"])[-1]
            return RenderResult(False, time.perf_counter() - started, warnings, reason[:300])
        shutil.move(str(target), out)
    return RenderResult(True, time.perf_counter() - started, warnings)
