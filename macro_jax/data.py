"""Labelling configurations with forces, the per-configuration precompute, and
normalisation statistics.

Offline labelling pays for forces once: ``L_z``/``L_x`` runs call the full
calculator, ``L_x,p`` runs draw k sites per configuration (without
replacement) and call the subset calculator, which evaluates those forces
only. Every labelling returns a ``ForceAccount``: how many site forces were
evaluated and the wall-clock seconds spent in the calculator (compile time
excluded, measured with ``block_until_ready``).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from macro_jax import jacobian
from macro_jax.losses import is_partial
from macro_jax import pool as pool_lib
from macro_jax.systems.base import MicroSystem, sample_sites, sample_sites_weighted


@dataclasses.dataclass
class ForceAccount:
    n_forces: int = 0  # site forces evaluated (atoms, or grid coordinates)
    seconds: float = 0.0  # wall-clock in the force calculator, compile excluded

    def __iadd__(self, other: "ForceAccount"):
        self.n_forces += other.n_forces
        self.seconds += other.seconds
        return self


def _timed(fn, *args):
    """Compiles ``fn`` ahead of time, then times one call to completion."""
    compiled = jax.jit(fn).lower(*args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - start


def label_full(system: MicroSystem, xs, chunk: int = 256) -> tuple[jax.Array, ForceAccount]:
    """All forces of every configuration in ``xs`` (n, N), ``chunk`` configurations
    vmapped at a time (bounds the calculator's working memory)."""
    forces, seconds = _timed(lambda xs: jax.lax.map(system.force_fn, xs, batch_size=chunk), xs)
    return forces, ForceAccount(int(xs.shape[0]) * system.n_sites, seconds)


def draw_sites(system: MicroSystem, key, n_configs: int, k: int, chunk: int = 1024):
    """k distinct sites for each of ``n_configs`` configurations, shape (n, k),
    ``chunk`` configurations vmapped at a time (bounds the sampler's memory)."""
    keys = jr.split(key, n_configs)
    return jax.jit(lambda keys: jax.lax.map(lambda kk: sample_sites(kk, system.n_sites, k), keys, batch_size=chunk))(keys)


def draw_weighted_sites(proposal, pool, indices, key, k: int, chunk: int = 1024):
    """k sites for each configuration ``pool[indices]``, i.i.d. from ``proposal(x)``
    (a system's ``site_proposal_fn``; ``sample_sites_weighted``), shape (n, k);
    the configurations are streamed ``chunk`` at a time (read, never labelled)."""
    indices = np.asarray(indices)
    keys = jr.split(key, indices.shape[0])
    draw = jax.jit(jax.vmap(lambda x, kk: sample_sites_weighted(kk, proposal(x), k)))
    return jnp.concatenate([draw(jnp.asarray(pool_lib.take(pool, indices[lo:hi])), keys[lo:hi])
                            for lo, hi in pool_lib.chunks(indices.shape[0], chunk)])


def label_subset(system: MicroSystem, xs, sites, chunk: int = 256) -> tuple[jax.Array, ForceAccount]:
    """Forces of the coordinates owned by ``sites`` (n, k) only, shape (n, k * dofs_per_site),
    ``chunk`` configurations vmapped at a time."""
    f_sub, seconds = _timed(
        lambda xs, sites: jax.lax.map(lambda a: system.subset_force_fn(*a), (xs, sites), batch_size=chunk), xs, sites)
    return f_sub, ForceAccount(int(sites.size), seconds)


def _map(fn, *args, chunk):
    return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk)


def _sample_fn(ae, method: str, system: MicroSystem, loss: str, proposal=None):
    """``one(x, label, sites) -> dict``: the per-configuration loss inputs
    (``proposal``: see ``partial_sample``). Call it inside the jitted region
    that maps over configurations."""
    geometry = jacobian.make_geometry_fn(ae, method)
    if loss == "z":
        return lambda x, f, _: {"z": ae.encode(x), "jf": jacobian.jacobian_times(ae, x, f)}
    if loss == "x":

        def one(x, f, _):
            geo = geometry(x, jnp.zeros((0,), jnp.int32))
            chol = jacobian.cholesky(geo.gram)
            jf = jacobian.jacobian_times(ae, x, f)
            pf2 = jnp.sum(f.astype(jnp.float64) ** 2) - jacobian.metric_norm2(chol, jf)
            return {"z": geo.z, "jf": jf, "chol": chol, "pf2": pf2}

        return one
    return lambda x, f_sub, s: partial_inputs(loss, partial_sample(geometry, system, x, f_sub, s, proposal))


