"""1-D predator-prey reaction-diffusion on a grid of cells (Chen & Li, Sec. 4.1).

State ``x = (u_1..u_n, v_1..v_n)`` (prey then predator), N = 2 n. Rates::

    du_i/dt = u_i (1 - u_i - v_i)
    dv_i/dt = a v_i (u_i - b) + (v_{i+1} - 2 v_i + v_{i-1})

The Laplacian is in grid units (no 1/dx^2, as in the reference code: an
effective diffusivity dx^2 on [0, 1]) with replicate (zero-flux) ends. Every
coordinate is a site (``dofs_per_site = 1``): the force of ``u_i`` reads
``u_i, v_i``; the force of ``v_i`` reads ``u_i`` and ``v_{i-1..i+1}``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import jax.random as jr

from macro_jax import observables
from macro_jax.systems import integrators
from macro_jax.systems.base import MicroSystem


def _rates(u, v, v_left, v_right, a, b):
    """Prey and predator rates of one or many cells; shared by the full and subset paths."""
    du = u * (1.0 - u - v)
    dv = a * v * (u - b) + (v_right - 2.0 * v + v_left)
    return du, dv


def make_predator_prey(
    n_cells: int = 50,
    a: float = 3.0,
    b: float = 0.4,
    amp_range: tuple[float, float] = (0.0, 0.2),
    mean_range: tuple[float, float] = (0.4, 0.6),
    n_modes: float = 5.0,
) -> MicroSystem:
    """Builds the system. The initial condition is ``u0 = b0 + a0 cos(n_modes pi s)``,
    ``v0 = (1 - b0) - a0 cos(n_modes pi s)`` at cell centres s, with
    ``a0 ~ U(amp_range)`` and ``b0 ~ U(mean_range)``."""
    if n_cells < 3:
        raise ValueError(f"system.n_cells={n_cells} must be at least 3")
    n = n_cells
    centres = (jnp.arange(n) + 0.5) / n

    def force_fn(x):
        u, v = x[:n], x[n:]
        v_left = jnp.concatenate([v[:1], v[:-1]])
        v_right = jnp.concatenate([v[1:], v[-1:]])
        du, dv = _rates(u, v, v_left, v_right, a, b)
        return jnp.concatenate([du, dv])

    def subset_force_fn(x, sites):
        # O(k): four gathers per chosen coordinate, never the whole field.
        cell = sites % n
        u = x[cell]
        v = x[n + cell]
        v_left = x[n + jnp.maximum(cell - 1, 0)]
        v_right = x[n + jnp.minimum(cell + 1, n - 1)]
        du, dv = _rates(u, v, v_left, v_right, a, b)
        return jnp.where(sites < n, du, dv)

    def observable_fn(x):  # (mean u, mean v)
        return observables.field_means(x, 2)

    def initial_fn(key):
        amp_key, mean_key = jr.split(key)
        a0 = jr.uniform(amp_key, (), minval=amp_range[0], maxval=amp_range[1])
        b0 = jr.uniform(mean_key, (), minval=mean_range[0], maxval=mean_range[1])
        wave = a0 * jnp.cos(n_modes * jnp.pi * centres)
        return jnp.concatenate([b0 + wave, (1.0 - b0) - wave])

    # Integrated in float64, stored in dtype every save_every steps (n_steps // save_every frames from t = 0).
    trajectory_fn = integrators.make_trajectory_fn(
        force_fn, initial_fn, dt=0.01, n_steps=3000, save_every=10, integrator="euler", dtype=jnp.float32)

    return MicroSystem(
        name="predator_prey",
        n_dof=2 * n,
        n_sites=2 * n,
        dofs_per_site=1,
        n_observables=2,
        force_fn=force_fn,
        subset_force_fn=subset_force_fn,
        observable_fn=observable_fn,
        site_dofs=functools.partial(jnp.asarray, dtype=jnp.int32),
        trajectory_fn=trajectory_fn,
        observable_names=("mean u (prey)", "mean v (predator)"),
    )
