"""The train step: compiles once, learns, reports NaNs; ensembles equal single runs."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import optax
import pytest

from macro_jax import data, losses, train
from macro_jax.models import LatentMLP, OnsagerNet
from macro_jax.systems import make_predator_prey


def _cfg(**overrides):
    c = ml_collections.ConfigDict(dict(
        epochs=3, batch_size=16, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, patience=2,
        plateau_factor=0.5, plateau_rtol=1e-4, min_lr=1e-4, log_every=0))
    c.update(overrides)
    return c


def _linear_problem(n=50, d=3, key=jr.PRNGKey(0)):
    """L_z data for the field g(z) = A z: the truth is reachable by an MLP."""
    z = jr.normal(key, (n, d), jnp.float32)
    a = jnp.asarray([[-1.0, 0.5, 0.0], [-0.5, -1.0, 0.0], [0.0, 0.0, -0.2]], jnp.float32)
    samples = {"z": z, "jf": z @ a.T}
    stats = (jnp.zeros(d), jnp.ones(d), jnp.zeros(d), jnp.ones(d))
    return samples, stats


def test_epoch_compiles_once():
    samples, stats = _linear_problem()
    net = LatentMLP(3, (16,), key=jr.PRNGKey(1))
    params, static = eqx.partition(net, eqx.is_array)
    cfg = _cfg()
    optimizer = train.make_dynamics_optimizer(cfg, steps_per_epoch=4)
    step = train.make_train_step(train.dynamics_loss_fn(losses.loss_z, static), optimizer)
    epoch = jax.jit(chex.assert_max_traces(train.make_epoch_fn(step, 50, 16), n=1))
    opt_state = optimizer.init(params)
    for e in range(4):
        params, opt_state, metrics = epoch(params, opt_state, samples, stats, jr.PRNGKey(2), e)
    assert set(metrics) >= {"loss", "grad_norm"}


def test_ensemble_learns_and_matches_single_member():
    samples, stats = _linear_problem()
    keys = jr.split(jr.PRNGKey(3), 2)
    nets = eqx.filter_vmap(lambda k: LatentMLP(3, (32,), key=k))(keys)
    stacked = tuple(jnp.stack([s, s]) for s in stats)
    cfg = _cfg(epochs=60)
    shuffle = jr.split(jr.PRNGKey(4), 2)
    trained, hist = train.train_ensemble(nets, losses.loss_z, samples, stacked, cfg=cfg, keys=shuffle,
                                         per_member_data=False)
    assert hist["loss"].shape == (60, 2)
    assert np.all(hist["loss"][-1] < 0.2 * hist["loss"][0])
    # member 1 trained alone gives the same parameters as inside the vmapped ensemble
    single = jax.tree_util.tree_map(lambda a: a[1:2] if eqx.is_array(a) else a, nets)
    alone, _ = train.train_ensemble(single, losses.loss_z, samples, tuple(s[1:2] for s in stacked), cfg=cfg,
                                    keys=shuffle[1:2], per_member_data=False)
    a = jax.tree_util.tree_leaves(eqx.filter(alone, eqx.is_array))
    b = jax.tree_util.tree_leaves(eqx.filter(trained, eqx.is_array))
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x[0]), np.asarray(y[1]), rtol=2e-4, atol=2e-6)


def test_nan_loss_raises_clear_error():
    samples, stats = _linear_problem()
    samples = dict(samples, jf=samples["jf"].at[3].set(jnp.nan))
    nets = eqx.filter_vmap(lambda k: LatentMLP(3, (8,), key=k))(jr.split(jr.PRNGKey(0), 1))
    with pytest.raises(FloatingPointError, match="non-finite training loss at epoch 0.*train.lr"):
        train.train_ensemble(nets, losses.loss_z, samples, tuple(s[None] for s in stats), cfg=_cfg(),
                             keys=jr.split(jr.PRNGKey(1), 1), per_member_data=False)


def test_plateau_halves_lr_after_patience():
    """A constant loss: PyTorch semantics reduce after patience + 1 flat epochs."""
    cfg = _cfg(lr=1.0, patience=2, min_lr=0.25)
    opt = train.make_dynamics_optimizer(cfg, steps_per_epoch=1)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    scales = []
    for _ in range(10):
        _, state = opt.update({"w": jnp.ones(())}, state, params, value=jnp.asarray(1.0))
        scales.append(float(train.plateau_scale(state)))
    # epoch 1 sets the best value; epochs 2-4 are 3 bad epochs > patience 2 -> halve; floor at 0.25
    assert scales[:3] == [1.0, 1.0, 1.0] and scales[3] == 0.5 and scales[-1] == 0.25


def test_online_step_draws_sites_and_learns():
    """Online labelling: the jitted step draws sites per configuration and computes their forces."""
    from macro_jax.models import Autoencoder

    system = make_predator_prey()
    ae = Autoencoder(system.n_dof, 2, 2, (16,), "softplus", system.observable_fn,
                     decoder_uses_observables=True, bias_init="torch", key=jr.PRNGKey(0))
    xs = system.trajectory_fn(jr.PRNGKey(1), 2, n_steps=200, save_every=10).xs.reshape(-1, system.n_dof)
    batch_fn = data.make_online_batch_fn(system, ae, "linear_first_layer", 20)
    b1 = batch_fn(xs[:4], jr.PRNGKey(5))
    b2 = batch_fn(xs[:4], jr.PRNGKey(6))
    assert b1["jfi"].shape == (4, 4) and b1["gram_i"].shape == (4, 4, 4)
    assert not np.array_equal(np.asarray(b1["ff"]), np.asarray(b2["ff"]))  # fresh sites per step
    nets = eqx.filter_vmap(lambda k: OnsagerNet(4, variant="separate", key=k))(jr.split(jr.PRNGKey(2), 2))
    z_stats = data.latent_statistics(ae, xs)
    stats = tuple(jnp.stack([s, s]) for s in (*z_stats, jnp.zeros(4, jnp.float32), jnp.full(4, 0.05, jnp.float32)))
    _, hist = train.train_ensemble(nets, losses.per_sample_loss("xp", 5.0), xs, stats, cfg=_cfg(epochs=15, lr=5e-3),
                                   keys=jr.split(jr.PRNGKey(3), 2), per_member_data=False, batch_fn=batch_fn)
    assert np.all(np.isfinite(hist["loss"]))
    assert np.all(hist["loss"][-3:].mean(0) < hist["loss"][:3].mean(0))


def test_amsgrad_follows_pytorch():
    """Our AMSGrad reproduces PyTorch's update rule (max over uncorrected moments)."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    grads = [5.0, 0.1, -0.2, 0.05, 0.3, -0.01]  # a large first gradient, then small ones
    m = v = v_max = 0.0
    expected = []
    for t, g in enumerate(grads, start=1):  # torch.optim.Adam(amsgrad=True), scalar transcription
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = max(v_max, v)
        expected.append(-lr / (1 - b1**t) * m / (np.sqrt(v_max) / np.sqrt(1 - b2**t) + eps))
    opt = train.scale_by_amsgrad_torch(b1, b2, eps)
    state = opt.init(jnp.zeros((), jnp.float32))
    ours = []
    for g in grads:
        u, state = opt.update(jnp.asarray(g, jnp.float32), state)
        ours.append(-lr * float(u))
    np.testing.assert_allclose(ours, expected, rtol=5e-5)  # float32 arithmetic
    # optax's AMSGrad keeps the corrected first square in its max: later steps are far smaller
    opt_optax = optax.scale_by_amsgrad(b1, b2, eps)
    state = opt_optax.init(jnp.zeros((), jnp.float32))
    for g in grads:
        u, state = opt_optax.update(jnp.asarray(g, jnp.float32), state)
    assert abs(-lr * float(u)) < 0.5 * abs(expected[-1])


