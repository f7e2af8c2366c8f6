"""Deterministic hashing of integers into seeds: identical on every platform, process, rank and worker.

Everything random in a run that must agree across processes or replay after a restart (the budget
of a step, the shard order of an epoch, the samples of a batch) is drawn from these, never from
global RNG state.
"""

from __future__ import annotations

import hashlib
import random

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One round of SplitMix64: a well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix(*values: int) -> int:
    """A 64-bit integer that depends on all ``values`` and their order."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (value & _MASK64))
    return state


def unit(*values: int) -> float:
    """A number in [0, 1) that depends only on ``values``."""
    return mix(*values) / 2.0**64


def rng(*values: int) -> random.Random:
    """A ``random.Random`` seeded from ``values``."""
    return random.Random(mix(*values))


def text_id(text: str) -> int:
    """A 64-bit integer for a string (a sample key), the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
