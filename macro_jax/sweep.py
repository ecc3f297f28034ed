"""Error versus force budget: every (budget, loss) of ``config.sweep``.

Runs are resumable: a run whose ``runs/<name>/result.json`` exists under the
workdir (made with the same settings) is read, not retrained. So the grid can
be split over processes sharing one workdir (``--config.sweep.runs=...``),
and a last call over the whole grid only collects.
"""

from __future__ import annotations

import filecmp
import glob
import os
import shutil
from typing import Sequence

import numpy as np
from absl import logging

from macro_jax import checkpoint, experiment, plotting
from macro_jax import eval as evaluation
from macro_jax.config import parse_run, subset_size
from macro_jax.losses import is_partial
from macro_jax.systems import make_system

# Published means over 3 seeds, keyed by force budget (site forces) and run:
# Predator-Prey from the authors' result.csv (n-equivalent = budget / 100);
# Allen-Cahn's one published point (loss.txt, 2,500 x 40,000 forces).
REFERENCE = {
    "allen_cahn": {"z": {100_000_000: 6.93e-3}, "xp:1/16": {100_000_000: 3.98e-3}},
    "predator_prey": {
        "z": {60_000: 1.855e-2, 150_000: 9.58e-3, 300_000: 3.19e-3, 600_000: 1.24e-3, 1_200_000: 1.03e-3, 2_400_000: 7.93e-4},
        "x": {60_000: 1.087e-2, 150_000: 1.218e-2, 300_000: 2.90e-3, 600_000: 1.24e-3, 1_200_000: 9.20e-4, 2_400_000: 6.76e-4},
        "xp:0.25": {60_000: 3.50e-3, 150_000: 2.19e-3, 300_000: 1.23e-3, 600_000: 9.08e-4, 1_200_000: 7.66e-4, 2_400_000: 5.64e-4},
        "xp:0.2": {60_000: 4.00e-3, 150_000: 1.92e-3, 300_000: 1.34e-3, 600_000: 1.13e-3, 1_200_000: 8.36e-4, 2_400_000: 5.70e-4},
    }
}
E_TOL = 3e-3


def grid(config) -> list[tuple[str, int]]:
    """The sweep's (run, budget) pairs: ``sweep.budgets`` for every run of
    ``sweep.runs``, except runs whose loss has training-set sizes in
    ``sweep.n_configs`` (then budget = configurations x sites with forces)."""
    sizes = dict(config.sweep.n_configs)
    n_sites = make_system(config.system).n_sites if sizes else 0
    pairs = []
    for spec in config.sweep.runs:
        loss, p = parse_run(spec)
        if loss in sizes:
            k = subset_size(p, n_sites, spec) if is_partial(loss) else n_sites
            pairs += [(spec, int(n) * k) for n in sizes[loss]]
        else:
            pairs += [(spec, int(b)) for b in config.sweep.budgets]
    return sorted(pairs, key=lambda sb: (sb[1], sb[0]))


def run_sweep(config, workdir: str) -> list[dict]:
    get_prep = experiment.memo_prepare(config, workdir)
    results = [experiment.cached_run(config, spec, budget, workdir, get_prep) for spec, budget in grid(config)]
    for r in results:  # results reused before a later run trained the autoencoder are checked now
        experiment.check_autoencoder(r, workdir, f"run {experiment.result_run_name(r)}")
    return [_with_last_member_errors(r, workdir) for r in results]


def _with_last_member_errors(result: dict, workdir: str) -> dict:
    """Adds the paper's Fig. 4 metric to a run finished before results carried it,
    from its saved test rollouts (left out when they are not in the workdir)."""
    if "last_member_errors" in result:
        return result
    pred_obs = experiment.saved_rollouts(os.path.join(workdir, "runs", experiment.result_run_name(result)), result)
    if pred_obs is None:
        return result
    return dict(result, last_member_errors=np.asarray(evaluation.last_member_errors(pred_obs), np.float64).tolist())


def export_runs(results: list[dict], directory: str, names: list[str] | None = None,
                workdir: str | None = None) -> None:
    """Writes each run's result (``result.json``, settings and autoencoder checksum
    included) to ``directory/<run name>.json`` (``names``: the runs' directory
    names under ``workdir/runs``, default a sweep's ``result_run_name``): small
    files to commit beside the rows, from which ``import_runs`` resumes in a
    fresh workdir. With ``workdir``, its trained autoencoder (weights and
    sidecar, checksum checked) is copied to ``directory/autoencoder/`` too, so
    that a machine which would train another encoder from the same data and
    seed can continue the same ensembles."""
    os.makedirs(directory, exist_ok=True)
    for r, name in zip(results, names or [experiment.result_run_name(r) for r in results], strict=True):
        experiment.write_json(os.path.join(directory, name + ".json"), experiment.public(r))
    source = os.path.join(workdir, experiment.AUTOENCODER_FILE) if workdir else None
    if source and os.path.exists(source):
        checkpoint.load_sidecar(source)  # never export a corrupt file
        _copy_checked(source, os.path.join(directory, experiment.AUTOENCODER_FILE))


