"""End-to-end experiments: data, autoencoder, labelled data, ensembles, rollouts.

``train_and_evaluate(config, workdir)`` runs every loss of ``config.train.runs``
at ``config.train.budget`` and writes, under ``workdir``::

    config.json            the run's config
    data/pool.npz, data/test.npz          trajectories (+ .json metadata, checksums)
    autoencoder/model.eqx  stage-1 weights (+ .json), history.json
    runs/<run>/members.eqx latent members (+ .json), history.npz (with monitor/* curves
                           when train.monitor_every > 0), result.json (with the
                           settings it was made with), rollouts.npz (+ .json)
    results.json           one object per loss
    stages.json            wall seconds and peak memory of each stage (macro_jax/stages.py)
    rollout.png            one test trajectory: truth vs each loss
    table.txt              the printed result table

Everything is reused on a second call when its metadata matches the config,
finished runs included (reported from result.json and rollouts.npz); a run
finished with other settings is an error, never overwritten.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from macro_jax import checkpoint, data, eval as evaluation, losses, plotting, stages, train
from macro_jax import pool as pool_lib
from macro_jax.config import (ConfigError, parse_run, run_option, run_settings, site_sampling, subset_size, zp_label,
                              validate, z_weighting)
from macro_jax.models import Autoencoder, make_latent_model
from macro_jax.systems import MicroSystem, Trajectories, make_system


class TestSet(NamedTuple):
    """What evaluation needs of the test trajectories: their first frames and
    their TRUE observables at every stored time (never the whole trajectories)."""

    times: jax.Array  # (T,)
    x0: jax.Array  # (n_test, N)
    obs: jax.Array  # (n_test, T, d_obs) float32


class Prepared(NamedTuple):
    system: MicroSystem
    ae: Autoencoder
    pool: jax.Array | pool_lib.BlockPool  # (n_configs, N), trajectory-major
    test: TestSet
    z_mean: jax.Array
    z_std: jax.Array


# ---------------------------------------------------------------- data and autoencoder


# System parameters added after data were saved: at these values (what older
# files were made with) they are left out of specs, so that those files stay valid.
_LATER_SYSTEM_DEFAULTS = {"initial": "fire"}


def system_spec(config) -> dict:
    """``config.system`` as saved in data and autoencoder specs."""
    system = config.system.to_dict()
    params = {k: v for k, v in system.get("params", {}).items()
              if not (k in _LATER_SYSTEM_DEFAULTS and v == _LATER_SYSTEM_DEFAULTS[k])}
    return dict(system, params=params)


def _spec(config, split: str) -> dict:
    d = config.data
    spec = {
        "system": system_spec(config),
        "n_trajectories": d[f"n_{split}_trajectories"],
        "integrator": d[f"{split}_integrator"],
        "dt": d[f"{split}_dt"],
        "n_steps": d[f"{split}_steps"],
        "save_every": d[f"{split}_save_every"],
        "dtype": d.dtype,
        "seed": config.seed,
    }
    if d.one_ensemble:  # both splits come from one call: each file names the whole ensemble
        spec["one_ensemble"] = [d.n_pool_trajectories, d.n_test_trajectories]
    return spec


def _simulate(system, key, spec) -> tuple[Trajectories, float]:
    start = time.perf_counter()
    # No force labels: configurations are labelled (and counted) by the force calculator later.
    traj = system.trajectory_fn(
        key, spec["n_trajectories"], dt=spec["dt"], n_steps=spec["n_steps"], save_every=spec["save_every"],
        integrator=spec["integrator"], dtype=jnp.dtype(spec["dtype"]), labels=False,
    )
    jax.block_until_ready(traj.xs)
    return traj, time.perf_counter() - start


def _observables(system, xs) -> np.ndarray:
    """Observables of trajectories (n, T, N) -> (n, T, d_obs), float32."""
    return np.asarray(evaluation.observable_trajectories(system.observable_fn, jnp.asarray(xs)))


def _kept(config, system, xs) -> np.ndarray:
    """Pool frames of trajectories (n, T, N), flattened trajectory-major, without
    those at or below ``data.pool_keep_above`` (first observable)."""
    flat = np.asarray(xs).reshape(-1, system.n_dof)
    if config.data.pool_keep_above is None:
        return flat
    return flat[_observables(system, xs)[..., 0].reshape(-1) > float(config.data.pool_keep_above)]


def _test_set(system, times, xs) -> TestSet:
    """What is kept of test trajectories (n, T, N): first frames and observables."""
    return TestSet(jnp.asarray(times), jnp.asarray(xs[:, 0]), jnp.asarray(_observables(system, xs)))


def _load_test(path, spec, system) -> TestSet:
    arrays, _ = checkpoint.load_arrays(path, expect={"spec": spec})
    if "xs" in arrays:  # written before test sets were stored as (x0, observables)
        return _test_set(system, arrays["times"], arrays["xs"])
    return TestSet(*(jnp.asarray(arrays[k]) for k in TestSet._fields))


def _pool_spec(config, spec) -> dict:
    d = config.data
    extra = {"block_trajectories": d.block_trajectories} if d.block_trajectories else {}
    if d.pool_keep_above is not None:
        extra["keep_above"] = float(d.pool_keep_above)
    return dict(spec, **extra)


POLL_SECONDS = 10.0  # how often a process waits for blocks that others simulate
AUTOENCODER_FILE = os.path.join("autoencoder", "model.eqx")  # a workdir's trained stage-1 weights


def _blocks(system, key, spec, block: int, skip=lambda b: False):
    """Simulates ``spec``'s trajectories ``block`` at a time (block b from
    ``fold_in(key, b)``), skipping blocks for which ``skip(b)``; yields
    (b, Trajectories, seconds)."""
    n = spec["n_trajectories"]
    for b, lo in enumerate(range(0, n, block)):
        if not skip(b):
            traj, seconds = _simulate(system, jr.fold_in(key, b), dict(spec, n_trajectories=min(block, n - lo)))
            yield b, traj, seconds


def _claimed_blocks(system, key, spec, block: int, directory: str, ext: str, write, check,
                    wait: bool = True) -> list[str] | None:
    """Simulates every missing block of ``spec``'s trajectories, ``block`` at a
    time, into ``directory/block_<b>.<ext>`` via ``write(path, b, traj, seconds)``.
    Each block is claimed first (``pool.claim``), so processes sharing the
    directory split the work; blocks others hold are waited for (or, with
    ``wait=False``, None is returned); existing blocks are verified by
    ``check(path, b)``. Returns the block paths."""
    n_blocks = -(-spec["n_trajectories"] // block)
    paths = [pool_lib.block_path(directory, b, ext) for b in range(n_blocks)]
    os.makedirs(directory, exist_ok=True)

    def skip(b):  # written already (and valid), or another process is simulating it
        if os.path.exists(paths[b]):
            check(paths[b], b)  # raises if stale or corrupt
            return True
        return not pool_lib.claim(paths[b])

    while True:
        for b, traj, seconds in _blocks(system, key, spec, block, skip):
            try:
                write(paths[b], b, traj, seconds)
            finally:
                pool_lib.release(paths[b])
        waiting = [b for b in range(n_blocks) if not os.path.exists(paths[b])]
        if not waiting:
            return paths
        if not wait:
            return None
        logging.info("waiting for blocks %s of %s (other processes)", waiting, directory)
        time.sleep(POLL_SECONDS)


def _block_pool(config, system, key, spec, directory) -> pool_lib.BlockPool:
    """The pool as memory-mapped blocks, simulating (and filtering) the missing ones."""
    manifest = os.path.join(directory, "manifest.npz")
    if os.path.exists(manifest):
        logging.info("loading pool blocks from %s", directory)
        return pool_lib.BlockPool(directory, expect={"spec": spec})
    block = int(config.data.block_trajectories)

    def write(path, b, traj, seconds):
        kept = _kept(config, system, traj.xs)
        logging.info("pool block %d/%d: %d trajectories, %d of %d frames kept, %.1fs", b + 1,
                     -(-spec["n_trajectories"] // block), traj.xs.shape[0], kept.shape[0],
                     traj.xs.shape[0] * traj.xs.shape[1], seconds)
        checkpoint.save_npy(path, kept, {"spec": spec, "block": b, "seconds": seconds})

    check = lambda path, b: checkpoint.load_npy(path, expect={"spec": spec, "block": b}, mmap=True)
    paths = _claimed_blocks(system, key, spec, block, directory, "npy", write, check)
    seconds = sum(_sidecar(path)["seconds"] for path in paths)
    rows = [int(np.load(path, mmap_mode="r").shape[0]) for path in paths]
    checkpoint.save_arrays(manifest, {"rows": np.asarray(rows)},
                           {"spec": spec, "seconds": seconds, "versions": checkpoint.versions()})
    return pool_lib.BlockPool(directory, expect={"spec": spec})


def _sidecar(path: str) -> dict:
    with open(path + ".json") as f:
        return json.load(f)


def _block_test(config, system, key, spec, directory, wait: bool = True) -> tuple[TestSet, float] | None:
    """The test set simulated in claimed blocks (each its first frames and
    observables); None if ``wait=False`` and other processes hold blocks."""

    def write(path, b, traj, seconds):
        logging.info("test block %d: %d trajectories, %.1fs", b, traj.xs.shape[0], seconds)
        checkpoint.save_arrays(path, _test_set(system, traj.times, traj.xs)._asdict(),
                               {"spec": spec, "block": b, "seconds": seconds})

    check = lambda path, b: checkpoint.load_arrays(path, expect={"spec": spec, "block": b})
    paths = _claimed_blocks(system, key, spec, int(config.data.block_trajectories), directory, "npz", write, check,
                            wait)
    if paths is None:
        return None
    parts = [checkpoint.load_arrays(path, expect={"spec": spec}) for path in paths]
    test = TestSet(jnp.asarray(parts[0][0]["times"]), *(jnp.asarray(np.concatenate([a[k] for a, _ in parts]))
                                                        for k in ("x0", "obs")))
    return test, sum(meta["seconds"] for _, meta in parts)


def _trajectories(config, system, workdir):
    """Loads (metadata checked) or simulates the pool and the test set.

    Returns ``(pool, test)``: the pool's configurations, flattened
    trajectory-major and filtered by ``data.pool_keep_above``, as an array
    (n_configs, N) or, with ``data.block_trajectories``, a ``BlockPool``;
    the test set as a ``TestSet``. Forces are not stored: labels are computed
    by the force calculator at labelling time, and counted there.
    """
    specs = {"pool": _pool_spec(config, _spec(config, "pool")), "test": _spec(config, "test")}
    paths = {"pool": os.path.join(workdir, "data", "pool.npz"), "test": os.path.join(workdir, "data", "test.npz")}
    root = jr.PRNGKey(config.seed)
    keys = {"pool": jr.fold_in(root, 0), "test": jr.fold_in(root, 1)}
    block = int(config.data.block_trajectories)
    test = _load_test(paths["test"], specs["test"], system) if os.path.exists(paths["test"]) else None
    if block:
        test_dir = os.path.join(workdir, "data", "test")
        # The test blocks no other process holds first, then the pool, then the test blocks waited for: no process
        # idles while work is left.
        made = None if test is not None else _block_test(config, system, keys["test"], specs["test"], test_dir, wait=False)
        pool = _block_pool(config, system, keys["pool"], specs["pool"], os.path.join(workdir, "data", "pool"))
        if test is None:
            made = made or _block_test(config, system, keys["test"], specs["test"], test_dir)
            test, seconds = made
            if not os.path.exists(paths["test"]):
                checkpoint.save_arrays(paths["test"], test._asdict(),
                                       {"spec": specs["test"], "seconds": seconds, "versions": checkpoint.versions()})
        return pool, test
    pool = None
    if os.path.exists(paths["pool"]):
        arrays, _ = checkpoint.load_arrays(paths["pool"], expect={"spec": specs["pool"]})
        logging.info("loaded pool from %s", paths["pool"])
        pool = jnp.asarray(arrays["xs"]).reshape(-1, system.n_dof)
    if pool is not None and test is not None:
        return pool, test
    if config.data.one_ensemble:
        n_pool = config.data.n_pool_trajectories
        spec = dict(specs["test"], n_trajectories=n_pool + config.data.n_test_trajectories)
        traj, seconds = _simulate(system, keys["pool"], spec)
        made = {"pool": (traj._replace(xs=traj.xs[:n_pool]), seconds), "test": (traj._replace(xs=traj.xs[n_pool:]), seconds)}
    else:
        made = {split: _simulate(system, keys[split], specs[split]) for split, have in (("pool", pool), ("test", test))
                if have is None}
    for split, (traj, seconds) in made.items():
        logging.info("simulated %d %s trajectories (%d frames each) in %.1fs", traj.xs.shape[0], split,
                     traj.xs.shape[1], seconds)
    if pool is None:
        traj, seconds = made["pool"]
        kept = _kept(config, system, traj.xs)
        checkpoint.save_arrays(paths["pool"], {"times": traj.times, "xs": kept},
                               {"spec": specs["pool"], "seconds": seconds, "versions": checkpoint.versions()})
        pool = jnp.asarray(kept)
    if test is None:
        traj, seconds = made["test"]
        test = _test_set(system, traj.times, traj.xs)
        checkpoint.save_arrays(paths["test"], test._asdict(),
                               {"spec": specs["test"], "seconds": seconds, "versions": checkpoint.versions()})
    return pool, test


def _make_autoencoder(config, system, key) -> Autoencoder:
    a = config.autoencoder
    return Autoencoder(
        system.n_dof, system.n_observables, a.latent_dim - system.n_observables, tuple(a.hidden), a.activation,
        system.observable_fn, decoder_uses_observables=a.decoder_uses_observables, bias_init=a.bias_init, key=key,
        input_shift=input_shift(config, system),
    )


def input_shift(config, system) -> tuple[float, int]:
    """The autoencoder's ``input_shift`` for ``autoencoder.input_origin``."""
    origin = config.autoencoder.get("input_origin", "data")
    if origin == "data":
        return (0.0, 0)
    if system.centre_shift[1] == 0:
        raise ConfigError(f"autoencoder.input_origin={origin!r} needs a system with a centre frame "
                          f"(MicroSystem.centre_shift); {system.name!r} has none: use 'data'")
    return system.centre_shift


