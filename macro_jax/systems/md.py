"""Molecular-dynamics data for the particle system (experiments.md section 3).

The reference protocol: random insertion plus energy minimisation, Gaussian
velocities with zero total momentum rescaled to ``T0 ~ U(0.5, 1.5)``, NVE
velocity Verlet at ``dt = 0.001`` for 250 steps, every step kept, atoms in a
fixed order. Units are those of ``particles.py`` (sigma, epsilon, atom mass,
k_B = 1); states use its layout ``x = (positions (3n), velocities (3n))``.

Neighbour lists here carry a skin: a Dense jax-md list with cut-off
``cutoff + skin`` and ``dr_threshold = skin``, rebuilt inside the jitted loop
only once an atom has moved more than ``skin / 2`` since the last build. Forces
use the calculator's kernel (``calc.neighbor_forces``), which masks pairs
beyond ``cutoff``, so the skin changes which pairs are candidates, never the
forces. Capacity overflow is never silent: flags are checked on the host after
each jitted block, which is then rerun with a larger list (or raises).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
from absl import logging
from jax_md import minimize, partition, space
from jaxtyping import Array, Float, PRNGKeyArray

from macro_jax import observables
from macro_jax.systems.base import Trajectories
from macro_jax.systems.particles import INITIAL_STATES, LIST_SLACK, ParticleCalculator, raise_if, use_cell_list, wrap_positions


def skin_neighbor_fn(calc: ParticleCalculator, skin: float, capacity_multiplier: float = 1.25):
    """A Dense jax-md neighbour list for ``calc``'s box with cut-off ``cutoff (1 +
    slack) + skin``, reused until some atom moved ``skin / 2`` (consecutive MD or
    FIRE steps, unlike the calculator's own list, which rebuilds on every call)."""
    cutoff = calc.cutoff * (1.0 + LIST_SLACK)
    return partition.neighbor_list(
        calc.displacement_fn, calc.box_size, cutoff, dr_threshold=float(skin),
        capacity_multiplier=capacity_multiplier, format=partition.Dense,
        disable_cell_list=not use_cell_list(calc.box_size, cutoff + float(skin)),
    )


def _grow(nbrs, extra_capacity: int) -> int:
    """Next ``extra_capacity`` after an overflow: at least doubles the list."""
    return int(extra_capacity + max(8, nbrs.max_occupancy))


# --- initial positions ------------------------------------------------------------------------


def random_insertion(
    key: PRNGKeyArray, n_atoms: int, box_size: float, min_distance: float = 0.75, max_attempts: int = 1000
) -> Float[Array, " 3n"]:
    """``n_atoms`` positions (3n,) float64, atom-major, in [0, box_size)^3, inserted one
    by one uniformly at random and rejected while closer than ``min_distance``
    (minimum image) to an atom already placed. Jittable; O(n^2 attempts). If an atom
    finds no place in ``max_attempts`` draws it raises (``RuntimeError``, or a
    ``JaxRuntimeError`` under jit) and the positions are NaN. At density 0.8 and
    ``min_distance`` 0.75 the excluded volume is ~18 % of the box: a few draws each."""
    n = int(n_atoms)
    min_sq = float(min_distance) ** 2

    def place(i, carry):
        positions, failed = carry
        placed = jnp.arange(n) < i

        def too_close(r):
            d = r[None, :] - positions
            d = d - box_size * jnp.round(d / box_size)
            return jnp.any(placed & (jnp.sum(d * d, -1) < min_sq))

        def draw(attempt):
            return jr.uniform(jr.fold_in(jr.fold_in(key, i), attempt), (3,), jnp.float64, 0.0, box_size)

        def cond(state):
            attempt, r = state
            return (attempt < max_attempts) & too_close(r)

        def body(state):
            attempt, _ = state
            return attempt + 1, draw(attempt + 1)

        attempt, r = jax.lax.while_loop(cond, body, (jnp.int32(0), draw(0)))
        return positions.at[i].set(r), failed | too_close(r)

    positions, failed = jax.lax.fori_loop(0, n, place, (jnp.zeros((n, 3), jnp.float64), jnp.zeros((), bool)))
    raise_if(failed, f"md.random_insertion: an atom found no place {min_distance:g} away from the others in "
                      f"{max_attempts} draws (n_atoms={n}, box_size={box_size:g}); lower min_distance")
    return jnp.where(failed, jnp.nan, positions).reshape(-1)


def make_minimizer(
    calc: ParticleCalculator,
    *,
    min_distance: float = 0.75,
    max_steps: int = 2000,
    chunk: int = 100,
    force_tol: float = 1e-3,
    dt_start: float = 1e-3,
    dt_max: float = 4e-3,
    skin: float = 0.3,
    max_reallocations: int = 4,
    dtype=jnp.float64,
):
    """``initial(key) -> positions`` (3n,): ``initial_positions`` with these settings,
    compiled once for many keys."""
    n, box_size = calc.n_atoms, calc.box_size
    _, shift_fn = space.periodic(box_size)
    neighbor_fn = skin_neighbor_fn(calc, skin)

    def energy_fn(r, neighbor):
        return calc.potential_energy(r.reshape(-1), neighbor)  # reads positions only

    init_fn, apply_fn = minimize.fire_descent(energy_fn, shift_fn, dt_start=dt_start, dt_max=dt_max)
    init_fn = jax.jit(init_fn)

    @jax.jit
    def block(state, nbrs):
        def step(_, carry):
            state, nbrs = carry
            nbrs = neighbor_fn.update(state.position, nbrs)
            return apply_fn(state, neighbor=nbrs), nbrs

        return jax.lax.fori_loop(0, chunk, step, (state, nbrs))

    insert = jax.jit(lambda key: random_insertion(key, n, box_size, min_distance))

    def initial(key):
        start = time.perf_counter()
        positions = jax.block_until_ready(insert(key)).reshape(n, 3)
        inserted = time.perf_counter()
        extra, steps, max_force = 0, 0, float("nan")
        nbrs = neighbor_fn.allocate(positions)
        state = init_fn(positions, neighbor=nbrs)
        for _ in range(0, max_steps, chunk):
            for attempt in range(max_reallocations + 1):
                new_state, new_nbrs = block(state, nbrs)
                if not new_nbrs.did_buffer_overflow:
                    break
                if attempt == max_reallocations:
                    raise RuntimeError(f"md.initial_positions: neighbour list still overflows after "
                                       f"{max_reallocations} reallocations (max_occupancy={new_nbrs.max_occupancy})")
                extra = _grow(nbrs, extra)
                nbrs = neighbor_fn.allocate(state.position, extra_capacity=extra)
                state = init_fn(state.position, neighbor=nbrs)  # forces from a complete list
            state, nbrs = new_state, new_nbrs
            steps += chunk
            max_force = float(jnp.max(jnp.abs(state.force)))
            if max_force < force_tol:
                break
        logging.info("md: %d atoms inserted in %.1f s, FIRE %d steps in %.1f s (max |force| %.2e)", n,
                     inserted - start, steps, time.perf_counter() - inserted, max_force)
        return state.position.reshape(-1).astype(dtype)

    return initial


def initial_positions(calc: ParticleCalculator, key: PRNGKeyArray, **kwargs) -> Float[Array, " 3n"]:
    """Positions (3n,) of ``calc``'s atoms, in [0, box_size): random insertion, then
    FIRE minimisation. Settings (keywords of ``make_minimizer``): ``min_distance``
    0.75, ``max_steps`` 2000 in jitted blocks of ``chunk`` 100, ``force_tol`` 1e-3,
    ``dt_start`` 1e-3, ``dt_max`` 4e-3, ``skin`` 0.3, ``dtype`` float64.

    Insertion rejects draws closer than ``min_distance`` (``random_insertion``),
    chosen over unconstrained insertion because FIRE has no step cap: an overlap
    at r ~ 0.01 has an LJ force ~1e26 that no small dt tames. FIRE
    (``jax_md.minimize.fire_descent``, periodic shift, so positions come back
    wrapped into the box) then minimises the calculator's truncated potential
    (``calc.potential_energy``) with a skin neighbour list until max |F| <
    ``force_tol`` or ``max_steps``. A block whose list overflowed is rerun from
    its start with a larger list (at most ``max_reallocations`` times, then
    ``RuntimeError``). A host driver: not jittable. Computed in float64.
    """
    return make_minimizer(calc, **kwargs)(key)


# --- initial velocities -----------------------------------------------------------------------


def initial_velocities(
    key: PRNGKeyArray, n_atoms: int, T0, mass: float = 1.0, dtype=jnp.float64
) -> Float[Array, " 3n"]:
    """Velocities (3n,), atom-major: Gaussian, total momentum removed, then scaled
    so that ``observables.temperature`` (3 (n - 1) degrees of freedom) is ``T0``
    (to round-off in float64). The direction (the unit-temperature draw) depends
    on ``key`` only, so one key at several ``T0`` gives the same directions
    scaled by ``sqrt(T0)``. Jittable and vmappable over ``key`` and ``T0``."""
    n = int(n_atoms)
    v = jr.normal(key, (n, 3), jnp.float64)
    v = v - jnp.mean(v, axis=0)  # equal masses: zero mean velocity is zero momentum
    v = v.reshape(-1)
    t = observables.temperature(jnp.concatenate([jnp.zeros_like(v), v]), n, mass)[0]
    return (v * jnp.sqrt(jnp.asarray(T0, jnp.float64) / t)).astype(dtype)


# --- NVE --------------------------------------------------------------------------------------


def make_nve(
    calc: ParticleCalculator,
    dt: float = 0.001,
    n_steps: int = 250,
    *,
    save_every: int = 1,
    skin: float = 0.3,
    capacity_multiplier: float = 1.25,
    max_reallocations: int = 4,
    dtype=None,
    vmap_size: int = 1,
    labels: bool = True,
):
    """``run(x0) -> (Trajectories, n_reallocations)``: NVE velocity Verlet from each
    state of ``x0`` (6n,) or (B, 6n).

    Frames are the states BEFORE steps ``0, save_every, 2 save_every, ...``:
    ``n_steps // save_every`` of them, the first ``x0`` (so ``n_steps = 250``,
    ``save_every = 1`` keeps 250 frames, steps 0..249, as the reference). The
    result has ``times`` (T,) ``= frame * save_every * dt``, ``xs`` (B, T, 6n) (B
    = 1 for a single state) with positions UNWRAPPED (integrated without
    wrapping; atom order fixed; forces wrap internally), and ``forces`` (B, T,
    6n), the exact ``f(x) = (v, F / m)`` of each stored state.

    Integration is in float64; frames are stored in ``dtype`` (default: that of
    ``x0``). In float64 the label is the force the integrator used; otherwise it
    is evaluated again at the rounded stored state, so a label is always f of the
    stored x, rounded once. ``labels=False`` skips the labels (``forces=None``;
    below float64 that saves one force evaluation per stored frame).

    Neighbour lists: one list is allocated outside jit from ``x0[0]`` (jax-md's
    rule, ``capacity_multiplier`` times its occupancy); each run starts from it
    with an update (valid since it rebuilds for any atom further than skin / 2
    from the list's reference), so the B runs share its capacity and are vmapped.
    Updates run inside a ``lax.scan``. After the run the overflow flags (jax-md
    accumulates them over updates) are checked on the host; on overflow the list
    is reallocated with at least twice the capacity and the whole batch is rerun,
    at most ``max_reallocations`` times, then ``RuntimeError``.
    ``n_reallocations`` says how many reruns happened.
    """
    n, mass = calc.n_atoms, calc.mass
    if n_steps % save_every:
        raise ValueError(f"n_steps={n_steps} must be a multiple of save_every={save_every}")
    n_frames = n_steps // save_every
    neighbor_fn = skin_neighbor_fn(calc, skin, capacity_multiplier)

    def run_one(x0, nbrs, store_dtype):
        pos, vel = x0[: 3 * n], x0[3 * n:]
        nbrs = neighbor_fn.update(wrap_positions(pos.reshape(n, 3), calc.box_size), nbrs)
        forces = calc.neighbor_forces(pos, nbrs)

        def step(_, carry):
            pos, vel, forces, nbrs = carry
            vel_half = vel + 0.5 * dt * forces.reshape(-1) / mass
            pos = pos + dt * vel_half  # unwrapped: never mapped back into the box
            nbrs = neighbor_fn.update(wrap_positions(pos.reshape(n, 3), calc.box_size), nbrs)
            forces = calc.neighbor_forces(pos, nbrs)
            return pos, vel_half + 0.5 * dt * forces.reshape(-1) / mass, forces, nbrs

        def frame(carry, _):
            pos, vel, forces, nbrs = carry
            x = jnp.concatenate([pos, vel]).astype(store_dtype)
            label = None
            if labels:
                if store_dtype == jnp.float64:
                    label_forces = forces
                else:  # the force of the rounded state (the list stays valid: rounding moves ~1e-7)
                    label_forces = calc.neighbor_forces(x.astype(jnp.float64), nbrs)
                label = jnp.concatenate([x[3 * n:].astype(jnp.float64), label_forces.reshape(-1) / mass])
                label = label.astype(store_dtype)
            return jax.lax.fori_loop(0, save_every, step, carry), (x, label)

        (_, _, _, nbrs), (xs, frame_labels) = jax.lax.scan(frame, (pos, vel, forces, nbrs), None, length=n_frames)
        return xs, frame_labels, nbrs.did_buffer_overflow

    def batch_one(x0s, nbrs, store_dtype):
        # lax.map's batch_size vmaps even a batch of 1, so 1 means no batch_size
        return jax.lax.map(lambda x0: run_one(x0, nbrs, store_dtype), x0s,
                           batch_size=vmap_size if vmap_size > 1 else None)

    batch_run = jax.jit(batch_one, static_argnums=2)

    def run(x0):
        x0 = jnp.asarray(x0)
        store_dtype = jnp.dtype(dtype if dtype is not None else x0.dtype)
        batch = jnp.atleast_2d(x0).astype(jnp.float64)
        reference = wrap_positions(batch[0, : 3 * n].reshape(n, 3), calc.box_size)
        extra = 0
        nbrs = neighbor_fn.allocate(reference)
        for attempt in range(max_reallocations + 1):
            xs, frame_labels, overflow = batch_run(batch, nbrs, store_dtype)
            if not bool(jnp.any(overflow)):
                break
            if attempt == max_reallocations:
                raise RuntimeError(
                    f"md.run_nve: neighbour list overflow persists after {max_reallocations} reallocations "
                    f"(max_occupancy={nbrs.max_occupancy}); raise capacity_multiplier (now "
                    f"{capacity_multiplier:g}) or max_reallocations"
                )
            extra = _grow(nbrs, extra)
            nbrs = neighbor_fn.allocate(reference, extra_capacity=extra)
        times = (jnp.arange(n_frames) * (save_every * dt)).astype(store_dtype)
        return Trajectories(times=times, xs=xs, forces=frame_labels), attempt

    return run


def run_nve(calc: ParticleCalculator, x0, dt: float = 0.001, n_steps: int = 250, **kwargs) -> Trajectories:
    """NVE trajectories from ``x0`` (6n,) or (B, 6n); ``make_nve`` states the
    contract (xs and forces are (B, T, 6n), B = 1 for one state)."""
    return make_nve(calc, dt, n_steps, **kwargs)(x0)[0]


# --- datasets ---------------------------------------------------------------------------------


class MDDataset(NamedTuple):
    """``trajectories`` (xs, forces (n_runs, T, 6n)) and each run's ``T0`` (n_runs,)."""

    trajectories: Trajectories
    T0: Float[Array, " n_runs"]


def make_lj_dataset(
    calc: ParticleCalculator,
    key: PRNGKeyArray,
    n_runs: int,
    T0_range: tuple[float, float] = (0.5, 1.5),
    same_initial: bool = True,
    *,
    dt: float = 0.001,
    n_steps: int = 250,
    save_every: int = 1,
    batch_size: int | None = None,
    dtype=jnp.float64,
    minimize_kwargs: dict | None = None,
    nve_kwargs: dict | None = None,
    initial: str = "fire",
) -> MDDataset:
    """``n_runs`` NVE runs (``make_nve``) with ``T0 ~ U(T0_range)`` each.

    ``same_initial=True`` is the reference protocol: one minimised configuration
    and one velocity draw shared by every run, scaled to each run's T0 (same
    directions). ``same_initial=False`` draws positions (insertion + FIRE) and
    velocities independently per run; minimisation is a host loop over runs.
    The NVE runs go to ``make_nve`` ``batch_size`` at a time (default all),
    sharing one neighbour-list capacity per batch; ``nve_kwargs`` may set its
    ``vmap_size`` (runs vmapped together; 1, sequential, is fastest on a CPU).

    ``initial`` picks the shared start of ``same_initial=True``: ``"fire"``
    (insertion and FIRE from ``key``, as above) or ``"lammps_reference"``, the
    reference's LAMMPS state with its fixed seeds and short minimisation
    (``lammps_initial.reference_initial_state``; Lennard-Jones only, needs
    LAMMPS); T0 is drawn from ``key`` either way.
    """
    n = calc.n_atoms
    t_key, pos_key, vel_key = jr.split(key, 3)
    T0 = jr.uniform(t_key, (n_runs,), jnp.float64, T0_range[0], T0_range[1])
    if initial not in INITIAL_STATES:
        raise ValueError(f"system.params.initial={initial!r} must be one of {INITIAL_STATES}")
    if initial == "lammps_reference":
        if not same_initial:
            raise ValueError("system.params.initial='lammps_reference' is one fixed state: it needs "
                             "system.params.same_initial=True")
        from macro_jax.systems import lammps_initial

        start, unit_velocities, info = lammps_initial.reference_initial_state(
            n, calc.box_size, calc.cutoff, calc.mass)
        logging.info("md: the reference's LAMMPS state: %d CG iterations, potential energy %.4f per atom",
                     info["minimize_iterations"], info["pe_per_atom_minimised"])
        if info["pe_per_atom_minimised"] > 0.0:
            # Its 10 % energy tolerance can stop CG while inserted atoms still overlap
            # (measured: -4.28 at 800 atoms, -4.16 at 2,700, but +28.7 at 6,400 and
            # +2,777 at 21,600): NVE from there is a hot explosion, not the reference's data.
            raise ValueError(
                f"system.params.initial='lammps_reference' is unusable for {n} atoms in a box of "
                f"{calc.box_size:g}: the reference's short minimisation stopped after {info['minimize_iterations']} "
                f"CG iterations at a potential energy of {info['pe_per_atom_minimised']:+.4g} per atom (must be "
                "<= 0: atoms still overlap); use system.params.initial='fire'")
        positions = jnp.broadcast_to(jnp.asarray(start), (n_runs, 3 * n))
        velocities = jnp.sqrt(T0)[:, None] * jnp.asarray(unit_velocities)[None, :]
    else:
        minimizer = make_minimizer(calc, **(minimize_kwargs or {}))
        if same_initial:
            positions = jnp.broadcast_to(minimizer(pos_key), (n_runs, 3 * n))
            vel_keys = jnp.broadcast_to(vel_key, (n_runs,) + vel_key.shape)
        else:
            positions = jnp.stack([minimizer(k) for k in jr.split(pos_key, n_runs)])
            vel_keys = jr.split(vel_key, n_runs)
        velocities = jax.vmap(initial_velocities, (0, None, 0, None))(vel_keys, n, T0, calc.mass)
    x0 = jnp.concatenate([positions, velocities], axis=1)

    run = make_nve(calc, dt, n_steps, save_every=save_every, dtype=dtype, **(nve_kwargs or {}))
    size = batch_size or n_runs
    start = time.perf_counter()
    parts = [jax.block_until_ready(run(x0[i: i + size])[0]) for i in range(0, n_runs, size)]
    logging.info("md: %d NVE runs of %d steps (%d atoms) in %.1f s", n_runs, n_steps, n, time.perf_counter() - start)
    forces = None if parts[0].forces is None else jnp.concatenate([p.forces for p in parts])
    traj = Trajectories(parts[0].times, jnp.concatenate([p.xs for p in parts]), forces)
    return MDDataset(traj, T0)


def total_energy(calc: ParticleCalculator, x, nbrs=None) -> Float[Array, ""]:
    """Kinetic plus (truncated) potential energy of one state (host helper: allocates
    a list from ``x`` when ``nbrs`` is None)."""
    n = calc.n_atoms
    if nbrs is None:
        nbrs = calc.allocate(x)
    kinetic = 0.5 * calc.mass * jnp.sum(x[3 * n:] ** 2)
    return kinetic + calc.potential_energy(x, nbrs)


__all__ = ["INITIAL_STATES", "random_insertion", "make_minimizer", "initial_positions", "initial_velocities", "make_nve", "run_nve",
           "MDDataset", "make_lj_dataset", "total_energy", "skin_neighbor_fn"]
