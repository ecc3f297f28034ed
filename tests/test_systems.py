"""Microscopic systems: partial forces, the subset sampler, integrators."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from macro_jax.systems import make_predator_prey, sample_sites
from macro_jax.systems.integrators import simulate


@pytest.fixture(scope="module")
def pp():
    return make_predator_prey()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_subset_forces_equal_full_forces_exactly(pp, dtype):
    x = jr.uniform(jr.PRNGKey(0), (pp.n_dof,), dtype, 0.1, 0.9)
    full = pp.force_fn(x)
    # every boundary and interior case, in both fields, in scrambled order
    sites = jnp.asarray([0, 49, 50, 99, 1, 51, 98, 25, 75, 48], jnp.int32)
    sub = pp.subset_force_fn(x, sites)
    assert sub.dtype == dtype
    np.testing.assert_array_equal(np.asarray(sub), np.asarray(full)[np.asarray(pp.site_dofs(sites))])
    every = jnp.arange(pp.n_sites, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(pp.subset_force_fn(x, every)), np.asarray(full))


def test_subset_force_reads_only_its_stencil(pp):
    """The force at a site depends on its stencil only: the sparsity the method relies on."""
    x = jr.uniform(jr.PRNGKey(1), (pp.n_dof,), jnp.float64, 0.1, 0.9)
    site = jnp.asarray([60], jnp.int32)  # v at cell 10: reads u_10, v_9, v_10, v_11
    grad = jax.jacrev(lambda y: pp.subset_force_fn(y, site)[0])(x)
    assert set(np.flatnonzero(np.asarray(grad))) == {10, 59, 60, 61}


def test_predator_prey_rates_analytic(pp):
    n = 50
    u, v = jnp.full(n, 0.5), jnp.full(n, 0.25)
    f = pp.force_fn(jnp.concatenate([u, v]))
    # uniform fields: no diffusion; du = u(1-u-v), dv = a v (u - b)
    np.testing.assert_allclose(f[:n], 0.5 * 0.25)
    np.testing.assert_allclose(f[n:], 3.0 * 0.25 * (0.5 - 0.4))


@pytest.mark.parametrize("n_sites,k", [(100, 20), (100, 100), (51_200, 50), (800, 50), (7, 1),
                                       (51_200, 3_200), (40_000, 2_500), (1_000, 200)])  # the last three: distinct draws
def test_sample_sites_distinct_and_in_range(n_sites, k):
    sites = np.asarray(sample_sites(jr.PRNGKey(3), n_sites, k))
    assert sites.shape == (k,)
    assert len(set(sites.tolist())) == k
    assert sites.min() >= 0 and sites.max() < n_sites


# Floyd (29 dof: P(chi2 > 70) < 1e-4); distinct draws, k^2 > n log n (399 dof: P(chi2 > 520) < 1e-4)
@pytest.mark.parametrize("n_sites,k,max_chi2", [(30, 5, 70.0), (400, 61, 520.0)])
def test_sample_sites_is_uniform(n_sites, k, max_chi2):
    """Every site is chosen with probability k / n (chi-square over many draws)."""
    n_draws = 6000
    draws = jax.vmap(lambda key: sample_sites(key, n_sites, k))(jr.split(jr.PRNGKey(4), n_draws))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=n_sites)
    expected = n_draws * k / n_sites
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < max_chi2
    assert all(len(set(d)) == k for d in np.asarray(draws).tolist())


def test_distinct_draws_are_uniform_over_pairs():
    """Pairs of sites come up equally often too (a uniform k-subset, not just uniform marginals)."""
    from macro_jax.systems.base import _distinct_draws

    n_sites, k, n_draws = 8, 3, 20000
    draws = np.sort(np.asarray(jax.vmap(lambda key: _distinct_draws(key, n_sites, k, 4))(
        jr.split(jr.PRNGKey(5), n_draws))), axis=1)  # m = 4 draws: frequent redraws
    pairs = np.zeros((n_sites, n_sites))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        np.add.at(pairs, (draws[:, a], draws[:, b]), 1)
    counts = pairs[np.triu_indices(n_sites, 1)]
    expected = n_draws * 3 / 28  # each draw holds 3 of the 28 pairs
    assert np.sum((counts - expected) ** 2 / expected) < 65.0  # 27 dof: P(chi2 > 65) < 1e-4


def test_sample_sites_rejects_bad_k():
    with pytest.raises(ValueError, match="subset size"):
        sample_sites(jr.PRNGKey(0), 10, 11)


def test_rk4_integrates_exponential_decay():
    traj = simulate(lambda x: -x, jnp.ones((1, 3)), dt=0.01, n_steps=100, save_every=10,
                    integrator="rk4", dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(traj.xs[0, :, 0]), np.exp(-np.asarray(traj.times)), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(traj.forces), -np.asarray(traj.xs))


def test_trajectories_store_exact_force_of_stored_state(pp):
    traj = pp.trajectory_fn(jr.PRNGKey(0), 2, n_steps=100, save_every=10)
    assert traj.xs.shape == (2, 10, 100) and traj.xs.dtype == jnp.float32
    expected = jax.vmap(jax.vmap(pp.force_fn))(traj.xs.astype(jnp.float64)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(traj.forces), np.asarray(expected))
    bare = pp.trajectory_fn(jr.PRNGKey(0), 2, n_steps=100, save_every=10, labels=False)  # frames only
    assert bare.forces is None
    np.testing.assert_array_equal(np.asarray(bare.xs), np.asarray(traj.xs))
    # the observables stay in the physical range
    means = jax.vmap(jax.vmap(pp.observable_fn))(traj.xs)
    assert np.all((np.asarray(means) > 0) & (np.asarray(means) < 1))