def autoencoder_spec(config) -> dict:
    """What determines a trained autoencoder (the metadata its file is checked
    against): system, AE settings, data and seed. ``autoencoder.checkpoint_every``
    is bookkeeping and left out (files saved before it existed stay valid)."""
    return {"system": system_spec(config), "autoencoder": _autoencoder_settings(config.autoencoder.to_dict()),
            "data": _without_later_defaults("data", config.data.to_dict()), "seed": config.seed}


def _autoencoder(config, system, pool, workdir) -> Autoencoder:
    key = jr.fold_in(jr.PRNGKey(config.seed), 2)
    init_key, shuffle_key = jr.split(key)
    skeleton = _make_autoencoder(config, system, init_key)
    path = os.path.join(workdir, AUTOENCODER_FILE)
    spec = autoencoder_spec(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:  # processes sharing the workdir: one trains, the others wait and load
        if os.path.exists(path) and not os.path.exists(path + ".lock"):
            logging.info("loaded autoencoder from %s", path)
            return checkpoint.load_model(path, skeleton, expect={"spec": spec})
        if pool_lib.claim(path):
            try:
                if os.path.exists(path):  # finished between the check and the claim
                    continue
                return _train_autoencoder(config, skeleton, pool, workdir, path, spec, shuffle_key)
            finally:
                pool_lib.release(path)
        logging.log_first_n(logging.INFO, "waiting for the autoencoder %s (another process trains it)", 1, path)
        time.sleep(POLL_SECONDS)


def _train_autoencoder(config, skeleton, pool, workdir, path, spec, shuffle_key) -> Autoencoder:
    n = config.autoencoder.n_configs or pool_lib.n_configs(pool)
    xs = pool if isinstance(pool, pool_lib.BlockPool) else pool[:n]  # a BlockPool streams its batches
    resume_path = os.path.join(workdir, "autoencoder", "resume.eqx")
    ae, history = train.train_autoencoder(skeleton, xs, config.autoencoder, shuffle_key, n=n,
                                          resume_path=resume_path, resume_expect={"spec": spec})
    seconds = float(np.sum(history["epoch_seconds"]))  # all epochs, also those of an interrupted call
    checkpoint.save_model(path, ae, {"spec": spec, "seconds": seconds, "versions": checkpoint.versions()})
    for stale in (resume_path, resume_path + ".json"):  # the AE is complete
        if os.path.exists(stale):
            os.remove(stale)
    write_json(os.path.join(workdir, "autoencoder", "history.json"),
                {k: v.tolist() for k, v in history.items()} | {"seconds": seconds})
    return ae


def _checked_system(config) -> MicroSystem:
    """The config's system, after checking the config against it."""
    system = make_system(config.system)
    validate(config, system.n_observables, system.integrators)
    for spec in tuple(config.train.runs) + tuple(config.sweep.runs):  # before hours of data and AE
        check_site_sampling(system, spec)
    return system


def _data(config, system, workdir):
    """``_trajectories``, recorded as a stage."""
    with stages.stage("data (generated, or loaded and checked)"):
        return _trajectories(config, system, workdir)


def generate_data(config, workdir):
    """Simulates (or loads and checks) the pool and test set; returns (pool, test)."""
    return _data(config, _checked_system(config), workdir)


def prepare(config, workdir) -> Prepared:
    """Builds the system, loads or makes the trajectories, loads or trains the AE."""
    system = _checked_system(config)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    pool, test = _data(config, system, workdir)
    with stages.stage("autoencoder (trained, or loaded)"):
        ae = _autoencoder(config, system, pool, workdir)
    with stages.stage("latent statistics"):
        z_mean, z_std = data.latent_statistics(ae, pool)
    return Prepared(system, ae, pool, test, z_mean, z_std)


# ---------------------------------------------------------------- one loss at one budget


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _broadcast(arrays, n_members: int):
    """The same arrays for every member (leading member axis)."""
    return tuple(jnp.broadcast_to(a, (n_members, *a.shape)) for a in arrays)


def _labels(prep: Prepared, config, cfg, loss: str, indices, n: int, k: int, label_keys, n_members: int,
            proposal=None):
    """Labels and precomputed loss inputs of one run: (samples, per_member,
    stats, n_forces, force_seconds, batch_fn); see ``run_loss``. ``xp``/``zp`` runs
    draw their sites uniformly, or from ``proposal`` (``_proposal``)."""
    system, ae = prep.system, prep.ae
    method = config.autoencoder.jacobian
    chunk = config.train.precompute_chunk
    batch_fn = None
    if loss in ("z", "x"):
        samples, account = data.label_and_precompute(system, ae, method, loss, prep.pool, indices, chunk=chunk)
        rate_mean, rate_std = data.rate_statistics(loss, samples)
        per_member = False
        stats = _broadcast((prep.z_mean, prep.z_std, rate_mean, rate_std), n_members)
        n_forces, force_seconds = account.n_forces, account.seconds
    else:
        # shared_subsets: one draw (the first member's key, or train.subset_seed's) labels every member
        draws = _subset_keys(cfg, label_keys) if cfg.shared_subsets else label_keys
        member_samples, member_stats, accounts = [], [], []
        for key in draws:
            if proposal is not None:
                sites = data.draw_weighted_sites(proposal, prep.pool, indices, key, k)
            else:
                sites = data.draw_sites(system, key, n, k)
            s, account = data.label_and_precompute(system, ae, method, loss, prep.pool, indices, sites, chunk=chunk,
                                                   proposal=proposal)
            member_stats.append((prep.z_mean, prep.z_std, *data.rate_statistics(loss, s)))
            member_samples.append(s)
            accounts.append(account)
        stats = _broadcast(member_stats[0], n_members) if cfg.shared_subsets else _stack(member_stats)
        n_forces = accounts[0].n_forces
        force_seconds = float(np.mean([a.seconds for a in accounts]))
        if cfg.label_mode == "online":
            # The labels above only set the normalisation; training draws fresh
            # sites and computes their forces inside the jitted step.
            xs = pool_lib.take(prep.pool, indices)
            samples, per_member = xs, False
            batch_fn = data.make_online_batch_fn(system, ae, method, k, proposal, loss)
            n_forces += cfg.epochs * n * k
            force_seconds += cfg.epochs * _online_force_seconds(system, xs, k, cfg.batch_size, n)
        elif cfg.shared_subsets:
            samples, per_member = member_samples[0], False
        else:
            samples, per_member = _stack(member_samples), True
    return samples, per_member, stats, n_forces, force_seconds, batch_fn


def _subset_keys(cfg, label_keys):
    """The one label key of shared subsets: ``train.subset_seed``'s, else the first member's."""
    seed = cfg.get("subset_seed", None)
    return label_keys[:1] if seed is None else _seed_keys(seed)[1][None]


def check_regression_labels(samples, spec: str, n_dofs: int) -> None:
    """Raises ``ConfigError`` if a regression label of ``spec`` is not finite:
    ``J_I J_I^T`` was singular, which it is whenever the ``n_dofs`` sampled
    coordinates are fewer than the latent dimension."""
    bad = int(np.sum(~np.all(np.isfinite(np.asarray(samples["rate_regression"])), axis=-1)))
    if bad:
        raise ConfigError(f"train.runs entry {spec!r}: the regression label needs J_I J_I^T invertible, but it is "
                          f"singular for {bad} configurations ({n_dofs} sampled coordinates per configuration; "
                          "at least the latent dimension are needed): raise p or use 'zp:<p>'")


def _split_selection(samples, per_member: bool, n: int, fraction: float):
    """(training samples, held-out samples, number held out): the last
    ``round(fraction n)`` configurations (at least 1) of a run's labelled
    samples are held out for model selection (``train.select_every``)."""
    n_held = max(1, int(round(fraction * n)))
    if n_held >= n:
        raise ConfigError(f"train.select_fraction={fraction} holds out all {n} configurations of the run; "
                          "lower it or raise train.budget")
    axis = 1 if per_member else 0
    cut = lambda lo, hi: jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(a, lo, hi, axis=axis), samples)
    return cut(0, n - n_held), cut(n - n_held, n), n_held


