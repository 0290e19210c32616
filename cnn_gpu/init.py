"""Weight initializers. Weights are drawn on the CPU from a seeded NumPy generator, so a
model built with the same seed starts from the same numbers on either backend."""
from __future__ import annotations

import numpy as np


def he_normal(shape: tuple[int, ...], fan_in: int, rng: np.random.Generator,
              dtype: str = "float32") -> np.ndarray:
    """N(0, 2/fan_in): keeps activations' variance steady through ReLU layers (He et al. 2015)."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def glorot_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator,
                   dtype: str = "float32") -> np.ndarray:
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010): for layers not followed by ReLU."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(dtype)


def init_weight(kind: str, shape: tuple[int, ...], fan_in: int, fan_out: int,
                rng: np.random.Generator, dtype: str) -> np.ndarray:
    """'he' or 'glorot' weights of a given shape."""
    if kind == "he":
        return he_normal(shape, fan_in, rng, dtype)
    if kind == "glorot":
        return glorot_uniform(shape, fan_in, fan_out, rng, dtype)
    raise ValueError(f"init must be 'he' or 'glorot', got {kind!r}")
