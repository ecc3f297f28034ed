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


def temperature(x, n_atoms: int, mass: float = 1.0):
    """Kinetic temperature (k_B = 1) of a particle state ``x = (positions,
    velocities)``, each (n_atoms * 3,): ``T = mass sum |v|^2 / (3 (n_atoms - 1))``,
    shape (1,). The 3 (n - 1) degrees of freedom (momentum conserved) follow
    LAMMPS and the paper; ``jax_md.quantity.temperature`` divides by 3 n."""
    v = x[3 * n_atoms :]
    return (mass * jnp.sum(v * v) / (3.0 * (n_atoms - 1))).reshape(1)