def _copy_checked(source: str, target: str) -> None:
    """Copies a file saved by ``checkpoint`` and its sidecar; the file lands last
    and atomically, so a process polling for ``target`` never sees it alone."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source + ".json", target + ".json")
    tmp = f"{target}.{os.getpid()}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _exported_autoencoder(directories: Sequence[str]) -> str | None:
    """The autoencoder file the folders export (checksums checked), None if none
    does; two different ones are refused."""
    found: dict[str, str] = {}
    for directory in directories:
        path = os.path.join(directory, experiment.AUTOENCODER_FILE)
        if os.path.exists(path):
            found.setdefault(checkpoint.load_sidecar(path)["sha256"], path)
    if len(found) > 1:
        raise ValueError("the folders export different autoencoders: " + ", ".join(
            f"{path} (sha256 {sha[:12]}...)" for sha, path in found.items()) + "; resume from one encoder's runs only")
    return next(iter(found.values()), None)


def import_runs(directories: str | Sequence[str], workdir: str) -> list[str]:
    """Copies the results ``export_runs`` wrote to each of ``directories`` (one
    folder or several, e.g. the exports of two commands that make one table)
    into ``workdir/runs/<name>/result.json`` where the workdir has none; returns
    the names copied. ``run_sweep`` then reuses them like its own: only with the
    same settings and the same autoencoder (``experiment.finished_run``,
    ``experiment.check_autoencoder``). A run name found in two folders with
    different contents is refused, not picked silently.

    An exported autoencoder is installed where the workdir has none (and no
    process is training one): the runs then continue on the encoder they were
    trained on, which the config's spec still checks on load. A workdir's own
    autoencoder is never replaced; if it differs, the copied runs are refused
    when read."""
    directories = [directories] if isinstance(directories, str) else list(directories)
    found: dict[str, str] = {}
    for directory in directories:
        paths = sorted(glob.glob(os.path.join(directory, "*.json")))
        if not paths:
            raise FileNotFoundError(f"{directory}: no exported run results (*.json) to resume from")
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            if name in found and not filecmp.cmp(found[name], path, shallow=False):
                raise ValueError(f"run {name!r} is exported twice with different results: {found[name]} and {path}")
            found.setdefault(name, path)
    encoder = _exported_autoencoder(directories)  # checked before anything is copied
    copied = []
    for name, path in found.items():
        target = os.path.join(workdir, "runs", name, "result.json")
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(name)
    target = os.path.join(workdir, experiment.AUTOENCODER_FILE)
    if encoder is not None and (os.path.exists(target) or os.path.exists(target + ".lock")):
        logging.info("kept %s (not replaced by the exported %s)", target, encoder)
    elif encoder is not None:
        _copy_checked(encoder, target)
        logging.info("installed the exported autoencoder %s as %s", encoder, target)
    return copied


def forces_to_etol(results: list[dict], e_tol: float = E_TOL, error: str = "test_error_mean") -> dict[str, dict]:
    """Per run: the force budget (and labelling seconds) at which the mean test
    error (the field ``error`` of each result) first falls below ``e_tol``.

    Budgets are scanned in increasing order; between the last budget above
    e_tol and the first below it, log(error) is interpolated linearly in
    log(budget) (and log(seconds) likewise). If the smallest budget is already
    below e_tol, that budget is reported (an upper bound: ``bound`` "at most");
    if none is, ``reached`` is False and the largest budget is a lower bound.
    """
    out = {}
    for spec in dict.fromkeys(r["run"] for r in results):
        rs = sorted((r for r in results if r["run"] == spec), key=lambda r: r["budget"])
        entry = {"loss": rs[0]["loss"], "p": rs[0]["p"], "sites_per_config": rs[0]["sites_per_config"],
                 "reached": False, "bound": "at least", "forces_to_etol": float(rs[-1]["n_force_computations"]),
                 "seconds_to_etol": float(rs[-1]["force_seconds"])}
        for i, r in enumerate(rs):
            if r[error] >= e_tol:
                continue
            entry.update(reached=True, bound="at most" if i == 0 else "interpolated")
            if i == 0:
                entry.update(forces_to_etol=float(r["n_force_computations"]), seconds_to_etol=float(r["force_seconds"]))
            else:
                lo = rs[i - 1]
                t = (np.log(e_tol) - np.log(lo[error])) / (np.log(r[error]) - np.log(lo[error]))
                interp = lambda a, b: float(np.exp(np.log(a) + t * (np.log(b) - np.log(a))))
                entry.update(forces_to_etol=interp(lo["n_force_computations"], r["n_force_computations"]),
                             seconds_to_etol=interp(max(lo["force_seconds"], 1e-12), max(r["force_seconds"], 1e-12)))
            break
        out[spec] = entry
    return out


def rows(results: list[dict]) -> list[dict]:
    """One object per (loss, p, budget, seed), as committed in docs/results/
    (with ``draw_seed`` where the run set ``train.draw_seed``)."""
    out = []
    for r in results:
        draw_seed = experiment.draw_seed_of(r)
        for i, (seed, err) in enumerate(zip(r["seeds"], r["test_errors"])):
            out.append({"loss": r["loss"], "run": r["run"], "p": r["p"], "budget": r["budget"], "seed": seed,
                        "test_error": err, "n_configs": r["n_configs"], "sites_per_config": r["sites_per_config"],
                        "n_force_computations": r["n_force_computations"], "force_seconds": r["force_seconds"]})
            if "last_member_errors" in r:  # the paper's Fig. 4 metric, for comparison only
                out[-1]["last_member_error"] = r["last_member_errors"][i]
            if draw_seed is not None:  # a repeat over data draws (train.draw_seed)
                out[-1]["draw_seed"] = draw_seed
    return out


def results_from_rows(rows_: list[dict]) -> list[dict]:
    """Per (run, budget, draw seed) results (mean and std over seeds) from per-seed rows."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows_:
        groups.setdefault((row["run"], row["budget"], row.get("draw_seed")), []).append(row)
    out = []
    for (spec, budget, draw_seed), rs in groups.items():
        errors = [r["test_error"] for r in rs]
        out.append({"run": spec, "loss": rs[0]["loss"], "p": rs[0]["p"], "budget": budget,
                    "sites_per_config": rs[0]["sites_per_config"], "n_configs": rs[0]["n_configs"],
                    "n_force_computations": rs[0]["n_force_computations"], "force_seconds": rs[0]["force_seconds"],
                    "seeds": [r["seed"] for r in rs], "test_errors": errors,
                    "test_error_mean": float(np.mean(errors)), "test_error_std": float(np.std(errors))})
        if all("last_member_error" in r for r in rs):
            last = [r["last_member_error"] for r in rs]
            out[-1].update(last_member_errors=last, last_member_error_mean=float(np.mean(last)))
        if draw_seed is not None:
            out[-1]["draw_seed"] = draw_seed
    return out


