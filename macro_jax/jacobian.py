"""The encoder Jacobian ``J = d phi / d x`` (d x N) without ever forming ``J^+``.

Everything the losses need from J, per configuration:

* the Gram matrix ``G = J J^T`` (d x d), formed in float64, and its Cholesky
  factor, so ``(J^+ g)_I = J[:, I]^T G^{-1} g`` is a d x d solve;
* the column block ``J[:, I]`` (d x |I|) at the coordinates with labels;
* ``J f`` (a jvp) for losses with every force.

Two ways to get G and ``J[:, I]``:

* ``"generic"``: the full d x N Jacobian by ``jax.jacrev``; any encoder.
* ``"linear_first_layer"``: the closure network starts with ``h1 = W1 x + b1``,
  so its rows are ``J_rest(x) W1`` with ``J_rest`` only (closure x width). Then
  ``G = [[A A^T, A W1^T R^T], [R W1 A^T, R (W1 W1^T) R^T]]`` with ``A`` the
  observables' Jacobian and ``R = J_rest``, and ``J[:, I] = [A[:, I]; R W1[:, I]]``.
  ``W1 W1^T`` is computed once per call, outside the per-sample map; the
  closure rows of J are never formed, nor a float64 copy of W1.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from macro_jax.models.autoencoder import Autoencoder

JACOBIAN_METHODS = ("generic", "linear_first_layer")
F64 = jnp.float64


class Geometry(NamedTuple):
    """Per-configuration encoder geometry (leading batch axes allowed)."""

    z: jax.Array  # (d,) float32 latent
    gram: jax.Array  # (d, d) float64, J J^T
    cols: jax.Array  # (d, k) float32, J[:, dofs]


def make_geometry_fn(ae: Autoencoder, method: str) -> Callable[[jax.Array, jax.Array], Geometry]:
    """Returns ``geometry(x, dofs) -> Geometry`` for single configurations.

    Call it inside the jitted region that maps over configurations, so that
    the per-parameter work (``W1 W1^T``) is traced once per call.
    """
    if method == "generic":

        def geometry(x, dofs):
            z = ae.encode(x)
            jac = jax.jacrev(ae.encode)(x)
            jac64 = jac.astype(F64)
            return Geometry(z, jac64 @ jac64.T, jac[:, dofs])

        return geometry

    if method == "linear_first_layer":
        first = ae.encoder.layers[0]
        w1 = first.weight  # (width, N)
        w1w1t = dot_t_f64(w1, w1)  # (width, width), once per parameter set

        def geometry(x, dofs):
            obs = ae.observable_fn(x).astype(jnp.float32)
            a = jax.jacrev(ae.observable_fn)(x)  # (d*, N), x's dtype; products below in float64
            h1 = first(ae.encoder_input(x))
            closure = ae.encoder.tail(h1)
            r = jax.jacrev(ae.encoder.tail)(h1).astype(F64)  # (c, width)
            a_w1t = dot_t_f64(a, w1)  # (d*, width)
            g_oo = dot_t_f64(a, a)
            g_oc = a_w1t @ r.T
            g_cc = r @ w1w1t @ r.T
            gram = jnp.block([[g_oo, g_oc], [g_oc.T, g_cc]])
            # J[:, I] is stored in float32: a float32 product over the width (64) suffices
            # and never holds a float64 copy of the gathered W1 columns.
            cols = jnp.concatenate([a[:, dofs].astype(jnp.float32), _gathered_product(r.astype(jnp.float32), w1, dofs)])
            return Geometry(jnp.concatenate([obs, closure]), gram, cols)

        return geometry

    raise ValueError(f"autoencoder.jacobian={method!r} is not one of {list(JACOBIAN_METHODS)}")


def dot_t_f64(a: jax.Array, b: jax.Array, chunk: int = 4096) -> jax.Array:
    """``a @ b.T`` in float64 for a (m, N) and b (p, N), converting ``chunk``
    columns at a time: never a float64 copy of a wide float32 matrix (the
    encoder's first layer is 64 x 40,000 for Allen-Cahn)."""
    n = a.shape[1]
    full = n // chunk

    def part(lo, size):
        sa = jax.lax.dynamic_slice_in_dim(a, lo, size, axis=1).astype(F64)
        sb = jax.lax.dynamic_slice_in_dim(b, lo, size, axis=1).astype(F64)
        return sa @ sb.T

    out = jnp.zeros((a.shape[0], b.shape[0]), F64)
    if full:
        out = jax.lax.fori_loop(0, full, lambda i, acc: acc + part(i * chunk, chunk), out)
    if n % chunk:
        out = out + part(full * chunk, n % chunk)
    return out


GATHER_CHUNK = 256


def _gathered_product(r: jax.Array, w: jax.Array, dofs: jax.Array) -> jax.Array:
    """``r @ w[:, dofs]``, gathering ``GATHER_CHUNK`` columns of w at a time: the
    gathered (width, k) block would otherwise be the largest buffer of a batch
    (Allen-Cahn: 640 KiB per configuration, 4x its J[:, I])."""
    k = dofs.shape[0]
    if k <= GATHER_CHUNK:
        return r @ w[:, dofs]
    n_chunks = -(-k // GATHER_CHUNK)
    padded = jnp.pad(dofs, (0, n_chunks * GATHER_CHUNK - k)).reshape(n_chunks, GATHER_CHUNK)
    parts = jax.lax.map(lambda d: r @ w[:, d], padded)  # (n_chunks, c, chunk)
    return jnp.moveaxis(parts, 0, 1).reshape(r.shape[0], -1)[:, :k]


def cholesky(gram: jax.Array) -> jax.Array:
    """Lower Cholesky factor of a float64 Gram matrix (NaN if not positive definite)."""
    return jnp.linalg.cholesky(gram.astype(F64))


def pinv_rows(chol: jax.Array, cols: jax.Array, g: jax.Array) -> jax.Array:
    """``(J^+ g)_I = J[:, I]^T G^{-1} g`` from the Cholesky factor of G.

    The d x d solve, where the conditioning of J bites, runs in float64. The
    product with the stored block ``J[:, I]`` runs in that block's dtype: its
    rounding error is of the order of the error already made when the block
    was stored (eps |J_I| |y| either way), and batched float64 dots do not
    vectorise on XLA CPU (0.27 s vs 0.04 s for 5,120 blocks of 300 x 32). The
    training loss does not call this: ``losses.loss_xp`` reads float64
    products of the block instead (``data.partial_sample``).
    """
    return cols.T @ solve_gram(chol, g).astype(cols.dtype)


def solve_gram(chol: jax.Array, g: jax.Array) -> jax.Array:
    """``y = G^{-1} g`` in float64 from the lower Cholesky factor of G."""
    return cho_solve((chol, True), g.astype(F64))


def metric_norm2(chol: jax.Array, r: jax.Array) -> jax.Array:
    """``r^T G^{-1} r`` in float64."""
    y = jax.scipy.linalg.solve_triangular(chol, r.astype(F64), lower=True)
    return jnp.sum(y**2)


def jacobian_times(ae: Autoencoder, x: jax.Array, f: jax.Array) -> jax.Array:
    """``J f``: the exact latent rate ``dz/dt`` of a configuration with all forces f."""
    return jax.jvp(ae.encode, (x,), (f.astype(x.dtype),))[1]


def condition_number(gram: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """``lambda_max / lambda_min`` of G (restricted to ``rows``) by ``eigvalsh``: cond(J)^2."""
    if rows is not None:
        gram = gram[rows][:, rows]
    eig = jnp.linalg.eigvalsh(gram.astype(F64))
    return eig[-1] / eig[0]
