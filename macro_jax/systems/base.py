"""The one protocol every microscopic system implements.

A microscopic system is an ODE ``dx/dt = f(x)`` with ``x`` in R^N. Its
coordinates are grouped into *sites*: the units whose forces a calculator
evaluates together and that the force budget counts (a grid point of a PDE,
an atom of a particle system). A site owns ``dofs_per_site`` coordinates of
``x``; for a PDE with one field that is 1, for an atom it is 6 (position and
velocity, whose rates are velocity and force / mass).

A system is a frozen bundle of pure functions built by a ``make_*`` factory:

* ``force_fn(x) -> f``: every force, shape (N,).
* ``subset_force_fn(x, sites) -> f_I``: the forces of the coordinates owned by
  ``sites`` (shape (k,) of int), laid out as ``f[site_dofs(sites)]``. Its cost
  must be O(k): it gathers only the neighbours the chosen sites depend on. A
  calculator that evaluates every force and slices defeats the method.
* ``observable_fn(x) -> z*``: the fixed macroscopic observables, shape (d*,).
* ``site_dofs(sites) -> idx``: the coordinates of ``x`` that ``sites`` own.
* ``trajectory_fn(key, n, *, dt, n_steps, save_every, integrator, dtype,
  labels=True) -> Trajectories``: n microscopic trajectories from the
  system's distribution of initial conditions; ``integrators`` lists the
  integrators it accepts. ``labels=False`` skips the force labels
  (``forces=None``) where the caller labels later with the force calculator.
* ``site_proposal_fn(x) -> q`` (optional, may be None): probabilities over the
  sites, shape (n_sites,), each > 0, for ``L_x,p`` runs with importance
  sampling (``"xp:<p>:importance"``). It reads the state only, never a
  force; an O(N) pass is acceptable (the encoder reads every coordinate of
  each configuration anyway).
* ``centre_shift = (c, m)`` (default ``(0.0, 0)``): a second frame for the
  encoder's input. With ``autoencoder.input_origin = "box_centre"`` the
  encoder sees ``x`` with ``c`` subtracted from its first ``m`` coordinates
  (particles: positions measured from the box centre, in ``[-L/2, L/2)`` as in
  the reference's LAMMPS box, instead of our ``[0, L)``). Forces, observables
  and stored data never change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray


class Trajectories(NamedTuple):
    """Microscopic trajectories stored at ``times``.

    ``xs`` has shape (n_traj, n_times, N) and ``forces`` the same: the exact
    right-hand side ``f(x)`` at each stored configuration (never an
    integrator's averaged slope). Trajectories simulated with
    ``labels=False`` or read back from disk carry ``forces=None``: training
    labels come from the force calculator.
    """

    times: Float[Array, " n_times"]
    xs: Float[Array, "n_traj n_times N"]
    forces: Float[Array, "n_traj n_times N"] | None


class ForceFn(Protocol):
    def __call__(self, x: Float[Array, " N"]) -> Float[Array, " N"]: ...


class SubsetForceFn(Protocol):
    def __call__(self, x: Float[Array, " N"], sites: Int[Array, " k"]) -> Float[Array, " kd"]: ...


@dataclasses.dataclass(frozen=True)
class MicroSystem:
    """A microscopic system: static sizes plus pure functions (see module doc)."""

    name: str
    n_dof: int
    n_sites: int
    dofs_per_site: int
    n_observables: int
    force_fn: ForceFn
    subset_force_fn: SubsetForceFn
    observable_fn: Callable[[Float[Array, " N"]], Float[Array, " d_obs"]]
    site_dofs: Callable[[Int[Array, " k"]], Int[Array, " kd"]]
    trajectory_fn: Callable[..., Trajectories]
    # Integrators ``trajectory_fn`` accepts, and display names of the observables.
    integrators: tuple[str, ...] = ("euler", "rk4")
    observable_names: tuple[str, ...] = ()
    site_proposal_fn: Callable[[Float[Array, " N"]], Float[Array, " n_sites"]] | None = None
    centre_shift: tuple[float, int] = (0.0, 0)

    def __post_init__(self):
        if self.n_sites * self.dofs_per_site != self.n_dof:
            raise ValueError(
                f"{self.name}: n_sites * dofs_per_site = {self.n_sites * self.dofs_per_site} "
                f"must equal n_dof = {self.n_dof}"
            )


def sample_sites(key: PRNGKeyArray, n_sites: int, k: int) -> Int[Array, " k"]:
    """k distinct sites drawn uniformly without replacement from range(n_sites).

    Never an O(N log N) permutation of all sites (unless k is a large fraction
    of them, where that is O(k log k) too):

    * small k (k^2 <= N log N): Robert Floyd's algorithm, k draws and an O(k)
      membership test each;
    * larger k: ``m`` slightly more than k i.i.d. draws, one sort of m keys,
      and the first k distinct values in draw order, which is sequential
      sampling with rejection of repeats, hence uniform; redrawn in the rare
      case of fewer than k distinct values (``lax.while_loop``).

    The order of the returned sites carries no meaning.
    """
    if not 0 < k <= n_sites:
        raise ValueError(f"subset size k={k} must be in [1, n_sites={n_sites}]")
    if k * k <= n_sites * max(1, n_sites.bit_length()):
        return _floyd(key, n_sites, k)
    # m draws give n (1 - exp(-m / n)) distinct values on average; aim for k plus 6 sigma.
    target = k + 6.0 * math.sqrt(k) + 8.0
    if target >= 0.5 * n_sites:
        return jr.permutation(key, n_sites)[:k].astype(jnp.int32)  # k ~ n: O(n log n) = O(k log k)
    m = int(math.ceil(-n_sites * math.log1p(-target / n_sites)))
    return _distinct_draws(key, n_sites, k, m)


def sample_sites_weighted(key: PRNGKeyArray, q: Float[Array, " n_sites"], k: int) -> Int[Array, " k"]:
    """k i.i.d. draws (with replacement) of a site with probabilities ``q``
    (normalised here): one cumulative sum in float64 and k binary searches,
    O(n_sites + k log n_sites). Sites of zero probability are never drawn."""
    if k < 1:
        raise ValueError(f"subset size k={k} must be at least 1")
    cdf = jnp.cumsum(q.astype(jnp.float64))
    u = jr.uniform(key, (k,), jnp.float64) * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), q.shape[0] - 1).astype(jnp.int32)


def _floyd(key, n_sites: int, k: int):
    draw_keys = jr.split(key, k)

    def body(i, chosen):
        j = n_sites - k + i  # Floyd: for j in N-k..N-1, draw t in [0, j]
        t = jr.randint(draw_keys[i], (), 0, j + 1, dtype=jnp.int32)
        seen = jnp.any(chosen == t)
        return chosen.at[i].set(jnp.where(seen, j, t))

    chosen = jnp.full((k,), -1, dtype=jnp.int32)
    return jax.lax.fori_loop(0, k, body, chosen)


def _distinct_draws(key, n_sites: int, k: int, m: int):
    """The first k distinct values of m i.i.d. uniform draws (see ``sample_sites``)."""

    def attempt(key):
        v = jr.randint(key, (m,), 0, n_sites, dtype=jnp.int32).astype(jnp.int64)
        s = jnp.sort(v * m + jnp.arange(m, dtype=jnp.int64))  # one sort of single keys: by value, then draw
        value, position = s // m, s % m
        first = jnp.concatenate([jnp.ones((1,), bool), value[1:] != value[:-1]])
        is_first = jnp.zeros((m,), bool).at[position].set(first)
        picked = jnp.nonzero(is_first, size=k, fill_value=0)[0]  # first k distinct draws, in draw order
        return v[picked].astype(jnp.int32), jnp.sum(first) >= k

    def body(state):
        key, _, _ = state
        key, sub = jr.split(key)
        return (key, *attempt(sub))

    key, sub = jr.split(key)
    return jax.lax.while_loop(lambda state: ~state[2], body, (key, *attempt(sub)))[1]
