"""Latent rollouts and their error against the TRUE microscopic trajectories.

``e_j = sum_t |z*_pred(t) - z*_true(t)| / sum_t |z*_true(t)|`` over the
observable components, for each test trajectory j; ``z*_true`` is the
observable of the microscopic trajectory itself (never another model's
prediction). Report the mean over trajectories, then mean +- std (ddof 0)
over seeds or ensemble members.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from macro_jax.models.latent import NormalisedField
from macro_jax.systems.integrators import rk4_step


def rollout(field, z0, dt: float, n_steps: int, substeps: int = 1):
    """RK4 from ``z0`` with step ``dt / substeps``; returns (n_steps + 1, d) at multiples of dt."""
    h = dt / substeps
    f = lambda z: field(0.0, z)

    def advance(z, _):
        z_next = jax.lax.fori_loop(0, substeps, lambda _, y: rk4_step(f, y, h), z)
        return z_next, z_next

    _, zs = jax.lax.scan(advance, z0, None, length=n_steps)
    return jnp.concatenate([z0[None], zs])


def trajectory_errors(pred_obs, true_obs, relative_floor: float = 0.0):
    """Relative error per trajectory; inputs (..., n_times, d_obs).

    With ``relative_floor > 0`` only the frames whose true observable norm
    exceeds ``relative_floor`` times its maximum over all of ``true_obs``
    count (the Allen-Cahn reference drops the frames after the ring has
    vanished, where the relative error is meaningless).
    """
    true_norm = jnp.linalg.norm(true_obs, axis=-1)
    keep = true_norm > relative_floor * jnp.max(true_norm) if relative_floor > 0 else jnp.ones_like(true_norm, bool)
    num = jnp.sum(jnp.where(keep, jnp.linalg.norm(pred_obs - true_obs, axis=-1), 0.0), axis=-1)
    den = jnp.sum(jnp.where(keep, true_norm, 0.0), axis=-1)
    return num / den


def observable_trajectories(observable_fn, xs):
    """Observables of microscopic trajectories (n_traj, T, N) -> (n_traj, T, d_obs)."""
    return jax.vmap(jax.vmap(observable_fn))(xs).astype(jnp.float32)


def make_member_rollout(static, z0s, dt: float, n_steps: int, substeps: int):
    """``fn(params, stats) -> (n_traj, n_steps + 1, d)`` for one ensemble member."""

    def member(params, stats):
        field = NormalisedField(eqx.combine(params, static), *stats)
        return jax.vmap(lambda z0: rollout(field, z0, dt, n_steps, substeps))(z0s)

    return member


def evaluate_ensemble(nets, stats, ae, x0s, true_obs, times, *, substeps: int = 1, relative_floor: float = 0.0):
    """Rollouts of every member from ``phi(x(0))`` of each test trajectory, scored
    against the true observables ``true_obs`` (n_traj, T, d_obs) of the
    microscopic trajectories started at ``x0s`` (n_traj, N).

    ``nets`` and the normalisation ``stats`` carry a leading member axis.

    Returns ``(errors, pred_obs)`` with errors (members, n_traj) and pred_obs
    (members, n_traj, T, d_obs).
    """
    params, static = eqx.partition(nets, eqx.is_array)
    z0s = jax.jit(jax.vmap(ae.encode))(x0s)
    dt = float(times[1] - times[0])
    member = make_member_rollout(static, z0s, dt, true_obs.shape[1] - 1, substeps)
    zs = jax.jit(jax.vmap(member))(params, stats)
    pred_obs = zs[..., : ae.n_observables]
    return trajectory_errors(pred_obs, true_obs[None], relative_floor), pred_obs


def last_member_errors(pred_obs):
    """The reference's Fig. 4 number, kept only to compare with the paper: each
    member's relative error against the LAST member's rollout instead of the
    truth (method.md section 5), mean over trajectories; the last member scores
    0. ``pred_obs`` (members, n_traj, T, d_obs) -> (members,)."""
    return jnp.mean(trajectory_errors(pred_obs, pred_obs[-1:]), axis=-1)
