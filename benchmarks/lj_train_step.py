"""LJ-800 training step: offline L_x,p (labels precomputed) vs online L_x,p
(the jitted step draws 50 atoms per configuration, computes their forces with
the subset calculator and builds the loss inputs), and L_z for scale.

The reference's LJ-800 ensemble: 10 members trained together (one vmap),
OnsagerNet [256 x 3] or MLP [256 x 2], d = 32, batch 512 (L_x,p) / 256
(L_z), encoder 4800 -> 64 -> 64 -> 31. Weights are random (timing does not
depend on training). Configurations come from a short NVE run of the
reference protocol. Each row: median seconds per training step over the
steps of a timed epoch (warm-up epoch first, block_until_ready), compile time
separately; the online row also reports the subset-force seconds per step
timed alone.

  python benchmarks/lj_train_step.py --out benchmarks/results/lj_train_step_cpu.json
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402

import macro_jax  # noqa: E402,F401
from benchmarks import common  # noqa: E402
from configs import lj800  # noqa: E402
from macro_jax import data, losses, train  # noqa: E402
from macro_jax.models import Autoencoder, make_latent_model  # noqa: E402
from macro_jax.systems import md  # noqa: E402
from macro_jax.systems.particles import make_particle_calculator  # noqa: E402

_OUT = flags.DEFINE_string("out", "benchmarks/results/lj_train_step_cpu.json", "JSON output.")
_MODELS = flags.DEFINE_list("models", ["onsagernet", "mlp"], "Latent models to time.")
_MEMBERS = flags.DEFINE_integer("members", 10, "Ensemble members trained in one vmap.")
_STEPS = flags.DEFINE_integer("steps", 4, "Training steps per timed epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed epochs per measurement.")


def _epoch_seconds(config, model, sample_loss, rows, stats, n, batch_size, batch_fn, per_member):
    members = _MEMBERS.value
    nets = eqx.filter_vmap(lambda k: make_latent_model(ml_collections.ConfigDict(
        dict(config.model, name=model)), 32, key=k))(jr.split(jr.PRNGKey(0), members))
    params, static = eqx.partition(nets, eqx.is_array)
    cfg = ml_collections.ConfigDict(dict(config.train, batch_size=batch_size))
    optimizer = train.make_dynamics_optimizer(cfg, math.ceil(n / batch_size))
    opt_state = jax.vmap(optimizer.init)(params)
    step = train.make_train_step(train.dynamics_loss_fn(sample_loss, static), optimizer)
    epoch = train.make_epoch_fn(step, n, batch_size, batch_fn)
    epoch_v = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0 if per_member else None, None, 0, None)))
    keys = jr.split(jr.PRNGKey(1), members)
    compiled, compile_s = common.compile_seconds(epoch_v, params, opt_state, rows, stats, keys, 0)
    compiled(params, opt_state, rows, stats, keys, 0)  # warm-up
    median, _ = common.time_call(lambda: compiled(params, opt_state, rows, stats, keys, 1), repeats=_REPEATS.value)
    return median / math.ceil(n / batch_size), compile_s


def main(argv):
    del argv
    config = lj800.get_config()
    p = config.system.params
    calc = make_particle_calculator(p.n_atoms, p.box_size, pair_fn=p.pair_fn, cutoff=p.cutoff,
                                    temperature_scale=p.temperature_scale)
    system = calc.system
    k, batch_xp, batch_z = 50, 512, 256
    n_xp, n_z = batch_xp * _STEPS.value, batch_z * _STEPS.value
    n_runs = math.ceil(n_xp / 250)
    traj = md.make_lj_dataset(calc, jr.PRNGKey(0), n_runs, dtype=jnp.float32).trajectories
    xs = traj.xs.reshape(-1, system.n_dof)[:n_xp]
    ae = Autoencoder(system.n_dof, 1, 31, (64, 64), "softplus", system.observable_fn, decoder_uses_observables=False, bias_init="zeros",
                     key=jr.PRNGKey(2))
    z_mean, z_std = data.latent_statistics(ae, xs)
    method = "linear_first_layer"

    sites = data.draw_sites(system, jr.PRNGKey(3), n_xp, k)
    f_sub, account = data.label_subset(system, xs, sites, chunk=256)
    s_xp = data.precompute(ae, method, system, "xp", xs, f_sub, sites)
    stats = (z_mean, z_std, *data.rate_statistics("xp", s_xp))
    f_full, _ = data.label_full(system, xs[:n_z], chunk=256)
    s_z = data.precompute(ae, method, system, "z", xs[:n_z], f_full)
    stats_z = (z_mean, z_std, *data.rate_statistics("z", s_z))
    members = _MEMBERS.value
    forces_per_step = account.seconds / n_xp * batch_xp * members  # each member draws its own atoms
    loss_xp = losses.per_sample_loss("xp", system.n_sites / k)
    device = common.device_description()
    rows = []
    for model in _MODELS.value:
        # offline: per-member label arrays (the independent-subsets layout, the heavier
        # gather; with train.shared_subsets the members read one shared array)
        s_members = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (members, *a.shape)), s_xp)
        cases = [
            ("offline_xp", loss_xp, s_members, stats, n_xp, batch_xp, None, True),
            ("online_xp", loss_xp, xs, stats, n_xp, batch_xp,
             data.make_online_batch_fn(system, ae, method, k), False),
            ("offline_z", losses.loss_z, s_z, stats_z, n_z, batch_z, None, False),
        ]
        for mode, *args in cases:
            step_s, compile_s = _epoch_seconds(config, model, *args)
            row = {"model": model, "mode": mode, "members": members, "batch_size": args[4],
                   "median_step_s": step_s, "compile_s": compile_s, "device": device}
            if mode == "online_xp":
                row["subset_force_s_per_step"] = forces_per_step
            rows.append(row)
            print({key: (round(v, 5) if isinstance(v, float) else v) for key, v in row.items()})
    common.write_rows(_OUT.value, rows)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
