"""The models a server can serve: every verified folder under a models directory, hot-swapped.

Each subfolder with a `manifest.json` is a model named after the folder. A folder is verified
(every file hash) and its session warmed up before it is offered; when `export-onnx` writes a new
or updated folder, the watcher notices, verifies and loads it on its own thread and swaps it in
atomically, so a request in flight keeps the generator it started with and the next request gets
the new one. A folder that fails verification is refused with a logged reason, and the model that
was serving under that name keeps serving.

After a scan that loaded something, one full collection frees what is garbage already, and everything
still alive is frozen out of Python's cyclic garbage collector (gc.freeze): a full collection walks every
object a loaded model holds (67,000 for the shipped default: tokenizer, grammar tables, manifests), 31-45
ms with the GIL held, and a long-running server otherwise pays that now and then in the middle of a
stream or before a first note (`python bench/bench_gc_pause.py`). Frozen objects are still freed when
their last reference goes, but garbage in reference cycles would stay: so a hot swap unfreezes
everything, and the scans that follow (the watcher's) collect until every replaced model is gone,
requests that were using it finished, and only then freeze again (or after SETTLE_SCANS scans, with a
log line, should something keep it for good).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.generate import Generator
from engine.manifest import MANIFEST_FILE, Manifest, ModelError

log = logging.getLogger("segue.models")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    folder: Path
    generator: Generator
    signature: tuple

    @property
    def manifest(self) -> Manifest:
        return self.generator.decoder.manifest

    @property
    def meters(self) -> list[list[int]]:
        """The time signatures this model's tokenizer has a token for, as [numerator, denominator]
        pairs ordered by denominator, then numerator: a clip in any other meter is refused."""
        return [list(m) for m in sorted(set(self.generator.tokenizer.kinds.time_sig.values()), key=lambda m: (m[1], m[0]))]

    def describe(self) -> dict:
        m = self.manifest
        return {"name": self.name, "parameters": m.model.parameters, "max_context": m.model.max_context,
                "val_perplexity": m.metrics.val_perplexity, "data_fingerprint": m.training.data_fingerprint,
                "created": m.created, "search": dataclasses.asdict(m.search), "meters": self.meters,
                "precision": self.generator.decoder.variant, "precision_reason": self.generator.decoder.serve_reason}


def folder_signature(folder: Path) -> tuple:
    """Changes whenever anything in the folder changes: export-onnx swapping in a new folder, and
    also a folder copied in file by file (manifest first), so a folder refused mid-copy is retried
    once the copy is complete."""
    entries = []
    for path in sorted(folder.iterdir()):
        stat = path.lstat()
        entries.append((path.name, stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return (folder.stat().st_ino, tuple(entries))


class ModelRegistry:
    SETTLE_SCANS = 30  # scans (seconds, with the watcher) a replaced model may stay alive before freezing anyway

    def __init__(self, models_dir: Path, threads: int = 1, default: str = "default",
                 trusted_keys: tuple[Path, ...] = (), require_signed: bool = False):
        self.models_dir = Path(models_dir)
        self.threads = threads
        self.trusted_keys = trusted_keys  # signatures checked against these (engine/signing.py)
        self.require_signed = require_signed  # refuse folders not signed by one of them
        self.default_name = default
        self._models: dict[str, LoadedModel] = {}
        self._refused: dict[str, tuple[tuple, str]] = {}  # name -> (signature, reason): not retried until it changes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._swap_listeners: list[Callable[[LoadedModel, LoadedModel], None]] = []
        self._retired: list[weakref.ref] = []  # replaced generators not yet freed: nothing is frozen meanwhile
        self._settle_scans = 0  # scans that found one of them still alive

    def on_swap(self, listener: Callable[[LoadedModel, LoadedModel], None]) -> None:
        """Call `listener(old, new)` (on the scanning thread) after a model is replaced by a newer load of its folder."""
        self._swap_listeners.append(listener)

    def off_swap(self, listener: Callable[[LoadedModel, LoadedModel], None]) -> None:
        """Stop calling a listener given to `on_swap` (a service that closed)."""
        if listener in self._swap_listeners:
            self._swap_listeners.remove(listener)

    # --- lookup ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def get(self, name: str | None) -> LoadedModel:
        with self._lock:
            if name:
                if name not in self._models:
                    raise KeyError(name)
                return self._models[name]
            if self.default_name in self._models:
                return self._models[self.default_name]
            if not self._models:
                raise KeyError("(no models loaded)")
            return self._models[sorted(self._models)[0]]

    def describe(self) -> list[dict]:
        with self._lock:
            return [self._models[n].describe() for n in sorted(self._models)]

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {name: reason for name, (_, reason) in self._refused.items()}

    # --- loading ---------------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Load every new or changed folder now. Returns the names loaded (or reloaded)."""
        loaded: list[str] = []
        if not self.models_dir.is_dir():
            return loaded
        for folder in sorted(p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / MANIFEST_FILE).is_file():
                continue
            try:
                signature = folder_signature(folder)
            except FileNotFoundError:  # being swapped right now; the next scan sees the result
                continue
            name = folder.name
            with self._lock:
                current = self._models.get(name)
                refused = self._refused.get(name)
            if (current and current.signature == signature) or (refused and refused[0] == signature):
                continue
            try:
                if folder.is_symlink() and not folder.resolve().is_relative_to(self.models_dir.resolve()):
                    raise ModelError(f"{folder} links to {folder.resolve()}, outside {self.models_dir}")
                generator = Generator.load(folder, threads=self.threads, trusted_keys=self.trusted_keys,
                                           require_signed=self.require_signed)
                generator.decoder.warm_up()
            except Exception as exc:  # one bad folder is refused; the others still load, and serving goes on
                with self._lock:
                    self._refused[name] = (signature, str(exc))
                verb = "keeping the model already serving" if current else "not serving it"
                log.warning("model %s refused: %s (%s)", name, exc, verb)
                continue
            new = LoadedModel(name, folder, generator, signature)
            with self._lock:
                self._models[name] = new
                self._refused.pop(name, None)
            log.info("model %s %s from %s", name, "reloaded" if current else "loaded", folder)
            if current is not None:
                self._tell_swapped(current, new)
                self._retired.append(weakref.ref(current.generator))
            loaded.append(name)
        if loaded or self._retired:
            self._settle()
        return loaded

    def _settle(self) -> None:
        """Freeze what is alive, once no replaced model is (see the module's note on the collector)."""
        if self._retired:
            gc.unfreeze()  # the replaced model's objects may be frozen: a collection must reach them
        gc.collect()  # garbage in cycles (a load's leftovers, a replaced model) is freed now, not frozen for good
        if self._retired:
            self._retired = [ref for ref in self._retired if ref() is not None]
            self._settle_scans = self._settle_scans + 1 if self._retired else 0
            if self._retired and self._settle_scans < self.SETTLE_SCANS:  # still in use (a stream that started
                return  # on it): the next scan looks again
            if self._retired:  # something keeps it: a full collection every scan would cost more than it saves
                log.info("a replaced model is still referenced after %d scans; freezing the heap with it", self._settle_scans)
                self._retired, self._settle_scans = [], 0
        gc.freeze()

    def _tell_swapped(self, old: LoadedModel, new: LoadedModel) -> None:
        for listener in self._swap_listeners:
            try:
                listener(old, new)
            except Exception:  # a listener's bug must not stop hot-swap
                log.exception("a listener failed after model %s was replaced", new.name)

    def start_watching(self, interval: float = 1.0) -> None:
        def watch():
            while not self._stop.wait(interval):
                try:
                    self.scan()
                except Exception:  # a watcher that dies silently would stop hot-swap for good
                    log.exception("model watcher failed; trying again in %.0f s", interval)

        self._watcher = threading.Thread(target=watch, name="segue-model-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher:
            self._watcher.join(timeout=5)
        gc.unfreeze()  # the process goes on without these models (a test, an embedding app): collect as usual
