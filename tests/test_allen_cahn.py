"""Allen-Cahn system: stencil-local subset forces, the free energy, and the dynamics."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import pytest

from macro_jax.systems import allen_cahn, make_allen_cahn
from macro_jax.systems.allen_cahn import interface_width
from macro_jax.systems.integrators import simulate


@pytest.fixture(scope="module")
def ac():
    return make_allen_cahn(n_grid=12, interface_cells=3.0, batch_size=2)


def _random_field(ac, seed=0):
    return jr.uniform(jr.PRNGKey(seed), (ac.n_dof,), jnp.float64, -1.2, 1.2)


def test_subset_forces_equal_full_forces(ac):
    x = _random_field(ac)
    sites = jnp.array([0, 11, 12, 13, 77, 132, 143, 5], jnp.int32)  # corners, edges, interior
    np.testing.assert_allclose(ac.subset_force_fn(x, sites), ac.force_fn(x)[sites], rtol=1e-12, atol=1e-9)


def test_subset_force_reads_only_its_stencil(ac):
    x = _random_field(ac)
    n = 12
    site = 5 * n + 7
    grad = jax.jacrev(lambda y: ac.subset_force_fn(y, jnp.array([site]))[0])(x)
    stencil = {site, site - 1, site + 1, site - n, site + n}
    assert set(np.flatnonzero(np.asarray(grad)).tolist()) == stencil


def test_free_energy_of_uniform_phase_is_zero_and_gradient_matches_finite_differences(ac):
    np.testing.assert_allclose(ac.observable_fn(jnp.ones(ac.n_dof, jnp.float64)), [0.0], atol=1e-14)
    x = _random_field(ac, 1)
    grad = jax.grad(lambda y: ac.observable_fn(y)[0])(x)
    step = 1e-6
    for i in (0, 13, 70, 143):
        e = jnp.zeros_like(x).at[i].set(step)
        fd = (ac.observable_fn(x + e)[0] - ac.observable_fn(x - e)[0]) / (2 * step)
        np.testing.assert_allclose(grad[i], fd, rtol=1e-6)


@pytest.mark.parametrize("n", [4, 5, 9])
def test_written_out_free_energy_gradient_equals_autodiff(n):
    """The hand-written gradient (custom JVP) equals autodiff of the energy's
    formula in float64, in reverse and forward mode, ends and corners included."""
    eps, h = 0.05, 1.0 / n
    u = jr.normal(jr.PRNGKey(n), (n, n), jnp.float64)

    def plain(u):
        p = jnp.pad(u, 1, mode="edge")
        gx = (p[2:, 1:-1] - p[:-2, 1:-1]) / (2.0 * h)
        gy = (p[1:-1, 2:] - p[1:-1, :-2]) / (2.0 * h)
        return h**2 * jnp.sum((u**2 - 1.0) ** 2 / (4.0 * eps**2) + 0.5 * (gx**2 + gy**2))

    expected = jax.grad(plain)(u)
    np.testing.assert_allclose(jax.grad(allen_cahn.free_energy)(u, eps, h), expected, rtol=1e-12, atol=1e-12)
    du = jr.normal(jr.PRNGKey(n + 1), (n, n), jnp.float64)
    value, tangent = jax.jvp(lambda v: allen_cahn.free_energy(v, eps, h), (u,), (du,))
    np.testing.assert_allclose(value, plain(u), rtol=1e-14)
    np.testing.assert_allclose(tangent, jnp.sum(expected * du), rtol=1e-12)


def test_flat_interface_has_the_analytic_bulk_energy():
    # A straight tanh interface of length 1: the integral across it of
    # (u^2 - 1)^2 / (4 eps^2) + u'^2 / 2 is 2 sqrt(2) / (3 eps) (the surface tension
    # in these units); central differences on 20 cells per interface cost ~0.3%.
    n = 400
    ac = make_allen_cahn(n_grid=n, interface_cells=20.0)
    eps = interface_width(n, 20.0)
    s = (jnp.arange(n) + 0.5) / n - 0.5
    u = jnp.tanh(s / (math.sqrt(2) * eps))[:, None] * jnp.ones((1, n))
    # Integral over s of (u^2-1)^2/(4 eps^2) + u'^2/2 = 2 sqrt(2) / (3 eps) per unit length.
    np.testing.assert_allclose(ac.observable_fn(u.ravel())[0], 2 * math.sqrt(2) / (3 * eps), rtol=5e-3)


def test_free_energy_decreases_along_the_dynamics():
    # Allen-Cahn is a gradient flow of the free energy: an annulus shrinks and E falls.
    ac = make_allen_cahn(n_grid=32, interface_cells=4.0, batch_size=2)
    traj = ac.trajectory_fn(jr.PRNGKey(3), 2, dt=0.1 / 32**2, n_steps=2000, save_every=200, dtype=jnp.float64)
    energy = jax.vmap(jax.vmap(ac.observable_fn))(traj.xs)[..., 0]
    assert energy.shape == (2, 10)
    assert bool(jnp.all(jnp.diff(energy, axis=1) <= 1e-12 * energy[:, :1]))
    assert bool(jnp.all(energy[:, 2] < 0.6 * energy[:, 0]))  # falls while the ring lives
    assert bool(jnp.all(energy[:, -1] < 1e-10 * energy[:, 0]))  # then the ring vanishes: u = -1


def test_initial_condition_is_an_annulus():
    ac = make_allen_cahn(n_grid=64, batch_size=3)
    traj = ac.trajectory_fn(jr.PRNGKey(0), 3, dt=1e-7, n_steps=1, save_every=1, dtype=jnp.float64)
    u0 = traj.xs[:, 0].reshape(3, 64, 64)
    centre = u0[:, 31:33, 31:33]  # r < r2: -1
    ring = u0[:, 32, 32 + 14]  # r = 14.5 / 64 = 0.227, mid-way between r2 <= 0.15 and r1 >= 0.3: +1
    corner = u0[:, 0, 0]  # r > r1: -1
    assert bool(jnp.all(centre < -0.9)) and bool(jnp.all(ring > 0.8)) and bool(jnp.all(corner < -0.99))


def test_batched_integration_equals_all_at_once(ac):
    x0 = jnp.stack([_random_field(ac, s) for s in range(3)])
    kw = dict(dt=1e-3, n_steps=20, save_every=5, integrator="rk4", dtype=jnp.float64)
    a = simulate(ac.force_fn, x0, **kw)
    b = simulate(ac.force_fn, x0, batch_size=2, **kw)
    np.testing.assert_allclose(a.xs, b.xs, rtol=1e-12)


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="r2_range"):
        make_allen_cahn(r1_range=(0.1, 0.2), r2_range=(0.15, 0.25))
    with pytest.raises(ValueError, match="n_grid"):
        make_allen_cahn(n_grid=3)


# ---------------------------------------------------------------- the experiment pipeline on a 16 x 16 grid


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from configs import allen_cahn
    from macro_jax import experiment

    workdir = str(tmp_path_factory.mktemp("ac_smoke"))
    config = allen_cahn.get_config("smoke")
    results = experiment.train_and_evaluate(config, workdir)
    return workdir, config, results, experiment.prepare(config, workdir)


def test_smoke_run_streams_a_filtered_block_pool(smoke):
    import os

    from macro_jax.pool import BlockPool

    workdir, config, results, prep = smoke
    assert [r["loss"] for r in results] == ["L_z", "L_x,p"]
    for r in results:
        assert r["n_force_computations"] == config.train.budget == r["n_configs"] * r["sites_per_config"]
        assert np.isfinite(r["test_error_mean"])
    assert results[1]["sites_per_config"] == 16 and results[1]["n_configs"] == 16 * results[0]["n_configs"]
    assert sorted(os.listdir(os.path.join(workdir, "data", "pool"))) == [
        "block_00000.npy", "block_00000.npy.json", "block_00001.npy", "block_00001.npy.json",
        "block_00002.npy", "block_00002.npy.json", "manifest.npz", "manifest.npz.json"]
    assert sorted(os.listdir(os.path.join(workdir, "data", "test"))) == ["block_00000.npz", "block_00000.npz.json"]
    assert isinstance(prep.pool, BlockPool)
    energy = jax.vmap(prep.system.observable_fn)(jnp.asarray(prep.pool.take(np.arange(len(prep.pool)))))
    assert bool(jnp.all(energy > config.data.pool_keep_above))  # the filter
    assert len(prep.pool) < config.data.n_pool_trajectories * 20  # ... dropped some frames
    assert prep.test.x0.shape == (3, 256) and prep.test.obs.shape == (3, 20, 1)
    np.testing.assert_allclose(prep.test.obs[:, 0], jax.vmap(prep.system.observable_fn)(prep.test.x0), rtol=1e-6)


def test_budget_sweep_reuses_the_protocol_runs(smoke):
    """experiments/sweep.py in the protocol's workdir retrains only the new budgets."""
    from macro_jax import sweep

    workdir, config, results, _ = smoke
    swept = sweep.run_sweep(config, workdir)
    assert sorted((r["run"], r["budget"]) for r in swept) == sorted(
        (spec, b) for spec in config.train.runs for b in config.sweep.budgets)
    for r in results:  # the protocol's budget: read back, same numbers
        (same,) = [s for s in swept if s["run"] == r["run"] and s["budget"] == r["budget"]]
        assert same["test_errors"] == r["test_errors"]
    for r in swept:
        assert r["n_force_computations"] == r["budget"] and np.all(np.isfinite(r["test_errors"]))


