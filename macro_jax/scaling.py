"""Fig. 4: force work to reach e_tol versus the number of atoms, from per-size sweeps.

Each size's sweep (``experiments/sweep.py`` with ``configs/lj_scaling.py:<n>``)
writes per-seed rows; ``collect`` turns them into one row per (size, loss)
with the force computations and labelling seconds at which the mean TRUE
test error reaches e_tol (``sweep.forces_to_etol``).
"""

from __future__ import annotations

import numpy as np

from macro_jax import plotting, sweep
from macro_jax.config import run_option

# The paper's Fig. 4 points (atom forces to reach 3e-3), measured against the
# last ensemble member's rollout instead of the truth (method.md section 5).
REFERENCE = {800: {"L_z": 1.2e6, "L_x,p": 1.125e5}, 2700: {"L_z": 2.025e6, "L_x,p": 8.75e4},
             6400: {"L_z": 4.8e6, "L_x,p": 1.0e5}, 21600: {"L_z": 1.08e7, "L_x,p": 6.25e4}}


def collect(per_size_rows: list[list[dict]], e_tol: float = sweep.E_TOL) -> list[dict]:
    """One object per (n_atoms, loss): ``forces_to_etol``, ``seconds_to_etol``,
    ``bound`` ("interpolated", "at most", "at least") and ``reached``, from the
    TRUE test errors; where every run of the loss recorded it, also
    ``forces_to_etol_last_member`` and ``bound_last_member``, the same from the
    paper's flawed metric (members against the last member), for comparison."""
    out = []
    for rows_ in per_size_rows:
        results = sweep.results_from_rows(rows_)
        draws = {r.get("draw_seed") for r in results}
        if len(draws) > 1:
            raise ValueError(f"one size's rows mix data draws (train.draw_seed {sorted(draws, key=str)}); "
                             "collect each draw from its own file")
        n_atoms = max(r["sites_per_config"] for r in results)  # L_z labels every atom
        flawed = {}
        for spec in dict.fromkeys(r["run"] for r in results):
            if all("last_member_error_mean" in r for r in results if r["run"] == spec):
                mine = [r for r in results if r["run"] == spec]
                flawed[spec] = sweep.forces_to_etol(mine, e_tol, error="last_member_error_mean")[spec]
        for spec, entry in sweep.forces_to_etol(results, e_tol).items():
            row = {"n_atoms": int(n_atoms), "run": spec, "label": label(spec, entry["loss"]), **entry}
            if spec in flawed:
                row.update(forces_to_etol_last_member=flawed[spec]["forces_to_etol"],
                           bound_last_member=flawed[spec]["bound"])
            out.append(row)
    return sorted(out, key=lambda r: (r["n_atoms"], r["loss"], r["run"]))


def label(spec: str, loss: str) -> str:
    """A run's name across sizes (its p changes with the size): ``L_z``, ``L_x,p``,
    or with our option, ``L_z normalised``, ``L_x,p importance``. The paper's
    points are under the plain names."""
    option = run_option(spec)
    return f"{loss} {option}" if option else loss


def table(rows_: list[dict]) -> str:
    lines = ["| atoms | loss | force computations to e_tol | labelling seconds to e_tol | paper (flawed metric) "
             "| ours with the paper's flawed metric |",
             "|---|---|---|---|---|---|"]
    for r in rows_:
        ref = REFERENCE.get(r["n_atoms"], {}).get(r["label"])
        flawed = (f"{r['bound_last_member']} {r['forces_to_etol_last_member']:.3g}"
                  if "forces_to_etol_last_member" in r else "–")
        # the seconds are those of the bracketing runs, so they carry the budget's bound
        lines.append(f"| {r['n_atoms']:,} | {r['label']} | {r['bound']} {r['forces_to_etol']:.3g} | "
                     f"{r['bound']} {r['seconds_to_etol']:.3g} | {f'{ref:.3g}' if ref else '–'} | {flawed} |")
    for n in sorted({r["n_atoms"] for r in rows_}):
        here = [r for r in rows_ if r["n_atoms"] == n]
        for z in (r for r in here if r["loss"] == "L_z"):
            for xp in (r for r in here if r["loss"] in ("L_x,p", "L_z,p")):
                plain = (z["label"], xp["label"]) == ("L_z", "L_x,p")
                both = "forces_to_etol_last_member" in z and "forces_to_etol_last_member" in xp
                flawed = ratio_text(z["forces_to_etol_last_member"], xp["forces_to_etol_last_member"],
                                    z["bound_last_member"], xp["bound_last_member"]) if both else "–"
                lines.append(f"| {n:,} | ratio {z['label']} / {xp['label']} | "
                             f"{ratio_text(z['forces_to_etol'], xp['forces_to_etol'], z['bound'], xp['bound'])} | "
                             f"{ratio_text(z['seconds_to_etol'], xp['seconds_to_etol'], z['bound'], xp['bound'])} | "
                             f"{_ref_ratio(n) if plain else '–'} | {flawed} |")
    return "\n".join(lines)


def ratio_text(a: float, b: float, bound_a: str, bound_b: str) -> str:
    """``a / b`` with what the bounds of a and b ("interpolated", "at most",
    "at least") make of it: an upper bound if a is at most or b at least its
    value, a lower bound in the opposite case, and no bound if they pull apart."""
    upper = bound_a == "at most" or bound_b == "at least"
    lower = bound_a == "at least" or bound_b == "at most"
    value = f"{a / max(b, 1e-12):.1f}x"
    if upper and lower:
        return f"{value}, not bounded ({bound_a} / {bound_b})"
    return f"at most {value}" if upper else f"at least {value}" if lower else value


def _ref_ratio(n: int) -> str:
    ref = REFERENCE.get(n)
    return f"{ref['L_z'] / ref['L_x,p']:.1f}x" if ref else "–"


def plot(rows_: list[dict], path: str) -> None:
    plt = plotting.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(dict.fromkeys(r["label"] for r in rows_)):
        color = f"C{i}"
        rs = sorted((r for r in rows_ if r["label"] == name), key=lambda r: r["n_atoms"])
        n = np.array([r["n_atoms"] for r in rs], float)
        for ax, key in zip(axes, ("forces_to_etol", "seconds_to_etol")):
            ax.plot(n, [r[key] for r in rs], "-o", color=color, label=f"ours: {name} (true error)")
            for r in rs:  # open markers: the e_tol was not reached (a lower bound)
                if not r["reached"]:
                    ax.plot([r["n_atoms"]], [r[key]], "^", color=color, mfc="none", ms=10)
        flawed = [r for r in rs if "forces_to_etol_last_member" in r]
        if flawed:  # the same runs scored as the paper scored them (against the last member)
            axes[0].plot([r["n_atoms"] for r in flawed], [r["forces_to_etol_last_member"] for r in flawed], "--s",
                         color=color, mfc="none", alpha=0.6, label=f"ours: {name} (paper's flawed metric)")
        if name not in ("L_z", "L_x,p"):
            continue
        ref = sorted((k, v[name]) for k, v in REFERENCE.items())
        axes[0].plot([k for k, _ in ref], [v for _, v in ref], ":x", color=color, alpha=0.7,
                     label=f"paper: {name} (flawed metric)")
    axes[0].set_ylabel("atom-force computations to reach e_tol = 3e-3")
    axes[1].set_ylabel("labelling seconds to reach e_tol")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of atoms")
        ax.legend(fontsize=7)
    fig.suptitle("Force work to reach e_tol vs system size (open triangles: e_tol not reached, lower bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
