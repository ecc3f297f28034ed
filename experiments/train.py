"""Train and evaluate every loss of a config at its force budget.

  python experiments/train.py --config configs/predator_prey.py:quick --workdir workdirs/pp_quick
"""

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.info("config:\n%s", _CONFIG.value)
    results = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(experiment.format_table(results))
    print(f"\nresults, rollout.png and checkpoints are in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