def _make_select(sample_loss, nets, stats, held, per_member: bool):
    """``select(params) -> (members,)``: each member's mean loss on ``held``."""
    loss_fn = train.dynamics_loss_fn(sample_loss, eqx.partition(nets, eqx.is_array)[1])
    mask = jnp.ones((jax.tree_util.tree_leaves(held)[0].shape[1 if per_member else 0],), jnp.float32)
    scores = jax.jit(jax.vmap(lambda p, s, h: loss_fn(p, (h, s), mask)[0], in_axes=(0, 0, 0 if per_member else None)))
    return lambda params: scores(params, stats, held)


def _proposal(system: MicroSystem, spec: str):
    """The site proposal an ``xp`` run draws from: None for uniform sampling."""
    return system.site_proposal_fn if site_sampling(spec) == "importance" else None


def check_site_sampling(system: MicroSystem, spec: str) -> None:
    """Raises ``ConfigError`` if ``spec`` asks for importance-sampled sites and
    ``system`` has no proposal to draw them from."""
    if site_sampling(spec) == "importance" and system.site_proposal_fn is None:
        raise ConfigError(f"train.runs entry {spec!r}: the system {system.name} has no site proposal "
                          "(MicroSystem.site_proposal_fn); use uniform sampling ('xp:<p>')")