def partial_inputs(loss: str, sample: dict) -> dict:
    """What a partial loss reads of one configuration's ``partial_sample``:
    ``xp`` all of it; ``zp`` ``z``, the rate moments and its two labels
    (``rate`` and ``rate_regression``), no Cholesky factor or sampled Gram."""
    if loss != "zp":
        return sample
    gram = sample["chol"] @ sample["chol"].T
    return {"z": sample["z"], "rate": sample["rate"], "rate2": sample["rate2"],
            "rate_regression": regression_rate(gram, sample["gram_i"], sample["jfi"])}


def regression_rate(gram, gram_i, jfi):
    """``G (J_I J_I^T)^{-1} J_I f_I`` (float64), the regression (ratio) estimate
    of ``J f`` from k sites: the rate whose ``J^+`` rows fit ``f_I`` best, i.e.
    the per-configuration minimiser of ``L_x,p``. Writing ``f = J^+ J f + P f``
    it is ``J f + G (J_I J_I^T)^{-1} J_I (P f)_I``: only the part of f that J
    does not explain is noise, where the unbiased ``rate`` carries the noise of
    all of f. Not unbiased (a ratio estimator, bias O(1/k)); NaN where
    ``J_I J_I^T`` is singular (fewer than d sampled dofs). Importance weights
    cancel: pass the weighted ``gram_i`` and ``jfi`` alike."""
    return gram.astype(jnp.float64) @ jacobian.solve_gram(jacobian.cholesky(gram_i), jfi)


def _no_sites(n: int):
    return jnp.zeros((n, 0), jnp.int32)


def precompute(ae, method: str, system: MicroSystem, loss: str, xs, labels, sites=None, chunk: int = 256,
               proposal=None):
    """Per-configuration arrays the stage-2 loss reads (see ``macro_jax.losses``).

    ``labels`` are full forces (n, N) for ``z``/``x`` and subset forces
    (n, k * dofs_per_site) for ``xp``/``zp`` (with ``sites`` (n, k), drawn uniformly
    or, with ``proposal``, from it: see ``partial_sample``).
    """

    @jax.jit
    def run(xs, labels, sites):
        return _map(_sample_fn(ae, method, system, loss, proposal), xs, labels, sites, chunk=chunk)

    samples = run(xs, labels, sites if sites is not None else _no_sites(xs.shape[0]))
    check_geometry(samples)
    return samples


def labeller(system: MicroSystem, loss: str):
    """``label(xs, sites)`` for a batch of configurations: the forces of ``sites``
    only (the subset calculator, vmapped) for ``xp``/``zp``, all forces otherwise
    (``sites`` unused), one configuration after another: a full-force call's
    temporaries (a jax-md neighbour build: 103 MiB per configuration at 2,700
    atoms) times a vmapped chunk of 256 exhausted memory, and the sequential
    map is also faster (measured, 32 configurations, one process: 10.4 vs 25.3
    ms each at 800 atoms, 84.6 vs 152 ms at 2,700; the same forces bit for bit)."""
    if is_partial(loss):
        return jax.vmap(system.subset_force_fn)
    return lambda xs, _: jax.lax.map(system.force_fn, xs)


