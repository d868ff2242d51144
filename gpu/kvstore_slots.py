"""Free slots of one tier of the tiered KV store (kvstore.py)."""
from __future__ import annotations

import numpy as np

from agentcg.gpu.kvgeometry import KVTierFull


class _Slots:
    """Free-slot bitmap of one tier; hands out the first contiguous run that fits."""

    def __init__(self, capacity: int, max_capacity: int | None = None) -> None:
        self.free = np.zeros(max(max_capacity or capacity, capacity), dtype=bool)
        self.free[:capacity] = True
        self.capacity = capacity
        self.n_free = capacity

    def take(self, n: int) -> np.ndarray:
        if n > self.n_free:
            raise KVTierFull("internal: take beyond free slots")  # callers check first
        if n == 0:
            return np.empty(0, dtype=np.int64)
        edges = np.diff(np.concatenate(([0], self.free[: self.capacity].view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        fits = np.flatnonzero(ends - starts >= n)
        if fits.size:
            slots = np.arange(starts[fits[0]], starts[fits[0]] + n, dtype=np.int64)
        else:
            slots = np.flatnonzero(self.free[: self.capacity])[:n].astype(np.int64)
        self.free[slots] = False
        self.n_free -= n
        return slots

    def give(self, slots: np.ndarray) -> None:
        self.free[slots] = True
        self.n_free += int(np.count_nonzero(slots < self.capacity))

    def used_above(self, limit: int) -> np.ndarray:
        return np.flatnonzero(~self.free[limit: self.capacity]) + limit