def table(results: list[dict], system: str) -> str:
    ref = REFERENCE.get(system, {})
    lines = ["| force budget | configurations | loss | ours: mean ± std | ours: per seed | reference (mean) | ours / reference |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        label = experiment.run_label(r)
        ref_value = ref.get(r["run"], {}).get(r["budget"])
        ratio = f"{r['test_error_mean'] / ref_value:.2f}" if ref_value else "–"
        ref_text = f"{ref_value:.2e}" if ref_value else "–"
        seeds = " / ".join(f"{e:.1e}" for e in r["test_errors"])
        lines.append(f"| {r['budget']:.1e} | {r['n_configs']:,} | {label} | {r['test_error_mean']:.2e} ± "
                     f"{r['test_error_std']:.1e} | {seeds} | {ref_text} | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict], system: str, path: str) -> None:
    plt = plotting.pyplot()

    ref = REFERENCE.get(system, {})
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    specs = list(dict.fromkeys(r["run"] for r in results))
    for i, spec in enumerate(specs):
        rs = sorted((r for r in results if r["run"] == spec), key=lambda r: r["budget"])
        label = experiment.run_label(rs[0])
        b = np.array([r["budget"] for r in rs], float)
        m = np.array([r["test_error_mean"] for r in rs])
        (line,) = ax.plot(b, m, "-o", label=f"ours: {label} (mean; dots = seeds)")
        for r in rs:  # every seed, so an outlier is visible rather than averaged away
            ax.plot([r["budget"]] * len(r["test_errors"]), r["test_errors"], ".", color=line.get_color(), alpha=0.5)
        if spec in ref:
            rb = sorted(ref[spec])
            ax.plot(rb, [ref[spec][k] for k in rb], ":", marker="x", color=line.get_color(), alpha=0.7,
                    label=f"reference: {label}")
    ax.axhline(E_TOL, color="grey", ls="--", lw=1, label="e_tol = 3e-3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("force budget (site forces per seed)")
    ax.set_ylabel("relative test error (true trajectories)")
    ax.set_title(f"{system}: error vs force budget")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: never over the data
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
