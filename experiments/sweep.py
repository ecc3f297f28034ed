"""Error versus force budget over config.sweep.budgets x config.sweep.runs.

  python experiments/sweep.py --config configs/predator_prey.py --workdir workdirs/pp_sweep \
      --out docs/results/predator_prey.json
Resumable: finished runs in --workdir are reused, so the grid can be split
over processes (--config.sweep.runs=...) and collected by a last full call.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory shared by every run of the sweep.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the per-seed rows; a .png and .md are written beside it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    results = sweep.run_sweep(config, _WORKDIR.value)
    experiment.report(results, _OUT.value, lambda rs: sweep.table(rs, config.system.name), sweep.rows,
                      lambda rs, path: sweep.plot(rs, config.system.name, path))


if __name__ == "__main__":
    app.run(main)