def _tiny_ensemble(**cfg_extra):
    """Two 3-d MLP members, 40 samples of dz/dt = -z, a 5-epoch config checkpointing every 2."""
    nets = eqx.filter_vmap(lambda k: LatentMLP(3, (8,), "tanh", key=k))(jr.split(jr.PRNGKey(0), 2))
    zs = jr.normal(jr.PRNGKey(1), (40, 3), jnp.float32)
    stats = tuple(jnp.broadcast_to(v, (2, 3)) for v in (jnp.zeros(3), jnp.ones(3), jnp.zeros(3), jnp.ones(3)))
    cfg = ml_collections.ConfigDict(dict(epochs=5, batch_size=16, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8,
                                         weight_decay=0.0, patience=1, plateau_factor=0.5, plateau_rtol=1e-4,
                                         min_lr=1e-5, log_every=0, checkpoint_every=2, **cfg_extra))
    return nets, {"z": zs, "jf": -zs}, stats, cfg


def test_interrupted_training_resumes_to_the_same_numbers(tmp_path):
    """checkpoint_every saves (params, optimiser, history, epoch); a second call
    continues from the last save and ends exactly where an uninterrupted run ends."""
    from macro_jax import checkpoint

    nets, samples, stats, cfg = _tiny_ensemble()
    keys = jr.split(jr.PRNGKey(2), 2)
    path = str(tmp_path / "resume.eqx")
    kw = dict(cfg=cfg, keys=keys, per_member_data=False, resume_path=path, resume_expect={"run": "t"})
    straight, h1 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)
    # the last save is at epoch 4 of 5; a second call resumes there and replays epoch 5 only
    assert int(checkpoint.load_model(path, _skeleton(nets, cfg), {"run": "t"})["epoch"]) == 4
    resumed, h2 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(straight, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(resumed, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])
    with pytest.raises(checkpoint.DataFileError, match="metadata field 'run'"):
        train.train_ensemble(nets, losses.loss_z, samples, stats, **dict(kw, resume_expect={"run": "other"}))