def label_and_precompute(system: MicroSystem, ae, method: str, loss: str, pool, indices, sites=None,
                         chunk: int = 256, proposal=None):
    """Labels the configurations ``pool[indices]`` and builds their loss inputs,
    streaming ``chunk`` configurations at a time from ``pool`` (an array or a
    memory-mapped ``BlockPool``): neither the configurations nor their forces
    are ever held all at once, only the per-configuration samples.

    Full forces for ``z``/``x``; for ``xp``/``zp`` the forces of ``sites`` (n, k) only,
    by the subset calculator (drawn from ``proposal``, if given: see
    ``partial_sample``). Returns ``(samples, ForceAccount)``; the seconds
    are those of the force calls alone (compile excluded).
    """
    indices = np.asarray(indices)
    n = indices.shape[0]
    sites = _no_sites(n) if sites is None else jnp.asarray(sites)
    label = labeller(system, loss)
    n_forces = int(sites.size) if is_partial(loss) else n * system.n_sites
    one = _sample_fn(ae, method, system, loss, proposal)
    prep = jax.vmap(one)
    write = jax.jit(lambda buf, part, lo: jax.tree_util.tree_map(
        lambda b, p: jax.lax.dynamic_update_slice_in_dim(b, p, lo, 0), buf, part), donate_argnums=0)
    compiled, out, account = {}, None, ForceAccount(n_forces, 0.0)
    for lo, hi in pool_lib.chunks(n, chunk):
        xs, s = jax.block_until_ready((pool_lib.take(pool, indices[lo:hi]), sites[lo:hi]))
        if hi - lo not in compiled:
            labels_aval = jax.eval_shape(label, xs, s)
            compiled[hi - lo] = (jax.jit(label).lower(xs, s).compile(), jax.jit(prep).lower(xs, labels_aval, s).compile())
        label_c, prep_c = compiled[hi - lo]
        # Dispatch is asynchronous and the queue runs in order: everything else in
        # this loop is waited for, so that no queued work (this chunk's transfer,
        # the previous chunk's loss inputs) is counted as force seconds.
        start = time.perf_counter()
        labels = jax.block_until_ready(label_c(xs, s))
        account.seconds += time.perf_counter() - start
        part = jax.block_until_ready(prep_c(xs, labels, s))
        if out is None:
            out = jax.tree_util.tree_map(lambda p: jnp.zeros((n, *p.shape[1:]), p.dtype), part)
        out = jax.block_until_ready(write(out, part, lo))
    check_geometry(out)
    return out, account


def partial_sample(geometry, system: MicroSystem, x, f_sub, sites, proposal=None):
    """The ``L_x,p`` inputs of one configuration labelled at ``sites`` (k of them).

    ``|f_I - J_I^T y|^2 = |f_I|^2 - 2 y.(J_I f_I) + y^T (J_I J_I^T) y`` for any
    y, so the loss needs only ``ff = |f_I|^2``, ``jfi = J_I f_I`` (d) and
    ``gram_i = J_I J_I^T`` (d x d), all accumulated in float64 from the
    float32 block ``J_I = J[:, I]``, which is then dropped: d^2 + d + 1 numbers
    per configuration instead of (d + 1) k dofs (Allen-Cahn: 273 instead of
    42,500). Float64 keeps the expanded form's cancellation harmless; the
    residual is also never small next to |f_I|^2 (f_I carries the fast
    forces the closure does not explain).

    ``rate``/``rate2`` are unbiased estimates of ``J f`` and ``(J f)^2``: with
    ``c_s`` the contribution of site s to ``J f``, ``T = (n_sites / k) sum_s c_s``
    and ``T^2 - n_sites^2 (1 - k / n_sites) s_c^2 / k`` (``s_c^2`` the sample
    variance of the ``c_s``) under uniform sampling without replacement; the
    latent model's rate normalisation comes from them, never from full forces.

    Importance sampling (``proposal(x) -> q``, the sites drawn i.i.d. from q):
    site s enters every sum with the weight ``w_s = 1 / (n_sites q_s)`` (1 for
    uniform q), so that ``(n_sites / k) sum_s w_s (...)_s`` is unbiased for the
    sum over all sites; ``rate2`` is then ``T^2 - s_Y^2 / k`` with ``s_Y^2``
    the sample variance of the per-draw estimates ``Y_s = n_sites w_s c_s``
    (draws with replacement: no finite-population factor). q is evaluated
    again here rather than kept from the draw: an O(N) pass next to the
    encoder's O(N width), instead of holding (n, k) float64 weights.
    """
    geo = geometry(x, system.site_dofs(sites))
    cols, f = geo.cols.astype(jnp.float64), f_sub.astype(jnp.float64)
    n, k = system.n_sites, sites.shape[0]
    c = (cols * f).reshape(cols.shape[0], k, system.dofs_per_site).sum(-1)  # (d, k) per-site contributions
    sample = {"z": geo.z, "chol": jacobian.cholesky(geo.gram)}
    if proposal is None:
        jfi = c.sum(-1)
        rate = (n / k) * jfi
        spread = jnp.var(c, -1, ddof=1) if k > 1 else jnp.zeros_like(rate)
        return sample | {"jfi": jfi, "ff": jnp.sum(f**2), "gram_i": cols @ cols.T, "rate": rate,
                         "rate2": rate**2 - n**2 * (1.0 - k / n) * spread / k}
    w = 1.0 / (n * proposal(x).astype(jnp.float64)[sites])  # (k,)
    w_dofs = jnp.repeat(w, system.dofs_per_site)
    per_draw = n * c * w  # (d, k): unbiased estimates of J f, one per draw
    rate = per_draw.mean(-1)
    spread = jnp.var(per_draw, -1, ddof=1) if k > 1 else jnp.zeros_like(rate)
    return sample | {"jfi": c @ w, "ff": jnp.sum(w_dofs * f**2), "gram_i": (cols * w_dofs) @ cols.T,
                     "rate": rate, "rate2": rate**2 - spread / k}


