"""Losses: per-sample pure functions, batched in one place.

Autoencoder (stage 1): ``L_AE = L_rec + lambda_cond L_cond``.

Latent dynamics (stage 2, encoder frozen), per configuration with
``g = g_theta(z)``:

* ``L_z   = |J f - g|^2``                              (all forces; or each
  component divided by its rate std, ``"z:normalised"``)
* ``L_x   = |f - J^+ g|^2 = |P f|^2 + (Jf - g)^T G^{-1} (Jf - g)``  (all forces)
* ``L_x,p = (n_sites / k) |f_I - (J^+ g)_I|^2``         (forces of k sites)
* ``L_z,p = |(n_sites / k) J_I f_I - g|^2``             (forces of k sites; ours)

``L_x`` is evaluated through the identity with the theta-independent
``|P f|^2`` precomputed, ``L_x,p`` from the Cholesky factor of ``G`` and the
float64 products ``|f_I|^2``, ``J_I f_I`` and ``J_I J_I^T`` of the block
``J[:, I]`` (which itself is not kept); no N x d pseudo-inverse anywhere. Uniform subsets without
replacement make ``L_x,p`` unbiased for ``L_x``.

``L_z,p`` (``"zp:<p>"``, our option, not the paper's) is ``L_z`` with the
unbiased k-site estimate ``h = (n_sites / k) J_I f_I`` of ``J f`` as its
label: ``E_I |h - g|^2 = |J f - g|^2 + tr Cov(h)``, and the second term does
not depend on theta, so its gradient is unbiased for ``L_z``'s. It pays the
forces of ``L_x,p`` without ``L_x``'s metric ``G^{-1}`` and without the
sampled Gram ``J_I J_I^T`` (``L_x,p``'s quadratic term, whose exact
expectation ``g^T G^{-1} g`` it never needs): a cheaper step, the L_z metric.
``"zp:<p>:regression"`` fits the regression estimate ``G (J_I J_I^T)^{-1}
J_I f_I`` instead (``data.regression_rate``; L_x,p's per-configuration
minimiser, far less noisy, slightly biased).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from macro_jax import jacobian

LOSSES = ("z", "x", "xp", "zp")
LOSS_NAMES = {"z": "L_z", "x": "L_x", "xp": "L_x,p", "zp": "L_z,p"}
PARTIAL_LOSSES = ("xp", "zp")  # labelled with the forces of k sites per configuration


def is_partial(loss: str) -> bool:
    """Whether ``loss`` is labelled with the forces of a subset of sites."""
    return loss in PARTIAL_LOSSES


# ---------------------------------------------------------------- stage 1


def reconstruction_loss(ae, x):
    return jnp.mean((ae(x) - x) ** 2)


def condition_loss(gram, rows):
    """``(kappa - 1)^2`` with ``kappa = cond(G[rows, rows])`` (= cond(J_rows)^2)."""
    return (jacobian.condition_number(gram, rows) - 1.0) ** 2


def make_autoencoder_loss(lambda_cond: float, cond_rows, method: str):
    """Per-batch AE loss ``(ae, x_batch, mask) -> (loss, aux)``."""
    rows = None if cond_rows is None else jnp.asarray(cond_rows)
    no_dofs = jnp.zeros((0,), jnp.int32)

    def loss_fn(ae, xb, mask):
        rec = jax.vmap(lambda x: reconstruction_loss(ae, x))(xb)
        if lambda_cond > 0:
            geometry = jacobian.make_geometry_fn(ae, method)
            gram = jax.vmap(lambda x: geometry(x, no_dofs).gram)(xb)
            cond = jax.vmap(lambda g: condition_loss(g, rows))(gram).astype(jnp.float32)
        else:
            cond = jnp.zeros_like(rec)
        rec_m, cond_m = masked_mean(rec, mask), masked_mean(cond, mask)
        return rec_m + lambda_cond * cond_m, {"rec": rec_m, "cond": cond_m}

    return loss_fn


# ---------------------------------------------------------------- stage 2


def loss_z(field, s):
    """``|J f - g(z)|^2``; sample keys: z, jf."""
    return jnp.sum((s["jf"] - field(0.0, s["z"])) ** 2)


def loss_z_normalised(field, s):
    """``|(J f - g) / sigma|^2`` with ``sigma = field.rate_std``, the std of each
    rate component over the run's labels (``field`` is a ``NormalisedField``):
    ``L_z`` in normalised target space, every latent component weighted alike
    whatever its scale (``config.z_weighting``); sample keys: z, jf."""
    r = (s["jf"] - field(0.0, s["z"])) / jax.lax.stop_gradient(field.rate_std)
    return jnp.sum(r**2)


def loss_x(field, s):
    """``|P f|^2 + (Jf - g)^T G^{-1} (Jf - g)``; sample keys: z, chol, jf, pf2."""
    r = s["jf"] - field(0.0, s["z"])
    return (s["pf2"] + jacobian.metric_norm2(s["chol"], r)).astype(jnp.float32)


def loss_xp(field, s, weight):
    """``weight |f_I - (J^+ g)_I|^2`` with ``(J^+ g)_I = J_I^T y``, ``y = G^{-1} g``,
    expanded as ``|f_I|^2 - 2 y.(J_I f_I) + y^T (J_I J_I^T) y`` in float64
    (``data.partial_sample``); sample keys: z, chol, ff, jfi, gram_i."""
    y = jacobian.solve_gram(s["chol"], field(0.0, s["z"]))
    r2 = s["ff"] - 2.0 * jnp.dot(y, s["jfi"]) + jnp.dot(y, s["gram_i"] @ y)
    return (weight * r2).astype(jnp.float32)


def loss_xp_excess(field, s, weight):
    """``loss_xp`` less its minimum over g, the theta-independent floor
    ``weight (|f_I|^2 - (J_I f_I)^T (J_I J_I^T)^{-1} J_I f_I)``: what remains
    is ``weight (y - y*)^T (J_I J_I^T) (y - y*)`` with ``y* = (J_I J_I^T)^{-1} J_I f_I``,
    computed as that square (float64, never negative). The gradient is
    ``loss_xp``'s; only the value differs, so that the reduce-on-plateau
    schedule (``train.xp_excess``) sees the part the model can reduce. Needs
    ``J_I J_I^T`` invertible (at least d sampled dofs); NaN otherwise.
    ``y*`` is theta-independent but solved again at every step (d^3 / 3
    flops per sample, by our estimate a few per cent of an LJ-800 MLP step): keeping it in
    the samples would cost every L_x,p run d more numbers per configuration
    for an option that is off by default."""
    y = jacobian.solve_gram(s["chol"], field(0.0, s["z"]))
    chol_i = jacobian.cholesky(s["gram_i"])
    e = y - jacobian.solve_gram(chol_i, s["jfi"])
    return (weight * jnp.sum((chol_i.T @ e) ** 2)).astype(jnp.float32)


def loss_zp(field, s, label: str = "rate"):
    """``|h - g(z)|^2`` with ``h = s[label]``: ``rate``, the unbiased k-site
    estimate of ``J f``, or ``rate_regression``, the regression estimate
    (``data.partial_inputs``); sample keys: z and the label."""
    g = field(0.0, s["z"])
    return jnp.sum((s[label].astype(g.dtype) - g) ** 2)


def per_sample_loss(loss: str, weight: float = 1.0, normalised: bool = False, regression: bool = False,
                    excess: bool = False) -> Callable:
    """``(field, sample) -> scalar`` for the loss named ``z``, ``x``, ``xp`` or ``zp``;
    ``normalised`` picks ``loss_z_normalised`` for ``z``, ``regression`` the
    regression label for ``zp``, ``excess`` ``loss_xp_excess`` for ``xp``."""
    if loss == "z":
        return loss_z_normalised if normalised else loss_z
    if loss == "x":
        return loss_x
    if loss == "xp":
        fn = loss_xp_excess if excess else loss_xp
        return lambda field, s: fn(field, s, weight)
    if loss == "zp":
        label = "rate_regression" if regression else "rate"
        return lambda field, s: loss_zp(field, s, label)
    raise ValueError(f"train.loss={loss!r} is not one of {list(LOSSES)}")


def masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_loss(sample_loss: Callable, field, batch, mask):
    """Masked mean of a per-sample loss over a batch (padding rows have mask 0)."""
    values = jax.vmap(lambda s: sample_loss(field, s))(batch)
    return masked_mean(values, mask)
