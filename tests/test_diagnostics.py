"""Diagnostics: condition numbers against SVDs and a known answer, monitored
curves equal to independent evaluations, the lambda_cond sweep resumes."""

import dataclasses
import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from configs import predator_prey
from macro_jax import checkpoint, diagnostics, experiment, jacobian, structures, train
from macro_jax.config import ConfigError
from macro_jax.models import Autoencoder, NormalisedField, make_latent_model
from macro_jax.systems import make_predator_prey

METHODS = ("generic", "linear_first_layer")


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


@pytest.mark.parametrize("method", METHODS)
def test_condition_numbers_equal_svd_of_jacrev(method):
    """cond(G) and the spectrum equal numpy's SVD of jax.jacrev(ae.encode), per configuration."""
    system = make_predator_prey()
    ae = _f64(Autoencoder(system.n_dof, 2, 2, (8,), "softplus", system.observable_fn, decoder_uses_observables=True,
                          bias_init="torch", key=jr.PRNGKey(0)))  # float64: both paths see the same J exactly
    xs = jr.uniform(jr.PRNGKey(1), (7, system.n_dof), jnp.float64, 0.5, 2.0)
    cond, sv = diagnostics.condition_numbers(ae, xs, method, chunk=3)  # chunks of 3, 3, 1
    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(ae.encode)))(xs), np.float64)
    s = np.linalg.svd(jac, compute_uv=False)  # (7, 4), largest first
    assert cond.shape == (7,) and sv.shape == (7, 4)
    np.testing.assert_allclose(sv, s, rtol=1e-6)
    np.testing.assert_allclose(cond, (s[:, 0] / s[:, -1]) ** 2, rtol=1e-6)
    assert np.all(cond >= 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_rows_have_known_condition_number(method):
    """Observables (mean u, mean v) have rows of norm^2 1/50; a closure J = W1 whose
    rows are zero-mean on each half (so orthogonal to them) with norm^2 1/50 and
    9/50 gives G = diag(1, 1, 1, 9)/50: cond = 1, then 9."""
    system = make_predator_prey()  # 50 cells: x = (u, v)
    ae = Autoencoder(system.n_dof, 2, 2, (2,), "relu", system.observable_fn, decoder_uses_observables=True,
                     bias_init="zeros", key=jr.PRNGKey(0))
    alt = np.where(np.arange(50) % 2 == 0, 1.0, -1.0) / 50  # zero mean, |alt|^2 = 1/50
    xs = jr.uniform(jr.PRNGKey(1), (5, system.n_dof), jnp.float32)
    for scale, expected in ((1.0, 1.0), (3.0, 9.0)):
        w1 = np.zeros((2, 100), np.float32)
        w1[0, :50], w1[1, 50:] = alt, scale * alt
        enc = ae.encoder
        enc = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias), enc,
                          (jnp.asarray(w1), jnp.full((2,), 2.0, jnp.float32), jnp.eye(2, dtype=jnp.float32),
                           jnp.zeros((2,), jnp.float32)))  # relu(W1 x + 2) = W1 x + 2 on these x: J = W1
        cond, sv = diagnostics.condition_numbers(eqx.tree_at(lambda a: a.encoder, ae, enc), xs, method)
        np.testing.assert_allclose(cond, expected, rtol=1e-5)
        np.testing.assert_allclose(sv[:, 0], scale / np.sqrt(50), rtol=1e-5)
        np.testing.assert_allclose(sv[:, 1:], 1 / np.sqrt(50), rtol=1e-5)


@pytest.fixture(scope="module")
def smoke_prep(tmp_path_factory):
    config = predator_prey.get_config("smoke")
    workdir = str(tmp_path_factory.mktemp("diag_smoke"))
    return config, workdir, experiment.prepare(config, workdir)


