"""Latent structures at one force budget (Fig. 3): every model of
config.structures.models x every loss of config.train.runs.

  python experiments/structures.py --config configs/lj800.py --workdir workdirs/lj800 \
      --out docs/results/lj800_structures.json
Resumable: finished runs in --workdir are reused, so models can be split over
processes (--config.structures.models=...) and collected by a last full call.
Long ensembles can train in member groups (--config.structures.group_size=g):
processes started with the same command on one workdir split the groups.
--out also writes every run's result and the workdir's autoencoder to
<stem>_runs/; in a fresh workdir --resume_from <stem>_runs installs that
autoencoder and reuses the runs (same settings, autoencoder and data files
only). --finished_only trains nothing and reports what has finished,
an ensemble with groups missing as fewer members.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from macro_jax import experiment, structures, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory shared by every run.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the per-member rows; a .png and .md are written beside it, "
                           "and every run's result and the autoencoder to <stem>_runs/ (what --resume_from reads).")
_RESUME = flags.DEFINE_list("resume_from", None, "Folders (comma-separated) of run results an earlier --out exported "
                            "(<stem>_runs/): copied into --workdir first (their autoencoder too, where the workdir has "
                            "none), reused if their settings, autoencoder and data match.")
_FINISHED_ONLY = flags.DEFINE_bool("finished_only", False, "Train nothing: report the runs and member groups that "
                                   "finished (an ensemble with groups missing shows fewer members).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.info("config:\n%s", _CONFIG.value)
    if _RESUME.value:
        logging.info("copied from %s: %s", ", ".join(_RESUME.value), sweep.import_runs(_RESUME.value, _WORKDIR.value))
    results = structures.run_structures(_CONFIG.value, _WORKDIR.value, train=not _FINISHED_ONLY.value)
    if not results:
        raise SystemExit(f"{_WORKDIR.value}: no finished runs to report (--finished_only)")
    experiment.report(results, _OUT.value, structures.table, structures.rows, structures.boxplot)
    if _OUT.value:
        runs = [run for r in results for run in r["_runs"]]
        sweep.export_runs([r for _, r in runs], os.path.splitext(_OUT.value)[0] + "_runs", [n for n, _ in runs],
                          workdir=_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
