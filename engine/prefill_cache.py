"""Prefilled prompts kept for reuse: what makes a prepared Continue start decoding at once.

    prefills = PrefillCache(max_bytes=256 << 20)
    generator.prefill(clip, prefills)                        # in the background: tokenize + one prefill
    generator.stream(clip, request, prefills=prefills)       # later: decoding starts from the kept cache

An entry is what `Generator.stream` computes before its first decode step: the prompt's token ids
(the clip's tokens and the continuation's forced opening), the KV cache after them (batch 1) and the
logits after the last of them. Entries are keyed by those exact ids and the model's identity
(`Generator.cache_identity`: the manifest's sha256, the variant and the device), so "the same clip"
means what the model hears: two clips that tokenize alike share an entry, and a hit is, bit for bit,
the prefill that would have been computed. A request for a prepared prompt therefore produces exactly
the notes it would have produced cold.

Memory is bounded in bytes (the KV arrays and the logits; `max_bytes`, 0 keeps nothing) and the least
recently used entries are evicted first; an entry larger than the bound is not kept. Stored arrays are
compact host copies (the prompt's positions only, never a preallocated buffer) marked read-only, so no
decoding can change them: `KVCache.repeat`/`select` and `OnnxDecoder.step` build new caches from them.

Tokenizing a dense clip costs milliseconds of Python, more than the rest of a prepared Continue, so a
small second map remembers each clip's prompt (ids and the beat the continuation starts at) by a
digest of the clip's content (`clip_digest`) and the model. It only spares the tokenizer: the entry
itself is still found by the ids.

Thread-safe. When two threads need the same missing entry (a Continue arriving while its clip's
prepare is being prefilled), the second waits for the first instead of prefilling it again.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.clip import Arrangement
from engine.session import KVCache

DEFAULT_MAX_BYTES = 256 << 20  # the shipped model keeps 8 KiB per token: about 120 prompts of 260 tokens, 32 of 1000
MAX_PROMPTS = 1024  # clip digest -> prompt entries (a few hundred bytes each)

Prompt = tuple[tuple[int, ...], float]  # the prompt's token ids (forced opening not included) and the continuation's first beat


@dataclass(frozen=True)
class Prefilled:
    """A prompt run through the model once: its ids, the KV cache after them and the next-token logits."""

    ids: tuple[int, ...]  # every token in the cache: the clip's prompt and the forced opening (Bar, TimeSig)
    logits: np.ndarray  # [1, vocab]: the distribution of the first generated token
    cache: KVCache  # batch 1, length len(ids)
    prefill_ms: float  # what computing it took
    reused: bool = False  # True when it came from a PrefillCache instead of the model

    @classmethod
    def kept(cls, ids: Sequence[int], logits: np.ndarray, cache: KVCache, prefill_ms: float) -> Prefilled:
        """The form a cache holds: compact, read-only host copies of the prompt's positions."""
        if cache.batch != 1 or cache.length != len(ids):
            raise ValueError(f"a prefill of {len(ids)} tokens needs a batch-1 cache of that length, "
                             f"not {cache.batch} rows of {cache.length}")
        tensors = tuple(_frozen(t) for t in cache.tensors)
        return cls(tuple(int(i) for i in ids), _frozen(logits[:1]), KVCache(tensors), prefill_ms)

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.cache.tensors) + int(self.logits.nbytes) + 8 * len(self.ids)


def _frozen(array: np.ndarray) -> np.ndarray:
    """`array` made read-only: in place when it owns its memory (a session's output, `KVCache.tensors`' copy),
    else (a view of another array, which could still be written through that array) a read-only copy."""
    array = np.asarray(array)
    if isinstance(array.base, np.ndarray) or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
    array.flags.writeable = False
    return array


