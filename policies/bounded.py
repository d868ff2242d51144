"""Bounded maps for policy state. Policies learn per sandbox and per tool; on a long-running
host both sets grow without end, so each map keeps its most recently updated keys only."""
from __future__ import annotations

from typing import Callable, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_KEYS = 4096


def touch(mapping: dict[K, V], key: K, value: V, cap: int | None = None) -> V:
    """mapping[key] = value as the most recent entry; the least recent go beyond `cap`."""
    limit = MAX_KEYS if cap is None else cap
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > limit:
        del mapping[next(iter(mapping))]
    return value


def recent(mapping: dict[K, V], key: K, make: Callable[[], V], cap: int | None = None) -> V:
    """Like dict.setdefault, but the key becomes the most recent and the map stays bounded."""
    value = mapping.pop(key, None)
    return touch(mapping, key, make() if value is None else value, cap)
