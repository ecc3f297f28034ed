"""Macroscopic observables: fixed, differentiable functions of the microscopic state.

Each takes one configuration ``x`` (N,) and returns a vector (d*,); a system
binds one of them as its ``observable_fn``. They have no parameters, and their
Jacobian rows enter ``J`` exactly (the encoder differentiates through them).
"""

from __future__ import annotations

import jax.numpy as jnp


def field_means(x, n_fields: int):
    """Spatial mean of each of ``n_fields`` equal-length fields stacked in ``x``."""
    return jnp.mean(x.reshape(n_fields, -1), axis=1)
