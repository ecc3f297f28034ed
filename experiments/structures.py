"""Latent structures at one force budget (Fig. 3): every model of
config.structures.models x every loss of config.train.runs.

  python experiments/structures.py --config configs/lj800.py --workdir workdirs/lj800 \
      --out docs/results/lj800_structures.json
Resumable: finished runs in --workdir are reused, so models can be split over
processes (--config.structures.models=...) and collected by a last full call.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment, structures

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory shared by every run.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the per-member rows; a .png and .md are written beside it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.info("config:\n%s", _CONFIG.value)
    results = structures.run_structures(_CONFIG.value, _WORKDIR.value)
    experiment.report(results, _OUT.value, structures.table, structures.rows, structures.boxplot)


if __name__ == "__main__":
    app.run(main)
