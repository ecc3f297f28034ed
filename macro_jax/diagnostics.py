"""Diagnostics of finished runs: the conditioning of the encoder, training curves
on held-out data, and the ``lambda_cond`` sweep.

* ``condition_numbers``: ``cond(G) = lambda_max / lambda_min`` of ``G = J J^T``
  (float64) and the singular values of J for every configuration of a pool.
  ``L_x`` and ``L_x,p`` solve with G, so its conditioning is what the
  penalty ``lambda_cond L_cond`` of stage 1 buys.
* ``make_monitor``: what ``train.monitor_every`` evaluates outside the jitted
  epoch (held-out ``L_z`` and ``L_x`` in the training's units, test error).
* ``subset_noise``: the variance of the partial (k-site) estimate of the
  latent rate ``J f`` next to the rate's variance over configurations, per
  row of J and per site coordinate, and ``|P f|^2``, the part of f that J
  does not explain (from full forces; a diagnostic).
* ``rollout_drift``: how much of an ensemble's end-of-rollout error is a
  drift in one direction that its members share (``drift_report``: every
  ensemble of a workdir, from the saved test rollouts).
* ``lambda_sweep``: test error and ``cond(G)`` for each ``lambda_cond`` of
  ``config.diagnostics.lambda_values`` (resumable).
* ``run_diagnostics``: the condition-number distribution of a workdir's
  autoencoder and the curves of its monitored runs, into ``workdir/diagnostics``.
* Plots: ``plot_curves``, ``plot_condition_numbers``, ``plot_lambda_sweep``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
from absl import logging

from macro_jax import checkpoint, data, jacobian, losses, plotting, train
from macro_jax import eval as evaluation
from macro_jax import pool as pool_lib
from macro_jax.config import ConfigError, parse_run
from macro_jax.losses import is_partial
from macro_jax.systems.base import sample_sites

# ---------------------------------------------------------------- condition numbers


def condition_numbers(ae, pool, method: str, chunk: int = 1024, indices=None, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """``cond(G)`` (n,) and the singular values of J (n, d), largest first, for
    the configurations ``pool[indices]`` (default: all), streamed ``chunk`` at a
    time from an array (n, N) or a ``BlockPool``. G comes from
    ``jacobian.make_geometry_fn(ae, method)`` (float64); ``rows`` restricts
    cond to those rows of J (as ``autoencoder.cond_rows`` does in ``L_cond``),
    the singular values are always those of the whole J."""
    indices = np.arange(pool_lib.n_configs(pool)) if indices is None else np.asarray(indices)
    rows = None if rows is None else jnp.asarray(rows)
    no_dofs = jnp.zeros((0,), jnp.int32)

    @eqx.filter_jit
    def spectrum(ae, xs):
        geometry = jacobian.make_geometry_fn(ae, method)

        def one(x):
            gram = geometry(x, no_dofs).gram
            eig = jnp.linalg.eigvalsh(gram)
            return jacobian.condition_number(gram, rows), jnp.sqrt(jnp.clip(eig[::-1], 0.0))

        return jax.vmap(one)(xs)

    parts = [spectrum(ae, pool_lib.take(pool, indices[lo:hi])) for lo, hi in pool_lib.chunks(len(indices), chunk)]
    return (np.concatenate([np.asarray(c, np.float64) for c, _ in parts]),
            np.concatenate([np.asarray(s, np.float64) for _, s in parts]))


def cond_summary(cond: np.ndarray) -> dict:
    """Quantiles of a condition-number sample (non-finite values counted apart)."""
    ok = np.isfinite(cond)
    c = cond[ok]
    q = lambda f: float(np.quantile(c, f)) if c.size else None
    return {"n": int(cond.size), "n_nonfinite": int(np.sum(~ok)), "min": q(0.0), "p10": q(0.1), "median": q(0.5),
            "p90": q(0.9), "max": q(1.0), "mean_log10": float(np.mean(np.log10(c))) if c.size else None}


def cond_indices(n_pool: int, n: int) -> np.ndarray:
    """``n`` pool rows evenly spaced over the pool (all of them for n = 0 or n >= n_pool)."""
    if n <= 0 or n >= n_pool:
        return np.arange(n_pool)
    return np.unique(np.linspace(0, n_pool - 1, n).round().astype(np.int64))


def _cond_spec(config) -> dict:
    from macro_jax import experiment

    return dict(experiment.autoencoder_spec(config), cond_configs=int(config.diagnostics.cond_configs))


def cached_condition_numbers(config, workdir: str, get_prep) -> tuple[np.ndarray, np.ndarray]:
    """``condition_numbers`` of ``workdir``'s autoencoder over its pool (rows
    ``diagnostics.cond_configs``), saved to ``workdir/diagnostics/condition_numbers.npz``
    and read from there on a second call (settings checked). ``get_prep()``
    returns the ``Prepared`` data, called only when they must be computed
    (``None``: they must exist)."""
    path = os.path.join(workdir, "diagnostics", "condition_numbers.npz")
    spec = _cond_spec(config)
    if os.path.exists(path):
        arrays, _ = checkpoint.load_arrays(path, expect={"spec": spec})
        return arrays["cond"], arrays["singular_values"]
    if get_prep is None:
        raise checkpoint.DataFileError(f"{path}: file not found (run the sweep first)")
    prep = get_prep()
    idx = cond_indices(pool_lib.n_configs(prep.pool), int(config.diagnostics.cond_configs))
    cond, sv = condition_numbers(prep.ae, prep.pool, config.autoencoder.jacobian, config.train.precompute_chunk, idx)
    checkpoint.save_arrays(path, {"cond": cond, "singular_values": sv, "indices": idx},
                           {"spec": spec, "versions": checkpoint.versions()})
    return cond, sv


# ---------------------------------------------------------------- noise of the partial labels


def subset_noise(system, ae, pool, k: int, indices, n_draws: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """How noisy the ``L_x,p`` estimate of the latent rate is, from FULL forces
    (a diagnostic: never used in training, never counted in a budget).

    For each configuration ``x = pool[i]`` the latent rate is ``J f = sum_s c_s``
    over sites, ``c_s = J[:, dofs(s)] f[dofs(s)]``. The partial estimate
    ``(n / k) sum_{s in I} c_s`` with ``I`` k sites drawn uniformly without
    replacement (``partial_sample``) has the variance ``n^2 (1 - k / n) S^2 / k``,
    ``S^2`` the sample variance (ddof 1) of the ``c_s`` over the n sites.
    Returns, per row of J (d,): ``signal_var``, the variance of ``J f`` over the
    configurations; ``noise_var``, that estimator variance averaged over them;
    ``noise_var_by_component`` (dofs_per_site, d), the same when only the j-th
    coordinate of each site is sampled and the others are summed exactly
    (particles: j = 0-2 positions, whose f is the velocity, j = 3-5 velocities,
    whose f is the force); ``ratio = noise_var / signal_var``; and
    ``gram_noise``, the relative variance ``E |G_I - G|_F^2 / |G|_F^2`` of the
    k-site estimate ``G_I = (n / k) J_I J_I^T`` of the Gram ``G = J J^T`` (the
    metric L_x,p solves with), averaged over the configurations.
    ``regression_noise_var`` (d,): the variance of the regression estimate
    ``G (J_I J_I^T)^{-1} J_I f_I`` (``data.regression_rate``,
    the per-configuration minimiser of ``L_x,p``; no closed form) over
    ``n_draws`` uniform subsets per configuration, averaged over them, and
    ``regression_ratio`` its ratio to ``signal_var`` (NaN when the k sites'
    coordinates are fewer than d: ``J_I J_I^T`` is then singular).
    ``force_norm2`` and ``unexplained_norm2`` (per configuration): ``|f|^2`` and
    ``|P f|^2 = |f|^2 - (J f)^T G^{-1} J f`` with ``P = I - J^+ J``, the part
    of f outside J's row space: the theta-independent floor of ``L_x``, and
    what the k-site estimates of ``J f`` (and the ``L_x,p`` gradient) are
    noisy with (for ``f = J^T a`` the regression estimate is exact);
    ``unexplained_fraction`` is their ratio.

    Would importance sampling of sites help (as it does for Allen-Cahn)? In the
    metric of ``L_x`` (``L_x = |P f|^2 + (J f - g)^T G^{-1} (J f - g)``) the
    estimate's noise is ``E (h - J f)^T G^{-1} (h - J f)``, per configuration:
    ``metric_noise`` for the uniform draw (without replacement, as trained) and,
    for k i.i.d. draws with probabilities q and weights 1 / (k q_s)
    (``sample_sites_weighted``), ``(sum_s |c_s|_M^2 / q_s - |J f|_M^2) / k`` with
    ``|c|_M^2 = c^T G^{-1} c``. ``importance_ratio_jacobian`` is that variance
    over ``metric_noise`` for q_s proportional to the norm of site s's columns
    of ``G^{-1/2} J`` (the state only: a proposal training could use), and
    ``importance_ratio_oracle`` for q_s proportional to ``|c_s|_M``, the best
    q of all (it needs every force, so it is a bound, not an option).
    J is ``jax.jacrev`` of the encoder (d x N per configuration, one at a time).
    """
    n, dps = system.n_sites, system.dofs_per_site
    if not 1 <= k < n:
        raise ConfigError(f"subset size k={k} is invalid: need 1 <= k < n_sites = {n}")
    if len(indices) < 2:
        raise ConfigError(f"n_configs={len(indices)} is invalid: the variance of J f over configurations needs >= 2")
    site_dofs = jax.vmap(lambda s: system.site_dofs(s[None]))(jnp.arange(n))  # (n, dps)
    fac = n**2 * (1.0 - k / n) / k

    @jax.jit
    def one(x, key):
        """(J f, estimator variance (d,), per-coordinate variances (dps, d), Gram noise,
        regression-estimate variance (d,), |f|^2, |P f|^2) of one configuration."""
        f = system.force_fn(x).astype(jnp.float64)
        jac = jax.jacrev(ae.encode)(x).astype(jnp.float64)  # (d, N)
        cols = jac[:, site_dofs]  # (d, n, dps)
        c = cols * f[site_dofs]  # per-site, per-coordinate contributions to J f
        per_site_gram = jnp.einsum("ask,bsk->sab", cols, cols)  # (n, d, d)
        gram = per_site_gram.sum(0)
        gram_noise = fac * jnp.sum(jnp.var(per_site_gram, 0, ddof=1)) / jnp.sum(gram**2)

        def regression(draw_key):
            sites = sample_sites(draw_key, n, k)
            ci = cols[:, sites].reshape(cols.shape[0], -1)
            return data.regression_rate(gram, ci @ ci.T, c[:, sites].sum((1, 2)))

        reg = jax.vmap(regression)(jr.split(key, n_draws))
        jf = c.sum((1, 2))
        ff = jnp.sum(f**2)
        chol = jacobian.cholesky(gram)
        pf = ff - jacobian.metric_norm2(chol, jf)  # as L_x's floor (data._sample_fn)
        whiten = lambda a: jax.scipy.linalg.solve_triangular(chol, a, lower=True)  # |c|_M = |G^{-1/2} c|
        wc = whiten(c.sum(-1))  # (d, n): whitened per-site contributions
        metric = fac * jnp.sum(jnp.var(wc, 1, ddof=1))

        def iid(q):
            q = q / q.sum()
            return (jnp.sum(jnp.sum(wc**2, 0) / q) - jnp.sum(wc.sum(1) ** 2)) / k

        site_norm = jnp.sqrt(jnp.sum(whiten(jac)[:, site_dofs] ** 2, (0, 2)))  # site s's columns of G^{-1/2} J
        importance = jnp.stack([iid(site_norm), iid(jnp.sqrt(jnp.sum(wc**2, 0)))])
        return (jf, fac * jnp.var(c.sum(-1), 1, ddof=1), fac * jnp.var(c, 1, ddof=1).T, gram_noise,
                jnp.var(reg, 0, ddof=1), ff, pf, metric, importance)

    keys = jr.split(jr.PRNGKey(seed), len(indices))
    per_config = [jax.device_get(one(jnp.asarray(pool_lib.take(pool, np.asarray([i]))[0]), keys[j]))
                  for j, i in enumerate(np.asarray(indices))]
    rates, noise, by_component, gram_noise, reg_noise, ff, pf, metric, importance = (
        np.stack(a) for a in zip(*per_config))
    signal = rates.var(0, ddof=1)
    noise_var = noise.mean(0)
    return {"signal_var": signal, "noise_var": noise_var, "noise_var_by_component": by_component.mean(0),
            "ratio": noise_var / signal, "gram_noise": float(gram_noise.mean()),
            "regression_noise_var": reg_noise.mean(0), "regression_ratio": reg_noise.mean(0) / signal,
            "force_norm2": ff, "unexplained_norm2": pf, "unexplained_fraction": pf / ff,
            "metric_noise": metric, "importance_ratio_jacobian": importance[:, 0] / metric,
            "importance_ratio_oracle": importance[:, 1] / metric}


def subset_noise_report(config, workdir: str, n_configs: int) -> dict:
    """``subset_noise`` of ``workdir``'s autoencoder on ``n_configs`` pool rows
    spread evenly over the pool, for the k of every ``xp`` run of
    ``config.train.runs``; written to ``workdir/diagnostics/subset_noise.json``."""
    from macro_jax import experiment
    from macro_jax.config import subset_size

    prep = experiment.prepare(config, workdir)
    idx = cond_indices(pool_lib.n_configs(prep.pool), n_configs)
    report = {"workdir": workdir, "n_configs": int(len(idx)), "autoencoder_sha256": experiment.autoencoder_sha256(workdir),
              "runs": {}}
    for spec in config.train.runs:
        loss, p = parse_run(spec)
        if not is_partial(loss):
            continue
        k = subset_size(p, prep.system.n_sites, spec)
        r = subset_noise(prep.system, prep.ae, prep.pool, k, idx)
        report["runs"][spec] = {
            "k": k, "ratio_median": float(np.median(r["ratio"])), "ratio_max": float(np.max(r["ratio"])),
            "regression_ratio_median": float(np.median(r["regression_ratio"])),
            "regression_ratio_max": float(np.max(r["regression_ratio"])),
            "component_ratio_median": [float(np.median(v / r["signal_var"])) for v in r["noise_var_by_component"]],
            "unexplained_fraction_median": float(np.median(r["unexplained_fraction"])),
            "unexplained_norm2_per_dof_mean": float(np.mean(r["unexplained_norm2"]) / prep.system.n_dof),
            "importance_ratio_jacobian_median": float(np.median(r["importance_ratio_jacobian"])),
            "importance_ratio_oracle_median": float(np.median(r["importance_ratio_oracle"])),
            **{key: np.asarray(v).tolist() for key, v in r.items()}}
    os.makedirs(os.path.join(workdir, "diagnostics"), exist_ok=True)
    experiment.write_json(os.path.join(workdir, "diagnostics", "subset_noise.json"), report)
    return report


# ---------------------------------------------------------------- drift of the rollouts


def rollout_drift(pred_obs, true_obs) -> dict[str, np.ndarray]:
    """How much of an ensemble's rollout error is a drift its members share.

    ``pred_obs`` (members, n_traj, T, d_obs) and ``true_obs`` (n_traj, T,
    d_obs). At the last step, per member and observable: ``end_signed``, the
    mean over trajectories of ``pred - true``, and ``end_abs``, the mean of
    ``|pred - true|``, both divided by the mean ``|true|`` there (relative).
    ``shared`` (d_obs,) is ``|mean_m end_signed| / mean_m end_abs``: 1 when
    every member is off by the same amount in the same direction on every
    trajectory, near 0 when the members' errors cancel on average;
    ``n_positive`` (d_obs,) counts the members that end above the truth.
    """
    pred = np.asarray(pred_obs, np.float64)[:, :, -1]
    true = np.asarray(true_obs, np.float64)[:, -1]
    if pred.shape[1:] != true.shape:
        raise ValueError(f"rollouts {pred.shape[1:]} and truth {true.shape} disagree in (n_traj, d_obs)")
    scale = np.mean(np.abs(true), axis=0)
    signed = np.mean(pred - true[None], axis=1) / scale
    absolute = np.mean(np.abs(pred - true[None]), axis=1) / scale
    return {"end_signed": signed, "end_abs": absolute, "shared": np.abs(signed.mean(0)) / absolute.mean(0),
            "n_positive": np.sum(signed > 0, axis=0)}


def drift_report(config, workdir: str) -> dict:
    """``rollout_drift`` of every ensemble of ``workdir/runs``, its member groups
    joined; runs without saved test rollouts are listed under ``skipped``.
    Written to ``workdir/diagnostics/drift.json``."""
    from macro_jax import experiment, structures

    true_obs = np.asarray(experiment.prepare(config, workdir).test.obs)
    pred, skipped = {}, []
    for result_path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "result.json"))):
        run_dir = os.path.dirname(result_path)
        with open(result_path) as f:
            pred_obs = experiment.saved_rollouts(run_dir, json.load(f))
        if pred_obs is None:
            skipped.append(os.path.basename(run_dir))
        else:
            pred.setdefault(structures.ensemble_run_name(os.path.basename(run_dir)), []).append(pred_obs)
    report = {"workdir": workdir, "skipped": skipped, "ensembles": {}}
    for key, parts in sorted(pred.items()):
        r = rollout_drift(np.concatenate(parts), true_obs)
        report["ensembles"][key] = {"n_members": int(sum(len(p) for p in parts)),
                                    **{k: np.asarray(v).tolist() for k, v in r.items()}}
    os.makedirs(os.path.join(workdir, "diagnostics"), exist_ok=True)
    experiment.write_json(os.path.join(workdir, "diagnostics", "drift.json"), report)
    return report


# ---------------------------------------------------------------- monitored curves


def make_monitor(static, stats, held, ae, test, *, substeps: int = 1, relative_floor: float = 0.0) -> Callable:
    """``monitor(params) -> {"L_z", "L_x", "L_x_residual", "test_error"}``, each
    (members,), for ``train.train_ensemble``. ``L_x_residual`` is ``L_x`` less
    its parameter-free part ``|P f|^2``, i.e. ``(Jf - g)^T G^{-1} (Jf - g)``:
    what the latent model can still reduce (``L_x`` itself is dominated by
    ``|P f|^2``, so its level is set by the held-out sample).

    ``static``: the nets' non-array part; ``stats``: the normalisation tuple
    (leading member axis) the run trains with; ``held``: ``L_x`` loss inputs
    (z, jf, chol, pf2; from full forces) of held-out configurations; ``test``:
    the run's ``TestSet``. The losses are ``train.dynamics_loss_fn`` of
    ``losses.loss_z`` / ``loss_x`` averaged over ``held``, i.e. in the units of
    the training loss (``L_x,p`` is unbiased for ``L_x``); the test error is
    ``eval.evaluate_ensemble``'s, averaged over test trajectories. One jitted
    function, compiled on the first call.
    """
    mask = jnp.ones((jax.tree_util.tree_leaves(held)[0].shape[0],), jnp.float32)
    residual = lambda field, s: jacobian.metric_norm2(s["chol"], s["jf"] - field(0.0, s["z"])).astype(jnp.float32)
    fns = {"L_z": train.dynamics_loss_fn(losses.loss_z, static), "L_x": train.dynamics_loss_fn(losses.loss_x, static),
           "L_x_residual": train.dynamics_loss_fn(residual, static)}
    z0s = jax.jit(jax.vmap(ae.encode))(test.x0)
    dt = float(test.times[1] - test.times[0])
    member = evaluation.make_member_rollout(static, z0s, dt, test.obs.shape[1] - 1, substeps)
    n_obs = ae.n_observables

    @jax.jit
    def evaluate(params, stats, held, true_obs):
        out = {name: jax.vmap(lambda p, s: fn(p, (held, s), mask)[0])(params, stats) for name, fn in fns.items()}
        pred = jax.vmap(member)(params, stats)[..., :n_obs]
        out["test_error"] = jnp.mean(evaluation.trajectory_errors(pred, true_obs[None], relative_floor), axis=1)
        return out

    def monitor(params):
        return {k: np.asarray(v, np.float64) for k, v in evaluate(params, stats, held, test.obs).items()}

    return monitor


def load_history(path: str) -> dict[str, np.ndarray]:
    """A run's ``history.npz`` (arrays only, never unpickled)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def monitored_names(history: Mapping[str, np.ndarray]) -> list[str]:
    return [k.split("/", 1)[1] for k in history if k.startswith("monitor/") and k != "monitor/epoch"]


