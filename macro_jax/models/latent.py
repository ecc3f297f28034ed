"""Latent vector fields ``g(t, z, args)``: an MLP, OnsagerNet and GFINN.

OnsagerNet carries its structure by construction::

    g(z) = -(M(z) + W(z) + alpha I) grad V(z) + F(z)
    M = L L^T (L lower triangular, so M is symmetric PSD),
    W = U - U^T (U strictly upper triangular, so W is skew),
    V(z) = beta |z|^2 + c |P(z) + Gamma z|^2  (coercive: V >= beta |z|^2).

Without forcing F, dV/dt = -grad V^T (M + alpha I) grad V <= 0.

Two reference variants are presets of the same class:

* ``"separate"`` (the reference Predator-Prey model): no shared trunk; P is a
  tanh MLP, the matrix entries come from a second tanh MLP, Gamma has no
  bias, c = 1/2, alpha = 0.01, no forcing.
* ``"shared"`` (the reference Allen-Cahn / Lennard-Jones model): a residual
  trunk with the smoothed ReLU^2 activation feeds linear heads for P, the
  matrix entries and the forcing; c = 1, alpha = 0.1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from macro_jax.models.layers import DTYPE, MLP, activation, dense


class LatentMLP(eqx.Module):
    """``g(z) = MLP(z)`` with no structure (the reference's baseline)."""

    net: MLP

    def __init__(self, dim: int, widths: Sequence[int], act: str = "relu", *, key):
        self.net = MLP([dim, *widths, dim], act, key=key, bias="torch")

    def __call__(self, t, z, args=None):
        return self.net(z)


class OnsagerNet(eqx.Module):
    trunk: list[eqx.nn.Linear]
    potential_head: MLP
    gamma: eqx.nn.Linear
    matrix_head: MLP
    forcing: eqx.nn.Linear | None
    trunk_act: Callable = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    potential_scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        variant: str,
        trunk_widths: Sequence[int] = (),
        potential_widths: Sequence[int] = (32, 32, 32),
        matrix_widths: Sequence[int] = (64, 64),
        key,
    ):
        keys = jr.split(key, 8)
        self.dim = dim
        if variant == "separate":
            if trunk_widths:
                raise ValueError("model.onsagernet.trunk_widths must be empty for variant 'separate'")
            self.trunk = []
            self.trunk_act = jnp.tanh
            pot_out = potential_widths[-1]
            self.potential_head = MLP([dim, *potential_widths], "tanh", key=keys[0])
            self.gamma = dense(keys[1], dim, pot_out, bias=None)
            self.matrix_head = MLP([dim, *matrix_widths, dim * dim], "tanh", key=keys[2])
            self.forcing = None
            self.alpha, self.beta, self.potential_scale = 0.01, 0.1, 0.5
        elif variant == "shared":
            if not trunk_widths:
                raise ValueError("model.onsagernet.trunk_widths must be non-empty for variant 'shared'")
            widths = [dim, *trunk_widths]
            self.trunk = [
                dense(k, a, b, gain=0.1, bias=(0.0, 0.05))
                for k, a, b in zip(jr.split(keys[0], len(trunk_widths)), widths[:-1], widths[1:])
            ]
            self.trunk_act = activation("relu2_smooth")
            w = trunk_widths[-1]
            self.potential_head = MLP([w, dim], "tanh", key=keys[1], weight="orthogonal", gain=0.1, bias=(0.0, 0.1))
            self.gamma = dense(keys[2], dim, dim, weight="orthogonal", gain=0.1, bias=(0.0, 0.1))
            orth = jax.nn.initializers.orthogonal()(keys[3], (dim, dim), DTYPE).reshape(-1)
            self.matrix_head = MLP([w, dim * dim], "tanh", key=keys[4], gain=0.1, bias=orth)
            self.forcing = dense(keys[5], w, dim, weight="orthogonal", gain=0.1, bias=(0.0, 0.05))
            self.alpha, self.beta, self.potential_scale = 0.1, 0.1, 1.0
        else:
            raise ValueError(f"model.onsagernet.variant={variant!r} is not one of ['separate', 'shared']")

    def features(self, z):
        h = z
        for i, layer in enumerate(self.trunk):
            a = self.trunk_act(layer(h))
            h = a if i == 0 else a + h  # residual after the first layer
        return h

    def potential(self, z, h):
        p = self.potential_head(h) + self.gamma(z)
        return self.beta * jnp.sum(z**2) + self.potential_scale * jnp.sum(p**2)

    def matrices(self, h):
        """(M, W): M symmetric PSD, W skew-symmetric, both d x d."""
        a = self.matrix_head(h).reshape(self.dim, self.dim)
        lower = jnp.tril(a)
        upper = jnp.triu(a, 1)
        return lower @ lower.T, upper - upper.T

    def potential_and_grad(self, z):
        """V(z) and grad V(z), sharing one trunk pass between V and the matrices."""
        h, features_vjp = jax.vjp(self.features, z)
        v, (dv_dz, dv_dh) = jax.value_and_grad(self.potential, argnums=(0, 1))(z, h)
        return v, dv_dz + features_vjp(dv_dh)[0], h

    def __call__(self, t, z, args=None):
        _, grad_v, h = self.potential_and_grad(z)
        m, w = self.matrices(h)
        g = -(m @ grad_v + w @ grad_v + self.alpha * grad_v)
        if self.forcing is not None:
            g = g + self.forcing(h)
        return g


