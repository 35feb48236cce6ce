"""The models the lab holds loaded, at most a few at once, the least recently used dropped first.

One `ModelCache` per lab (`LabState.models`) holds every model the lab keeps in memory: its baseline
(the model it shows, which the what-if estimator and the chat's baseline targets use), the copy a run
changes, the model a replay loads, and the stage models one chats with (A/B included). It keeps at
most `max_models` of them (`FRANKENLAB_MAX_MODELS`, default 2). Opening one more first drops the least
recently used model that nothing is using (its references go, then `devices.free_cached_memory` hands
the GPU memory it held back), so the new one loads into the room made; a dropped model loads again when
it is asked for. A model in use (the baseline while it is the lab's, a run's copy while the run goes, a
chat model while it answers) is never dropped: the count goes over the limit only while more models
than that are in use at once, and comes back down as soon as one is let go.

Thread-safe: chat replies, runs and the UI ask from different threads. A load runs outside the cache's
lock (a second request for the same model waits for the first load instead of loading it twice).
"""

from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from frankenlab.evals import devices

MAX_MODELS_ENV = "FRANKENLAB_MAX_MODELS"
DEFAULT_MAX_MODELS = 2


def max_models(environ=None) -> int:
    """The lab's model limit from FRANKENLAB_MAX_MODELS (default 2); ValueError with one line when bad."""
    raw = (os.environ if environ is None else environ).get(MAX_MODELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_MODELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{MAX_MODELS_ENV} must be a whole number of at least 1 (models the lab keeps loaded), got {raw!r}: "
            f"set it to 1, 2, 3, ... or unset it for {DEFAULT_MAX_MODELS}"
        )
    return value


def model_device(value) -> Any:
    """The device of the first torch module in `value` (a module, a LoadedModel, a (model, tokenizer)
    pair), or None when it holds none (a stand-in in tests, a slot reserved for a replay)."""
    import torch

    candidates = [value, getattr(value, "model", None)]
    if isinstance(value, tuple | list):
        candidates.extend(value)
    for c in candidates:
        if isinstance(c, torch.nn.Module):
            return devices.model_device(c)
    return None


@dataclass
class _Entry:
    value: Any
    device: Any
    users: int = 0  # jobs using it now: never dropped while above 0
    keep: bool = False  # held until the owner lets go (the lab's baseline)

    @property
    def in_use(self) -> bool:
        return self.users > 0 or self.keep


class ModelCache:
    """At most `limit` models loaded, least recently used dropped first, models in use never."""

    def __init__(self, limit: int | None = None, *, free: Callable | None = None):
        self.limit = max_models() if limit is None else int(limit)
        if self.limit < 1:
            raise ValueError(f"a model cache holds at least 1 model, got {limit}")
        self._free = free or devices.free_cached_memory
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0  # models loaded through the cache (a reload counts again)
        self.dropped: list[str] = []  # keys let go (to make room, replaced or dropped), oldest first

    # -- what it holds -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def in_use(self, key: str) -> bool:
        with self._lock:
            e = self._entries.get(key)
            return e is not None and e.in_use

    def describe(self) -> str:
        with self._lock:
            held = ", ".join(k + (" (in use)" if e.in_use else "") for k, e in self._entries.items()) or "none"
        return f"{len(self._entries)} of at most {self.limit} models loaded: {held}"

    # -- asking for a model ------------------------------------------------------------------------
    def get(self, key: str, load: Callable[[], Any]) -> Any:
        """The model under `key`, loaded with `load()` when it is not held; it becomes the most recent."""
        return self._acquire(key, load, use=False)

    @contextmanager
    def use(self, key: str, load: Callable[[], Any]) -> Iterator[Any]:
        """`get`, with the model kept while the block runs (a chat reply, a job): never dropped meanwhile."""
        value = self._acquire(key, load, use=True)
        try:
            yield value
        finally:
            self._release(key)

    def put(self, key: str, value: Any, *, keep: bool = False) -> None:
        """Hold `value` under `key` (replacing what was there); `keep`: never dropped until `drop(key)`."""
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = _Entry(value, model_device(value), keep=keep)
            dropped = self._over_limit()
        self._let_go(([(key, old)] if old is not None and old.value is not value else []) + dropped)

    def drop(self, key: str) -> None:
        """Let go of `key` now (a replaced baseline, a run's finished copy)."""
        with self._lock:
            old = self._entries.pop(key, None)
        if old is not None:
            self._let_go([(key, old)])

    @contextmanager
    def held(self, key: str, make: Callable[[], Any]) -> Iterator[Any]:
        """A model that lives only for the block (a run's copy; a replay's own model, `make` returning
        None): room is made first, it counts while the block runs, and it is let go at the end."""
        self.make_room()
        value = make()
        with self._lock:
            self._entries[key] = _Entry(value, model_device(value), users=1)
        try:
            yield value
        finally:
            del value
            self.drop(key)

    def make_room(self, new: int = 1) -> list[str]:
        """Drop least recently used models not in use until `new` more fit; returns the keys dropped."""
        with self._lock:
            dropped = self._over_limit(room=new)
        self._let_go(dropped)
        return [k for k, _ in dropped]

    # -- inside --------------------------------------------------------------------------------------
    def _acquire(self, key: str, load: Callable[[], Any], *, use: bool) -> Any:
        with self._lock:
            e = self._take(key, use)
            if e is not None:
                return e.value
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key at a time; a second caller finds it loaded
            with self._lock:
                e = self._take(key, use)
                if e is not None:
                    return e.value
            self.make_room()
            value = load()
            with self._lock:
                self.loads += 1
                self._entries[key] = _Entry(value, model_device(value), users=1 if use else 0)
                dropped = self._over_limit(spare=key)  # never the model just loaded for the caller
                self._loading.pop(key, None)
        self._let_go(dropped)
        return value

    def _take(self, key: str, use: bool) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            if use:
                e.users += 1
        return e

    def _release(self, key: str) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.users:
                e.users -= 1
            dropped = self._over_limit()
        self._let_go(dropped)

    def _over_limit(self, room: int = 0, spare: str | None = None) -> list[tuple[str, _Entry]]:
        """(under the lock) Take out the least recently used entries not in use until `room` more fit."""
        out = []
        for key in list(self._entries):
            if len(self._entries) + room <= self.limit:
                break
            if key != spare and not self._entries[key].in_use:
                out.append((key, self._entries.pop(key)))
        return out

    def _let_go(self, dropped: list[tuple[str, _Entry]]) -> None:
        """Drop the references, collect, and give the GPU memory they held back (outside the lock)."""
        if not dropped:
            return
        devices_held = {str(e.device) for _, e in dropped if e.device is not None}
        self.dropped.extend(k for k, _ in dropped)
        for _, e in dropped:
            e.value = None
        dropped.clear()
        gc.collect()
        for d in sorted(devices_held) or [None]:
            self._free(d)
