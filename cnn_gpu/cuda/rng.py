"""Counter-based random numbers: Philox4x32-10 (Salmon et al. 2011), on the GPU and in NumPy.

    words = philox4x32_10(counters, key)           # NumPy: counters (..., 4) uint32, key (2,) uint32
    u = uniform(n, seed, c1, c2, c3, dtype)        # CuPy: (n,) in [0, 1), element i from counter (i, c1, c2, c3)
    u_ref = uniform_reference(n, seed, c1, c2, c3, dtype)   # the same numbers in NumPy, bit for bit

A counter-based generator has no state: each number is a pure function of its counter and the
key, so a kernel replayed from a CUDA graph draws what the same kernel launched eagerly draws,
and a step's numbers depend on (seed, epoch, step) alone, not on how many were drawn before.
cuRAND's host API and CuPy's generators keep state that a graph cannot advance, and refuse
capture. The device code is kernels/batch.cu; the NumPy code here is its reference.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import require_cupy
from . import loader

KERNEL_FILE = "batch.cu"
M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)  # Weyl key increments
ROUNDS = 10
THREADS = 256
MAX_BLOCKS = 4096  # grid cap for the grid-stride loops


def key_of(seed: int) -> tuple[int, int]:
    """The 64-bit Philox key of a seed in [0, 2**64): its low and high 32-bit words."""
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"a Philox seed must be in [0, 2**64), got {seed}")
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def philox4x32_10(counters: Any, key: Any) -> np.ndarray:
    """counters (..., 4) uint32, key (2,) uint32 -> (..., 4) uint32: Random123's philox4x32_10."""
    c = np.array(counters, dtype=np.uint32).reshape(-1, 4).T.copy()  # (4, n), one row per word
    k0, k1 = (np.uint32(v) for v in np.asarray(key, dtype=np.uint32))
    with np.errstate(over="ignore"):  # the key schedule wraps around 2**32 by design
        for r in range(ROUNDS):
            if r:
                k0, k1 = k0 + W0, k1 + W1
            p0 = M0 * c[0].astype(np.uint64)
            p1 = M1 * c[2].astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
            c = np.stack([hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0])
    return c.T.reshape(np.shape(counters))


def words_to_uniform(words: np.ndarray, dtype: Any) -> np.ndarray:
    """(..., 4) uint32 words -> uniforms in [0, 1) of dtype, as kernels/batch.cu's unit_uniform:
    float32 from the top 24 bits of word 0, float64 from the top 27 of word 0 and 26 of word 1."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return (words[..., 0] >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    bits = ((words[..., 0] >> np.uint32(5)).astype(np.uint64) << np.uint64(26)) \
        | (words[..., 1] >> np.uint32(6)).astype(np.uint64)
    return bits.astype(np.float64) * 2.0 ** -53


def uniform_reference(n: int, seed: int, c1: int = 0, c2: int = 0, c3: int = 0, dtype: Any = np.float32) -> np.ndarray:
    """(n,) uniforms in [0, 1): element i from counter (i, c1, c2, c3) under key_of(seed)."""
    counters = np.zeros((n, 4), dtype=np.uint32)
    counters[:, 0] = np.arange(n, dtype=np.uint64).astype(np.uint32)
    counters[:, 1:] = np.array([c1, c2, c3], dtype=np.uint32)
    return words_to_uniform(philox4x32_10(counters, key_of(seed)), dtype)


def name_expressions(dtype: Any) -> tuple[str, ...]:
    """Every template instantiation of batch.cu for one float dtype."""
    t = loader.ctype(dtype)
    return (f"philox_uniform<{t}>", f"gather_augment_normalize<{t}>", "gather_labels<long long>")


def function(name: str, dtype: Any) -> Any:
    """The compiled kernel `name` (a name expression of name_expressions(dtype))."""
    return loader.load_module(KERNEL_FILE, name_expressions(dtype)).get_function(name)


def grid(total: int) -> tuple[int]:
    """Blocks for a grid-stride loop over `total` elements."""
    return (max(1, min(-(-total // THREADS), MAX_BLOCKS)),)


def uniform(n: int, seed: int, c1: int = 0, c2: int = 0, c3: int = 0, dtype: Any = np.float32) -> Any:
    """(n,) CuPy uniforms in [0, 1): uniform_reference's numbers, drawn on the device."""
    if not 0 <= n < 2**32:
        raise ValueError(f"uniform: n must be in [0, 2**32) (one counter per element), got {n}")
    cupy = require_cupy()
    dtype = np.dtype(dtype)
    out = cupy.empty(n, dtype=dtype)
    if n:
        k0, k1 = key_of(seed)
        function(f"philox_uniform<{loader.ctype(dtype)}>", dtype)(
            grid(n), (THREADS,), (out, np.int64(n), np.uint32(k0), np.uint32(k1), np.uint32(c1), np.uint32(c2),
                                  np.uint32(c3)))
    return out