def test_monitored_losses_equal_independent_evaluation(smoke_prep):
    """monitor_every = 1: curves of shape (epochs + 1, members); the last L_z equals
    |J f - g(z)|^2 on the held-out configurations computed here from the forces and
    jax.jacrev of the encoder with the saved members; the last test error equals
    the run's; the trained numbers equal an unmonitored run's."""
    config, workdir, prep = smoke_prep
    config = config.copy_and_resolve_references()
    config.train.monitor_every = 1
    budget = config.train.budget
    monitored = experiment.run_loss(prep, config, "z", budget, workdir, tag="mon")
    history = diagnostics.load_history(os.path.join(workdir, "runs", "mon_z_budget6000", "history.npz"))
    epochs, members = config.train.epochs, len(config.train.seeds)
    np.testing.assert_array_equal(history["monitor/epoch"], np.arange(epochs + 1))
    for name in ("L_z", "L_x", "L_x_residual", "test_error"):
        assert history[f"monitor/{name}"].shape == (epochs + 1, members)
        assert np.all(np.isfinite(history[f"monitor/{name}"])) and np.all(history[f"monitor/{name}"] > 0)
    # L_x = |P f|^2 + residual, |P f|^2 fixed by the held-out data alone
    pf2 = history["monitor/L_x"] - history["monitor/L_x_residual"]
    np.testing.assert_allclose(pf2, pf2[0, 0], rtol=1e-4)
    n_pool, h = prep.pool.shape[0], config.diagnostics.holdout
    assert monitored["diagnostic_force_computations"] == h * prep.system.n_sites
    assert monitored["n_force_computations"] == budget  # the held-out forces are not in the budget

    # independent L_z: forces, J by jacrev, rate statistics of the run's configurations
    system, ae = prep.system, prep.ae
    jf_of = jax.jit(jax.vmap(lambda x: jax.jacrev(ae.encode)(x) @ system.force_fn(x)))
    n = budget // system.n_sites
    jf_train = np.asarray(jf_of(prep.pool[:n]), np.float64)
    rate_mean, rate_std = jf_train.mean(0), jf_train.std(0, ddof=1)
    held_idx = experiment.holdout_indices(config, n_pool, np.arange(n))
    assert held_idx.size == h and held_idx.min() >= n and held_idx.max() < n_pool and len(set(held_idx)) == h
    assert len(set(held_idx // 100)) > 1  # spread over the trajectories (100 frames each), not one's tail
    scattered = np.random.default_rng(0).choice(n_pool, 200, replace=False)  # as train.draw_configs = "random"
    assert not np.intersect1d(experiment.holdout_indices(config, n_pool, scattered), scattered).size
    held = prep.pool[held_idx]
    jf_held, z_held = jf_of(held), jax.vmap(ae.encode)(held)
    skeleton = eqx.filter_vmap(lambda k: make_latent_model(config.model, ae.latent_dim, key=k))(
        jnp.stack([jr.PRNGKey(s) for s in config.train.seeds]))
    nets = checkpoint.load_model(os.path.join(workdir, "runs", "mon_z_budget6000", "members.eqx"), skeleton)
    for m in range(members):
        net = jax.tree_util.tree_map(lambda a: a[m] if eqx.is_array(a) else a, nets)
        field = NormalisedField(net, prep.z_mean, prep.z_std, jnp.asarray(rate_mean, jnp.float32),
                                jnp.asarray(rate_std, jnp.float32))
        l_z = np.mean(np.sum((np.asarray(jf_held) - np.asarray(jax.vmap(lambda z: field(0.0, z))(z_held))) ** 2, -1))
        np.testing.assert_allclose(history["monitor/L_z"][-1, m], l_z, rtol=1e-4)
    np.testing.assert_allclose(history["monitor/test_error"][-1], monitored["test_errors"], rtol=1e-5)

    config.train.monitor_every = 0
    plain = experiment.run_loss(prep, config, "z", budget, workdir, tag="plain")
    assert plain["test_errors"] == monitored["test_errors"]
    assert plain["final_train_loss"] == monitored["final_train_loss"]
    assert plain["diagnostic_force_computations"] == 0

    # the held-out rows must not be the run's
    with pytest.raises(ConfigError, match="diagnostics.holdout=350 is invalid: only 340 of the 400"):
        config.diagnostics.holdout = 350
        experiment.holdout_indices(config, n_pool, np.arange(n))


def test_lambda_sweep_writes_rows_and_resumes(tmp_path, monkeypatch):
    config = predator_prey.get_config("smoke")
    config.train.runs = ("z", "xp:0.2")
    config.train.epochs = 2
    config.diagnostics.lambda_values = (0.0, 1e-4)
    rows = diagnostics.lambda_sweep(config, str(tmp_path))
    assert [(r["lambda_cond"], r["loss"]) for r in rows] == [(0.0, "L_z"), (0.0, "L_x,p"), (1e-4, "L_z"), (1e-4, "L_x,p")]
    for r in rows:
        assert {"lambda_cond", "loss", "test_error_mean", "test_error_std", "test_errors", "cond_median", "cond_p90",
                "cond_max"} <= set(r)
        assert np.isfinite(r["test_error_mean"]) and len(r["test_errors"]) == len(config.train.seeds)
        assert 1.0 <= r["cond_median"] <= r["cond_p90"] <= r["cond_max"]
    assert os.path.isdir(os.path.join(tmp_path, "lambda_0")) and os.path.isdir(os.path.join(tmp_path, "lambda_0.0001"))
    # a second call trains and computes nothing
    monkeypatch.setattr(experiment, "prepare", lambda *a: pytest.fail("the second call prepared data"))
    assert diagnostics.lambda_sweep(config, str(tmp_path)) == rows
    out = str(tmp_path / "docs" / "lambda_cond.json")
    experiment.report(rows, out, diagnostics.lambda_table, lambda rs: rs, diagnostics.plot_lambda_sweep)
    assert json.load(open(out)) == rows
    assert os.path.getsize(out[:-5] + ".png") > 0 and "| 0.0001 | L_x,p p=0.2 |" in open(out[:-5] + ".md").read()


def test_subset_noise_equals_variance_of_the_training_estimate():
    """subset_noise's closed-form variance of the k-site rate estimate equals the
    empirical variance of partial_sample's ``rate`` (what L_x,p normalises with)
    over 4,000 uniform draws, per row of J, and likewise for the k-site Gram
    (n / k) J_I J_I^T against J J^T; its signal is the variance of J f."""
    from macro_jax import data
    from macro_jax.systems import sample_sites, sample_sites_weighted

    system = make_predator_prey()
    ae = _f64(Autoencoder(system.n_dof, 2, 2, (8,), "softplus", system.observable_fn, decoder_uses_observables=True,
                          bias_init="torch", key=jr.PRNGKey(0)))
    xs = jr.uniform(jr.PRNGKey(1), (3, system.n_dof), jnp.float64, 0.5, 2.0)
    k = 30  # the finite-population factor 1 - k/n = 0.7 is well outside the tolerance
    r = diagnostics.subset_noise(system, ae, xs, k, np.arange(3))
    geometry = jacobian.make_geometry_fn(ae, "generic")
    keys = jr.split(jr.PRNGKey(2), 4000)
    noise, gram_noise, metric_noise, importance = [], [], [], []
    for x in xs:
        def rate(key, x=x):
            sites = sample_sites(key, system.n_sites, k)
            s = data.partial_sample(geometry, system, x, system.subset_force_fn(x, sites), sites)
            return s["rate"], (system.n_sites / k) * s["gram_i"]
        rates, grams = jax.jit(jax.vmap(rate))(keys)
        noise.append(np.var(np.asarray(rates), 0, ddof=1))
        jac = np.asarray(jax.jacrev(ae.encode)(x))
        gram = jac @ jac.T
        gram_noise.append(np.mean(np.sum((np.asarray(grams) - gram) ** 2, (1, 2))) / np.sum(gram**2))
        # the same draws in L_x's metric G^{-1}, and k i.i.d. draws from the Jacobian proposal
        f = np.asarray(system.force_fn(x))
        dofs = np.asarray(jax.vmap(lambda s: system.site_dofs(s[None]))(jnp.arange(system.n_sites)))
        c = np.einsum("dsk,sk->sd", jac[:, dofs], f[dofs])  # (n, d) per-site contributions
        white = np.linalg.solve(np.linalg.cholesky(gram), jac)
        q = np.sqrt(np.sum(white[:, dofs] ** 2, (0, 2)))
        q = q / q.sum()
        drawn = np.asarray(jax.vmap(lambda key: sample_sites_weighted(key, jnp.asarray(q), k))(keys))
        weighted = (c[drawn] / (k * q[drawn])[..., None]).sum(1)
        in_metric = lambda h: np.einsum("ad,de,ae->a", h - jac @ f, np.linalg.inv(gram), h - jac @ f)
        metric_noise.append(np.mean(in_metric(np.asarray(rates))))
        importance.append(np.mean(in_metric(weighted)))
    np.testing.assert_allclose(r["noise_var"], np.mean(noise, 0), rtol=0.1)  # 4,000 draws: ~2 % sampling error
    np.testing.assert_allclose(r["gram_noise"], np.mean(gram_noise), rtol=0.1)
    np.testing.assert_allclose(r["metric_noise"], metric_noise, rtol=0.1)
    np.testing.assert_allclose(r["importance_ratio_jacobian"] * r["metric_noise"], importance, rtol=0.1)
    # the oracle proposal is the best i.i.d. one (Cauchy-Schwarz): below the Jacobian proposal
    np.testing.assert_array_less(r["importance_ratio_oracle"], r["importance_ratio_jacobian"])
    assert np.all(r["importance_ratio_oracle"] > 0)
    jf = np.stack([np.asarray(jax.jacrev(ae.encode)(x) @ system.force_fn(x)) for x in xs])
    np.testing.assert_allclose(r["signal_var"], jf.var(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(r["ratio"], r["noise_var"] / r["signal_var"])
    # |P f|^2 against an explicit pseudo-inverse, P = I - J^+ J
    for i, x in enumerate(xs):
        jac, f = np.asarray(jax.jacrev(ae.encode)(x)), np.asarray(system.force_fn(x))
        pf = f - np.linalg.pinv(jac) @ (jac @ f)
        np.testing.assert_allclose(r["unexplained_norm2"][i], np.sum(pf**2), rtol=1e-8)
        np.testing.assert_allclose(r["force_norm2"][i], np.sum(f**2), rtol=1e-12)
    assert np.all((r["unexplained_fraction"] > 0) & (r["unexplained_fraction"] < 1))
    assert r["noise_var_by_component"].shape == (system.dofs_per_site, 4)
    # the regression estimate only carries the noise of the part of f that J does not explain
    assert np.all(r["regression_noise_var"] > 0)
    explained = dataclasses.replace(system, force_fn=lambda x: jnp.ones(4, jnp.float64) @ jax.jacrev(ae.encode)(x))
    e = diagnostics.subset_noise(explained, ae, xs, k, np.arange(3), n_draws=50)
    assert np.all(e["noise_var"] > 1e-6 * e["signal_var"])  # the unbiased estimate is still noisy
    np.testing.assert_array_less(e["regression_noise_var"], 1e-12 * e["signal_var"])  # f = J^T a: exact
    np.testing.assert_array_less(e["unexplained_fraction"], 1e-10)  # ... and J explains all of f
    with pytest.raises(ConfigError, match="k=100"):
        diagnostics.subset_noise(system, ae, xs, system.n_sites, np.arange(3))
    with pytest.raises(ConfigError, match="n_configs=1"):
        diagnostics.subset_noise(system, ae, xs, k, np.arange(1))


def test_rollout_drift_of_a_shared_offset_and_of_cancelling_members():
    true = np.linspace(1.0, 2.0, 3 * 5 * 2).reshape(3, 5, 2)  # (n_traj, T, d_obs); last step mean |true|
    scale = np.mean(true[:, -1], axis=0)
    shared = diagnostics.rollout_drift(np.stack([true + 0.01 * scale] * 4), true)
    np.testing.assert_allclose(shared["end_signed"], 0.01)
    np.testing.assert_allclose(shared["end_abs"], 0.01)
    np.testing.assert_allclose(shared["shared"], 1.0)
    assert shared["n_positive"].tolist() == [4, 4]
    # two members off by +-2 % on every trajectory: the same error, none of it shared
    pair = diagnostics.rollout_drift(np.stack([true * 1.02, true * 0.98]), true)
    np.testing.assert_allclose(pair["end_abs"], 0.02)
    np.testing.assert_allclose(pair["end_signed"], [[0.02, 0.02], [-0.02, -0.02]])
    np.testing.assert_allclose(pair["shared"], 0.0, atol=1e-12)
    assert pair["n_positive"].tolist() == [1, 1]
    assert structures.ensemble_run_name("mlp_seeds3-3_xp_p0.0625_budget1000000") == "mlp_xp_p0.0625_budget1000000"
    with pytest.raises(ValueError, match="disagree"):
        diagnostics.rollout_drift(np.stack([true]), true[:2])


def test_drift_report_reads_the_saved_rollouts_of_a_workdir(tmp_path):
    config = predator_prey.get_config("smoke")
    config.train.runs = ("z",)
    config.train.epochs = 2
    workdir = str(tmp_path)
    experiment.train_and_evaluate(config, workdir)
    report = diagnostics.drift_report(config, workdir)
    (key, r), = report["ensembles"].items()
    run_dir = os.path.join(workdir, "runs", key)
    pred = np.load(os.path.join(run_dir, experiment.ROLLOUTS))["pred_obs"]
    true = np.asarray(experiment.prepare(config, workdir).test.obs)
    assert r["n_members"] == len(config.train.seeds) == len(pred) and report["skipped"] == []
    np.testing.assert_allclose(r["end_signed"], diagnostics.rollout_drift(pred, true)["end_signed"])
    assert json.load(open(os.path.join(workdir, "diagnostics", "drift.json"))) == report
