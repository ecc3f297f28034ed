"""Pseudo-inverse rows, the L_x identity, unbiasedness of L_x,p, the AE loss."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from macro_jax import data, jacobian, losses
from macro_jax.models import Autoencoder
from macro_jax.systems import make_predator_prey, sample_sites


@pytest.fixture(scope="module")
def setup():
    system = make_predator_prey()
    ae = Autoencoder(system.n_dof, 2, 2, (32, 32), "softplus", system.observable_fn,
                     decoder_uses_observables=True, bias_init="torch", key=jr.PRNGKey(0))
    traj = system.trajectory_fn(jr.PRNGKey(1), 3, n_steps=300, save_every=30)
    xs = traj.xs.reshape(-1, system.n_dof)
    fs = traj.forces.reshape(-1, system.n_dof)
    return system, ae, xs, fs


def _field(key, d=4):
    """A smooth nonlinear stand-in for g_theta."""
    w = jr.normal(key, (d, d)) * 0.3
    return lambda t, z, args=None: jnp.tanh(w @ z) - 0.1 * z


def test_fast_path_equals_generic_path(setup):
    system, ae, xs, _ = setup
    dofs = jnp.asarray([3, 50, 99, 7], jnp.int32)
    generic = jacobian.make_geometry_fn(ae, "generic")
    fast = jacobian.make_geometry_fn(ae, "linear_first_layer")
    for x in xs[:4]:
        a, b = generic(x, dofs), fast(x, dofs)
        np.testing.assert_allclose(np.asarray(a.z), np.asarray(b.z), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(a.gram), np.asarray(b.gram), rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(np.asarray(a.cols), np.asarray(b.cols), rtol=1e-5, atol=1e-8)


def test_pinv_rows_match_numpy_pinv(setup):
    system, ae, xs, _ = setup
    x = xs[5]
    g = jr.normal(jr.PRNGKey(2), (4,))
    dofs = jnp.asarray([0, 10, 60, 99], jnp.int32)
    geo = jacobian.make_geometry_fn(ae, "linear_first_layer")(x, dofs)
    rows = jacobian.pinv_rows(jacobian.cholesky(geo.gram), geo.cols, g)
    jac = np.asarray(jax.jacrev(ae.encode)(x), np.float64)
    expected = (np.linalg.pinv(jac) @ np.asarray(g, np.float64))[np.asarray(dofs)]
    np.testing.assert_allclose(np.asarray(rows), expected, rtol=2e-5, atol=1e-8)


def test_pinv_rows_float32_block_keeps_storage_accuracy_when_ill_conditioned():
    """cond(J) = 1e3, where float32 normal equations fail: the float64 solve with
    a float32 product stays within 3x of the error that storing J[:, I] in
    float32 already makes (a float64 product of the same stored block)."""
    rng = np.random.default_rng(0)
    d, n = 16, 2000
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(n, d)))
    jac = (u * np.logspace(0, -3, d)) @ v.T
    dofs = rng.choice(n, 300, replace=False)
    g = rng.normal(size=d).astype(np.float32)
    exact = (np.linalg.pinv(jac) @ g.astype(np.float64))[dofs]
    cols = jnp.asarray(jac[:, dofs], jnp.float32)
    ours = np.asarray(jacobian.pinv_rows(jacobian.cholesky(jnp.asarray(jac @ jac.T)), cols, jnp.asarray(g)))
    stored = np.asarray(cols, np.float64).T @ np.linalg.solve(jac @ jac.T, g.astype(np.float64))
    err = lambda a: np.linalg.norm(a - exact) / np.linalg.norm(exact)  # noqa: E731
    assert ours.dtype == np.float32
    assert err(ours) < 3 * err(stored) and err(ours) < 3e-5, (err(ours), err(stored))


def test_lx_identity_projection_plus_metric(setup):
    """|f - J^+ g|^2 = |P f|^2 + (Jf - g)^T (J J^T)^-1 (Jf - g), with J from the encoder."""
    system, ae, xs, fs = setup
    x, f = xs[7], fs[7]
    g = np.asarray(jr.normal(jr.PRNGKey(3), (4,)), np.float64)
    jac = np.asarray(jax.jacrev(ae.encode)(x), np.float64)
    f64 = np.asarray(f, np.float64)
    pinv = np.linalg.pinv(jac)
    lhs = np.sum((f64 - pinv @ g) ** 2)
    proj = f64 - pinv @ (jac @ f64)
    r = jac @ f64 - g
    rhs = np.sum(proj**2) + r @ np.linalg.solve(jac @ jac.T, r)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    # and our float64 L_x (precomputed |Pf|^2 + metric norm) equals the same number
    samples = data.precompute(ae, "linear_first_layer", system, "x", xs[7:8], fs[7:8])
    field = lambda t, z, args=None: jnp.asarray(g, jnp.float32)
    ours = losses.loss_x(field, jax.tree_util.tree_map(lambda a: a[0], samples))
    np.testing.assert_allclose(float(ours), np.sum((f64 - pinv @ np.asarray(g, np.float32)) ** 2), rtol=1e-4)


@pytest.mark.parametrize("full, partial, keys", [
    ("x", "xp", {"z", "chol", "jfi", "ff", "gram_i", "rate", "rate2"}),
    ("z", "zp", {"z", "rate", "rate2", "rate_regression"}),  # L_z,p keeps no Cholesky factor or sampled Gram
    ("z", "zp:regression", {"z", "rate", "rate2", "rate_regression"}),
])
def test_partial_loss_with_every_site_equals_its_full_loss(setup, full, partial, keys):
    """Labelled at every site, L_x,p is L_x and L_z,p (either label) is L_z."""
    system, ae, xs, fs = setup
    field = _field(jr.PRNGKey(4))
    every = jnp.broadcast_to(jnp.arange(system.n_sites, dtype=jnp.int32), (4, system.n_sites))
    loss, _, option = partial.partition(":")
    sf = data.precompute(ae, "linear_first_layer", system, full, xs[:4], fs[:4])
    sp = data.precompute(ae, "linear_first_layer", system, loss, xs[:4], fs[:4], every)
    assert set(sp) == keys
    lf = jax.vmap(lambda s: losses.per_sample_loss(full)(field, s))(sf)
    lp = jax.vmap(lambda s: losses.per_sample_loss(loss, 1.0, regression=option == "regression")(field, s))(sp)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lf), rtol=1e-4)


def test_lxp_from_products_equals_direct_residual(setup):
    """The expanded float64 form of L_x,p equals |f_I - (J^+ g)_I|^2 computed from
    J[:, I] and f_I directly, configuration by configuration."""
    system, ae, xs, fs = setup
    field = _field(jr.PRNGKey(8))
    geometry = jacobian.make_geometry_fn(ae, "linear_first_layer")
    sites = data.draw_sites(system, jr.PRNGKey(9), 6, 7)
    f_sub, _ = data.label_subset(system, xs[:6], sites)
    sp = data.precompute(ae, "linear_first_layer", system, "xp", xs[:6], f_sub, sites)
    for i in range(6):
        geo = geometry(xs[i], system.site_dofs(sites[i]))
        g = field(0.0, geo.z)
        pred = jacobian.pinv_rows(jacobian.cholesky(geo.gram), geo.cols.astype(jnp.float64), g)
        direct = float(np.sum((np.asarray(f_sub[i], np.float64) - np.asarray(pred)) ** 2))
        expanded = float(losses.loss_xp(field, jax.tree_util.tree_map(lambda a: a[i], sp), 1.0))
        assert expanded == pytest.approx(direct, rel=1e-6)
    assert "cols" not in sp and sp["gram_i"].shape == (6, 4, 4)  # J[:, I] itself is not kept


def test_lxp_excess_is_lxp_less_its_floor_with_the_same_gradient(setup):
    """``loss_xp_excess`` = ``loss_xp`` - min over g of ``loss_xp`` (the floor,
    from a direct least-squares fit of f_I by the rows J_I^T y): the difference
    is the same for two unrelated fields, the excess vanishes at the
    minimising rate and the gradients in g agree."""
    system, ae, xs, fs = setup
    geometry = jacobian.make_geometry_fn(ae, "linear_first_layer")
    sites = data.draw_sites(system, jr.PRNGKey(21), 4, 20)
    f_sub, _ = data.label_subset(system, xs[:4], sites)
    sp = data.precompute(ae, "linear_first_layer", system, "xp", xs[:4], f_sub, sites)
    szp = data.precompute(ae, "linear_first_layer", system, "zp", xs[:4], f_sub, sites)
    w = 5.0
    as64 = lambda fn: (lambda *a: fn(*a).astype(jnp.float64))
    for i in range(4):
        s = jax.tree_util.tree_map(lambda a: a[i], sp)
        cols = np.asarray(geometry(xs[i], system.site_dofs(sites[i])).cols, np.float64)  # (d, k dofs)
        fi = np.asarray(f_sub[i], np.float64)
        y_star = np.linalg.lstsq(cols.T, fi, rcond=None)[0]
        floor = w * float(np.sum((fi - cols.T @ y_star) ** 2))
        assert floor > 0.1 * w * float(np.sum(fi**2))  # the floor is not negligible: the check has power
        for key in (jr.PRNGKey(22), jr.PRNGKey(23)):
            field = _field(key)
            full, excess = losses.loss_xp(field, s, w), losses.loss_xp_excess(field, s, w)
            assert float(excess) >= 0.0
            assert float(full) - float(excess) == pytest.approx(floor, rel=1e-5)
        best = lambda t, z: szp["rate_regression"][i]
        assert float(losses.loss_xp_excess(best, s, w)) < 1e-6 * floor
        g0 = _field(jr.PRNGKey(24))(0.0, s["z"])
        grads = [jax.grad(lambda g: as64(fn)(lambda t, z: g, s, w))(g0) for fn in (losses.loss_xp, losses.loss_xp_excess)]
        np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-4)


def test_weighted_lxp_is_unbiased_for_lx(setup):
    """The mean of (N/k)|f_I - (J^+ g)_I|^2 over many random subsets equals L_x."""
    system, ae, xs, fs = setup
    field = _field(jr.PRNGKey(5))
    x, f = xs[3], fs[3]
    sx = data.precompute(ae, "linear_first_layer", system, "x", x[None], f[None])
    lx = float(losses.loss_x(field, jax.tree_util.tree_map(lambda a: a[0], sx)))
    k, n_draws = 20, 4000
    sites = jax.vmap(lambda kk: sample_sites(kk, system.n_sites, k))(jr.split(jr.PRNGKey(6), n_draws))
    f_sub = jax.vmap(lambda s: system.subset_force_fn(x, s))(sites)
    sp = data.precompute(ae, "linear_first_layer", system, "xp", jnp.broadcast_to(x, (n_draws, x.size)), f_sub, sites)
    vals = np.asarray(jax.vmap(lambda s: losses.loss_xp(field, s, system.n_sites / k))(sp), np.float64)
    stderr = vals.std(ddof=1) / np.sqrt(n_draws)
    assert abs(vals.mean() - lx) < 4 * stderr, (vals.mean(), lx, stderr)
    assert stderr < 0.05 * lx  # the check has power: the estimator is not trivially loose


def test_partial_rate_moments_unbiased(setup):
    """From k sites: E[T] = J f and E[T^2 - correction] = (J f)^2 (within 4 standard errors)."""
    system, ae, xs, fs = setup
    x, f = xs[4], fs[4]
    jf = np.asarray(jacobian.jacobian_times(ae, x, f), np.float64)
    n_draws = 20000
    xs_rep = jnp.broadcast_to(x, (n_draws, x.size))
    sites = data.draw_sites(system, jr.PRNGKey(7), n_draws, 20)
    f_sub, account = data.label_subset(system, xs_rep, sites)
    assert account.n_forces == n_draws * 20
    part = data.precompute(ae, "linear_first_layer", system, "xp", xs_rep, f_sub, sites)
    total, second = np.asarray(part["rate"]), np.asarray(part["rate2"])
    for est, truth in ((total, jf), (second, jf**2)):
        stderr = est.std(0, ddof=1) / np.sqrt(n_draws)
        assert np.all(np.abs(est.mean(0) - truth) < 4 * stderr + 1e-12), (est.mean(0), truth, stderr)
    # the naive second moment T^2 is biased upwards by the subset noise; the correction matters
    assert np.all((total**2).mean(0) - jf**2 > 4 * (total**2).std(0) / np.sqrt(n_draws))
    # the run's statistics are these estimates' moments
    mean, std = data.rate_statistics("xp", part)
    np.testing.assert_allclose(mean, total.mean(0), rtol=1e-5)
    var = second.mean(0) - total.mean(0) ** 2  # one configuration: ~0, clamped as rate_statistics does
    np.testing.assert_allclose(std, np.sqrt(np.maximum(var, 1e-6 * (total**2).mean(0))), rtol=1e-4)


def test_condition_number_and_loss():
    gram = jnp.diag(jnp.asarray([4.0, 1.0, 2.0], jnp.float64))
    assert float(jacobian.condition_number(gram)) == pytest.approx(4.0)
    assert float(jacobian.condition_number(gram, jnp.asarray([1, 2]))) == pytest.approx(2.0)
    assert float(losses.condition_loss(gram, None)) == pytest.approx(9.0)


def test_rank_deficient_jacobian_is_reported(setup):
    system, ae, xs, fs = setup
    bad = {"chol": jnp.full((2, 4, 4), jnp.nan)}
    with pytest.raises(FloatingPointError, match="lambda_cond"):
        data.check_geometry(bad)


@pytest.mark.parametrize("chunk", [3000, 10000, 50000])  # chunks + remainder, exact chunks, remainder only
def test_chunked_float64_product_equals_numpy(chunk):
    a = jr.normal(jr.PRNGKey(0), (3, 10000))
    b = jr.normal(jr.PRNGKey(1), (5, 10000))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    np.testing.assert_allclose(jacobian.dot_t_f64(a, b, chunk=chunk), exact, rtol=1e-12, atol=1e-11)


def test_normalised_lz_weights_each_component_by_its_rate_std():
    """"z:normalised" is the squared error in normalised target space: with the
    field g = net(z_n) * sigma + mu it equals |net(z_n) - (J f - mu) / sigma|^2,
    and with sigma = 1 it is the plain L_z."""
    from macro_jax.config import ConfigError, parse_run, z_weighting
    from macro_jax.models.latent import NormalisedField

    d = 3
    net = _field(jr.PRNGKey(3), d)
    z = jnp.asarray([0.3, -1.2, 2.0])
    jf = jnp.asarray([40.0, -2.0, 0.05])
    mu, sigma = jnp.asarray([10.0, 0.0, 0.1]), jnp.asarray([100.0, 1.0, 0.01])
    zero, one = jnp.zeros(d), jnp.ones(d)
    field = NormalisedField(net, zero, one, mu, sigma)
    s = {"z": z, "jf": jf}
    by_hand = jnp.sum((net(0.0, z) - (jf - mu) / sigma) ** 2)
    assert float(losses.per_sample_loss("z", normalised=True)(field, s)) == pytest.approx(float(by_hand), rel=1e-5)
    # the physical loss weighs the large-scale component 1e4 x more than this one
    assert float(losses.loss_z(field, s)) == pytest.approx(float(jnp.sum((sigma * net(0.0, z) + mu - jf) ** 2)),
                                                          rel=1e-5)
    plain = NormalisedField(net, zero, one, mu, one)
    assert float(losses.loss_z_normalised(plain, s)) == pytest.approx(float(losses.loss_z(plain, s)), rel=1e-6)

    assert parse_run("z:normalised") == ("z", 1.0)
    assert z_weighting("z:normalised") == "normalised" and z_weighting("z") == "physical"
    assert z_weighting("xp:0.5") == "physical"
    with pytest.raises(ConfigError, match="L_z weighting 'whitened'"):
        parse_run("z:whitened")
    with pytest.raises(ConfigError, match="'x' takes no options"):
        parse_run("x:normalised")


def test_lzp_differences_are_unbiased_for_lz(setup):
    """E_I L_z,p = L_z + tr Cov(h) with a theta-independent second term, so the
    difference between two latent fields is unbiased for L_z's difference
    (hence the gradient is unbiased too), while L_z,p itself is biased upwards."""
    system, ae, xs, fs = setup
    g1, g2 = _field(jr.PRNGKey(12)), _field(jr.PRNGKey(13))
    x, f = xs[5], fs[5]
    sz = jax.tree_util.tree_map(lambda a: a[0], data.precompute(ae, "linear_first_layer", system, "z", x[None], f[None]))
    k, n_draws = 20, 4000
    sites = data.draw_sites(system, jr.PRNGKey(14), n_draws, k)
    f_sub, _ = data.label_subset(system, jnp.broadcast_to(x, (n_draws, x.size)), sites)
    sp = data.precompute(ae, "linear_first_layer", system, "zp", jnp.broadcast_to(x, (n_draws, x.size)), f_sub, sites)
    vals = {i: np.asarray(jax.vmap(lambda s: losses.loss_zp(g, s))(sp), np.float64) for i, g in ((1, g1), (2, g2))}
    diff = vals[1] - vals[2]
    truth = float(losses.loss_z(g1, sz) - losses.loss_z(g2, sz))
    stderr = diff.std(ddof=1) / np.sqrt(n_draws)
    assert abs(diff.mean() - truth) < 4 * stderr, (diff.mean(), truth, stderr)
    assert stderr < 0.05 * abs(truth)  # the check has power
    offset = vals[1].mean() - float(losses.loss_z(g1, sz))  # tr Cov(h) > 0: the subset noise
    assert offset > 4 * vals[1].std(ddof=1) / np.sqrt(n_draws)


def test_regression_label_minimises_lxp_and_is_exact_with_every_site(setup):
    """``rate_regression = G (J_I J_I^T)^{-1} J_I f_I`` is the latent rate that
    minimises a configuration's L_x,p (its gradient in g vanishes there), and
    with every site it is J f itself."""
    system, ae, xs, fs = setup
    sites = data.draw_sites(system, jr.PRNGKey(15), 5, 20)
    f_sub, _ = data.label_subset(system, xs[:5], sites)
    sp = data.precompute(ae, "linear_first_layer", system, "xp", xs[:5], f_sub, sites)
    szp = data.precompute(ae, "linear_first_layer", system, "zp", xs[:5], f_sub, sites)
    assert set(szp) == {"z", "rate", "rate2", "rate_regression"} and "rate_regression" not in sp
    for i in range(5):
        s = jax.tree_util.tree_map(lambda a: a[i], sp)
        r = szp["rate_regression"][i]
        grad = jax.grad(lambda g: losses.loss_xp(lambda t, z: g, s, 1.0).astype(jnp.float64))(r)
        scale = jax.grad(lambda g: losses.loss_xp(lambda t, z: g, s, 1.0).astype(jnp.float64))(jnp.zeros_like(r))
        assert float(jnp.linalg.norm(grad)) < 1e-6 * float(jnp.linalg.norm(scale))
    every = jnp.broadcast_to(jnp.arange(system.n_sites, dtype=jnp.int32), (4, system.n_sites))
    full = data.precompute(ae, "linear_first_layer", system, "zp", xs[:4], fs[:4], every)
    jf = jax.vmap(lambda x, f: jacobian.jacobian_times(ae, x, f))(xs[:4], fs[:4])
    np.testing.assert_allclose(np.asarray(full["rate_regression"]), np.asarray(jf), rtol=1e-4, atol=1e-6)


def test_regression_label_with_too_few_sampled_dofs_is_an_error(setup):
    from macro_jax.config import ConfigError
    from macro_jax.experiment import check_regression_labels

    system, ae, xs, fs = setup  # d = 4 latent rows, 1 dof per site: 2 sites cannot determine them
    sites = data.draw_sites(system, jr.PRNGKey(16), 3, 2)
    f_sub, _ = data.label_subset(system, xs[:3], sites)
    szp = data.precompute(ae, "linear_first_layer", system, "zp", xs[:3], f_sub, sites)
    with pytest.raises(ConfigError, match=r"'zp:2/100:regression'.*singular for 3 configurations"):
        check_regression_labels(szp, "zp:2/100:regression", 2)