def _skeleton(nets, cfg):
    params, static = eqx.partition(nets, eqx.is_array)
    optimizer = train.make_dynamics_optimizer(cfg, 3)
    return {"params": params, "opt_state": jax.vmap(optimizer.init)(params), "epoch": jnp.zeros((), jnp.int32),
            "history": {k: jnp.zeros((cfg.epochs, 2), jnp.float64) for k in ("loss", "grad_norm", "lr")}}


def test_monitored_history_survives_resume(tmp_path):
    """A monitored run interrupted after its checkpoint resumes with the curves up
    to the checkpoint and ends with the same history as an uninterrupted run."""
    nets, samples, stats, cfg = _tiny_ensemble(monitor_every=2)
    calls = []

    def monitor(params):  # the squared norm of each member's parameters
        calls.append(1)
        return {"norm2": sum(jnp.sum(a.reshape(2, -1) ** 2, 1) for a in jax.tree_util.tree_leaves(params))}

    path = str(tmp_path / "resume.eqx")
    kw = dict(cfg=cfg, keys=jr.split(jr.PRNGKey(2), 2), per_member_data=False, resume_path=path,
              resume_expect={"run": "t"}, monitor=monitor)
    trained, h1 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)
    np.testing.assert_array_equal(h1["monitor/epoch"], [0, 2, 4, 5])
    assert h1["monitor/norm2"].shape == (4, 2) and len(calls) == 4
    final = sum(np.sum(np.asarray(a).reshape(2, -1) ** 2, 1) for a in jax.tree_util.tree_leaves(eqx.filter(trained, eqx.is_array)))
    np.testing.assert_allclose(h1["monitor/norm2"][-1], final, rtol=1e-6)
    # the files hold the state after epoch 4: a second call replays epoch 5 only, monitoring once
    _, h2 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)
    assert len(calls) == 5
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])
    # monitoring does not change training
    _, h3 = train.train_ensemble(nets, losses.loss_z, samples, stats, **dict(kw, resume_path=None, monitor=None))
    assert not any(k.startswith("monitor/") for k in h3)
    np.testing.assert_array_equal(h1["loss"], h3["loss"])


def test_selection_returns_each_members_best_parameters_and_survives_resume(tmp_path):
    import os

    """train.select_every: each member leaves with its parameters at its lowest
    held-out score, equal to a run stopped at that epoch; resuming selects the same."""
    nets, samples, stats, cfg = _tiny_ensemble(select_every=1)
    keys = jr.split(jr.PRNGKey(2), 2)
    held = {"z": samples["z"][:8], "jf": -samples["jf"][:8]}  # wrong labels: the score gets worse as training fits
    loss_fn = train.dynamics_loss_fn(losses.loss_z, eqx.partition(nets, eqx.is_array)[1])

    def select(params):
        return jax.vmap(lambda p, st: loss_fn(p, (held, st), jnp.ones(8))[0])(params, stats)

    path = str(tmp_path / "resume.eqx")
    kw = dict(cfg=cfg, keys=keys, per_member_data=False, resume_path=path, resume_expect={"run": "t"}, select=select)
    chosen, h1 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)
    np.testing.assert_array_equal(h1["select/epoch"], np.arange(1, cfg.epochs + 1))
    assert h1["select/score"].shape == (cfg.epochs, 2)
    best = h1["select/best_epoch"]
    np.testing.assert_array_equal(best, np.argmin(h1["select/score"], 0) + 1)
    assert np.all(best < cfg.epochs)  # the check can fail: the wrong labels make the first epochs the best
    for m in range(2):  # member m stopped after best[m] epochs, without selection
        stopped, _ = train.train_ensemble(nets, losses.loss_z, samples, stats,
                                          **dict(kw, cfg=ml_collections.ConfigDict(dict(cfg.to_dict(), epochs=int(best[m]))),
                                                 resume_path=None, select=None))
        for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(chosen, eqx.is_array)),
                        jax.tree_util.tree_leaves(eqx.filter(stopped, eqx.is_array))):
            np.testing.assert_array_equal(np.asarray(a)[m], np.asarray(b)[m])
    assert os.path.exists(path)
    resumed, h2 = train.train_ensemble(nets, losses.loss_z, samples, stats, **kw)  # from the epoch-4 checkpoint
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(chosen, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(resumed, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])
