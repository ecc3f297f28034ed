"""Train and evaluate every loss of a config at its force budget.

  python experiments/train.py --config configs/predator_prey.py:quick --workdir workdirs/pp_quick
  python experiments/train.py --config configs/allen_cahn.py --workdir workdirs/allen_cahn \
      --out docs/results/allen_cahn.json   # + per-seed rows, the rollout plot and the table

With --data_only it only simulates (or checks) the data and exits: a second
process started so on the same workdir shares a block-written pool's
generation with the first (data.block_trajectories > 0). Each run writes the
wall seconds and peak memory of its stages (macro_jax/stages.py) to
workdir/stages.json (--data_only: workdir/data/stages_data_only_<pid>.json).
"""

import os
import shutil

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment, stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and results.")
_OUT = flags.DEFINE_string("out", None, "JSON file for per-seed rows; the rollout .png and table .md go beside it.")
_DATA_ONLY = flags.DEFINE_bool("data_only", False, "Only simulate (or check) the data, then exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.info("config:\n%s", _CONFIG.value)
    if _DATA_ONLY.value:
        experiment.generate_data(_CONFIG.value, _WORKDIR.value)
        # this process's share: several may generate one pool together
        path = os.path.join(_WORKDIR.value, "data", f"stages_data_only_{os.getpid()}.json")
        experiment.write_json(path, stages.records())
        print(f"data in {_WORKDIR.value}/data; this process's seconds and peak memory in {path}")
        return
    results = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    rollout = os.path.join(_WORKDIR.value, "rollout.png")
    experiment.report(results, _OUT.value, experiment.format_table, experiment.seed_rows,
                      lambda rs, path: shutil.copyfile(rollout, path))
    print(f"\nresults, rollout.png and checkpoints are in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
