"""Error versus force budget over config.sweep.budgets x config.sweep.runs.

  python experiments/sweep.py --config configs/predator_prey.py --workdir workdirs/pp_sweep \
      --out docs/results/predator_prey.json
Resumable: finished runs in --workdir are reused, so the grid can be split
over processes (--config.sweep.runs=...) and collected by a last full call.
--out also exports every run's result and the workdir's autoencoder to
<stem>_runs/; in a fresh workdir (a new machine or session) --resume_from
<stem>_runs installs that autoencoder and reuses the runs. The same config
and seed need not rebuild the same autoencoder on another machine, so a
workdir that already has its own keeps it, and runs trained on another
encoder are refused (checked by its SHA-256). Several folders: comma-separated.
Repeats over data draws on the same data and autoencoder, in the same workdir:
--config.train.draw_configs=random --config.train.draw_seed=S (one --out per S).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory shared by every run of the sweep.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the per-seed rows; a .png and .md are written beside it, "
                           "and every run's result and the autoencoder to <stem>_runs/ (what --resume_from reads).")
_RESUME = flags.DEFINE_list("resume_from", None, "Folders (comma-separated) of run results a sweep's --out exported "
                            "(<stem>_runs/): copied into --workdir first (their autoencoder too, where the workdir has "
                            "none), reused if their settings, autoencoder and data match.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    if _RESUME.value:
        logging.info("copied from %s: %s", ", ".join(_RESUME.value), sweep.import_runs(_RESUME.value, _WORKDIR.value))
    results = sweep.run_sweep(config, _WORKDIR.value)
    experiment.report(results, _OUT.value, lambda rs: sweep.table(rs, config.system.name), sweep.rows,
                      lambda rs, path: sweep.plot(rs, config.system.name, path))
    if _OUT.value:
        sweep.export_runs(results, os.path.splitext(_OUT.value)[0] + "_runs", workdir=_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