# ---------------------------------------------------------------- plots


def _band(ax, x, values, label, **kw):
    """Mean over members (columns) with a min-max band."""
    values = np.asarray(values, np.float64).reshape(len(x), -1)
    (line,) = ax.plot(x, values.mean(1), label=f"{label} (mean, band = min-max over {values.shape[1]} members)"
                      if values.shape[1] > 1 else label, **kw)
    if values.shape[1] > 1:
        ax.fill_between(x, values.min(1), values.max(1), color=line.get_color(), alpha=0.2, lw=0)


def plot_curves(history, path: str, title: str = "") -> None:
    """Training loss (every epoch) with the monitored held-out losses (left) and
    the test rollout error (right) vs epoch, log y, mean and min-max band over
    the members. ``history``: one run's history, or ``{run name: history}``
    for one row per run (shared y axes per column)."""
    plt = plotting.pyplot()
    runs = {"": history} if "loss" in history else dict(history)
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.8 * len(runs)), squeeze=False, sharey="col")
    for (name, h), (ax, ax_err) in zip(runs.items(), axes):
        loss = np.asarray(h["loss"])
        _band(ax, np.arange(1, loss.shape[0] + 1), loss, "training loss (the run's)", color="k", lw=1)
        epochs = np.asarray(h.get("monitor/epoch", []))
        for i, key in enumerate(k for k in monitored_names(h) if k != "test_error"):
            _band(ax, epochs, h[f"monitor/{key}"], f"held-out {key}", marker=".", lw=1.2, color=f"C{i}")
        ax.set_yscale("log")
        ax.set_ylabel("loss (training units)")
        ax.legend(fontsize=7)
        if "monitor/test_error" in h:
            _band(ax_err, epochs, h["monitor/test_error"], "test rollout error", marker=".", color="C3")
            ax_err.set_yscale("log")
            ax_err.legend(fontsize=7)
        ax_err.set_ylabel("relative test error (true trajectories)")
        for a in (ax, ax_err):
            a.set_xlabel("epoch")
            if name:
                a.set_title(name, fontsize=9)
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_condition_numbers(conds: Mapping[str, np.ndarray], path: str,
                           singular_values: Mapping[str, np.ndarray] | None = None, title: str = "") -> None:
    """Histogram of log10 cond(J J^T) for each labelled sample (left) and, with
    ``singular_values`` (n, d) per label, the spectrum of J: median and 5-95%
    band of each singular value (right)."""
    plt = plotting.pyplot()
    ncols = 2 if singular_values else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    logs = {k: np.log10(v[np.isfinite(v)]) for k, v in conds.items()}
    finite = [v for v in logs.values() if v.size]
    lo, hi = (min(v.min() for v in finite), max(v.max() for v in finite)) if finite else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
    for label, v in logs.items():
        ax.hist(v, bins=bins, histtype="step", lw=1.5, label=f"{label} (median {10 ** np.median(v):.3g})")
    ax.set_xlabel("log10 cond(J J^T)")
    ax.set_ylabel("configurations")
    ax.legend(fontsize=7)
    if singular_values:
        ax = axes[0][1]
        for label, sv in singular_values.items():
            idx = np.arange(1, sv.shape[1] + 1)
            (line,) = ax.plot(idx, np.median(sv, 0), "o-", label=label)
            ax.fill_between(idx, np.quantile(sv, 0.05, 0), np.quantile(sv, 0.95, 0), color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xticks(idx)
        ax.set_xlabel("singular value index (largest first)")
        ax.set_ylabel("singular value of J (median, 5-95%)")
        ax.legend(fontsize=7)
    fig.suptitle(title or "conditioning of the encoder Jacobian over the pool")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lambda_positions(lambdas) -> tuple[dict[float, float], list[float], list[str]]:
    """x positions (log10 lambda; lambda = 0 one and a half decades left of the
    smallest nonzero value), tick positions and labels."""
    nonzero = sorted(v for v in set(lambdas) if v > 0)
    zero_at = (np.log10(nonzero[0]) if nonzero else 0.0) - 1.5
    pos = {v: (np.log10(v) if v > 0 else zero_at) for v in set(lambdas)}
    ticks = sorted(pos.values())
    labels = ["0" if t == zero_at else f"1e{round(t):d}" for t in ticks]
    return pos, ticks, labels


def plot_lambda_sweep(rows: list[dict], path: str) -> None:
    """Test error (mean ± std over seeds) vs lambda_cond for each loss (left)
    and median and 90th percentile of cond(J J^T) vs lambda_cond (right); log
    axes, lambda_cond = 0 at the marked position left of the break."""
    plt = plotting.pyplot()
    pos, ticks, labels = _lambda_positions([r["lambda_cond"] for r in rows])
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(dict.fromkeys(_label(r) for r in rows)):
        rs = sorted((r for r in rows if _label(r) == label and r["test_error_mean"] is not None),
                    key=lambda r: pos[r["lambda_cond"]])
        x = np.array([pos[r["lambda_cond"]] for r in rs]) + 0.06 * (i - 0.5)  # side by side
        mean, std = np.array([r["test_error_mean"] for r in rs]), np.array([r["test_error_std"] for r in rs])
        ax.errorbar(x, mean, [np.minimum(std, 0.9 * mean), std], fmt="o", capsize=3, color=f"C{i}", label=label)
        _unbroken(ax, x, mean, [r["lambda_cond"] for r in rs], "-", color=f"C{i}")
        for xi, r in zip(x, rs):
            ax.plot([xi] * len(r["test_errors"]), r["test_errors"], ".", color=f"C{i}", alpha=0.4)
    ax.set_ylabel("relative test error")
    ax.set_title("mean ± std over seeds (lower bar clipped at 0.1 x mean); dots = seeds", fontsize=8)
    per_lambda = {r["lambda_cond"]: r for r in rows if r.get("cond_median") is not None}
    lams = sorted(per_lambda, key=pos.get)
    x = [pos[v] for v in lams]
    for key, line, marker, color, label in (("cond_median", "-", "o", "C0", "median"),
                                            ("cond_p90", "--", "s", "C1", "90th percentile"),
                                            ("cond_max", ":", "x", "grey", "max")):
        y = [per_lambda[v][key] for v in lams]
        ax_c.plot(x, y, marker, ls="none", color=color, label=label)
        _unbroken(ax_c, x, y, lams, line, color=color)
    ax_c.set_title("over every pool configuration", fontsize=8)
    ax_c.set_ylabel("cond(J J^T) over the pool")
    for a in (ax, ax_c):
        a.set_yscale("log")
        a.set_xticks(ticks, labels)
        a.set_xlabel("autoencoder.lambda_cond")
        if 0.0 in pos and len(pos) > 1:
            a.axvline(pos[0.0] + 0.75, color="grey", ls=(0, (2, 2)), lw=0.8)  # the axis break
        a.legend(fontsize=7)
    fig.suptitle("lambda_cond sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _unbroken(ax, x, y, lambdas, style, **kw) -> None:
    """Lines between the points with lambda_cond > 0 only (none across the axis break)."""
    keep = [i for i, v in enumerate(lambdas) if v > 0]
    ax.plot([x[i] for i in keep], [y[i] for i in keep], style, **kw)


def _label(r: dict) -> str:
    from macro_jax import experiment

    return experiment.run_label(r)


# ---------------------------------------------------------------- lambda_cond sweep


def lambda_config(config, lambda_cond: float) -> ml_collections.ConfigDict:
    c = config.copy_and_resolve_references()
    c.autoencoder.lambda_cond = float(lambda_cond)
    return c


def lambda_dir(workdir: str, lambda_cond: float) -> str:
    """``workdir/lambda_<value>``, e.g. ``lambda_0``, ``lambda_1e-06``."""
    return os.path.join(workdir, f"lambda_{float(lambda_cond):g}")


def _cached_or_failed(config, spec: str, workdir: str, get_prep) -> dict:
    """``experiment.cached_run``, except that a run that fails numerically (a
    rank-deficient J, a non-finite loss) is recorded in ``runs/<name>/failed.json``
    and reported as such (reused on the next call) instead of ending the sweep."""
    from macro_jax import experiment

    name = experiment.config_run_name(config, spec, config.train.budget)
    failed = os.path.join(workdir, "runs", name, "failed.json")
    settings = experiment._settings(config, spec)
    if os.path.exists(failed):
        with open(failed) as f:
            saved = json.load(f)
        if experiment._normalised(saved.get("settings") or {}) == settings:
            return saved
    try:
        return experiment.cached_run(config, spec, config.train.budget, workdir, get_prep)
    except FloatingPointError as e:
        loss, p = parse_run(spec)
        result = {"loss": losses.LOSS_NAMES[loss], "run": spec, "p": p, "failed": str(e), "settings": settings,
                  "seeds": list(config.train.seeds), "test_errors": [], "test_error_mean": None, "test_error_std": None}
        logging.warning("%s: failed (%s)", name, e)
        experiment.write_json(failed, result)
        return result


def lambda_sweep(config, workdir: str) -> list[dict]:
    """For each ``lambda_cond`` of ``config.diagnostics.lambda_values``: every run of
    ``config.train.runs`` at ``config.train.budget`` in ``lambda_dir(workdir, value)``
    (its own data, autoencoder and runs, reused when present) and the
    condition numbers of its autoencoder over the pool. Returns one row per
    (lambda_cond, loss)."""
    from macro_jax import experiment

    out = []
    for value in config.diagnostics.lambda_values:
        c = lambda_config(config, value)
        sub = lambda_dir(workdir, value)
        get_prep = experiment.memo_prepare(c, sub)
        results = [_cached_or_failed(c, spec, sub, get_prep) for spec in c.train.runs]
        try:
            summary = cond_summary(cached_condition_numbers(c, sub, get_prep)[0])
        except FloatingPointError as e:  # the autoencoder itself failed to train
            logging.warning("lambda_cond=%g: no condition numbers (%s)", value, e)
            summary = dict.fromkeys(("median", "p90", "max", "min", "n"))
        ae_history = os.path.join(sub, "autoencoder", "history.json")
        ae = json.load(open(ae_history)) if os.path.exists(ae_history) else {}
        for r in results:
            out.append({
                "lambda_cond": float(value), "loss": r["loss"], "run": r["run"], "p": r["p"], "seeds": r["seeds"],
                "test_errors": r["test_errors"], "test_error_mean": r["test_error_mean"],
                "test_error_std": r["test_error_std"], "n_failed_rollouts": r.get("n_failed_rollouts"),
                "failed": r.get("failed"), "cond_median": summary["median"], "cond_p90": summary["p90"],
                "cond_max": summary["max"], "cond_min": summary["min"], "n_cond_configs": summary["n"],
                "ae_final_rec": ae["rec"][-1] if ae.get("rec") else None,
                # mean (kappa - 1)^2 of the last AE epoch; not computed (None) when lambda_cond = 0
                "ae_final_cond": ae["cond"][-1] if ae.get("cond") and float(value) > 0 else None,
            })
        logging.info("lambda_cond=%g: %s; cond median %.3g", value,
                     ", ".join(f"{r['loss']} {r['test_error_mean']}" for r in results), summary["median"] or np.nan)
    return out


def lambda_table(rows: list[dict]) -> str:
    lines = ["| lambda_cond | loss | test error: mean ± std | per seed | cond(J J^T): median | p90 | max | AE L_rec (last epoch) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["test_error_mean"] is None:
            err, seeds = f"failed: {r.get('failed') or '?'}"[:60], "–"
        else:
            err = f"{r['test_error_mean']:.2e} ± {r['test_error_std']:.1e}"
            seeds = " / ".join(f"{e:.1e}" for e in r["test_errors"])
        num = lambda v, f: format(v, f) if v is not None else "–"
        lines.append(f"| {r['lambda_cond']:g} | {_label(r)} | {err} | {seeds} | {num(r['cond_median'], '.3g')} | "
                     f"{num(r['cond_p90'], '.3g')} | {num(r['cond_max'], '.3g')} | {num(r.get('ae_final_rec'), '.2e')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- one finished workdir


def run_diagnostics(config, workdir: str, train_monitored: bool = False) -> dict:
    """The condition numbers of ``workdir``'s autoencoder over its pool and the
    curves of every run under ``workdir/runs`` with monitored history, as PNGs
    and ``summary.json`` in ``workdir/diagnostics``.

    With ``train_monitored`` every run of ``config.train.runs`` is first trained
    again with ``train.monitor_every`` into ``runs/monitored_<run>`` (cached), so
    that a workdir whose runs were not monitored gets curves; monitoring does
    not change the numbers, so those runs reproduce the original ones.
    """
    from macro_jax import experiment

    get_prep = experiment.memo_prepare(config, workdir)
    out_dir = os.path.join(workdir, "diagnostics")
    os.makedirs(out_dir, exist_ok=True)
    if train_monitored:
        if int(config.train.monitor_every) <= 0:
            raise ConfigError(f"train.monitor_every={config.train.monitor_every!r} is invalid: "
                              "--train_monitored needs it > 0")
        for spec in config.train.runs:
            experiment.cached_run(config, spec, config.train.budget, workdir, get_prep, tag="monitored")
    cond, sv = cached_condition_numbers(config, workdir, get_prep)
    label = f"lambda_cond={config.autoencoder.lambda_cond:g}"
    plot_condition_numbers({label: cond}, os.path.join(out_dir, "condition_numbers.png"), {label: sv},
                           title=f"{os.path.basename(os.path.normpath(workdir))}: cond(J J^T) and spectrum of J")
    summary = {"workdir": workdir, "lambda_cond": float(config.autoencoder.lambda_cond), "cond": cond_summary(cond),
               "singular_values_median": np.median(sv, 0).tolist(), "runs": {}}
    monitored = {}
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "history.npz"))):
        name = os.path.basename(os.path.dirname(path))
        history = load_history(path)
        if "monitor/epoch" not in history:
            continue
        monitored[name] = history
        png = os.path.join(out_dir, f"curves_{name}.png")
        plot_curves(history, png, title=name)
        summary["runs"][name] = {
            "curves": png, "epochs_monitored": history["monitor/epoch"].tolist(),
            "final_train_loss": history["loss"][-1].tolist(),
            **{f"final_{k}": history[f"monitor/{k}"][-1].tolist() for k in monitored_names(history)},
        }
    if monitored:
        plot_curves(monitored, os.path.join(out_dir, "curves.png"),
                    title=f"{os.path.basename(os.path.normpath(workdir))}: training curves of the monitored runs")
    experiment.write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def plot_lambda_histograms(config, workdir: str, path: str) -> None:
    """``plot_condition_numbers`` of every autoencoder of a finished lambda sweep
    (read from each ``lambda_<value>/diagnostics/condition_numbers.npz``)."""
    conds, svs = {}, {}
    for value in config.diagnostics.lambda_values:
        c = lambda_config(config, value)
        cond, sv = cached_condition_numbers(c, lambda_dir(workdir, value), get_prep=None)
        conds[f"lambda_cond={float(value):g}"], svs[f"lambda_cond={float(value):g}"] = cond, sv
    plot_condition_numbers(conds, path, svs, title="cond(J J^T) over the pool and spectrum of J, per lambda_cond")