def test_interrupted_pool_generation_resumes_at_the_missing_block(smoke, tmp_path):
    import os
    import shutil

    from macro_jax import experiment

    workdir, config, _, prep = smoke
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    for name in ("block_00001.npy", "block_00001.npy.json", "manifest.npz", "manifest.npz.json"):
        os.remove(os.path.join(copy, "data", "pool", name))
    kept = os.path.getmtime(os.path.join(copy, "data", "pool", "block_00000.npy"))
    pool, _ = experiment._trajectories(config, prep.system, copy)
    assert os.path.getmtime(os.path.join(copy, "data", "pool", "block_00000.npy")) == kept  # not redone
    np.testing.assert_array_equal(pool.take(np.arange(len(pool))), prep.pool.take(np.arange(len(prep.pool))))


@pytest.mark.parametrize("loss", ["z", "xp"])
def test_streamed_labelling_equals_the_in_memory_precompute(smoke, loss):
    from macro_jax import data

    _, config, _, prep = smoke
    system, method = prep.system, config.autoencoder.jacobian
    idx = np.array([5, 0, 17, 3, 40])
    xs = jnp.asarray(prep.pool.take(idx))
    if loss == "xp":
        sites = data.draw_sites(system, jr.PRNGKey(1), idx.size, 16)
        labels = jax.vmap(system.subset_force_fn)(xs, sites)
    else:
        sites, labels = None, jax.vmap(system.force_fn)(xs)
    streamed, account = data.label_and_precompute(system, prep.ae, method, loss, prep.pool, idx, sites, chunk=2)
    whole = data.precompute(prep.ae, method, system, loss, xs, labels, sites)
    assert account.n_forces == idx.size * (16 if loss == "xp" else 256) and account.seconds > 0
    assert set(streamed) == set(whole)
    for key in whole:  # equal up to float32 round-off relative to each array's scale
        scale = float(jnp.max(jnp.abs(whole[key])))
        np.testing.assert_allclose(streamed[key], whole[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)


def test_autoencoder_from_blocks_equals_from_memory(smoke):
    from macro_jax import train
    from macro_jax.experiment import _make_autoencoder

    _, config, _, prep = smoke
    skeleton = _make_autoencoder(config, prep.system, jr.PRNGKey(4))
    everything = jnp.asarray(prep.pool.take(np.arange(len(prep.pool))))
    cfg = config.autoencoder
    a, ha = train.train_autoencoder(skeleton, prep.pool, cfg, jr.PRNGKey(5))
    b, hb = train.train_autoencoder(skeleton, everything, cfg, jr.PRNGKey(5))
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    np.testing.assert_allclose(a.encoder.layers[0].weight, b.encoder.layers[0].weight, rtol=1e-4, atol=1e-7)


def test_interrupted_autoencoder_resumes_to_the_same_weights(smoke, tmp_path):
    """autoencoder.checkpoint_every saves the AE's training state; a second call
    continues from the last save and ends where an uninterrupted run ends."""
    from macro_jax import checkpoint, train
    from macro_jax.experiment import _make_autoencoder

    _, config, _, prep = smoke
    skeleton = _make_autoencoder(config, prep.system, jr.PRNGKey(4))
    cfg = ml_collections.ConfigDict(config.autoencoder.to_dict())
    cfg.epochs, cfg.checkpoint_every = 3, 2
    path = str(tmp_path / "resume.eqx")
    kw = dict(resume_path=path, resume_expect={"spec": "ae"})
    straight, h1 = train.train_autoencoder(skeleton, prep.pool, cfg, jr.PRNGKey(5), **kw)
    assert json.load(open(path + ".json"))["spec"] == "ae"  # the save after epoch 2 of 3 is left
    resumed, h2 = train.train_autoencoder(skeleton, prep.pool, cfg, jr.PRNGKey(5), **kw)  # replays epoch 3
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(straight, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(resumed, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in ("loss", "rec", "cond"):
        np.testing.assert_array_equal(h1[k], h2[k])
    assert len(h2["epoch_seconds"]) == 3 and np.all(h2["epoch_seconds"] > 0)
    with pytest.raises(checkpoint.DataFileError, match="metadata field 'spec'"):
        train.train_autoencoder(skeleton, prep.pool, cfg, jr.PRNGKey(5), **dict(kw, resume_expect={"spec": "b"}))


def test_block_claims_split_work_and_stale_locks_are_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from macro_jax import pool as pool_lib

    path = str(tmp_path / "block_00000.npy")
    assert pool_lib.claim(path) and not pool_lib.claim(path)  # held by this (live) process
    pool_lib.release(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path + ".lock", "w") as f:
        import socket

        f.write(f"{socket.gethostname()} {dead.pid}")
    assert pool_lib.claim(path)  # its owner is gone
    pool_lib.release(path)
    assert not os.path.exists(path + ".lock")


def test_a_claimed_block_is_waited_for_not_simulated(smoke, tmp_path, monkeypatch):
    import os
    import shutil

    from macro_jax import experiment
    from macro_jax import pool as pool_lib

    workdir, config, _, prep = smoke
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    pool_dir = os.path.join(copy, "data", "pool")
    for name in ("block_00002.npy", "block_00002.npy.json", "manifest.npz", "manifest.npz.json"):
        os.remove(os.path.join(pool_dir, name))
    block = pool_lib.block_path(pool_dir, 2)
    assert pool_lib.claim(block)  # "another process" (this one, alive) is simulating block 2
    monkeypatch.setattr(experiment, "POLL_SECONDS", 0.05)
    original = os.path.join(workdir, "data", "pool", "block_00002.npy")

    _finish_later(original, block)  # the other process writes its block a little later
    pool, _ = experiment.generate_data(config, copy)
    np.testing.assert_array_equal(pool.take(np.arange(len(pool))), prep.pool.take(np.arange(len(prep.pool))))


def test_a_process_waiting_for_pool_blocks_simulates_the_test_set_meanwhile(smoke, tmp_path, monkeypatch):
    """Two data processes: while the other holds the last pool block, this one
    simulates the test set instead of idling, then loads the other's block."""
    import os
    import shutil
    import threading
    import time

    from macro_jax import experiment
    from macro_jax import pool as pool_lib

    workdir, config, _, prep = smoke
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    data = os.path.join(copy, "data")
    for name in ("pool/block_00002.npy", "pool/block_00002.npy.json", "pool/manifest.npz", "pool/manifest.npz.json",
                 "test.npz", "test.npz.json", "test/block_00000.npz", "test/block_00000.npz.json"):
        os.remove(os.path.join(data, name))
    block = pool_lib.block_path(os.path.join(data, "pool"), 2)
    assert pool_lib.claim(block)  # "another process" (this one, alive) is simulating pool block 2
    monkeypatch.setattr(experiment, "POLL_SECONDS", 0.05)
    original = os.path.join(workdir, "data", "pool", "block_00002.npy")
    seen = {}

    def finish_after_the_test_set():  # the other process finishes only once this one has made the test block
        test_block, deadline = os.path.join(data, "test", "block_00000.npz"), time.time() + 120
        while not os.path.exists(test_block) and time.time() < deadline:
            time.sleep(0.05)
        seen["test_first"] = os.path.exists(test_block)
        for suffix in ("", ".json"):
            shutil.copy(original + suffix, block + suffix)
        pool_lib.release(block)

    threading.Thread(target=finish_after_the_test_set).start()
    pool, test = experiment.generate_data(config, copy)
    assert seen["test_first"]
    np.testing.assert_array_equal(pool.take(np.arange(len(pool))), prep.pool.take(np.arange(len(prep.pool))))
    np.testing.assert_array_equal(np.asarray(test.obs), np.asarray(prep.test.obs))
    assert os.path.exists(os.path.join(data, "test.npz"))


def _finish_later(original, claimed):
    """Play "another process": after a moment, write `claimed` (and its
    sidecar) as a copy of `original` and release its claim."""
    import shutil
    import threading
    import time

    from macro_jax import pool as pool_lib

    def finish():
        time.sleep(0.5)
        for suffix in ("", ".json"):
            shutil.copy(original + suffix, claimed + suffix)
        pool_lib.release(claimed)

    threading.Thread(target=finish).start()


def test_an_autoencoder_another_process_trains_is_waited_for_and_loaded(smoke, tmp_path, monkeypatch):
    """Two sweep processes started together on one workdir: the second waits
    for the first's autoencoder (claimed like a data block) instead of
    training a second copy into the same files."""
    import os
    import shutil

    import equinox as eqx
    import jax

    from macro_jax import experiment, train
    from macro_jax import pool as pool_lib

    workdir, config, _, prep = smoke
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    model = os.path.join(copy, "autoencoder", "model.eqx")
    os.makedirs(os.path.dirname(model))
    assert pool_lib.claim(model)  # "another process" (this one, alive) is training it
    monkeypatch.setattr(experiment, "POLL_SECONDS", 0.05)

    def no_training(*args, **kwargs):
        raise AssertionError("trained a second autoencoder")

    monkeypatch.setattr(train, "train_autoencoder", no_training)
    original = os.path.join(workdir, "autoencoder", "model.eqx")

    _finish_later(original, model)  # the other process saves its autoencoder a little later
    loaded = experiment.prepare(config, copy).ae
    leaves = [jax.tree_util.tree_leaves(eqx.filter(ae, eqx.is_array)) for ae in (loaded, prep.ae)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(model + ".lock")


def test_importance_sampled_run_beside_the_uniform_one(smoke):
    """"xp:1/16:importance" trains at the same force count in its own run directory;
    the variant config keeps the protocol's runs (reused, not retrained)."""
    import os

    from configs import allen_cahn as ac_config
    from macro_jax import experiment

    workdir, config, results, prep = smoke
    r = experiment.run_loss(prep, config, "xp:1/16:importance", config.train.budget, workdir)
    assert r["site_sampling"] == "importance" and r["n_force_computations"] == config.train.budget
    assert r["n_configs"] == results[1]["n_configs"] and np.all(np.isfinite(r["test_errors"]))
    assert os.path.exists(os.path.join(workdir, "runs", f"xp_p0.0625_importance_budget{config.train.budget}",
                                       "result.json"))
    assert experiment.run_label(r) == "L_x,p p=0.0625 importance"
    assert results[1]["site_sampling"] == "uniform"
    full = ac_config.get_config("importance")
    assert full.train.runs == ("z", "xp:1/16", "xp:1/16:importance") and full.train.budget == 100_000_000


def test_normalised_lz_run_beside_the_physical_one(smoke):
    """"z:normalised" trains on the same configurations and force count as "z" in its
    own run directory, with a different loss (so different members)."""
    import os

    from configs import allen_cahn as ac_config
    from macro_jax import experiment

    workdir, config, results, prep = smoke
    r = experiment.run_loss(prep, config, "z:normalised", config.train.budget, workdir)
    physical = results[0]
    assert physical["run"] == "z" and physical["z_weighting"] == "physical"
    assert r["z_weighting"] == "normalised" and r["n_force_computations"] == physical["n_force_computations"]
    assert r["n_configs"] == physical["n_configs"] and np.all(np.isfinite(r["test_errors"]))
    assert not np.allclose(r["test_errors"], physical["test_errors"], rtol=1e-6, atol=0.0)
    assert os.path.exists(os.path.join(workdir, "runs", f"z_normalised_budget{config.train.budget}", "result.json"))
    assert experiment.run_label(r) == "L_z normalised"
    full = ac_config.get_config("improved")
    assert full.train.runs == ("z", "z:normalised", "xp:1/16", "xp:1/16:importance")
