"""Diagnostics: conditioning and training curves of a finished run, or the lambda_cond sweep.

  # cond(J J^T) over the pool and the spectrum of J for the workdir's autoencoder,
  # plus the curves of every run with monitored history -> <workdir>/diagnostics/
  python experiments/diagnostics.py --mode=run --config configs/predator_prey.py:quick \
      --workdir workdirs/predator_prey_quick
  # the same, first retraining each run with monitoring into runs/monitored_<run>:
  python experiments/diagnostics.py --mode=run --config configs/predator_prey.py:quick \
      --workdir workdirs/predator_prey_quick --config.train.monitor_every=10 --train_monitored

  # test error and cond(J J^T) for each diagnostics.lambda_values (resumable):
  python experiments/diagnostics.py --mode=lambda_sweep --config configs/predator_prey.py:quick \
      --workdir workdirs/diag_lambda --out docs/results/lambda_cond.json
  # (+ lambda_cond.png, .md, and lambda_cond_histograms.png: cond(J J^T) of every autoencoder)

  # noise of the partial labels: variance of the k-site estimate of J f vs the
  # variance of J f over configurations, and the bound on what importance sampling
  # of sites could gain (full forces on --n_configs pool rows)
  python experiments/diagnostics.py --mode=subset_noise --config configs/lj_scaling.py:800 \
      --workdir workdirs/lj800_scaling --n_configs=50
  # -> <workdir>/diagnostics/subset_noise.json

  # the members' signed error at the end of the test rollouts: how much of an
  # ensemble's error is a drift they share (from the runs' saved rollouts)
  python experiments/diagnostics.py --mode=drift --config configs/lj800.py:centred \
      --workdir workdirs/lj800_centred
  # -> <workdir>/diagnostics/drift.json
"""

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import diagnostics, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir (run) or the sweep's (lambda_sweep).")
_MODE = flags.DEFINE_enum("mode", "run", ["run", "lambda_sweep", "subset_noise", "drift"], "What to diagnose.")
_N_CONFIGS = flags.DEFINE_integer("n_configs", 50, "subset_noise: pool rows (spread evenly) to label with all forces.")
_OUT = flags.DEFINE_string("out", None, "lambda_sweep: JSON file for the rows; a .png and .md are written beside it.")
_TRAIN_MONITORED = flags.DEFINE_bool("train_monitored", False,
                                     "run: first train each run again with train.monitor_every (runs/monitored_*).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    if _MODE.value == "lambda_sweep":
        rows = diagnostics.lambda_sweep(config, _WORKDIR.value)
        experiment.report(rows, _OUT.value, diagnostics.lambda_table, lambda rs: rs, diagnostics.plot_lambda_sweep)
        if _OUT.value:
            path = os.path.splitext(_OUT.value)[0] + "_histograms.png"
            diagnostics.plot_lambda_histograms(config, _WORKDIR.value, path)
            print(f"wrote {path}")
        return
    if _MODE.value == "subset_noise":
        report = diagnostics.subset_noise_report(config, _WORKDIR.value, _N_CONFIGS.value)
        for spec, r in report["runs"].items():
            print(f"{spec}: k={r['k']}, noise/signal variance of the rate estimate: median over rows "
                  f"{r['ratio_median']:.3g}, max {r['ratio_max']:.3g}; per site coordinate (median) "
                  + ", ".join(f"{v:.3g}" for v in r["component_ratio_median"])
                  + f"; relative variance of the k-site Gram {r['gram_noise']:.3g}; |P f|^2 / |f|^2 (median) "
                  f"{r['unexplained_fraction_median']:.3g}; importance sampling (variance in L_x's metric, "
                  f"median ratio to uniform): Jacobian proposal {r['importance_ratio_jacobian_median']:.3g}, "
                  f"oracle bound {r['importance_ratio_oracle_median']:.3g}")
        print(f"wrote {_WORKDIR.value}/diagnostics/subset_noise.json")
        return
    if _MODE.value == "drift":
        report = diagnostics.drift_report(config, _WORKDIR.value)
        for key, r in report["ensembles"].items():
            for j, shared in enumerate(r["shared"]):
                signed = np.asarray(r["end_signed"])[:, j]
                print(f"{key} (observable {j}, {r['n_members']} members): end error "
                      f"{np.mean(np.asarray(r['end_abs'])[:, j]):.2%}, signed {np.mean(signed):+.2%} "
                      f"(members {np.min(signed):+.2%} ... {np.max(signed):+.2%}, {r['n_positive'][j]} above "
                      f"the truth), shared fraction {shared:.2f}")
        if report["skipped"]:
            print(f"no saved rollouts: {', '.join(report['skipped'])}")
        print(f"wrote {_WORKDIR.value}/diagnostics/drift.json")
        return
    summary = diagnostics.run_diagnostics(config, _WORKDIR.value, train_monitored=_TRAIN_MONITORED.value)
    print(json.dumps(summary["cond"], indent=1))
    print(f"runs with curves: {sorted(summary['runs']) or 'none (set train.monitor_every)'}")
    print(f"wrote {_WORKDIR.value}/diagnostics/")


if __name__ == "__main__":
    app.run(main)
