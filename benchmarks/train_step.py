"""How fast is one training epoch and one rollout set, against the authors' PyTorch?

Predator-Prey, OnsagerNet (reference variant), batch 256:
  * one epoch of L_x,p (p = 1/5) on 15,000 configurations,
  * one epoch of L_z on 3,000 configurations,
  * the RK4 rollout of 100 test trajectories over 3,000 steps.
Compile time is reported separately. Same-run baseline: the same jitted step
driven from a Python loop over minibatches (a direct port of the PyTorch
training loop) instead of our one-scan-per-epoch. The authors' PyTorch
numbers, measured on the same kind of 2-core CPU, are carried as constants.

  python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.json
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
from macro_jax import data, eval as evaluation, losses, train  # noqa: E402
from macro_jax.models import Autoencoder, OnsagerNet  # noqa: E402
from macro_jax.systems import make_predator_prey  # noqa: E402

PYTORCH = {"epoch_lxp": 0.70, "epoch_lz": 0.175, "rollout": 30.0}  # seconds, authors' code, 2-core CPU

_OUT = flags.DEFINE_string("out", "benchmarks/results/train_step_cpu.json", "JSON output.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Shrink every size by this factor (for a functional check).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement.")


def _train_cfg():
    return ml_collections.ConfigDict(dict(batch_size=256, lr=5e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                          patience=100, plateau_factor=0.5, plateau_rtol=1e-4, min_lr=5e-6))


def _epoch_rows(name, sample_loss, samples, stats, n, repeats):
    net = OnsagerNet(4, variant="separate", key=jr.PRNGKey(0))
    params, static = eqx.partition(net, eqx.is_array)
    cfg = _train_cfg()
    steps = math.ceil(n / cfg.batch_size)
    optimizer = train.make_dynamics_optimizer(cfg, steps)
    step = train.make_train_step(train.dynamics_loss_fn(sample_loss, static), optimizer)
    opt_state = optimizer.init(params)
    key = jr.PRNGKey(1)

    # ours: one jitted scan per epoch
    epoch = jax.jit(train.make_epoch_fn(step, n, cfg.batch_size))
    compiled, compile_s = common.compile_seconds(epoch, params, opt_state, samples, stats, key, 0)
    compiled(params, opt_state, samples, stats, key, 0)  # warm-up
    median, times = common.time_call(lambda: compiled(params, opt_state, samples, stats, key, 1), repeats=repeats)

    # baseline: the same step, one Python call per minibatch
    @jax.jit
    def step_at(params, opt_state, idx, mask):
        batch = jax.tree_util.tree_map(lambda a: a[idx], samples)
        return step(params, opt_state, (batch, stats), mask)

    def loop_epoch():
        p, s = params, opt_state
        idx, mask = train.make_batches(key, n, cfg.batch_size)
        for i in range(steps):
            p, s, _ = step_at(p, s, idx[i], mask[i])
        return p

    loop_epoch()
    base_median, _ = common.time_call(loop_epoch, repeats=repeats)

    # members trained together: per-member cost inside a 3-member vmap
    nets = eqx.filter_vmap(lambda k: OnsagerNet(4, variant="separate", key=k))(jr.split(jr.PRNGKey(2), 3))
    vparams, _ = eqx.partition(nets, eqx.is_array)
    vstate = jax.vmap(optimizer.init)(vparams)
    vepoch = jax.jit(jax.vmap(train.make_epoch_fn(step, n, cfg.batch_size), in_axes=(0, 0, None, None, 0, None)))
    vkeys = jr.split(key, 3)
    vepoch(vparams, vstate, samples, stats, vkeys, 0)
    v_median, _ = common.time_call(lambda: vepoch(vparams, vstate, samples, stats, vkeys, 1), repeats=repeats)
    return {
        "benchmark": name, "n_configs": n, "batch_size": cfg.batch_size, "steps_per_epoch": steps,
        "compile_s": compile_s, "median_s": median, "times_s": times,
        "baseline": "python_loop_over_jitted_step", "baseline_median_s": base_median,
        "speedup_vs_baseline": base_median / median,
        "ensemble3_median_s": v_median, "ensemble3_per_member_s": v_median / 3,
        "reference_pytorch_s": PYTORCH[name] if _SCALE.value == 1.0 else None,
        "speedup_vs_pytorch": PYTORCH[name] / median if _SCALE.value == 1.0 else None,
    }


def main(argv):
    del argv
    scale, repeats = _SCALE.value, _REPEATS.value
    system = make_predator_prey()
    ae = Autoencoder(system.n_dof, 2, 2, (32, 32), "softplus", system.observable_fn,
                     decoder_uses_observables=True, bias_init="torch", key=jr.PRNGKey(0))
    n_lxp, n_lz = int(15_000 * scale), int(3_000 * scale)
    traj = system.trajectory_fn(jr.PRNGKey(1), math.ceil(n_lxp / 300))
    xs = traj.xs.reshape(-1, system.n_dof)[:n_lxp]
    z_mean, z_std = data.latent_statistics(ae, xs)
    rows = []

    sites = data.draw_sites(system, jr.PRNGKey(2), n_lxp, 20)
    f_sub, _ = data.label_subset(system, xs, sites)
    s_xp = data.precompute(ae, "linear_first_layer", system, "xp", xs, f_sub, sites)
    stats = (z_mean, z_std, *data.rate_statistics("xp", s_xp))
    rows.append(_epoch_rows("epoch_lxp", losses.per_sample_loss("xp", 5.0), s_xp, stats, n_lxp, repeats))

    f_full, _ = data.label_full(system, xs[:n_lz])
    s_z = data.precompute(ae, "linear_first_layer", system, "z", xs[:n_lz], f_full)
    stats = (z_mean, z_std, *data.rate_statistics("z", s_z))
    rows.append(_epoch_rows("epoch_lz", losses.loss_z, s_z, stats, n_lz, repeats))

    # rollout: 100 trajectories x 3000 RK4 steps of the latent OnsagerNet
    n_traj, n_steps = max(1, int(100 * scale)), int(3000 * scale)
    field = eqx.filter_vmap(lambda k: OnsagerNet(4, variant="separate", key=k))(jr.split(jr.PRNGKey(3), 1))
    params, static = eqx.partition(field, eqx.is_array)
    z0s = jax.vmap(ae.encode)(xs[: n_traj * 300 : 300][:n_traj])
    member = evaluation.make_member_rollout(static, z0s, 0.01, n_steps, 1)
    one = jax.tree_util.tree_map(lambda a: a[0], params)
    stats1 = (z_mean, z_std, stats[2], stats[3])
    rollout = jax.jit(member)
    compiled, compile_s = common.compile_seconds(rollout, one, stats1)
    compiled(one, stats1)
    median, times = common.time_call(lambda: compiled(one, stats1), repeats=max(3, repeats // 2))
    rows.append({
        "benchmark": "rollout", "n_trajectories": n_traj, "n_steps": n_steps, "compile_s": compile_s,
        "median_s": median, "times_s": times,
        "reference_pytorch_s": PYTORCH["rollout"] if scale == 1.0 else None,
        "speedup_vs_pytorch": PYTORCH["rollout"] / median if scale == 1.0 else None,
    })
    device = common.device_description()
    for r in rows:
        r["device"] = device
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "times_s"})
    common.write_rows(_OUT.value, rows)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
