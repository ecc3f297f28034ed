"""Fig. 4 from the per-size sweep files of configs/lj_scaling.py.

  python experiments/fig4.py --inputs 'docs/results/lj_scaling_*.json' --out docs/results/fig4.json
Writes the JSON rows (n_atoms, loss, forces_to_etol, seconds_to_etol, ...),
fig4.png and fig4.md beside --out.
"""

import glob
import json

from absl import app, flags

from macro_jax import experiment, scaling, sweep

_INPUTS = flags.DEFINE_string("inputs", None, "Glob of per-size sweep JSON files (experiments/sweep.py --out).")
_OUT = flags.DEFINE_string("out", None, "JSON output; a .png and .md are written beside it.")
_ETOL = flags.DEFINE_float("e_tol", sweep.E_TOL, "Target mean relative test error.")
flags.mark_flags_as_required(["inputs", "out"])


def main(argv):
    del argv
    paths = sorted(glob.glob(_INPUTS.value))
    if not paths:
        raise app.UsageError(f"--inputs={_INPUTS.value!r} matches no file")
    per_size = []
    for path in paths:
        with open(path) as f:
            per_size.append(json.load(f))
    rows = scaling.collect(per_size, _ETOL.value)
    experiment.report(rows, _OUT.value, scaling.table, lambda rs: rs, scaling.plot)


if __name__ == "__main__":
    app.run(main)