def make_online_batch_fn(system: MicroSystem, ae, method: str, k: int, proposal=None, loss: str = "xp"):
    """``batch_fn(xs, key)`` for the online mode: inside the jitted step, draw k
    sites per configuration (uniformly, or i.i.d. from ``proposal``: see
    ``partial_sample``), evaluate their forces with the subset calculator and
    build the inputs of ``loss`` (``xp`` or ``zp``: ``partial_inputs``). The
    encoder is frozen (a constant here)."""

    def batch_fn(xs, key):
        geometry = jacobian.make_geometry_fn(ae, method)

        def one(x, site_key):
            if proposal is None:
                sites = sample_sites(site_key, system.n_sites, k)
            else:
                sites = sample_sites_weighted(site_key, proposal(x), k)
            return partial_inputs(loss, partial_sample(geometry, system, x, system.subset_force_fn(x, sites), sites,
                                                       proposal))

        return jax.vmap(one)(xs, jr.split(key, xs.shape[0]))

    return batch_fn


def check_geometry(samples):
    """Raises if any Gram matrix was not positive definite (rank-deficient J)."""
    if "chol" in samples:
        bad = int(np.sum(~np.all(np.isfinite(np.asarray(samples["chol"])), axis=(-2, -1))))
        if bad:
            raise FloatingPointError(
                f"J J^T is not positive definite for {bad} configurations: the encoder Jacobian "
                "is rank deficient there. Train the autoencoder with a larger "
                "autoencoder.lambda_cond or check the data."
            )


def latent_statistics(ae, pool, chunk: int = 1024):
    """Mean and std (ddof 1) of ``z = phi(x)`` over the configurations of ``pool``
    (an array or a ``BlockPool``, streamed ``chunk`` at a time): free, no forces."""
    encode = jax.jit(jax.vmap(ae.encode))
    n = pool_lib.n_configs(pool)
    zs = jnp.concatenate([encode(pool_lib.take(pool, np.arange(lo, hi))) for lo, hi in pool_lib.chunks(n, chunk)])
    return jnp.mean(zs, 0), jnp.std(zs, 0, ddof=1)


def rate_statistics(loss: str, samples):
    """Mean and std of the latent rate ``J f`` from what the run's labels allow.

    With all forces these are the sample statistics of ``J f``; with partial
    labels they come from the unbiased per-configuration estimates ``rate``
    and ``rate2`` of ``partial_sample``, never from a full force.
    """
    if loss in ("z", "x"):
        jf = samples["jf"].astype(jnp.float64)
        mean, var = jnp.mean(jf, 0), jnp.var(jf, 0, ddof=1)
    else:
        rate = samples["rate"]
        mean = jnp.mean(rate, 0)
        var = jnp.mean(samples["rate2"], 0) - mean**2
        # Sampling noise can push the estimate below zero for tiny data sets.
        var = jnp.maximum(var, 1e-6 * jnp.mean(rate**2, 0))
    return mean.astype(jnp.float32), jnp.sqrt(var).astype(jnp.float32)
