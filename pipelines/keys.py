"""Counter-based randomness: every random number of a run is a hash of explicit keys, not a generator's state.

A key is derived from (seed, rank, epoch, ...) by `combine`, and `uniform(key, n)` is its n-th U[0, 1) draw. So a
crop does not depend on which thread decoded it, a resumed run (at any step, on any number of processes) draws what
an uninterrupted one would, and every engine computes the same numbers. Users: the crops (per sample), the loader's
per-batch keys (each batch augmentation op draws from its own `named` child stream; mixing) and the trainer's
per-micro-batch drop-path seed. numba-compiled (FFCV's decoder calls them from its threads) and callable from Python.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def mix64(x):
    """splitmix64's finaliser: a bijective, well-mixed 64-bit hash."""
    x = np.uint64(x)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def combine(a, b):
    """Key of a child stream: hash of (a, b)."""
    return mix64(np.uint64(a) ^ (mix64(np.uint64(b)) + _GOLDEN))


@njit(cache=True, nogil=True)
def uniform(key, n):
    """The n-th U[0, 1) draw of stream `key` (53-bit resolution)."""
    return float(mix64(np.uint64(key) + np.uint64(n + 1) * _GOLDEN) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def sample_key(epoch_key, sample_index, slot):
    """Key of one sample in one epoch; `slot` (its position in the batch) separates repeated copies of a sample."""
    return combine(combine(epoch_key, sample_index), slot)


def epoch_key(seed: int, rank: int, epoch: int) -> np.uint64:
    """Keys are np.uint64 on the Python side too: numba returns a uint64 as a plain int, and a plain int above 2**63
    passed back into numba is an OverflowError (so every intermediate key is wrapped again)."""
    seed_rank = np.uint64(combine(np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.uint64(rank)))
    return np.uint64(combine(seed_rank, np.uint64(epoch)))


def seed_of(key) -> int:
    """A key as a non-negative 63-bit seed, for torch.manual_seed and torch.Generator.manual_seed."""
    return int(key) & 0x7FFF_FFFF_FFFF_FFFF


@cache
def name_key(name: str) -> np.uint64:
    """A stable 64-bit key of a name: its UTF-8 bytes folded with `combine` (Python's hash() of a str is salted per
    process, so it would differ between the processes of one run)."""
    k = np.uint64(0)
    for byte in name.encode():
        k = np.uint64(combine(k, np.uint64(byte)))
    return k


def named(key, name: str) -> np.uint64:
    """Key of the child stream called `name` of `key`: e.g. one augmentation op's draws for one batch. Streams of
    different names are independent, so adding a stream leaves every other one's numbers unchanged."""
    return np.uint64(combine(np.uint64(key), name_key(name)))