def clip_digest(arrangement: Arrangement) -> bytes:
    """A digest of everything in a clip that tokenizing may read: every track's notes, instrument and
    name, the tempo, meter and length, and which tracks are continued (not `Clip.extra`)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(struct.pack(f"<{len(arrangement.continued) + 1}q", len(arrangement.continued), *arrangement.continued))
    for clip in arrangement.tracks:
        head = (clip.tempo, *clip.time_signature, -1.0 if clip.length is None else clip.length, clip.program,
                int(clip.is_drum), len(clip.notes))
        h.update(struct.pack("<d2qd2qq", *head))
        h.update(clip.name.encode("utf-8") + b"\0")
        if clip.notes:
            notes = np.array([(n.pitch, n.velocity, n.start, n.duration, n.channel) for n in clip.notes], dtype=np.float64)
            h.update(notes.tobytes())
    return h.digest()


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int  # fetches answered from the cache (waiting for another thread's prefill included)
    misses: int  # fetches that ran the prefill
    evictions: int
    prompt_hits: int  # clips whose prompt was known, so they were not tokenized again


class PrefillCache:
    """Prefilled prompts by (model identity, token ids), least recently used evicted first, under `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_prompts: int = MAX_PROMPTS):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
        self.max_bytes = max_bytes
        self.max_prompts = max_prompts
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Prefilled] = OrderedDict()  # oldest use first
        self._prompts: OrderedDict[tuple[str, bytes], Prompt] = OrderedDict()
        self._computing: dict[tuple[str, tuple[int, ...]], threading.Event] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._prompt_hits = 0
        self._lock = threading.Lock()

    # --- prefills ------------------------------------------------------------------------------------

    def fetch(self, model: str, ids: Sequence[int], compute: Callable[[], tuple[np.ndarray, KVCache]]) -> Prefilled:
        """The prefill of `ids` under `model`: the kept one (`reused`), else `compute()`'s, which is kept.

        On a miss the caller gets `compute()`'s own logits and cache (nothing copied on its way to the
        first decode step); the cache keeps read-only copies."""
        key = (model, tuple(int(i) for i in ids))
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return replace(entry, reused=True)
                waiting = self._computing.get(key)
                if waiting is None:
                    done = self._computing[key] = threading.Event()
                    self._misses += 1
                    break
            waiting.wait()  # another thread is prefilling these very ids: its result is ours
            with self._lock:
                if key not in self._entries:  # it failed, or was too large to keep: compute it ourselves
                    if key not in self._computing:
                        done = self._computing[key] = threading.Event()
                        self._misses += 1
                        break
        try:
            started = time.perf_counter()
            logits, cache = compute()
            ms = (time.perf_counter() - started) * 1000
            if self.max_bytes:
                self._keep(key, Prefilled.kept(key[1], logits, cache, ms))
            return Prefilled(key[1], logits, cache, ms)
        finally:
            with self._lock:
                del self._computing[key]
            done.set()

    def get(self, model: str, ids: Sequence[int]) -> Prefilled | None:
        """The kept prefill of `ids`, if there is one (counts as a use: it becomes the most recent)."""
        key = (model, tuple(int(i) for i in ids))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return replace(entry, reused=True)

    def _keep(self, key: tuple[str, tuple[int, ...]], entry: Prefilled) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = entry
            self._bytes += size

    # --- prompts -------------------------------------------------------------------------------------

    def prompt(self, model: str, arrangement: Arrangement,
               tokenize: Callable[[Arrangement], tuple[Sequence[int], float]]) -> Prompt:
        """`tokenize(arrangement)`, remembered by the clip's content: a clip sent again is not tokenized again."""
        key = (model, clip_digest(arrangement))
        with self._lock:
            known = self._prompts.get(key)
            if known is not None:
                self._prompts.move_to_end(key)
                self._prompt_hits += 1
                return known
        ids, offset = tokenize(arrangement)  # may raise (a meter the model lacks): nothing is remembered then
        prompt = (tuple(int(i) for i in ids), float(offset))
        if self.max_bytes and self.max_prompts:
            with self._lock:
                self._prompts[key] = prompt
                while len(self._prompts) > self.max_prompts:
                    self._prompts.popitem(last=False)
        return prompt

    # --- bookkeeping ---------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self.max_bytes, self._hits, self._misses,
                              self._evictions, self._prompt_hits)

    def forget(self, model: str) -> int:
        """Drop every entry of one model identity (a model that was replaced). Returns how many prefills went."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == model]
            for key in keys:
                self._bytes -= self._entries.pop(key).nbytes
            for prompt_key in [k for k in self._prompts if k[0] == model]:
                del self._prompts[prompt_key]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._prompts.clear()
            self._bytes = 0