class _GenericBracket(eqx.Module):
    """One GENERIC operator built around a scalar network ``F`` (S or E):
    ``A(z) = B^T Sigma(z) B`` with ``B`` (K, d) of rows ``grad F^T xi_k``, each
    ``xi_k`` skew (d, d), so ``A grad F = 0`` by construction; ``Sigma`` is
    ``C - C^T`` (skew: A is skew) or ``C C^T`` (PSD: A is symmetric PSD) with
    ``C(z)`` (K, K) from a network."""

    scalar: MLP
    sigma_net: MLP
    xi: jax.Array  # (K, d, d); only the strictly upper triangles are used
    symmetric: bool = eqx.field(static=True)

    def __init__(self, dim: int, rank: int, widths: Sequence[int], act: str, symmetric: bool, *, key):
        k1, k2, k3 = jr.split(key, 3)
        kw = {"weight": "xavier_uniform", "bias": "zeros"}
        self.scalar = MLP([dim, *widths, 1], act, key=k1, **kw)
        self.sigma_net = MLP([dim, *widths, rank * rank], act, key=k2, **kw)
        self.xi = 0.1 * jr.normal(k3, (rank, dim, dim), DTYPE)
        self.symmetric = symmetric

    def grad(self, z):
        return jax.grad(lambda z: self.scalar(z)[0])(z)

    def _factors(self, z, grad_f):
        """``(B, C)``: B (K, d) of rows ``grad F^T xi_k`` (so ``B grad F = 0``), C (K, K)."""
        upper = jnp.triu(self.xi, 1)
        xi = upper - jnp.swapaxes(upper, 1, 2)  # (K, d, d) skew
        b = jnp.einsum("i,kij->kj", grad_f, xi)
        rank = self.xi.shape[0]
        return b, self.sigma_net(z).reshape(rank, rank)

    def operator(self, z, grad_f):
        """The d x d operator ``B^T Sigma B`` (for inspection and tests)."""
        b, c = self._factors(z, grad_f)
        sigma = c @ c.T if self.symmetric else c - c.T
        return b.T @ sigma @ b

    def apply(self, z, grad_f, v):
        """``operator(z, grad_f) @ v`` by matrix-vector products only (the field's path)."""
        b, c = self._factors(z, grad_f)
        u = b @ v
        w = c @ (c.T @ u) if self.symmetric else c @ u - c.T @ u
        return b.T @ w


class GFINN(eqx.Module):
    """GENERIC-formalism informed network (reference: gfinn_gc, as in the LJ code)::

        g(z) = L(z) grad E(z) + M(z) grad S(z)

    with L skew and L grad S = 0 (built around S), M symmetric PSD and
    M grad E = 0 (built around E). Then dE/dt = 0 and dS/dt >= 0 exactly.
    E and S are tanh MLPs (d -> widths -> 1), each operator has its own MLP
    (d -> widths -> K^2) and its own K skew matrices (init N(0, 0.1^2)).
    The reference (d = K = 32, widths (256, 256)) has 889,346 parameters.
    """

    poisson: _GenericBracket  # L, around S
    friction: _GenericBracket  # M, around E

    def __init__(self, dim: int, rank: int | None = None, widths: Sequence[int] = (256, 256), act: str = "tanh",
                 *, key):
        k1, k2 = jr.split(key)
        rank = dim if rank is None else rank
        self.poisson = _GenericBracket(dim, rank, widths, act, symmetric=False, key=k1)
        self.friction = _GenericBracket(dim, rank, widths, act, symmetric=True, key=k2)

    def operators(self, z):
        """(L, M, grad E, grad S) at z."""
        grad_s = self.poisson.grad(z)
        grad_e = self.friction.grad(z)
        return self.poisson.operator(z, grad_s), self.friction.operator(z, grad_e), grad_e, grad_s

    def __call__(self, t, z, args=None):
        grad_s = self.poisson.grad(z)
        grad_e = self.friction.grad(z)
        return self.poisson.apply(z, grad_s, grad_e) + self.friction.apply(z, grad_e, grad_s)


class NormalisedField(eqx.Module):
    """The physical field ``g(z) = net((z - z_mean) / z_std) * rate_std + rate_mean``.

    The statistics are constants (no gradient flows into them). ``z`` statistics
    come from configurations (free); rate statistics only from the labels the
    run's loss may see (``macro_jax.data.rate_statistics``).
    """

    net: eqx.Module
    z_mean: jax.Array
    z_std: jax.Array
    rate_mean: jax.Array
    rate_std: jax.Array

    def __call__(self, t, z, args=None):
        stop = jax.lax.stop_gradient
        zn = (z - stop(self.z_mean)) / stop(self.z_std)
        return self.net(t, zn, args) * stop(self.rate_std) + stop(self.rate_mean)


LATENT_MODELS = ("mlp", "onsagernet", "gfinn")


def make_latent_model(model_config, dim: int, *, key) -> eqx.Module:
    """Builds the latent network named by ``model_config.name``."""
    if model_config.name == "mlp":
        return LatentMLP(dim, tuple(model_config.mlp.widths), model_config.mlp.activation, key=key)
    if model_config.name == "onsagernet":
        c = model_config.onsagernet
        return OnsagerNet(
            dim,
            variant=c.variant,
            trunk_widths=tuple(c.trunk_widths),
            potential_widths=tuple(c.potential_widths),
            matrix_widths=tuple(c.matrix_widths),
            key=key,
        )
    if model_config.name == "gfinn":
        c = model_config.gfinn
        return GFINN(dim, c.rank or None, tuple(c.widths), c.activation, key=key)
    raise ValueError(f"model.name={model_config.name!r} is not one of {list(LATENT_MODELS)}")


def count_params(model) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))))