def run_size(system: MicroSystem, spec: str, budget: int, n_pool: int) -> tuple[int, int]:
    """``(k, n)`` of a run: sites labelled per configuration (all for ``z``/``x``,
    ``p n_sites`` for ``xp``/``zp``) and configurations, ``budget // k``; raises
    ``ConfigError`` if the pool (``n_pool`` configurations) cannot supply them."""
    loss, p = parse_run(spec)
    check_site_sampling(system, spec)
    k = subset_size(p, system.n_sites, spec) if losses.is_partial(loss) else system.n_sites
    n = int(budget // k)
    if n < 1 or n > n_pool:
        raise ConfigError(
            f"train.budget={budget} with {spec!r} needs {n} configurations; the pool has "
            f"{n_pool} (data.n_pool_trajectories, data.pool_keep_above) and at least 1 is needed"
        )
    return k, n


def _seed_keys(seed: int):
    """A member's (initialisation, label, shuffle) keys: they depend on its seed only."""
    return jr.split(jr.PRNGKey(seed), 3)


def _members(config, cfg, latent_dim: int):
    """(initial nets with a leading member axis, label keys, shuffle keys), one per seed."""
    init_keys, label_keys, shuffle_keys = (jnp.stack(ks) for ks in zip(*(_seed_keys(s) for s in cfg.seeds)))
    nets = eqx.filter_vmap(lambda kk: make_latent_model(config.model, latent_dim, key=kk))(init_keys)
    return nets, label_keys, shuffle_keys


def run_loss(prep: Prepared, config, spec: str, budget: int, workdir: str, tag: str = "") -> dict:
    """Trains one ensemble (a member per seed) with one loss at one force budget,
    in ``workdir/runs/<config_run_name(config, spec, budget, tag)>``.

    Each member has the whole budget and its own initialisation; for
    ``L_x,p`` also its own subsets unless ``train.shared_subsets`` (then one
    draw labels all). Force counts and seconds are per member.
    """
    loss, p = parse_run(spec)
    system, ae = prep.system, prep.ae
    cfg = run_settings(config, loss)
    n_pool = pool_lib.n_configs(prep.pool)
    k, n = run_size(system, spec, budget, n_pool)
    excess = loss == "xp" and bool(cfg.get("xp_excess", False))
    if excess and k * system.dofs_per_site < ae.latent_dim:
        raise ConfigError(f"train.xp_excess=True with {spec!r}: the floor needs J_I J_I^T invertible, i.e. at least "
                          f"the latent dimension ({ae.latent_dim}) sampled coordinates, but the run samples "
                          f"{k * system.dofs_per_site}: raise p or set train.xp_excess=False")
    name = config_run_name(config, spec, budget, tag)
    logging.info("== %s: %s, %d configurations x %d sites, seeds %s", name, losses.LOSS_NAMES[loss], n, k, tuple(cfg.seeds))
    seeds = tuple(cfg.seeds)
    nets, label_keys, shuffle_keys = _members(config, cfg, ae.latent_dim)
    n_members = len(seeds)
    indices = config_indices(config, cfg, n_pool, n)
    with stages.stage(f"{name}: labels and precompute"):
        samples, per_member, stats, n_forces, force_seconds, batch_fn = _labels(
            prep, config, cfg, loss, indices, n, k, label_keys, n_members, _proposal(system, spec))
    regression = zp_label(spec) == "regression"
    if regression and batch_fn is None:
        check_regression_labels(samples, spec, k * system.dofs_per_site)
    sample_loss = losses.per_sample_loss(loss, system.n_sites / k, normalised=z_weighting(spec) == "normalised",
                                         regression=regression, excess=excess)
    select, n_select = None, 0
    if int(cfg.get("select_every", 0) or 0) > 0:
        samples, held, n_select = _split_selection(samples, per_member, n, float(cfg.select_fraction))
        select = _make_select(sample_loss, nets, stats, held, per_member)
    monitor, n_diagnostic_forces = None, 0
    if int(cfg.get("monitor_every", 0) or 0) > 0:
        monitor, n_diagnostic_forces = _make_monitor(prep, config, nets, stats, holdout_indices(config, n_pool, indices))
    run_dir = os.path.join(workdir, "runs", name)
    resume_path = os.path.join(run_dir, "resume.eqx")
    settings = _settings(config, spec)
    start = time.perf_counter()
    with stages.stage(f"{name}: training"):
        nets, history = train.train_ensemble(nets, sample_loss, samples, stats, cfg=cfg, keys=shuffle_keys,
                                             per_member_data=per_member, batch_fn=batch_fn, log_prefix=f"{name}: ",
                                             resume_path=resume_path,
                                             resume_expect={"settings": settings}, monitor=monitor,
                                             select=select)
    train_seconds = time.perf_counter() - start
    with stages.stage(f"{name}: evaluation"):
        errors, pred_obs = evaluation.evaluate_ensemble(nets, stats, ae, prep.test.x0, prep.test.obs,
                                                        prep.test.times, substeps=config.eval.substeps,
                                                        relative_floor=config.eval.relative_floor)
    member_errors = np.asarray(jnp.mean(errors, axis=1), dtype=np.float64)
    result = {
        "loss": losses.LOSS_NAMES[loss],
        "run": spec,
        "p": p,
        "site_sampling": site_sampling(spec) if losses.is_partial(loss) else None,
        "z_weighting": z_weighting(spec) if loss == "z" else None,
        "zp_label": zp_label(spec) if loss == "zp" else None,
        "sites_per_config": k,
        "budget": int(budget),
        "n_configs": n,
        "n_force_computations": int(n_forces),
        "force_seconds": float(force_seconds),
        # full forces of the held-out configurations of the monitored curves (not in the budget)
        "diagnostic_force_computations": int(n_diagnostic_forces),
        "label_mode": cfg.label_mode if losses.is_partial(loss) else "offline",
        "shared_subsets": bool(cfg.shared_subsets) if losses.is_partial(loss) else None,
        # model selection (train.select_every): configurations held out of training, each member's chosen epoch
        "n_select_configs": int(n_select),
        "select_best_epoch": np.asarray(history["select/best_epoch"]).tolist() if select is not None else None,
        "seeds": list(seeds),
        "test_errors": member_errors.tolist(),
        "test_error_mean": float(np.mean(member_errors)),
        "test_error_std": float(np.std(member_errors)),
        "n_failed_rollouts": int(np.sum(~np.isfinite(np.asarray(errors)))),
        # the paper's flawed Fig. 4 metric (against the last member, not the truth), for comparison only
        "last_member_errors": np.asarray(evaluation.last_member_errors(pred_obs), np.float64).tolist(),
        "train_seconds": train_seconds,
        "final_train_loss": np.asarray(history["loss"][-1]).tolist(),
        # what the numbers depend on: later calls in the same workdir reuse this run (finished_run)
        "settings": settings,
        # the encoder it was trained on: a result copied into another workdir is reused only there
        # if that workdir's autoencoder is the same file (check_autoencoder)
        "autoencoder_sha256": autoencoder_sha256(workdir),
        # the data files it was trained and scored on (where a rebuilt encoder differs: data or training?)
        "data_sha256": data_sha256(workdir),
    }
    checkpoint.save_model(os.path.join(run_dir, "members.eqx"), nets,
                          {"config": config.to_dict(), "run": spec, "budget": budget, "versions": checkpoint.versions()})
    # the members' test rollouts (observables), so that a finished run is reported without retraining
    checkpoint.save_arrays(os.path.join(run_dir, ROLLOUTS), {"pred_obs": np.asarray(pred_obs)},
                           rollouts_meta(spec, budget, settings))
    np.savez(os.path.join(run_dir, "history.npz"), **history)
    write_json(os.path.join(run_dir, "result.json"), result)
    monitor_path = resume_path + ".monitor.npz"
    for path in (resume_path, resume_path + ".json", monitor_path, monitor_path + ".json"):  # the run is complete
        if os.path.exists(path):
            os.remove(path)
    logging.info("%s: test error %.3e +- %.2e", name, result["test_error_mean"], result["test_error_std"])
    result["_pred_obs"], result["_true_obs"] = np.asarray(pred_obs), np.asarray(prep.test.obs)
    return result


def config_indices(config, cfg, n_pool: int, n: int) -> np.ndarray:
    """Pool rows a run labels (``train.draw_configs``): the first n, or n drawn
    without replacement by one permutation of the pool per experiment seed, or
    per ``train.draw_seed`` where set (runs with fewer configurations take a
    prefix of the same draw)."""
    if cfg.draw_configs == "first":
        return np.arange(n)
    seed = config.seed if cfg.get("draw_seed", None) is None else cfg.draw_seed
    perm = jr.permutation(jr.fold_in(jr.PRNGKey(seed), 3), n_pool)
    return np.asarray(perm[:n])


def holdout_indices(config, n_pool: int, indices) -> np.ndarray:
    """Pool rows (sorted) of the monitored curves' held-out set: the first
    ``diagnostics.holdout`` rows of one permutation of the pool (key: experiment
    seed, 4) that the run does not label. Uniform over the unused rows, and
    mostly the same rows for every run of an experiment (a run skips only the
    rows it labels). Not the last rows of the pool: with ``draw_configs``
    "first" those are the late, near-steady frames of one trajectory (on
    Predator-Prey their mean |f|^2 is 4.6x below the pool's). Raises
    ``ConfigError`` if the pool has too few unused rows."""
    h, n = int(config.diagnostics.holdout), len(indices)
    if h > n_pool - n:
        raise ConfigError(f"diagnostics.holdout={h} is invalid: only {n_pool - n} of the {n_pool} pool configurations "
                          f"are not labelled by the run; lower diagnostics.holdout or train.budget")
    perm = np.asarray(jr.permutation(jr.fold_in(jr.PRNGKey(config.seed), 4), n_pool))
    return np.sort(perm[~np.isin(perm, np.asarray(indices))][:h])


def _make_monitor(prep: Prepared, config, nets, stats, held):
    """The monitor of ``train.monitor_every`` and the number of full forces it
    labelled (``held`` configurations; never counted in the run's budget)."""
    from macro_jax import diagnostics  # diagnostics drives experiments too

    samples, account = data.label_and_precompute(prep.system, prep.ae, config.autoencoder.jacobian, "x", prep.pool,
                                                 held, chunk=config.train.precompute_chunk)
    monitor = diagnostics.make_monitor(eqx.partition(nets, eqx.is_array)[1], stats, samples, prep.ae, prep.test,
                                       substeps=config.eval.substeps, relative_floor=config.eval.relative_floor)
    return monitor, account.n_forces


ROLLOUTS = "rollouts.npz"  # a finished run's test rollouts, beside its result.json


def rollouts_meta(spec: str, budget: int, settings: dict) -> dict:
    return {"run": spec, "budget": int(budget), "settings": settings}


def saved_rollouts(run_dir: str, result: dict) -> np.ndarray | None:
    """The test rollouts ``pred_obs`` saved beside a finished run's ``result``
    (checksum and settings checked), or None when the run has none."""
    path = os.path.join(run_dir, ROLLOUTS)
    if not os.path.exists(path):
        return None
    return checkpoint.load_arrays(path, expect=rollouts_meta(result["run"], result["budget"], result["settings"]))[0][
        "pred_obs"]


def run_name(spec: str, budget: int, tag: str = "", draw_seed: int | None = None) -> str:
    """Directory name of one run under ``workdir/runs``, e.g. ``xp_p0.25_budget60000``
    (``mlp_xp_p0.0625_budget1000000`` with ``tag="mlp"``,
    ``xp_p0.0625_importance_budget100000000`` for ``"xp:1/16:importance"``,
    ``z_normalised_budget100000000`` for ``"z:normalised"``, ``zp_p0.0625_budget100000`` for ``"zp:1/16"``,
    ``xp_p0.0625_budget250000_draw3`` with ``draw_seed=3``)."""
    loss, p = parse_run(spec)
    option = run_option(spec)
    body = (f"{loss}_p{p:g}" if losses.is_partial(loss) else loss) + (f"_{option}" if option else "")
    draw = "" if draw_seed is None else f"_draw{int(draw_seed)}"
    return (f"{tag}_" if tag else "") + body + f"_budget{budget}" + draw


def config_run_name(config, spec: str, budget: int, tag: str = "") -> str:
    """``run_name`` of ``spec`` at ``budget`` under ``config`` (its ``train.draw_seed``, per-loss overrides applied)."""
    return run_name(spec, budget, tag, run_settings(config, parse_run(spec)[0]).get("draw_seed", None))


def draw_seed_of(result: dict) -> int | None:
    """The ``train.draw_seed`` a saved result was made with (None: the experiment seed's draw)."""
    return ((result.get("settings") or {}).get("train") or {}).get("draw_seed", None)


def result_run_name(result: dict) -> str:
    """``run_name`` of a saved untagged result (a sweep's), its draw seed read from its settings."""
    return run_name(result["run"], result["budget"], draw_seed=draw_seed_of(result))


# train fields that change how a run is logged or saved, not its numbers, and
# those that choose which runs a call makes (a run's own budget is in its name)
_BOOKKEEPING = ("log_every", "checkpoint_every", "monitor_every", "runs", "budget")


def _autoencoder_settings(fields: dict) -> dict:
    """The autoencoder section without ``checkpoint_every``, bookkeeping added after
    autoencoders and results were saved (``log_every`` stays: saved files hold it)."""
    return _without_later_defaults("autoencoder", {k: v for k, v in fields.items() if k != "checkpoint_every"})


# Fields added after results were saved: at these values they are left out of
# saved settings, so that older files stay valid.
# (data.one_ensemble is not here: autoencoders saved since it exists carry it in their spec.)
_LATER_DEFAULTS = {"autoencoder": {"input_origin": "data"},
                   "data": {"block_trajectories": 0, "pool_keep_above": None},
                   "train": {"draw_configs": "first", "draw_seed": None, "monitor_every": 0, "shared_subsets": False,
                             "subset_seed": None, "select_every": 0, "select_fraction": 0.1,
                             "xp_excess": False}}


def _without_later_defaults(section: str, fields: dict) -> dict:
    later = _LATER_DEFAULTS.get(section, {})
    return {k: v for k, v in fields.items() if not (k in later and v == later[k])}


def _normalised(settings: dict) -> dict:
    """``settings`` without bookkeeping fields, other latent models' fields and
    later fields at their defaults, so that results saved before such fields
    existed still compare equal."""
    model = settings.get("model", {})
    name = model.get("name")
    train = {k: v for k, v in settings.get("train", {}).items() if k not in _BOOKKEEPING}
    return dict(settings, train=_without_later_defaults("train", train),
                autoencoder=_autoencoder_settings(settings.get("autoencoder", {})),
                data=_without_later_defaults("data", settings.get("data", {})), model={"name": name, name: model.get(name)})


def _settings(config, spec) -> dict:
    """Everything a run's numbers depend on (JSON-normalised)."""
    loss, _ = parse_run(spec)
    settings = {"train": run_settings(config, loss).to_dict(), "model": config.model.to_dict(),
                "autoencoder": config.autoencoder.to_dict(), "data": config.data.to_dict(), "seed": config.seed}
    return _normalised(json.loads(json.dumps(settings, default=str)))


def finished_run(config, spec: str, budget: int, workdir: str, tag: str = "") -> dict | None:
    """The public result of a run that finished in ``workdir/runs/<name>/`` with the
    same settings, or None if none finished there; a run finished with other
    settings is an error (results are never silently mixed or overwritten).
    Settings do not cover the code: after changing it, use a fresh workdir."""
    name = config_run_name(config, spec, budget, tag)
    path = os.path.join(workdir, "runs", name, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if _normalised(result.get("settings") or {}) != _settings(config, spec):
        raise RuntimeError(f"{path} was made with other settings; use a fresh --workdir")
    check_autoencoder(result, workdir, path)
    logging.info("%s: reusing %s", name, path)
    return result


def autoencoder_sha256(workdir: str) -> str | None:
    """SHA-256 of ``workdir``'s trained autoencoder file (from its checked sidecar), None before it exists."""
    path = os.path.join(workdir, AUTOENCODER_FILE)
    return checkpoint.load_sidecar(path)["sha256"] if os.path.exists(path) else None


def data_sha256(workdir: str) -> dict[str, str]:
    """SHA-256 of ``workdir``'s pool (its file, or a block pool's manifest) and test set, from their sidecars."""
    out = {}
    for split, names in (("pool", ("pool.npz", os.path.join("pool", "manifest.npz"))), ("test", ("test.npz",))):
        for name in names:
            path = os.path.join(workdir, "data", name)
            if os.path.exists(path):
                out[split] = checkpoint.load_sidecar(path)["sha256"]
                break
    return out


def check_autoencoder(result: dict, workdir: str, where: str) -> None:
    """Refuses a result trained on another autoencoder or other data files than
    ``workdir``'s (results carry the files' SHA-256; one copied from another
    workdir or session is reused only where the same config and seed rebuilt
    the same files). Results saved before the fields existed, or a workdir
    without a trained autoencoder yet, pass (``sweep.run_sweep`` checks again
    once it exists)."""
    saved, here = result.get("autoencoder_sha256"), autoencoder_sha256(workdir)
    if saved and here and saved != here:
        raise RuntimeError(f"{where} was trained on another autoencoder (sha256 {saved[:12]}...) than "
                           f"{workdir}/autoencoder/model.eqx ({here[:12]}...); results of different "
                           "encoders are never mixed: use the workdir it came from or retrain it")
    # the same for the data files, where both sides know theirs
    saved_data, here_data = result.get("data_sha256") or {}, data_sha256(workdir)
    for split in sorted(set(saved_data) & set(here_data)):
        if saved_data[split] != here_data[split]:
            raise RuntimeError(f"{where} was trained on other {split} data (sha256 {saved_data[split][:12]}...) "
                               f"than {workdir}/data ({here_data[split][:12]}...); results of different data "
                               "are never mixed: use the workdir it came from or retrain it")


def cached_run(config, spec: str, budget: int, workdir: str, get_prep, tag: str = "") -> dict:
    """``run_loss``'s public result, read back when the run finished in ``workdir``
    before (``finished_run``: long grids resume and can be split over processes
    sharing ``workdir``). ``get_prep()`` returns the ``Prepared`` data, called
    only when a run must train."""
    result = finished_run(config, spec, budget, workdir, tag)
    if result is not None:
        return result
    return public(run_loss(get_prep(), config, spec, budget, workdir, tag))


def _reevaluated(prep: Prepared, config, spec: str, budget: int, run_dir: str, result: dict) -> np.ndarray:
    """Test rollouts of a run that finished before ``rollouts.npz`` was saved:
    its saved members, with the normalisation its labels give (labelled again
    as the run drew them). The errors must equal the run's own, else this code
    no longer reproduces the run and it is refused."""
    loss, _ = parse_run(spec)
    cfg = run_settings(config, loss)
    n_pool = pool_lib.n_configs(prep.pool)
    k, n = run_size(prep.system, spec, budget, n_pool)
    skeleton, label_keys, _ = _members(config, cfg, prep.ae.latent_dim)
    nets = checkpoint.load_model(os.path.join(run_dir, "members.eqx"), skeleton)
    stats = _labels(prep, config, cfg, loss, config_indices(config, cfg, n_pool, n), n, k, label_keys,
                    len(cfg.seeds), _proposal(prep.system, spec))[2]
    errors, pred_obs = evaluation.evaluate_ensemble(nets, stats, prep.ae, prep.test.x0, prep.test.obs,
                                                    prep.test.times, substeps=config.eval.substeps,
                                                    relative_floor=config.eval.relative_floor)
    member_errors = np.asarray(jnp.mean(errors, axis=1), dtype=np.float64)
    if not np.allclose(member_errors, result["test_errors"], rtol=1e-4, atol=0.0):
        raise RuntimeError(f"{run_dir}: re-evaluated errors {member_errors.tolist()} differ from the saved "
                           f"{result['test_errors']}; the code changed since the run, use a fresh --workdir")
    return np.asarray(pred_obs)


def _reported_run(prep: Prepared, config, spec: str, workdir: str) -> dict:
    """``run_loss`` at ``train.budget``, or the finished run read back with its test rollouts."""
    budget = config.train.budget
    result = finished_run(config, spec, budget, workdir)
    if result is None:
        return run_loss(prep, config, spec, budget, workdir)
    run_dir = os.path.join(workdir, "runs", config_run_name(config, spec, budget))
    pred_obs = saved_rollouts(run_dir, result)
    if pred_obs is None:
        pred_obs = _reevaluated(prep, config, spec, budget, run_dir, result)
        checkpoint.save_arrays(os.path.join(run_dir, ROLLOUTS), {"pred_obs": pred_obs},
                               rollouts_meta(spec, budget, result["settings"]))
    return dict(result, _pred_obs=pred_obs, _true_obs=np.asarray(prep.test.obs))


def memo_prepare(config, workdir: str):
    """``get_prep`` for ``cached_run``: ``prepare(config, workdir)`` on first call only."""
    return functools.cache(lambda: prepare(config, workdir))


def _online_force_seconds(system, xs, k, batch_size, n) -> float:
    """Seconds the subset calculator spends per online epoch, timed outside the step."""
    xb = xs[: min(batch_size, n)]
    sites = data.draw_sites(system, jr.PRNGKey(0), xb.shape[0], k)
    _, account = data.label_subset(system, xb, sites)
    return account.seconds * (n / xb.shape[0])


# ---------------------------------------------------------------- reporting


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run_label(r: dict) -> str:
    """A result's name in tables and legends: ``L_z``, ``L_z normalised``,
    ``L_x,p p=0.0625``, ``L_x,p p=0.0625 importance``, ``L_z,p p=0.0625``."""
    option = run_option(r["run"]) if "run" in r else None
    base = f"{r['loss']} p={r['p']:g}" if r["loss"] in ("L_x,p", "L_z,p") else r["loss"]
    return base + (f" {option}" if option else "")


def format_table(results: list[dict]) -> str:
    header = f"{'loss':<27} {'configurations':>14} {'force computations':>19} {'force seconds':>14}  test error (mean ± std over seeds)"
    lines = [header, "-" * len(header)]
    for r in results:
        label = run_label(r)
        lines.append(
            f"{label:<27} {r['n_configs']:>14,d} {r['n_force_computations']:>19,d} {r['force_seconds']:>14.4f}  "
            f"{r['test_error_mean']:.3e} ± {r['test_error_std']:.2e}"
        )
    return "\n".join(lines)


def seed_rows(results: list[dict]) -> list[dict]:
    """One object per (loss, seed): what docs/results/ commits for a single-budget run."""
    return [{"loss": r["loss"], "run": r["run"], "p": r["p"], "seed": seed, "test_error": err,
             "n_force_computations": r["n_force_computations"], "n_configs": r["n_configs"],
             "force_seconds": r["force_seconds"]}
            for r in results for seed, err in zip(r["seeds"], r["test_errors"])]


def plot_rollout(results: list[dict], times, path: str, trajectory: int, observable_names) -> None:
    plt = plotting.pyplot()

    true_obs = results[0]["_true_obs"][trajectory]
    n_obs = true_obs.shape[-1]
    fig, axes = plt.subplots(1, n_obs, figsize=(5 * n_obs, 3.6), squeeze=False)
    t = np.asarray(times)
    for j, ax in enumerate(axes[0]):
        ax.plot(t, true_obs[:, j], "k-", lw=2.5, label="truth (microscopic)")
        for r in results:
            label = run_label(r)
            ax.plot(t, r["_pred_obs"][0, trajectory, :, j], "--", lw=1.5, label=f"{label} (seed {r['seeds'][0]})")
        ax.set_xlabel("t")
        ax.set_ylabel(observable_names[j] if j < len(observable_names) else f"z*_{j}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"test trajectory {trajectory}: latent rollout vs truth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_and_evaluate(config, workdir: str) -> list[dict]:
    """Runs every loss of ``config.train.runs`` at ``config.train.budget``; see module doc."""
    first_stage = len(stages.records())  # this call's stages only, whatever ran before in the process
    prep = prepare(config, workdir)
    results = [_reported_run(prep, config, spec, workdir) for spec in config.train.runs]
    write_json(os.path.join(workdir, "results.json"), [public(r) for r in results])
    write_json(os.path.join(workdir, "stages.json"), stages.records()[first_stage:])  # seconds, peak memory
    table = format_table(results)
    with open(os.path.join(workdir, "table.txt"), "w") as f:
        f.write(table + "\n")
    plot_rollout(results, prep.test.times, os.path.join(workdir, "rollout.png"), config.eval.plot_trajectory,
                 prep.system.observable_names)
    return results


def report(results: list[dict], out: str | None, table, rows, plot) -> None:
    """Prints ``table(results)``; with ``out``, writes ``rows(results)`` to the JSON
    file ``out``, ``plot(results, <stem>.png)`` and the table to ``<stem>.md``."""
    text = table(results)
    print(text)
    if not out:
        return
    write_json(out, rows(results))
    stem = os.path.splitext(out)[0]
    plot(results, stem + ".png")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {out}, {stem}.png, {stem}.md")


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
