"""Fixed-step integrators that generate microscopic trajectories.

Trajectories are integrated in float64 (the truth the latent model is scored
against) and stored in the requested dtype, with the exact right-hand side
``f(x)`` at each stored configuration as the force label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from macro_jax.systems.base import Trajectories

INTEGRATORS = ("euler", "rk4")


def euler_step(f, x, dt):
    return x + dt * f(x)


def rk4_step(f, x, dt):
    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


_STEPS = {"euler": euler_step, "rk4": rk4_step}


def simulate(force_fn, x0, *, dt, n_steps, save_every, integrator, dtype, batch_size=None,
             labels: bool = True) -> Trajectories:
    """Integrates a batch of initial states ``x0`` (n_traj, N) for ``n_steps``.

    Stores ``n_steps // save_every`` frames, the first at t = 0. With
    ``batch_size``, that many trajectories are vmapped at a time and the
    batches run one after another (``lax.map``); by default all at once.
    ``labels=False``: no force labels (``forces=None``).
    """
    if integrator not in _STEPS:
        raise ValueError(f"integrator={integrator!r} is not one of {INTEGRATORS}")
    if n_steps % save_every:
        raise ValueError(f"n_steps={n_steps} must be a multiple of save_every={save_every}")
    step = _STEPS[integrator]
    n_frames = n_steps // save_every

    def advance(x, _):
        x_next = jax.lax.fori_loop(0, save_every, lambda _, y: step(force_fn, y, dt), x)
        return x_next, x

    @jax.jit
    def run(x0):
        _, xs = jax.lax.scan(advance, x0.astype(jnp.float64), None, length=n_frames)
        xs = xs.astype(dtype)
        if not labels:
            return xs, None
        # The label is the exact force of the configuration as stored, rounded once.
        forces = jax.vmap(force_fn)(xs.astype(jnp.float64)).astype(dtype)
        return xs, forces

    xs, forces = jax.lax.map(run, x0, batch_size=batch_size) if batch_size else jax.vmap(run)(x0)
    times = (jnp.arange(n_frames) * (save_every * dt)).astype(dtype)
    return Trajectories(times=times, xs=xs, forces=forces)


def make_trajectory_fn(force_fn, initial_fn, *, batch_size=None, **defaults):
    """A system's ``trajectory_fn(key, n_traj, *, dt, n_steps, save_every,
    integrator, dtype, labels)``: ``n_traj`` initial states ``initial_fn(key_i)`` (keys
    split from ``key``) integrated by ``simulate`` in float64 and stored in
    ``dtype`` every ``save_every`` steps; ``defaults`` fills the keywords a
    call leaves out."""

    def trajectory_fn(key, n_traj: int, **settings) -> Trajectories:
        x0 = jax.vmap(initial_fn)(jax.random.split(key, n_traj))
        return simulate(force_fn, x0, batch_size=batch_size, **{**defaults, **settings})

    return trajectory_fn
