"""2-D Allen-Cahn phase field on an n x n cell-centred grid of [0, 1]^2 (Chen & Li, Sec. 4.2).

State ``x = u.ravel()`` (row-major), N = n^2, one site per grid point. Rate::

    du/dt = (u - u^3) / eps^2 + Lap_h u,     Lap_h the 5-point stencil / h^2

with replicate (zero-flux Neumann) ends, h = 1 / n and
``eps = interface_cells * h / (2 sqrt(2) artanh(0.9))`` (the 0.1 -> 0.9
transition of the tanh profile spans ``interface_cells`` cells).

The observable is the Ginzburg-Landau free energy, defined once here and used
for the data filter and inside the encoder::

    E(u) = h^2 sum_cells [ (u^2 - 1)^2 / (4 eps^2) + |grad_c u|^2 / 2 ]

with central differences after replicate padding (the reference's encoder
definition; its data filter used an interior-only variant, which we do not
copy). The force of grid point s reads u at s and its four stencil
neighbours only, so forces on k points cost O(k).

The importance proposal (``"xp:<p>:importance"`` runs) mixes, half and half,
the uniform distribution with one proportional to ``(1 - u^2)^2``, which is 1
on the interface (u = 0) and 0 in the bulk (u = +-1), where the force
vanishes: points are drawn where the force is, the uniform half bounds every
weight 1 / (N q) by 2. It reads u only, no stencil and no force.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from macro_jax.systems import integrators
from macro_jax.systems.base import MicroSystem


def interface_width(n_grid: int, interface_cells: float) -> float:
    """``eps`` of the reference: ``interface_cells * h / (2 sqrt(2) artanh(0.9))``."""
    return interface_cells / n_grid / (2.0 * math.sqrt(2.0) * math.atanh(0.9))


def _rate(u, up, down, left, right, eps, h):
    """The right-hand side at points with value ``u`` and stencil neighbours;
    shared by the full and subset paths."""
    return (u - u**3) / eps**2 + (up + down + left + right - 4.0 * u) / h**2


def _central_differences(u, h):
    """``grad_c u`` after replicate padding: ``(u[i+1] - u[i-1]) / 2h`` with clamped indices."""
    p = jnp.pad(u, 1, mode="edge")
    return (p[2:, 1:-1] - p[:-2, 1:-1]) / (2.0 * h), (p[1:-1, 2:] - p[1:-1, :-2]) / (2.0 * h)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def free_energy(u, eps, h):
    """``E(u)`` of an (n, n) grid, n >= 4. Its derivative is written out
    (``free_energy_gradient``): autodiff's transposed pads of every difference
    are separate (n + 2)^2 buffers, 5 per configuration inside the batched
    encoder Jacobian."""
    gx, gy = _central_differences(u, h)
    density = (u**2 - 1.0) ** 2 / (4.0 * eps**2) + 0.5 * (gx**2 + gy**2)
    return h**2 * jnp.sum(density)


def free_energy_gradient(u, eps, h):
    """``dE/du`` on an (n, n) grid, n >= 4: ``h^2 (u^2 - 1) u / eps^2 + h^2 (D_x^T D_x
    + D_y^T D_y) u`` with D the clamped central difference ``(u[a+1] - u[a-1]) / 2h``.

    Away from the ends ``h^2 D^T D u`` is the cross stencil
    ``(4 u - u[a-2] - u[a+2] - u[b-2] - u[b+2]) / 4``: one convolution with zero
    fill. The clamped ends differ from it on rows and columns 0, 1, n-2, n-1 by
    one neighbour each (row 0: -u[1], row 1: -u[0], row n-2: -u[n-1], row n-1:
    -u[n-2], over 4), added in place. No padded copies of u are made: this runs
    per configuration inside the batched encoder Jacobian.
    """
    n = u.shape[0]
    kernel = np.zeros((5, 5))
    kernel[2, 2] = 1.0
    kernel[0, 2] = kernel[4, 2] = kernel[2, 0] = kernel[2, 4] = -0.25
    out = jax.lax.conv_general_dilated(u[None, None], jnp.asarray(kernel, u.dtype)[None, None], (1, 1),
                                       ((2, 2), (2, 2)))[0, 0]
    out = out + h**2 * (u**2 - 1.0) * u / eps**2
    for row, neighbour in ((0, 1), (1, 0), (n - 2, n - 1), (n - 1, n - 2)):
        out = out.at[row, :].add(-0.25 * u[neighbour, :]).at[:, row].add(-0.25 * u[:, neighbour])
    return out


@free_energy.defjvp
def _free_energy_jvp(eps, h, primals, tangents):
    (u,), (du,) = primals, tangents
    return free_energy(u, eps, h), jnp.sum(free_energy_gradient(u, eps, h) * du)


PROPOSAL_UNIFORM = 0.5  # the uniform share of the importance proposal


def interface_proposal(x):
    """Site probabilities ``q = a / N + (1 - a) w / sum(w)``, ``w = (1 - u^2)^2``,
    ``a = PROPOSAL_UNIFORM`` (uniform where ``sum(w) = 0``)."""
    n = x.shape[0]
    w = (1.0 - x.astype(jnp.float64) ** 2) ** 2
    total = jnp.sum(w)
    shaped = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / n)
    return PROPOSAL_UNIFORM / n + (1.0 - PROPOSAL_UNIFORM) * shaped


def make_allen_cahn(
    n_grid: int = 200,
    interface_cells: float = 10.0,
    r1_range: tuple[float, float] = (0.30, 0.40),
    r2_range: tuple[float, float] = (0.10, 0.15),
    batch_size: int = 4,
) -> MicroSystem:
    """Builds the system. Initial conditions are annuli centred at (0.5, 0.5)::

        u0 = tanh((r1 - r) / (sqrt(2) eps)) - tanh((r2 - r) / (sqrt(2) eps)) - 1

    (u ~ +1 for r2 < r < r1, -1 elsewhere) with ``r1 ~ U(r1_range)`` and
    ``r2 ~ U(r2_range)``. ``batch_size`` trajectories are integrated together
    (vmapped), the batches one after another: a few grids fit in cache, and
    memory stays bounded for hundreds of trajectories.
    """
    if n_grid < 4:
        raise ValueError(f"system.n_grid={n_grid} must be at least 4 (the free energy's written-out gradient)")
    if batch_size < 1:
        raise ValueError(f"system.batch_size={batch_size} must be at least 1")
    for name, (lo, hi) in (("r1_range", r1_range), ("r2_range", r2_range)):
        if not 0.0 < lo <= hi < 0.5 * math.sqrt(2.0):
            raise ValueError(f"system.{name}={(lo, hi)} must satisfy 0 < low <= high < 0.707")
    if not r2_range[1] < r1_range[0]:
        raise ValueError(f"system.r2_range={r2_range} must lie below system.r1_range={r1_range} (an annulus)")
    n = n_grid
    h = 1.0 / n
    eps = interface_width(n, interface_cells)
    centres = (jnp.arange(n) + 0.5) * h

    def force_fn(x):
        u = x.reshape(n, n)
        p = jnp.pad(u, 1, mode="edge")
        return _rate(u, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:], eps, h).ravel()

    def subset_force_fn(x, sites):
        # O(k): five gathers per chosen point; clamping the neighbour index is
        # exactly the replicate padding of the full path.
        i, j = sites // n, sites % n
        at = lambda a, b: x[a * n + b]
        return _rate(at(i, j), at(jnp.maximum(i - 1, 0), j), at(jnp.minimum(i + 1, n - 1), j),
                     at(i, jnp.maximum(j - 1, 0)), at(i, jnp.minimum(j + 1, n - 1)), eps, h)

    def observable_fn(x):  # the free energy, shape (1,)
        return free_energy(x.reshape(n, n), eps, h).reshape(1)

    def initial_fn(key):
        k1, k2 = jr.split(key)
        r1 = jr.uniform(k1, (), minval=r1_range[0], maxval=r1_range[1])
        r2 = jr.uniform(k2, (), minval=r2_range[0], maxval=r2_range[1])
        r = jnp.hypot(centres[:, None] - 0.5, centres[None, :] - 0.5)
        s = math.sqrt(2.0) * eps
        return (jnp.tanh((r1 - r) / s) - jnp.tanh((r2 - r) / s) - 1.0).ravel()

    trajectory_fn = integrators.make_trajectory_fn(
        force_fn, initial_fn, batch_size=batch_size, dt=0.1 / n**2, n_steps=40_000, save_every=100,
        integrator="rk4", dtype=jnp.float32)

    return MicroSystem(
        name="allen_cahn",
        n_dof=n * n,
        n_sites=n * n,
        dofs_per_site=1,
        n_observables=1,
        force_fn=force_fn,
        subset_force_fn=subset_force_fn,
        observable_fn=observable_fn,
        site_dofs=functools.partial(jnp.asarray, dtype=jnp.int32),
        trajectory_fn=trajectory_fn,
        observable_names=("free energy",),
        site_proposal_fn=interface_proposal,
    )
