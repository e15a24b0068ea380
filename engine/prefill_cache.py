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

The decode buffer a prefill was computed in is kept too, for the prompt of each model most recently
prefilled, prepared or continued by one row (its "hot" buffer; one preallocated buffer, 8 MB for the
shipped model; `promote` copies a kept prompt into one): a Continue that leases it
(`fetch(..., lease=True)`) decodes on in that very buffer, after the prompt's positions, instead of
first copying the kept prompt into a new one (0.3-0.4 ms for the 4-bar chorale, 1 ms for a dense clip
of 650 tokens). Its `release()` at the end frees the positions it wrote, so the next Continue of the
clip (Generate again) leases it again. Two at once: the second gets the compact copy, as before.
Decoding never writes the prompt's positions, so a leased buffer's prompt stays what was prefilled.

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
from dataclasses import dataclass, field, replace

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
    # Leading positions taken from another kept prompt that begins with the same tokens (PrefillCache.fetch's
    # `extend`): only the rest was computed, in `prefill_ms`. 0 for a prompt computed whole, or found whole.
    prefix_reused: int = 0
    lease: _Hot | None = field(default=None, compare=False, repr=False)  # the hot buffer `cache` lies in, if leased

    @property
    def ahead(self) -> Ahead | None:
        """A leased prefill's look ahead (see `Ahead`), if one was computed in its buffer."""
        return self.lease.ahead if self.lease is not None else None

    def release(self, ahead: Ahead | None = None, ahead_intact: bool = True) -> None:
        """The end of decoding from a leased prefill (call it once every cache stepped from `cache` is
        finished with): its buffer's positions after the prompt are free, and the next fetch may lease it.
        `ahead`: a look ahead the lessee just computed from `cache`, kept in the buffer for the next
        lessee; `ahead_intact` False: the lessee wrote over the look ahead's positions (it drew another
        token than the look ahead's), so it is gone."""
        if self.lease is not None:
            self.lease.give_back(ahead, ahead_intact)

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
class Ahead:
    """The first tokens a continuation will most likely begin with, already run through the model in a
    prepared prompt's own buffer (computed in the background by `prepare`, Generator.prefill): the most
    likely Position of the first bar and the tokens the grammar forces after it. A continue feeds them
    on a guess (Generator._guess's mechanism: drawn from the model's own distribution, each one drawn
    as guessed saves its decode step), so its first note needs one model call instead of two."""

    tokens: tuple[int, ...]
    logits: tuple[np.ndarray, ...]  # [1, vocab] after each token
    cache: KVCache  # the prompt's cache followed by these tokens, in the hot buffer


