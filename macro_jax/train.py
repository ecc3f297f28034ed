"""Optimisers, the jitted train step, and ensembles trained in one ``vmap``.

One epoch is one jitted ``lax.scan`` over minibatches; an ensemble of members
(independent seeds, possibly with their own labelled data) is that epoch
function under ``jax.vmap``. The learning rate follows the reference: AMSGrad
and a reduce-on-plateau scale that reads the mean training loss of each epoch.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from absl import logging

from macro_jax import checkpoint, losses
from macro_jax import pool as pool_lib
from macro_jax.models.latent import NormalisedField


class AmsgradState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_amsgrad_torch(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AMSGrad as PyTorch computes it: the running max is over the *uncorrected*
    second moment, bias-corrected afterwards.

    ``optax.scale_by_amsgrad`` takes the max over bias-corrected moments, so a
    large first gradient (corrected to its full square at step 1) stays in the
    max for the whole run and throttles every later step; on Predator-Prey
    that left members stuck at 3-10x the reference error.
    """

    def init_fn(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
        return AmsgradState(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree_util.tree_map(jnp.maximum, state.nu_max, nu)
        t = count.astype(jnp.float32)
        bc1, bc2_sqrt = 1 - b1**t, jnp.sqrt(1 - b2**t)
        updates = jax.tree_util.tree_map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu_max)
        return updates, AmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def make_dynamics_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """AMSGrad (weight decay 0 in the reference) with PyTorch-style ReduceLROnPlateau.

    PyTorch reduces once more than ``patience`` epochs show no improvement;
    optax's counter reduces on reaching its patience, hence ``patience + 1``.
    The plateau logic averages the loss over ``steps_per_epoch`` updates, i.e.
    it acts once per epoch on the epoch's mean training loss.
    """
    parts = [scale_by_amsgrad_torch(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts += [
        optax.scale(-cfg.lr),
        optax.contrib.reduce_on_plateau(
            factor=cfg.plateau_factor,
            patience=cfg.patience + 1,
            rtol=cfg.plateau_rtol,
            accumulation_size=steps_per_epoch,
            min_scale=cfg.min_lr / cfg.lr,
        ),
    ]
    return optax.chain(*parts)


def plateau_scale(opt_state) -> jax.Array:
    return opt_state[-1].scale


def make_batches(key, n: int, batch_size: int):
    """A shuffled epoch as (steps, batch) indices and a mask; the last batch is padded."""
    steps = math.ceil(n / batch_size)
    perm = jr.permutation(key, n)
    pad = steps * batch_size - n
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, batch_size)
    mask = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, batch_size)
    return idx, mask


def make_train_step(loss_fn: Callable, optimizer) -> Callable:
    """``step(params, opt_state, batch, mask) -> (params, opt_state, metrics)``.

    ``loss_fn(params, batch, mask) -> (loss, aux)``; metrics hold the loss, its
    auxiliary terms and the gradient norm.
    """

    def step(params, opt_state, batch, mask):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return step


def make_epoch_fn(step: Callable, n: int, batch_size: int, batch_fn: Callable | None = None) -> Callable:
    """``epoch(params, opt_state, rows, consts, key, epoch_index) -> (params, opt_state, metrics)``.

    ``rows`` holds one entry per configuration (gathered per minibatch);
    ``consts`` is passed to every step unchanged. The step sees
    ``(batch, consts)``. ``batch_fn(batch, step_key)`` turns gathered rows into
    loss inputs (online labelling draws sites and computes forces there); the
    step key is the member key folded with the global step counter.
    """
    steps = math.ceil(n / batch_size)

    def epoch(params, opt_state, rows, consts, key, epoch_index):
        idx, mask = make_batches(jr.fold_in(key, epoch_index), n, batch_size)
        step_base = jr.fold_in(key, 2**31 - 1)  # a stream apart from the shuffles

        def body(carry, inp):
            params, opt_state = carry
            i, idx_b, mask_b = inp
            batch = jax.tree_util.tree_map(lambda a: a[idx_b], rows)
            if batch_fn is not None:
                batch = batch_fn(batch, jr.fold_in(step_base, epoch_index * steps + i))
            params, opt_state, metrics = step(params, opt_state, (batch, consts), mask_b)
            return (params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (jnp.arange(steps), idx, mask))
        return params, opt_state, jax.tree_util.tree_map(jnp.mean, metrics)

    return epoch


def dynamics_loss_fn(sample_loss: Callable, static) -> Callable:
    """``(params, (samples, stats), mask) -> (loss, {})`` for a latent net split as (params, static)."""

    def loss_fn(params, batch, mask):
        samples, stats = batch
        field = NormalisedField(eqx.combine(params, static), *stats)
        return losses.batch_loss(sample_loss, field, samples, mask), {}

    return loss_fn


def train_ensemble(
    nets,
    sample_loss: Callable,
    samples,
    stats,
    *,
    cfg,
    keys,
    per_member_data: bool,
    batch_fn: Callable | None = None,
    log_prefix: str = "",
    resume_path: str | None = None,
    resume_expect: dict | None = None,
    monitor: Callable | None = None,
    select: Callable | None = None,
):
    """Trains a batch of latent nets (leading member axis) in one vmap.

    With ``resume_path`` and ``cfg.checkpoint_every > 0`` the state (params,
    optimiser, history, epoch) is saved there every ``checkpoint_every``
    epochs, and a later call finding the file (with metadata ``resume_expect``)
    continues from it; epochs are deterministic in (key, epoch), so a resumed
    run equals an uninterrupted one. The file is left for the caller to delete.

    ``samples``: per-configuration loss inputs (leading member axis if
    ``per_member_data``); ``stats``: the normalisation tuple, per member
    likewise. Returns the trained nets and a history dict (per epoch, per
    member: loss, grad norm, learning rate). Raises ``FloatingPointError`` on
    a non-finite loss.

    ``monitor(params) -> {name: (members,)}`` (``params``: the nets' array
    leaves, leading member axis), with ``cfg.monitor_every > 0``, is called
    outside the jitted epoch on the initial parameters and after every
    ``monitor_every``-th and the last epoch; the history then also holds
    ``monitor/epoch`` (epochs completed, (M,)) and ``monitor/<name>`` (M,
    members). It reads the parameters only, so the trained numbers are those
    of an unmonitored run. When resuming, the monitored values up to the
    resume point are read from ``resume_path + ".monitor.npz"`` (written with
    each checkpoint, also left for the caller to delete); if that file is
    missing (the interrupted run was not monitored) they are dropped and the
    curves start at the resume point.

    ``select(params) -> (members,)`` (a held-out loss), with
    ``cfg.select_every > 0``, is called outside the jitted epoch after every
    ``select_every``-th and the last epoch; each member's parameters at its
    lowest score are returned (model selection; early stopping without
    stopping), and the history holds ``select/epoch`` (M,), ``select/score``
    (M, members) and ``select/best_epoch`` (members,). The best parameters and
    scores are part of the checkpoint, so a resumed run selects the same.
    """
    params, static = eqx.partition(nets, eqx.is_array)
    params = jax.tree_util.tree_map(jnp.copy, params)  # the loop donates its buffers, not the caller's
    n = jax.tree_util.tree_leaves(samples)[0].shape[1 if per_member_data else 0]
    steps = math.ceil(n / cfg.batch_size)
    optimizer = make_dynamics_optimizer(cfg, steps)
    opt_state = jax.vmap(optimizer.init)(params)

    step = make_train_step(dynamics_loss_fn(sample_loss, static), optimizer)
    epoch = make_epoch_fn(step, n, cfg.batch_size, batch_fn)
    data_axis = 0 if per_member_data else None
    epoch_v = jax.jit(jax.vmap(epoch, in_axes=(0, 0, data_axis, 0, 0, None)), donate_argnums=(0, 1))

    names = ("loss", "grad_norm", "lr")
    history = {k: [] for k in names}
    every = int(cfg.get("checkpoint_every", 0) or 0) if resume_path else 0
    select_every = int(cfg.get("select_every", 0) or 0) if select is not None else 0
    n_members = jax.tree_util.tree_leaves(params)[0].shape[0]
    # selection epochs -> their row; the selection's state: each member's best parameters, score and epoch
    # (epoch -1: none yet) and every score so far
    ticks = [t for t in range(1, cfg.epochs + 1) if select_every and (t % select_every == 0 or t == cfg.epochs)]
    tick_row = {t: row for row, t in enumerate(ticks)}
    best = ({"params": jax.tree_util.tree_map(jnp.copy, params), "score": jnp.full((n_members,), jnp.inf, jnp.float64),
             "epoch": jnp.full((n_members,), -1, jnp.int32),
             "scores": jnp.full((len(ticks), n_members), jnp.nan, jnp.float64)} if select_every else None)
    first = 0
    if every and os.path.exists(resume_path):
        params, opt_state, first, history, best = _load_resume(resume_path, params, opt_state, names, (n_members,),
                                                               cfg.epochs, resume_expect, log_prefix, best)
    monitor_every = int(cfg.get("monitor_every", 0) or 0) if monitor is not None else 0
    monitor_path = f"{resume_path}.monitor.npz" if resume_path else None
    monitored: dict[str, list] = {}

    def record(epochs_done: int) -> None:
        values = monitor(params)
        monitored.setdefault("epoch", []).append(epochs_done)
        for name, v in values.items():
            monitored.setdefault(name, []).append(np.asarray(v, np.float64))

    if monitor_every:
        if first == 0:
            record(0)
        else:
            monitored = _load_monitored(monitor_path, first, resume_expect, log_prefix)
    start = time.perf_counter()
    for e in range(first, cfg.epochs):
        params, opt_state, metrics = epoch_v(params, opt_state, samples, stats, keys, e)
        loss = np.asarray(metrics["loss"])
        if not np.all(np.isfinite(loss)):
            bad = np.flatnonzero(~np.isfinite(loss)).tolist()
            raise FloatingPointError(
                f"{log_prefix}non-finite training loss at epoch {e} for members {bad}; "
                f"lower train.lr (now {cfg.lr}) or check the labels"
            )
        history["loss"].append(loss)
        history["grad_norm"].append(np.asarray(metrics["grad_norm"]))
        history["lr"].append(np.asarray(plateau_scale(opt_state)) * cfg.lr)
        if cfg.log_every and (e % cfg.log_every == 0 or e == cfg.epochs - 1):
            logging.info(
                "%sepoch %d/%d loss %s lr %.2e (%.1fs)", log_prefix, e + 1, cfg.epochs,
                np.array2string(loss, precision=3), history["lr"][-1].max(), time.perf_counter() - start,
            )
        if monitor_every and ((e + 1) % monitor_every == 0 or e + 1 == cfg.epochs):
            record(e + 1)
        if e + 1 in tick_row:
            best = _select(best, params, select(params), tick_row[e + 1], e + 1)
        if every and (e + 1) % every == 0 and e + 1 < cfg.epochs:
            if monitor_every:  # first: a crash between the two files leaves it ahead, never behind
                checkpoint.save_arrays(monitor_path, {k: np.stack(v) for k, v in monitored.items()},
                                       resume_expect or {})
            _save_resume(resume_path, params, opt_state, history, cfg.epochs, resume_expect, best)
    history = {k: np.stack(v) for k, v in history.items()}
    history.update({f"monitor/{k}": np.stack(v) for k, v in monitored.items()})
    if select_every:
        history.update({"select/epoch": np.asarray(ticks), "select/score": np.asarray(best["scores"]),
                        "select/best_epoch": np.asarray(best["epoch"])})
        params = best["params"]
    return eqx.combine(params, static), history


def _select(best: dict, params, score, row: int, epochs_done: int) -> dict:
    """``best`` with the members whose ``score`` (after ``epochs_done`` epochs,
    the selection's ``row``-th) is below their best so far taking ``params``."""
    score = jnp.asarray(score, jnp.float64)
    if not bool(jnp.all(jnp.isfinite(score))):
        raise FloatingPointError(f"non-finite held-out score {np.asarray(score)} after epoch {epochs_done}")
    better = score < best["score"]

    def pick(new, old):
        return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return {"params": jax.tree_util.tree_map(pick, params, best["params"]),
            "score": jnp.where(better, score, best["score"]),
            "epoch": jnp.where(better, epochs_done, best["epoch"]),
            "scores": best["scores"].at[row].set(score)}


def _save_resume(path: str, params, opt_state, history: dict[str, list], total_epochs: int,
                 expect: dict | None, best: dict | None = None) -> None:
    """Training state after ``len(history[...])`` epochs: params, optimiser state,
    the epoch count, the history padded to ``total_epochs`` (fixed shapes, so
    ``_load_resume`` can build the skeleton before reading) and, when
    selecting, the selection's state ``best``."""
    done = len(next(iter(history.values())))
    padded = {k: np.concatenate([np.stack(v), np.zeros((total_epochs - done, *np.shape(v[0])))])
              for k, v in history.items()}
    state = {"params": params, "opt_state": opt_state, "epoch": jnp.asarray(done, jnp.int32),
             "history": {k: jnp.asarray(v, jnp.float64) for k, v in padded.items()}}
    if best is not None:
        state["best"] = best
    checkpoint.save_model(path, state, expect or {})


def _load_resume(path: str, params, opt_state, names, shape: tuple, total_epochs: int, expect: dict | None,
                 log_prefix: str, best: dict | None = None):
    """(params, opt_state, epochs done, history lists, best) saved by
    ``_save_resume``; ``params``, ``opt_state`` and ``best`` (None when not
    selecting) give the structure, ``shape`` a history entry's. Raises
    ``checkpoint.DataFileError`` if the file is from other settings."""
    skeleton = {"params": params, "opt_state": opt_state, "epoch": jnp.zeros((), jnp.int32),
                "history": {k: jnp.zeros((total_epochs, *shape), jnp.float64) for k in names}}
    if best is not None:
        skeleton["best"] = best
    state = checkpoint.load_model(path, skeleton, expect=expect)
    first = int(state["epoch"])
    history = {k: list(np.asarray(state["history"][k][:first])) for k in names}
    logging.info("%sresuming at epoch %d/%d from %s", log_prefix, first + 1, total_epochs, path)
    return state["params"], state["opt_state"], first, history, state.get("best")


def _load_monitored(path: str, first: int, expect: dict | None, log_prefix: str) -> dict[str, list]:
    """Monitored values saved with a checkpoint, up to epoch ``first``; empty
    (with a warning) if the file is missing or from other settings."""
    if not os.path.exists(path):
        logging.warning("%sno monitored history at %s: curves start at epoch %d", log_prefix, path, first)
        return {}
    try:
        arrays, _ = checkpoint.load_arrays(path, expect=expect)
    except checkpoint.DataFileError as e:
        logging.warning("%smonitored history dropped (%s)", log_prefix, e)
        return {}
    keep = arrays["epoch"] <= first
    return {k: list(v[keep]) for k, v in arrays.items()}


# ---------------------------------------------------------------- autoencoder


def make_autoencoder_optimizer(cfg) -> optax.GradientTransformation:
    """PyTorch Adam with (coupled) L2 weight decay, as in the reference AE scripts."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2),
        optax.scale(-cfg.lr),
    )


def train_autoencoder(ae, xs, cfg, key, log_prefix: str = "autoencoder: ", n: int | None = None,
                      resume_path: str | None = None, resume_expect: dict | None = None):
    """Trains the AE on the first ``n`` (default all) configurations of ``xs``;
    returns (ae, history).

    ``xs`` is an array (n, N), one jitted scan per epoch, or a ``BlockPool``
    larger than memory: then each minibatch is gathered from the memory map
    and fed to the same jitted step (the same shuffles and batches).

    With ``resume_path`` and ``cfg.checkpoint_every > 0`` the state is saved
    there every ``checkpoint_every`` epochs and a later call continues from it
    (as ``train_ensemble``; epochs are deterministic in (key, epoch), so the
    result equals an uninterrupted run). The file is left for the caller.
    """
    cond_rows = None
    if cfg.cond_rows == "closure":
        cond_rows = list(range(ae.n_observables, ae.latent_dim))
    loss_fn_ae = losses.make_autoencoder_loss(cfg.lambda_cond, cond_rows, cfg.jacobian)
    params, static = eqx.partition(ae, eqx.is_array)
    params = jax.tree_util.tree_map(jnp.copy, params)  # the loop donates its buffers, not the caller's
    optimizer = make_autoencoder_optimizer(cfg)
    opt_state = optimizer.init(params)
    n = int(xs.shape[0]) if n is None else n

    def loss_fn(params, batch, mask):
        xb, _ = batch
        return loss_fn_ae(eqx.combine(params, static), xb, mask)

    step = make_train_step(loss_fn, optimizer)
    if isinstance(xs, pool_lib.BlockPool):
        step_jit = jax.jit(step, donate_argnums=(0, 1))

        def epoch(params, opt_state, xs, _, key, e):
            idx, mask = (np.asarray(a) for a in make_batches(jr.fold_in(key, e), n, cfg.batch_size))
            metrics = []
            for idx_b, mask_b in zip(idx, mask):
                params, opt_state, m = step_jit(params, opt_state, (jnp.asarray(xs.take(idx_b)), None), mask_b)
                metrics.append(m)
            return params, opt_state, jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v)), *metrics)
    else:
        epoch = jax.jit(make_epoch_fn(step, n, cfg.batch_size), donate_argnums=(0, 1))
        xs = xs[:n]
    history = {"loss": [], "rec": [], "cond": [], "epoch_seconds": []}  # each epoch's wall time
    every = int(cfg.get("checkpoint_every", 0) or 0) if resume_path else 0
    first = 0
    if every and os.path.exists(resume_path):
        params, opt_state, first, history, _ = _load_resume(resume_path, params, opt_state, tuple(history), (),
                                                            cfg.epochs, resume_expect, log_prefix)
    start = time.perf_counter()
    for e in range(first, cfg.epochs):
        epoch_start = time.perf_counter()
        params, opt_state, metrics = epoch(params, opt_state, xs, None, key, e)
        metrics = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"{log_prefix}non-finite loss at epoch {e}; lower autoencoder.lr "
                f"(now {cfg.lr}) or autoencoder.lambda_cond (now {cfg.lambda_cond})"
            )
        for k in ("loss", "rec", "cond"):
            history[k].append(metrics[k])
        history["epoch_seconds"].append(time.perf_counter() - epoch_start)
        logging.info("%sepoch %d/%d loss %.3e rec %.3e cond %.3e (%.1fs)", log_prefix, e + 1, cfg.epochs,
                     metrics["loss"], metrics["rec"], metrics["cond"], time.perf_counter() - start)
        if every and (e + 1) % every == 0 and e + 1 < cfg.epochs:
            _save_resume(resume_path, params, opt_state, history, cfg.epochs, resume_expect)
    return eqx.combine(params, static), {k: np.asarray(v) for k, v in history.items()}
