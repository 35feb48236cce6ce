"""Which hidden states the what-if estimator keeps, inside a byte budget.

A trail is one plan's hidden states at some of its positions: `states[p][b]` is batch b's
(B, T, H) input of position p. The baseline's trail (the unmodified model) is pinned; up to
`MAX_TRAILS` recently estimated plans are kept beside it, least recently used first out, so
editing a plan further along its depth restarts near the edit. When the baseline's states do not
all fit in the budget, only every `stride`-th position is kept (checkpoints); when not even one
fits, nothing is kept and every estimate embeds again. All of it is exact: a state is reused
only for a plan that shares every position before it.

Not thread-safe on its own: the estimator calls it under its lock (`held` may be read anywhere).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

MAX_TRAILS = 8  # recent plans kept as restart points (besides the baseline), budget permitting

States = list[torch.Tensor]  # one (B, T, H) tensor per batch


@dataclass
class Trail:
    """Hidden states entering positions of one plan."""

    order: tuple[int, ...]
    pinned: bool = False  # the baseline's trail is never evicted
    states: dict[int, States] = field(default_factory=dict)

    def best_restart(self, order: tuple[int, ...]) -> int:
        """The latest stored position whose state `order` shares (-1 if none)."""
        shared = 0
        for a, b in zip(self.order, order, strict=False):
            if a != b:
                break
            shared += 1
        usable = [p for p in self.states if p <= shared and p <= len(order)]
        return max(usable, default=-1)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kwargs_bytes(kwargs: dict) -> int:
    """Bytes of the tensors among a layer call's keyword arguments (masks, rotary tables)."""
    total = 0
    for v in kwargs.values():
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class StateCache:
    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes  # None = unbounded
        self.clear()

    def clear(self) -> None:
        self.trails: OrderedDict[tuple[int, ...], Trail] = OrderedDict()
        self.stride: int | None = None  # checkpoint every k-th position; None = nothing fits
        self.state_bytes = 0  # one position's states over all batches
        self.held = 0  # bytes held, kept as a counter so any thread may read it

    def configure(self, n_layers: int, first: States, fixed_bytes: int) -> None:
        """Choose the checkpoint stride for `n_layers` positions and pin the baseline's first state.

        `first` is the embedding output (the input of position 0), `fixed_bytes` what is held
        regardless (the per-batch layer arguments); both count against the budget.
        """
        self.clear()
        self.state_bytes = tensor_bytes(first)
        self.held = fixed_bytes
        room = None if self.max_bytes is None else (self.max_bytes - self.held) // max(1, self.state_bytes)
        if room is None or room >= n_layers:
            self.stride = 1
        elif room >= 1:
            self.stride = math.ceil(n_layers / room)
        base = Trail(tuple(range(n_layers)), pinned=True)
        if self.stride is not None:
            base.states[0] = first
            self.held += self.state_bytes
        self.trails[base.order] = base

    @property
    def baseline(self) -> Trail | None:
        return next((t for t in self.trails.values() if t.pinned), None)

    def restart(self, order: tuple[int, ...]) -> tuple[int, States | None]:
        """The latest position of `order` with a stored state, and that state (0, None: start over)."""
        best, src = -1, None
        for trail in self.trails.values():
            p = trail.best_restart(order)
            if p > best:
                best, src = p, trail
        if src is None:
            return 0, None
        self.trails.move_to_end(src.order)
        return best, src.states[best]

    def trail_for(self, order: tuple[int, ...]) -> Trail | None:
        """The trail that records `order`'s states as they are computed (None when nothing fits)."""
        if self.stride is None:
            return None
        trail = self.trails.get(order)
        if trail is None:
            while len(self.trails) > MAX_TRAILS:  # + the pinned baseline
                self._drop(next(t for t in self.trails.values() if not t.pinned))
            trail = self.trails[order] = Trail(order)
        self.trails.move_to_end(order)
        return trail

    def wants(self, trail: Trail | None, pos: int) -> bool:
        """Whether `trail` would keep its input of position `pos` (a checkpoint it does not hold yet)."""
        return trail is not None and pos < len(trail.order) and pos % self.stride == 0 and pos not in trail.states

    def offer(self, trail: Trail | None, pos: int, x: States) -> None:
        """Keep `x` as `trail`'s input of position `pos` if it is a checkpoint and fits."""
        if self.wants(trail, pos) and (trail.pinned or self._make_room(trail)):
            trail.states[pos] = x
            self.held += self.state_bytes

    def release(self, trail: Trail | None) -> None:
        """Forget a trail that ended up holding nothing (a cancel before its first checkpoint)."""
        if trail is not None and not trail.states and not trail.pinned:
            self.trails.pop(trail.order, None)

    def _make_room(self, keep: Trail) -> bool:
        """Evict least recently used plans' states until one more position fits."""
        if self.max_bytes is None:
            return True
        while self.held + self.state_bytes > self.max_bytes:
            victim = next((t for t in self.trails.values() if not t.pinned and t is not keep), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _drop(self, trail: Trail) -> None:
        self.trails.pop(trail.order, None)
        self.held -= self.state_bytes * len(trail.states)
