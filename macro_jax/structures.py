"""Latent structures compared at one force budget (the paper's Fig. 3).

For every model of ``config.structures.models`` and every loss of
``config.train.runs``: one ensemble (a member per seed) at
``config.train.budget``, all on the same data and autoencoder. Runs are
resumable (``experiment.finished_run``), in ``runs/<model>_<run>``; with
``structures.group_size = g > 0`` an ensemble not finished as one run trains
in groups of ``g`` seeds (``runs/<model>_seeds<a>-<b>_<run>``), which
processes sharing the workdir claim one at a time, and is reported as one
ensemble once its groups are merged (``merge_groups``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import time

import numpy as np
from absl import logging

from macro_jax import experiment, plotting
from macro_jax import pool as pool_lib
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


def seed_groups(seeds, size: int) -> list[tuple[int, ...]]:
    """``seeds`` in consecutive groups of ``size`` (the last may be shorter); one group if ``size`` is 0."""
    seeds = tuple(seeds)
    return [seeds[i:i + size] for i in range(0, len(seeds), size)] if size else [seeds]


def group_tag(model: str, seeds) -> str:
    """The run-name tag of a member group: ``onsagernet_seeds3-4``."""
    return f"{model}_seeds{seeds[0]}-{seeds[-1]}"


def ensemble_run_name(run_name: str) -> str:
    """The ensemble a run directory belongs to: its name less the ``group_tag`` seeds
    (``mlp_seeds3-3_xp_p0.0625_budget1000000`` -> ``mlp_xp_p0.0625_budget1000000``)."""
    return re.sub(r"_seeds\d+-\d+", "", run_name)


def group_config(config, model: str, seeds):
    """``config`` for ``model`` with only ``seeds`` as members; shared subsets keep
    the whole ensemble's draw (``train.subset_seed``: its first seed's)."""
    c = model_config(config, model)
    c.train.seeds = tuple(seeds)
    if c.train.shared_subsets and c.train.get("subset_seed", None) is None:
        c.train.subset_seed = int(config.train.seeds[0])
    return c


def _groups(config, model: str, spec: str, workdir: str, get_prep, train: bool) -> list[tuple[str, dict]]:
    """(run name, result) of every finished group of one ensemble, in seed order,
    training the missing ones if ``train``: each is claimed first
    (``pool.claim`` on its run directory), so processes sharing ``workdir``
    split the groups; groups others hold are waited for."""
    budget = config.train.budget
    groups = [(group_config(config, model, g), group_tag(model, g))
              for g in seed_groups(config.train.seeds, config.structures.group_size)]
    found: dict[int, tuple[str, dict]] = {}
    while True:
        held = []
        for i, (c, tag) in enumerate(groups):
            if i in found:
                continue
            name = experiment.config_run_name(c, spec, budget, tag)
            result = experiment.finished_run(c, spec, budget, workdir, tag)
            if result is None and train:
                path = os.path.join(workdir, "runs", name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if not pool_lib.claim(path):
                    held.append(name)
                    continue
                try:  # cached_run reads back a group another process finished between the check and the claim
                    result = experiment.cached_run(c, spec, budget, workdir, get_prep, tag)
                finally:
                    pool_lib.release(path)
            if result is not None:
                found[i] = (name, result)
        if not held:
            return [found[i] for i in sorted(found)]
        logging.info("waiting for member groups %s (other processes)", held)
        time.sleep(experiment.POLL_SECONDS)


def merge_groups(parts: list[dict], n_planned: int) -> dict:
    """One ensemble's result from its member groups' (in seed order): members
    concatenated, mean and std over all of them, ``n_members_planned`` the
    ensemble's size (more than the members while groups are missing) and
    ``groups`` (each group's seeds, seconds and files). Groups trained on
    different autoencoder or data files are never merged (an error)."""
    for key in ("autoencoder_sha256", "data_sha256"):
        if len({json.dumps(p.get(key), sort_keys=True) for p in parts}) > 1:
            raise RuntimeError(f"member groups {[p['seeds'] for p in parts]} were trained on different {key} "
                               f"({[p.get(key) for p in parts]}); they are never merged into one ensemble")
    cat = lambda field: [v for p in parts for v in (p.get(field) or [])]
    errors = np.asarray(cat("test_errors"), np.float64)
    merged = dict(parts[0])
    merged.update(
        seeds=cat("seeds"), test_errors=errors.tolist(), test_error_mean=float(np.mean(errors)),
        test_error_std=float(np.std(errors)), n_failed_rollouts=int(sum(p["n_failed_rollouts"] for p in parts)),
        final_train_loss=cat("final_train_loss"),
        select_best_epoch=cat("select_best_epoch") if parts[0].get("select_best_epoch") is not None else None,
        # the paper's Fig. 4 metric is against each run's own last member: not defined across groups
        last_member_errors=None if len(parts) > 1 else parts[0].get("last_member_errors"),
        train_seconds=float(sum(p["train_seconds"] for p in parts)),
        n_members_planned=int(n_planned),
        groups=[{"seeds": p["seeds"], "train_seconds": p["train_seconds"], "subset_seed":
                 p["settings"]["train"].get("subset_seed")} for p in parts],
    )
    return merged


def _ensemble(config, model: str, spec: str, workdir: str, get_prep, train: bool) -> tuple[dict, list] | None:
    """(result, [(run name, run result)]) of one ensemble: its whole run if that
    finished (or trains, without ``structures.group_size``), else its merged
    groups; None if nothing finished and ``train`` is False."""
    budget, whole = config.train.budget, model_config(config, model)
    name = experiment.config_run_name(whole, spec, budget, model)
    result = experiment.finished_run(whole, spec, budget, workdir, model)
    if result is None and not config.structures.group_size:
        if not train:
            return None
        result = experiment.public(experiment.run_loss(get_prep(), whole, spec, budget, workdir, model))
    if result is not None:
        return result, [(name, result)]
    runs = _groups(config, model, spec, workdir, get_prep, train)
    if not runs:
        return None
    return merge_groups([r for _, r in runs], len(config.train.seeds)), runs


def run_structures(config, workdir: str, train: bool = True) -> list[dict]:
    """Every (model, loss) result, each with ``model`` and ``initial`` (the MD
    runs' start, ``system.params.initial``) fields and ``_runs`` (the run
    names and results it is made of, what ``--out`` exports). With ``train``
    False nothing trains: finished runs and groups only (an ensemble with
    groups missing is reported with fewer members)."""
    get_prep = experiment.memo_prepare(config, workdir)
    results = []
    for model in config.structures.models:
        for spec in config.train.runs:
            found = _ensemble(config, model, spec, workdir, get_prep, train)
            if found is not None:
                result, runs = found
                results.append(dict(result, model=model, initial=config.system.params.get("initial", "fire"),
                                    _runs=runs))
    return results


def rows(results: list[dict]) -> list[dict]:
    """One object per (model, loss, member), as committed in docs/results/."""
    return [
        {"model": r["model"], "loss": r["loss"], "run": r["run"], "label": experiment.run_label(r), "p": r["p"],
         "member": i, "seed": seed, "test_error": err,
         "budget": r["budget"], "n_configs": r["n_configs"], "n_force_computations": r["n_force_computations"],
         "epochs": r["settings"]["train"]["epochs"], "initial": r.get("initial", "fire"),
         "ensemble_size": r.get("n_members_planned", len(r["seeds"]))}
        for r in results for i, (seed, err) in enumerate(zip(r["seeds"], r["test_errors"]))
    ]


def _reference(r: dict):
    """The reference's per-member errors for a result of the LJ-800 protocol (800
    atoms, 1e6 atom forces, 50-atom subsets, no option of ours), else None."""
    if r["budget"] != 1_000_000 or r["sites_per_config"] not in (800, 50) or run_option(r["run"]):
        return None
    return REFERENCE.get(r["model"], {}).get(r["loss"])


def _members_text(r: dict) -> str:
    """``10``, or ``4 of 10`` for an ensemble whose member groups are not all finished."""
    n, planned = len(r["test_errors"]), r.get("n_members_planned", len(r["test_errors"]))
    return f"{n}" if n == planned else f"{n} of {planned}"


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
                     f"({_members_text(r)}) | {ref_text} | {ratio} |")
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
