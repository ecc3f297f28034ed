"""Importance-sampled L_x,p sites ("xp:<p>:importance"): the weighted sampler,
the Allen-Cahn interface proposal, and exact unbiasedness of the weighted
loss and rate estimates (expectations enumerated over every possible draw)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from macro_jax import data, jacobian, losses
from macro_jax.config import ConfigError, parse_run, site_sampling
from macro_jax.models import Autoencoder
from macro_jax.systems import make_allen_cahn, make_predator_prey, sample_sites_weighted

METHOD = "linear_first_layer"


@pytest.fixture(scope="module")
def setup():
    system = make_allen_cahn(n_grid=8, interface_cells=2.0, batch_size=1)
    ae = Autoencoder(system.n_dof, 1, 3, (16,), "softplus", system.observable_fn,
                     decoder_uses_observables=False, bias_init="torch", key=jr.PRNGKey(0))
    x = system.trajectory_fn(jr.PRNGKey(1), 1, n_steps=20, save_every=20).xs[0, -1].astype(jnp.float64)
    w = jr.normal(jr.PRNGKey(2), (4, 4)) * 0.3
    field = lambda t, z, args=None: jnp.tanh(w @ z) - 0.1 * z
    return system, ae, x, system.force_fn(x), field


def _partial(setup, sites, proposal):
    system, ae, x, _, _ = setup
    xs = jnp.broadcast_to(x, (sites.shape[0], x.size))
    f_sub = jax.vmap(system.subset_force_fn)(xs, sites)
    return data.precompute(ae, METHOD, system, "xp", xs, f_sub, sites, proposal=proposal)


def test_weighted_sampler_draws_in_proportion():
    q = jnp.array([0.1, 0.0, 0.5, 0.15, 0.25])
    m = 200_000
    counts = np.bincount(np.asarray(sample_sites_weighted(jr.PRNGKey(0), q, m)), minlength=5)
    expected = m * np.asarray(q)
    assert counts[1] == 0  # probability zero: never drawn
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - np.asarray(q))) + 1e-9), counts


def test_interface_proposal_favours_the_interface(setup):
    system, _, x, _, _ = setup
    n = system.n_sites
    q = np.asarray(system.site_proposal_fn(x))
    assert q.shape == (n,) and q.sum() == pytest.approx(1.0, abs=1e-12)
    assert q.min() >= 0.5 / n * (1 - 1e-12)  # the uniform half bounds every weight 1 / (n q) by 2
    u = np.asarray(x)
    assert q[np.argmin(np.abs(u))] > 2 * q[np.argmax(np.abs(u))]  # interface over bulk
    np.testing.assert_allclose(system.site_proposal_fn(jnp.ones(n)), np.full(n, 1.0 / n))  # no interface


def test_importance_estimates_are_exactly_unbiased(setup):
    """E over draws from q of the weighted L_x,p equals L_x, and the rate estimates
    are unbiased for J f and (J f)^2: k = 1 enumerates every site, k = 2 every pair."""
    system, ae, x, f, field = setup
    n, proposal = system.n_sites, system.site_proposal_fn
    q = np.asarray(proposal(x), np.float64)
    sx = data.precompute(ae, METHOD, system, "x", x[None], f[None])
    lx = float(losses.loss_x(field, jax.tree_util.tree_map(lambda a: a[0], sx)))
    jf = np.asarray(jacobian.jacobian_times(ae, x, f), np.float64)

    def expectation(sites, prob, k, proposal):
        s = _partial(setup, sites, proposal)
        lxp = np.asarray(jax.vmap(lambda one: losses.loss_xp(field, one, n / k))(s), np.float64)
        return prob @ lxp, prob @ np.asarray(s["rate"]), prob @ np.asarray(s["rate2"])

    singles = jnp.arange(n, dtype=jnp.int32)[:, None]
    e_loss, e_rate, _ = expectation(singles, q, 1, proposal)
    assert e_loss == pytest.approx(lx, rel=1e-5)
    np.testing.assert_allclose(e_rate, jf, rtol=1e-6, atol=1e-6 * np.abs(jf).max())  # J[:, I] is float32
    # the weights matter: the same draws without them overweight the interface
    assert abs(expectation(singles, q, 1, None)[0] - lx) > 0.05 * lx

    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pairs = jnp.asarray(np.stack([i.ravel(), j.ravel()], 1), jnp.int32)
    e_loss2, e_rate_2, e_rate2 = expectation(pairs, np.outer(q, q).ravel(), 2, proposal)
    assert e_loss2 == pytest.approx(lx, rel=1e-5)
    np.testing.assert_allclose(e_rate_2, jf, rtol=1e-6, atol=1e-6 * np.abs(jf).max())  # J[:, I] is float32
    np.testing.assert_allclose(e_rate2, jf**2, rtol=1e-6, atol=1e-6 * (jf**2).max())


@pytest.mark.parametrize("loss", ["xp", "zp"])
def test_online_importance_batch_equals_offline_precompute(setup, loss):
    """The online step's draw and inputs equal drawing with the same keys and precomputing."""
    system, ae, x, _, _ = setup
    xs = jnp.stack([x, -x, 0.5 * x])
    key, k = jr.PRNGKey(3), 5
    online = data.make_online_batch_fn(system, ae, METHOD, k, system.site_proposal_fn, loss)(xs, key)
    sites = jnp.stack([sample_sites_weighted(kk, system.site_proposal_fn(xi), k)
                       for kk, xi in zip(jr.split(key, 3), xs)])
    offline = data.precompute(ae, METHOD, system, loss, xs, jax.vmap(system.subset_force_fn)(xs, sites), sites,
                              proposal=system.site_proposal_fn)
    assert set(online) == set(offline)
    for name in offline:
        np.testing.assert_allclose(online[name], offline[name], rtol=1e-6, err_msg=name)


def test_run_specs_name_the_sampling():
    assert parse_run("xp:1/16:importance") == ("xp", 0.0625)
    assert site_sampling("xp:1/16:importance") == "importance" and site_sampling("xp:0.2") == "uniform"
    with pytest.raises(ConfigError, match="site sampling 'stratified'"):
        parse_run("xp:0.2:stratified")
    with pytest.raises(ConfigError, match="L_z weighting ':importance'"):
        parse_run("z::importance")
    with pytest.raises(ConfigError, match="'x' takes no options"):
        parse_run("x:0.5:importance")


def test_importance_needs_a_system_with_a_proposal(tmp_path):
    """Refused before any data are made, naming the run entry."""
    import os

    from configs import predator_prey
    from macro_jax import experiment

    with pytest.raises(ConfigError, match="has no site proposal"):
        experiment.run_size(make_predator_prey(), "xp:0.5:importance", 100, 1000)
    config = predator_prey.get_config("smoke")
    config.train.runs = ("z", "xp:0.5:importance")
    with pytest.raises(ConfigError, match="'xp:0.5:importance': the system predator_prey has no site proposal"):
        experiment.prepare(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "data")