class _Hot:
    """A model's most recent prefill as computed: its cache over a preallocated decode buffer, whether a
    Continue is decoding in that buffer now (leased), and its look ahead, if one was computed there."""

    def __init__(self, key: tuple[str, tuple[int, ...]], cache: KVCache, leased: bool, lock: threading.Lock):
        self.key, self.cache, self.leased, self._lock = key, cache, leased, lock
        self.ahead: Ahead | None = None

    def give_back(self, ahead: Ahead | None, ahead_intact: bool) -> None:
        with self._lock:
            if not self.leased:
                return
            if ahead is not None:
                self.ahead = ahead
            elif not ahead_intact:
                self.ahead = None
            # The lessee's steps are over: the buffer after the prompt (and its look ahead) is free.
            (self.ahead.cache if self.ahead is not None else self.cache).rewind_buffer()
            self.leased = False


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int  # fetches answered from the cache (waiting for another thread's prefill included)
    misses: int  # fetches that ran the prefill
    evictions: int
    prompt_hits: int  # clips whose prompt was known, so they were not tokenized again
    leases: int  # fetches that decode on in the prefill's own buffer (no copy of the prompt)
    prefix_hits: int = 0  # misses computed after the first positions of a kept prompt that begins alike


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
        self._hot: dict[str, _Hot] = {}  # model -> its most recent prefill's own buffer
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._prompt_hits = self._leases = self._prefix_hits = 0
        self._lock = threading.Lock()

    # --- prefills ------------------------------------------------------------------------------------

    def fetch(self, model: str, ids: Sequence[int], compute: Callable[[], tuple[np.ndarray, KVCache]],
              lease: bool = False, promote: Callable[[KVCache], KVCache] | None = None,
              extend: Callable[[KVCache], tuple[np.ndarray, KVCache]] | None = None, align: int = 0,
              rest: int = 1) -> Prefilled:
        """The prefill of `ids` under `model`: the kept one (`reused`), else `compute()`'s, which is kept.

        `extend` and `align` (> 0): on a miss, a kept prompt of the same model that begins with the same
        tokens lends its first positions, a multiple of `align` of them (at least `align`, and at least
        `rest` fewer than `ids`), and `extend(cache of those positions)` computes the rest
        (`prefix_reused`): a clip whose last bars were edited, or that grew while it was recorded, is
        prefilled from where it changed. The caller's model must compute such a rest bit for bit as
        `compute()` computes those positions (OnnxDecoder.prefill_chunk and prefill_rest).

        `lease`: the caller decodes from the result and calls its `release()` when done; it gets the
        prefill's own decode buffer when that is free (see the module docstring), else what others get.
        Without `lease` a miss still gives the caller `compute()`'s own logits and cache (nothing copied),
        unless that cache lies in a buffer the cache keeps as the hot one: then the compact copy.
        `promote` (with `lease`; `prepare` gives OnnxDecoder.in_buffer): a kept prompt that is not the
        model's hot one becomes it, copied into a buffer of its own by `promote(cache)`, so that a
        clip selected again after others is as ready as the last one prepared."""
        key = (model, tuple(int(i) for i in ids))
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    hot = self._hot.get(model)
                    if lease and hot is not None and hot.key == key and not hot.leased:
                        hot.leased = True
                        self._leases += 1
                        return replace(entry, cache=hot.cache, reused=True, lease=hot)
                    if not lease or promote is None or (hot is not None and hot.key == key):
                        return replace(entry, reused=True)  # (its hot buffer is leased: the compact copy)
                    waiting = None
                else:
                    waiting = self._computing.get(key)
                    if waiting is None:
                        done = self._computing[key] = threading.Event()
                        self._misses += 1
                        break
            if entry is not None and promote is not None:
                return self._promoted(model, key, entry, promote)
            assert waiting is not None
            waiting.wait()  # another thread is prefilling these very ids: its result is ours
            with self._lock:
                if key not in self._entries:  # it failed, or was too large to keep: compute it ourselves
                    if key not in self._computing:
                        done = self._computing[key] = threading.Event()
                        self._misses += 1
                        break
        try:
            prefix = None
            if extend is not None and align > 0:
                with self._lock:
                    prefix = self._kept_prefix(key, align, rest)
            started = time.perf_counter()
            if prefix is not None:
                assert extend is not None
                logits, cache = extend(prefix)
            else:
                logits, cache = compute()
            ms = (time.perf_counter() - started) * 1000
            lent = prefix.length if prefix is not None else 0
            if not self.max_bytes:
                return Prefilled(key[1], logits, cache, ms, prefix_reused=lent)
            kept = Prefilled.kept(key[1], logits, cache, ms)  # (a later hit reuses it whole: no prefix_reused)
            if not self._keep(key, kept) or not cache.in_place or cache.batch != 1:
                return Prefilled(key[1], logits, cache, ms, prefix_reused=lent)
            hot = self._make_hot(model, key, cache, lease)
            if lease:
                return Prefilled(key[1], logits, cache, ms, prefix_reused=lent, lease=hot)
            return replace(kept, prefix_reused=lent)
        finally:
            with self._lock:
                del self._computing[key]
            done.set()

    def _kept_prefix(self, key: tuple[str, tuple[int, ...]], align: int, rest: int = 1) -> KVCache | None:
        """(Under the lock.) The first positions of the kept prompt of `key`'s model that shares the most
        runs of `align` tokens with `key`'s ids, from the first, as a cache (read-only views); None when
        none shares a whole run. At least `rest` (>= 1) fewer positions than the ids: the last one's
        logits are computed."""
        model, ids = key
        limit = (len(ids) - max(rest, 1)) // align * align
        best: tuple[tuple[str, tuple[int, ...]], int] | None = None
        if limit < align:
            return None
        head = ids[:align]
        for other_key in reversed(self._entries):  # the most recently used first: it wins a tie
            other_model, other = other_key
            if other_model != model or other[:align] != head:
                continue
            shared = align  # whole steps only: a shorter kept prompt's last slice is short, so never equal
            while shared < limit and other[shared:shared + align] == ids[shared:shared + align]:
                shared += align
            if best is None or shared > best[1]:
                best = (other_key, shared)
        if best is None:
            return None
        lender, shared = best
        self._entries.move_to_end(lender)
        self._prefix_hits += 1
        return KVCache(tuple(t[:, :, :shared] for t in self._entries[lender].cache.tensors))

    def _promoted(self, model: str, key: tuple[str, tuple[int, ...]], entry: Prefilled,
                  promote: Callable[[KVCache], KVCache]) -> Prefilled:
        """A kept prompt made the model's hot one, leased to the caller: copied into a buffer of its own
        (outside the lock: 0.3 ms for 260 tokens)."""
        cache = promote(entry.cache)
        if not cache.in_place or cache.batch != 1:
            return replace(entry, reused=True)
        return replace(entry, cache=cache, reused=True, lease=self._make_hot(model, key, cache, leased=True))

    def _make_hot(self, model: str, key: tuple[str, tuple[int, ...]], cache: KVCache, leased: bool) -> _Hot:
        """`cache` (a batch-1 cache in a buffer of its own) as the model's hot prompt, leased to the caller or not."""
        with self._lock:
            hot = self._hot[model] = _Hot(key, cache, leased=leased, lock=self._lock)
            self._leases += leased
        return hot

    def get(self, model: str, ids: Sequence[int]) -> Prefilled | None:
        """The kept prefill of `ids`, if there is one (counts as a use: it becomes the most recent)."""
        key = (model, tuple(int(i) for i in ids))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return replace(entry, reused=True)

    def _keep(self, key: tuple[str, tuple[int, ...]], entry: Prefilled) -> bool:
        """Keep `entry` (evicting the least recently used); False when it is larger than the whole bound."""
        size = entry.nbytes
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
                hot = self._hot.get(evicted_key[0])
                if hot is not None and hot.key == evicted_key:
                    del self._hot[evicted_key[0]]  # its buffer goes back to the pool once its lessee is done
            self._entries[key] = entry
            self._bytes += size
            return True

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
                              self._evictions, self._prompt_hits, self._leases, self._prefix_hits)

    def forget(self, model: str) -> int:
        """Drop every entry of one model identity (a model that was replaced). Returns how many prefills went."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == model]
            for key in keys:
                self._bytes -= self._entries.pop(key).nbytes
            for prompt_key in [k for k in self._prompts if k[0] == model]:
                del self._prompts[prompt_key]
            self._hot.pop(model, None)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._prompts.clear()
            self._hot.clear()
            self._bytes = 0
