"""Latent structures compared at one force budget (the paper's Fig. 3).

For every model of ``config.structures.models`` and every loss of
``config.train.runs``: one ensemble (a member per seed) at
``config.train.budget``, all on the same data and autoencoder. Runs are
resumable (``experiment.cached_run``), in ``runs/<model>_<run>``.
"""

from __future__ import annotations

import copy

import numpy as np

from macro_jax import experiment, plotting
from macro_jax.config import run_option

# Per-member test errors of the authors' LJ-800 ensembles (structures.txt),
# keyed by model and loss name; means: MLP 2.60e-2 / 1.34e-3, OnsagerNet
# 4.45e-3 / 1.17e-3, GFINN 1.28e-2 / 2.84e-3 (L_z / L_x,p with p = 1/16).
REFERENCE = {
    "mlp": {
        "L_z": [.014341, .035337, .023823, .022134, .032921, .036806, .022252, .017396, .011556, .043743],
        "L_x,p": [.0019197, .0009307, .0012351, .0014714, .0012427, .0010901, .0012359, .0013667, .0013924, .0015340],
    },
    "onsagernet": {
        "L_z": [.0068787, .0030684, .0087532, .0028218, .0028144, .0061323, .0043423, .0044335, .0023995, .0028113],
        "L_x,p": [.0009684, .0012205, .0012092, .0013287, .0011760, .0009255, .0009601, .0011382, .0015082, .0013105],
    },
    "gfinn": {
        "L_z": [.019395, .011678, .006512, .029304, .002891, .016795, .015166, .011020, .005415, .010142],
        "L_x,p": [.0032878, .0015936, .0016743, .0014382, .0033848, .0030426, .0035435, .0037095, .0044970, .0022741],
    },
}
MODEL_NAMES = {"mlp": "MLP", "onsagernet": "OnsagerNet", "gfinn": "GFINN"}


def model_config(config, model: str):
    c = copy.deepcopy(config)
    c.model.name = model
    return c


def run_structures(config, workdir: str) -> list[dict]:
    """Every (model, loss) result, each with ``model`` and ``initial`` (the MD
    runs' start, ``system.params.initial``) fields."""
    get_prep = experiment.memo_prepare(config, workdir)
    results = []
    for model in config.structures.models:
        for spec in config.train.runs:
            result = experiment.cached_run(model_config(config, model), spec, config.train.budget, workdir,
                                           get_prep, tag=model)
            results.append(dict(result, model=model, initial=config.system.params.get("initial", "fire")))
    return results


def rows(results: list[dict]) -> list[dict]:
    """One object per (model, loss, member), as committed in docs/results/."""
    return [
        {"model": r["model"], "loss": r["loss"], "run": r["run"], "label": experiment.run_label(r), "p": r["p"],
         "member": i, "seed": seed, "test_error": err,
         "budget": r["budget"], "n_configs": r["n_configs"], "n_force_computations": r["n_force_computations"],
         "epochs": r["settings"]["train"]["epochs"], "initial": r.get("initial", "fire")}
        for r in results for i, (seed, err) in enumerate(zip(r["seeds"], r["test_errors"]))
    ]


def _reference(r: dict):
    """The reference's per-member errors for a result of the LJ-800 protocol (800
    atoms, 1e6 atom forces, 50-atom subsets, no option of ours), else None."""
    if r["budget"] != 1_000_000 or r["sites_per_config"] not in (800, 50) or run_option(r["run"]):
        return None
    return REFERENCE.get(r["model"], {}).get(r["loss"])


def table(results: list[dict]) -> str:
    lines = ["| latent model | loss | configurations x atoms | ours: mean ± std (members) | reference: mean ± std "
             "| ours / reference |", "|---|---|---|---|---|---|"]
    for r in results:
        ref = _reference(r)
        label = experiment.run_label(r)
        ref_text = f"{np.mean(ref):.2e} ± {np.std(ref):.1e}" if ref else "–"
        ratio = f"{r['test_error_mean'] / np.mean(ref):.2f}" if ref else "–"
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {label} | {r['n_configs']:,} x "
                     f"{r['sites_per_config']} | {r['test_error_mean']:.2e} ± {r['test_error_std']:.1e} "
                     f"({len(r['test_errors'])}) | {ref_text} | {ratio} |")
    return "\n".join(lines)


def boxplot(results: list[dict], path: str) -> None:
    """Per-member errors, ours next to the reference's, log scale."""
    plt = plotting.pyplot()

    data, labels, colors = [], [], []
    for r in results:
        name = f"{MODEL_NAMES.get(r['model'], r['model'])}\n{experiment.run_label(r)}"
        data.append(r["test_errors"])
        labels.append(f"{name}\nours")
        colors.append("tab:blue" if r["loss"] == "L_x,p" else "tab:orange")
        ref = _reference(r)
        if ref:
            data.append(ref)
            labels.append(f"{name}\nreference")
            colors.append("lightgrey")
    fig, ax = plt.subplots(figsize=(1.3 * len(data) + 1.5, 4.4))
    box = ax.boxplot(data, patch_artist=True, widths=0.6)
    for patch, color in zip(box["boxes"], colors):
        patch.set_facecolor(color)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative test error of T (true trajectories)")
    ax.set_title("LJ-800: L_z (orange) vs L_x,p (blue) at 1e6 atom forces; grey = reference")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
