"""Force-labelling seconds of an experiment's runs, measured alone.

For each entry of the config's ``train.runs`` at ``train.budget``: the run's
configurations (``experiment.config_indices``, as the run draws them) are
read from the experiment's pool chunk by chunk (``train.precompute_chunk``)
and labelled with all forces (``z``/``x``) or with the forces of k random
sites each (``xp``, the subset calculator). Only the force calls are timed
(compiled once, warmed up, ``block_until_ready``); pool reads are not.
The L_z / L_x,p rows of one config are measured in the same run, so their
ratio is the wall-clock price of the two labellings at equal force counts.

  python benchmarks/label_seconds.py --config configs/allen_cahn.py \
      --workdir workdirs/allen_cahn --out benchmarks/results/label_seconds_allen_cahn_cpu.json

The workdir must hold the experiment's data (``experiments/train.py
--data_only`` makes it).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import macro_jax  # noqa: E402,F401
from benchmarks import common  # noqa: E402
from macro_jax import data, experiment  # noqa: E402
from macro_jax import pool as pool_lib  # noqa: E402
from macro_jax.config import parse_run, run_settings  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The experiment's workdir (its data).")
_OUT = flags.DEFINE_string("out", None, "JSON output.")


def label_seconds(config, workdir: str) -> list[dict]:
    system = experiment._checked_system(config)
    pool, _ = experiment.generate_data(config, workdir)
    n_pool, chunk = pool_lib.n_configs(pool), int(config.train.precompute_chunk)
    rows = []
    for spec in config.train.runs:
        loss, _ = parse_run(spec)
        k, n = experiment.run_size(system, spec, config.train.budget, n_pool)
        indices = experiment.config_indices(config, run_settings(config, loss), n_pool, n)
        sites = data.draw_sites(system, jr.PRNGKey(0), n, k) if loss == "xp" else None
        fn = jax.jit(data.labeller(system, loss))
        seconds = 0.0
        for lo, hi in pool_lib.chunks(n, chunk):
            xs = jax.block_until_ready(pool_lib.take(pool, indices[lo:hi]))
            s = None if sites is None else sites[lo:hi]
            if lo == 0 or hi - lo != chunk:
                jax.block_until_ready(fn(xs, s))  # compile and warm up this chunk size
            start = time.perf_counter()
            jax.block_until_ready(fn(xs, s))
            seconds += time.perf_counter() - start
        n_forces = n * k
        rows.append({"config": config.system.name, "run": spec, "loss": "L_x,p" if loss == "xp" else f"L_{loss}",
                     "n_configs": n, "sites_per_config": k, "n_force_computations": n_forces,
                     "force_seconds": seconds, "ns_per_force": seconds / n_forces * 1e9,
                     "device": common.device_description()})
        print(f"{spec}: {n:,} configurations x {k:,} sites, {seconds:.3f} s ({rows[-1]['ns_per_force']:.1f} ns per force)")
    return rows


def main(argv):
    del argv
    rows = label_seconds(_CONFIG.value, _WORKDIR.value)
    if _OUT.value:
        common.write_rows(_OUT.value, rows)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
