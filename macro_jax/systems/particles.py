"""Particles with a radial pair potential in a periodic cubic box (jax-md).

State ``x = (positions, velocities)``, each ``(n_atoms * 3,)`` atom-major
(``x1 y1 z1 x2 ...``), so ``N = 6 n_atoms``. Rates ``f(x) = (velocities,
forces / mass)``. Every atom is a site (``dofs_per_site = 6``): atom ``a`` owns
positions ``3a .. 3a+2`` and velocities ``3n + 3a .. 3n + 3a+2``. Lengths are in
units of sigma, energies of epsilon, masses of the atom mass (Lennard-Jones
reduced units with k_B = 1).

The pair energy is ``pair_fn(r)`` for ``r < cutoff`` and 0 beyond: truncated,
neither shifted nor smoothed (LAMMPS ``pair_style lj/cut`` with ``pair_modify
tail no``; jax-md's ``lennard_jones_neighbor_list`` would smooth from r = 2.0).
Distances use the minimum image, which is exact only if ``box_size >= 2
cutoff``; smaller boxes are rejected. Positions may be unwrapped: they are
wrapped into [0, box_size) before binning and distances use the minimum image.

Two force paths, one pair kernel (``_make_pair_kernel``: ``F_i = -d/dR_i`` of
the energy of the pairs that contain atom i, which is ``-dE/dR_i`` of the total):

* Full forces read a Dense jax-md neighbour list (a row of neighbours per
  atom). ``ParticleCalculator`` exposes the usual discipline: ``allocate``
  outside jit, ``update_and_forces`` inside jit, which hands back the list so
  the caller checks ``did_buffer_overflow``, and ``full_forces``, a host
  driver that reallocates on overflow. ``MicroSystem.force_fn(x)`` must be a
  pure function of ``x``: it rebuilds a list of fixed capacity (estimated
  from the density, see ``_capacity``) and raises on overflow.
* Subset forces sort all atoms once by cell (one sort of N int32 keys, no
  pair work). Cells are ``m x m`` rows across y and z (side >= cutoff) cut
  along x into ``m_x`` slabs of side >= cutoff / X_DIVISIONS, numbered x
  fastest, so the atoms of a run of neighbouring x-cells of one row are
  contiguous in the sorted order. For each of the k chosen atoms only, the
  candidates are the 9 neighbouring rows' runs of ``2 X_DIVISIONS + 1``
  x-cells around it (a run that wraps the box is two pieces), padded to
  ``range_capacity``. Pair work is O(k x 9 x range_capacity); no neighbour
  list is built and no other atom's force is evaluated. The thin x-cells
  search ~25% less volume than the 27 cells of side >= cutoff around an atom
  (at 51,200 atoms: 381 vs 512 sigma^3) and a run pads once, not per cell. Boxes with fewer than 3 rows per side or
  ``2 X_DIVISIONS + 1`` x-cells, or so small that 9 x range_capacity >= N,
  use all N atoms as candidates of each chosen atom instead (O(k N) pair work,
  no binning, still only the chosen atoms' forces).

Overflow is never silent. Inside jit, a capacity overflow raises through a
host callback (a ``RuntimeError`` eagerly, a ``JaxRuntimeError`` carrying the
same message under jit) naming the setting to raise, and the returned forces
are NaN so that a caller that swallows the error still cannot use them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax_md import energy, partition, space
from jaxtyping import Array, Float, Int, PRNGKeyArray

from macro_jax import observables
from macro_jax.systems.base import MicroSystem

PairFn = Callable[[Array], Array]

# Named jax-md pair energies a config can select by string (a config cannot hold a callable).
PAIR_FNS = {"lennard_jones": energy.lennard_jones, "morse": energy.morse, "soft_sphere": energy.soft_sphere}

# Lists and cells are built with a cut-off this much (relative) larger than the
# force cut-off, so a pair at r ~ cutoff that rounding puts on the other side in
# one code path is still a candidate in the other; the force mask decides.
LIST_SLACK = 1e-5

# The subset kernel's x-cells have side >= cutoff / X_DIVISIONS. On the 2-core CPU
# (51,200 atoms, 3,200 chosen, benchmarks/partial_forces.py) 1, 2 and 3 divisions
# took 31, 29 and 25 ms; at 3 the runs average 34 atoms, and finer cells pad more.
X_DIVISIONS = 3

# The shared start of the reference protocol's runs (``initial`` below).
INITIAL_STATES = ("fire", "lammps_reference")


def resolve_pair_fn(pair_fn: PairFn | str | None, pair_params: dict | None = None) -> PairFn:
    """A pair energy ``u(r)``: a callable as is, a name from ``PAIR_FNS`` bound
    to ``pair_params``, or (None) Lennard-Jones with epsilon = sigma = 1."""
    if pair_fn is None:
        pair_fn = "lennard_jones"
    if isinstance(pair_fn, str):
        if pair_fn not in PAIR_FNS:
            raise ValueError(f"pair_fn={pair_fn!r} is not one of {sorted(PAIR_FNS)}")
        defaults = {"lennard_jones": {"sigma": 1.0, "epsilon": 1.0}}.get(pair_fn, {})
        return functools.partial(PAIR_FNS[pair_fn], **{**defaults, **(pair_params or {})})
    if pair_params:
        raise ValueError("pair_params is only for a pair_fn given by name; bind them into the callable")
    return pair_fn


def use_cell_list(box_size: float, list_cutoff: float) -> bool:
    """Whether a jax-md neighbour list should build through its cell list. jax-md
    uses one from 3 cells per side, where all 27 cells are every atom's
    neighbours and the cell pass only adds work (measured at 800 atoms, box 10:
    a rebuild costs 61 ms with cells, 14 ms without); from 4 per side cells prune."""
    return box_size / list_cutoff >= 4.0


def _capacity(mean: float, multiplier: float) -> int:
    """Capacity for a count whose mean is ``mean``: ``multiplier`` times the
    mean plus three Poisson standard deviations. A liquid fluctuates less than
    an ideal gas, so this covers a liquid at the same density with room."""
    return int(math.ceil(multiplier * (mean + 3.0 * math.sqrt(mean))))


def raise_if(flag, message: str):
    """Raises ``RuntimeError(message)`` from the host if ``flag`` is true (any
    element, so it also works under vmap). Under jit the error surfaces as a
    ``JaxRuntimeError`` whose text contains ``message``."""

    def check(flag):
        if np.any(np.asarray(flag)):
            raise RuntimeError(message)

    jax.debug.callback(check, flag)


def _positions(x, n_atoms):
    return x[: 3 * n_atoms].reshape(n_atoms, 3)


def _xyz(sites):
    """Indices 3a, 3a+1, 3a+2 of each atom a of ``sites``, atom by atom."""
    return (3 * jnp.asarray(sites, jnp.int32)[:, None] + jnp.arange(3, dtype=jnp.int32)).reshape(-1)


def wrap_positions(positions, box_size):
    """Positions in [0, box_size): ``mod`` can round a tiny negative up to box_size."""
    wrapped = jnp.mod(positions, box_size)
    return jnp.where(wrapped >= box_size, wrapped - box_size, wrapped)


def _make_pair_kernel(pair_fn: PairFn, cutoff: float, box_size: float):
    """``(atom_forces, atom_energies)`` over padded candidate lists.

    Both take the chosen atoms' positions ``r`` (k, 3), their candidates'
    coordinates ``cand`` (3, k, M) (structure of arrays: one (k, M) plane per
    axis) and ``valid`` (k, M). ``atom_energies`` is ``sum_j u(|r_i - r_j|)``
    over valid candidates within ``cutoff`` (k,); ``atom_forces`` is minus its
    gradient in ``r_i`` (k, 3), which is ``-dE/dR_i`` of the total energy.

    The minimum image is ``d - L round(d / L)`` per axis: exact for |d| < L / 2
    (jax-md's ``space.periodic`` rounds through ``mod(d + L/2, L)``, which costs
    ~1e-6 relative in float32). The (3, k, M) layout matters on CPU: the same
    arithmetic on (k, M, 3) arrays ran 3x slower (XLA CPU, 2 cores,
    k = 3,200, M = 918).
    """
    cutoff_sq = cutoff * cutoff

    def total_energy(r, cand, valid):
        d = [r[:, a, None] - cand[a] for a in range(3)]
        d = [v - box_size * jnp.round(v / box_size) for v in d]
        dr_sq = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        inside = valid & (dr_sq < cutoff_sq)
        # Masked pairs (padding, self, beyond the cut-off) are evaluated at r = cutoff,
        # where u is finite, so that neither u nor its gradient produces NaN there.
        dist = jnp.sqrt(jnp.where(inside, dr_sq, cutoff_sq))
        return jnp.where(inside, pair_fn(dist), 0.0)

    def atom_energies(r, cand, valid):
        return jnp.sum(total_energy(r, cand, valid), axis=1)

    def atom_forces(r, cand, valid):
        # Row i of the sum depends on r_i only (candidates are held fixed), so the
        # gradient of the total is every atom's own gradient at once.
        return -jax.grad(lambda r: jnp.sum(total_energy(r, cand, valid)))(r)

    return atom_forces, atom_energies


def _candidates(positions, idx):
    """Coordinates (3, *idx.shape) of atoms ``idx`` (padding ``n`` reads atom n - 1; mask it)."""
    return positions.T[:, jnp.minimum(idx, positions.shape[0] - 1)]


@dataclasses.dataclass(frozen=True)
class ParticleCalculator:
    """The particle system plus the neighbour-list machinery behind it.

    ``system`` is the ``MicroSystem``; the rest is for callers that manage
    neighbour lists themselves (benchmarks, MD). Forces ``F`` are (n_atoms, 3)
    in energy / length; ``f = system.force_fn(x)`` holds ``F / mass``.

    * ``allocate(x, extra_capacity=0) -> NeighborList``: outside jit; jax-md's
      capacity rule (occupancy of ``x`` times ``capacity_multiplier``).
    * ``update_and_forces(x, nbrs) -> (F, nbrs)``: jittable; rebuilds the list
      for ``x`` at ``nbrs``'s capacity. The caller must check
      ``nbrs.did_buffer_overflow`` (F is then incomplete).
    * ``neighbor_forces(x, nbrs) -> F``: jittable; forces from an existing list
      built for ``x`` (no rebuild).
    * ``full_forces(x, nbrs=None) -> (f, nbrs)``: host driver; allocates when
      ``nbrs`` is None, and reallocates from ``x`` if the list overflowed.
    * ``subset_forces(x, sites) -> F_sites`` (k, 3): the cell-list kernel.
    * ``potential_energy(x, nbrs) -> E``: total energy from an existing list.
    * ``pair_energy(r) -> u``: the truncated pair energy.
    * ``fixed_neighbors``: the capacity-only list ``force_fn`` rebuilds at each
      call; ``update_and_forces(x, fixed_neighbors)`` gives a list for ``x`` at
      ``force_fn``'s capacity.
    """

    system: MicroSystem
    n_atoms: int
    box_size: float
    cutoff: float
    mass: float
    neighbor_capacity: int  # neighbours per atom in force_fn's list
    cells_per_side: int  # rows per side (y and z) of the subset kernel's grid
    x_cells: int  # x-cells per row of the subset kernel's grid
    range_capacity: int  # candidates per row (a run of 2 X_DIVISIONS + 1 x-cells) of the subset kernel
    cell_capacity: int  # atoms per cell of the cell list jax-md builds force_fn's list with
    displacement_fn: Callable
    neighbor_fn: partition.NeighborListFns
    allocate: Callable
    update_and_forces: Callable
    neighbor_forces: Callable
    full_forces: Callable
    subset_forces: Callable
    potential_energy: Callable
    pair_energy: Callable
    fixed_neighbors: partition.NeighborList

    subset_uses_cells: bool  # False: the subset kernel takes every atom as a candidate


def make_particle_calculator(
    n_atoms: int,
    box_size: float,
    pair_fn: PairFn | str | None = None,
    cutoff: float = 2.5,
    mass: float = 1.0,
    capacity_multiplier: float = 1.25,
    neighbor_capacity: int | None = None,
    cell_capacity: int | None = None,
    range_capacity: int | None = None,
    pair_params: dict | None = None,
    temperature_scale: float = 1.0,
    T0_range: tuple[float, float] = (0.5, 1.5),
    md_batch_size: int = 16,
    same_initial: bool = True,
    initial: str = "fire",
) -> ParticleCalculator:
    """Builds the calculator (see module doc).

    Args:
      n_atoms: number of atoms n.
      box_size: side L of the periodic cubic box, in sigma; at least 2 cutoff.
      pair_fn: radial pair energy ``u(r)`` (jax-md style, e.g.
        ``functools.partial(jax_md.energy.morse, alpha=6.)``), or a name in
        ``PAIR_FNS`` with keyword ``pair_params``. Default Lennard-Jones, eps =
        sigma = 1.
      cutoff: energy is ``u(r)`` for r < cutoff and 0 beyond (no shift).
      mass: atom mass; rates of velocities are F / mass.
      capacity_multiplier: headroom on estimated capacities: of the fixed
        neighbour list behind ``force_fn``, of the subset kernel's runs, and
        (as in jax-md) of lists built by ``allocate``.
      neighbor_capacity: neighbours per atom of ``force_fn``'s list. Default
        ``_capacity(rho 4/3 pi cutoff^3, capacity_multiplier)``.
      cell_capacity: atoms per cell of the cell list jax-md builds
        ``force_fn``'s list with. Default ``_capacity(n / cells,
        capacity_multiplier)``.
      range_capacity: candidates per row of the subset kernel (atoms in a run
        of ``2 X_DIVISIONS + 1`` x-cells). Default ``_capacity(mean,
        capacity_multiplier)``.
      temperature_scale: the observable is ``temperature_scale * T`` (the
        reference stores 20 T; the scale weighs the T row in ``L_z``).
      T0_range: initial temperatures of ``trajectory_fn``'s runs, U(T0_range).
      md_batch_size: MD runs per ``md.make_nve`` call of ``trajectory_fn`` (they
        share one neighbour-list capacity and run one after another).
      same_initial: ``trajectory_fn``'s protocol. True (the reference): every
        run of one call starts from one minimised configuration and one
        velocity draw, only T0 differs. False: each run inserts, minimises and
        draws its own (independent runs).
      initial: the shared start of ``same_initial``: ``"fire"`` (random
        insertion and FIRE to |F| < 1e-3, jax-md) or ``"lammps_reference"``
        (the reference's LAMMPS state: fixed seeds and its short minimisation;
        Lennard-Jones eps = sigma = 1 only, needs LAMMPS; see
        ``lammps_initial``).
    """
    n = int(n_atoms)
    if initial not in INITIAL_STATES:
        raise ValueError(f"system.params.initial={initial!r} must be one of {INITIAL_STATES}")
    if initial == "lammps_reference" and (pair_fn not in (None, "lennard_jones") or pair_params):
        raise ValueError(f"system.params.initial='lammps_reference' is the reference's Lennard-Jones state "
                         f"(eps = sigma = 1): it needs pair_fn='lennard_jones' without pair_params, "
                         f"not pair_fn={pair_fn!r}, pair_params={pair_params!r}")
    box_size = float(box_size)
    cutoff = float(cutoff)
    if n < 2:
        raise ValueError(f"system.n_atoms={n} must be at least 2")
    if box_size < 2.0 * cutoff:
        raise ValueError(
            f"system.box_size={box_size:g} must be at least 2 cutoff = {2 * cutoff:g}: the minimum "
            "image convention misses interactions with further periodic images in a smaller box"
        )
    pair_fn = resolve_pair_fn(pair_fn, pair_params)
    density = n / box_size**3
    list_cutoff = cutoff * (1.0 + LIST_SLACK)

    displacement_fn, _ = space.periodic(box_size)  # for jax-md's neighbour lists
    atom_forces, atom_energies = _make_pair_kernel(pair_fn, cutoff, box_size)

    # jax-md's cells (full path) and the subset kernel's rows have side L / m >= list_cutoff.
    m = int(box_size // list_cutoff)
    if cell_capacity is None:
        cell_capacity = min(n, _capacity(n / m**3, capacity_multiplier))
    # The subset kernel's x-cells: side L / m_x >= list_cutoff / X_DIVISIONS, so every
    # neighbour of an atom in x-cell i lies in x-cells i - X_DIVISIONS .. i + X_DIVISIONS.
    m_x = int(box_size // (list_cutoff / X_DIVISIONS))
    n_cells = m * m * m_x
    run = 2 * X_DIVISIONS + 1
    if range_capacity is None:
        range_capacity = min(n, _capacity(n * run / (m * m * m_x), capacity_multiplier))
    range_capacity = int(range_capacity)
    if neighbor_capacity is None:
        neighbor_capacity = _capacity(density * 4.0 / 3.0 * math.pi * list_cutoff**3, capacity_multiplier)
    neighbor_capacity = min(int(neighbor_capacity), n - 1)
    cell_capacity = int(cell_capacity)
    # 9 distinct rows need m >= 3, a run of distinct x-cells m_x >= run; and the runs
    # only pay once their 9 x capacity candidates are fewer than all n atoms.
    subset_uses_cells = m >= 3 and m_x >= run and 9 * range_capacity < n

    # --- full forces: jax-md Dense neighbour list -----------------------------------------
    # dr_threshold = 0: jax-md rebuilds the list on every update (no skin, no reuse test);
    # configurations here are unrelated samples, not consecutive MD steps.
    jaxmd_uses_cells = use_cell_list(box_size, list_cutoff)
    neighbor_fn = partition.neighbor_list(
        displacement_fn, box_size, list_cutoff, dr_threshold=0.0,
        capacity_multiplier=capacity_multiplier, format=partition.Dense, disable_cell_list=not jaxmd_uses_cells,
    )
    # force_fn's list: a template carrying only capacities (static fields). With dr_threshold
    # = 0 an update reads neither idx nor reference_position, so they are empty placeholders.
    template = partition.NeighborList(
        idx=jnp.zeros((0, 0), jnp.int32),
        reference_position=jnp.zeros((0, 3), jnp.float32),
        error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
        cell_list_capacity=cell_capacity if jaxmd_uses_cells else None,
        max_occupancy=neighbor_capacity,
        format=partition.Dense,
        cell_size=list_cutoff if jaxmd_uses_cells else None,
        cell_list_fn=(partition.cell_list(box_size, list_cutoff, capacity_multiplier)
                      if jaxmd_uses_cells else None),
        update_fn=neighbor_fn.update,
    )

    def neighbor_forces(x, nbrs):
        positions = wrap_positions(_positions(x, n), box_size)
        return atom_forces(positions, _candidates(positions, nbrs.idx), nbrs.idx < n)

    def potential_energy(x, nbrs):
        positions = wrap_positions(_positions(x, n), box_size)
        energies = atom_energies(positions, _candidates(positions, nbrs.idx), nbrs.idx < n)
        return 0.5 * jnp.sum(energies)  # each pair seen twice

    def update_and_forces(x, nbrs):
        nbrs = neighbor_fn.update(wrap_positions(_positions(x, n), box_size), nbrs)
        return neighbor_forces(x, nbrs), nbrs

    def allocate(x, extra_capacity: int = 0):
        return neighbor_fn.allocate(wrap_positions(_positions(x, n), box_size), extra_capacity=extra_capacity)

    def rates(x, forces):
        return jnp.concatenate([x[3 * n:], (forces / mass).reshape(-1)])

    _jit_update_and_forces = jax.jit(update_and_forces)

    def full_forces(x, nbrs=None):
        if nbrs is None:
            nbrs = allocate(x)
        forces, new_nbrs = _jit_update_and_forces(x, nbrs)
        if new_nbrs.did_buffer_overflow:
            new_nbrs = allocate(x)  # capacity from this configuration
            forces, new_nbrs = _jit_update_and_forces(x, new_nbrs)
            if new_nbrs.did_buffer_overflow:
                raise RuntimeError("neighbour list overflowed right after allocation for this configuration")
        return rates(x, forces), new_nbrs

    nbr_overflow_msg = (
        f"particles: neighbour list overflow (n_atoms={n}): an atom has more than "
        f"neighbor_capacity={neighbor_capacity} neighbours within {cutoff:g}, or a cell of "
        f"jax-md's cell list more than cell_capacity={cell_capacity} atoms. Raise "
        f"system.capacity_multiplier (now {capacity_multiplier:g}) or system.neighbor_capacity / "
        "system.cell_capacity. Forces of this call are NaN."
    )

    def force_fn(x):
        forces, nbrs = update_and_forces(x, template)
        overflow = nbrs.did_buffer_overflow != 0
        raise_if(overflow, nbr_overflow_msg)
        return jnp.where(overflow, jnp.nan, rates(x, forces))

    # --- subset forces: runs of sorted cells, only the chosen atoms' pairs ---------------
    rows = jnp.asarray(np.stack(np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing="ij"), -1).reshape(9, 2),
                       jnp.int32)
    slots = jnp.arange(range_capacity, dtype=jnp.int32)
    range_overflow_msg = (
        f"particles: subset kernel overflow (n_atoms={n}, {m} x {m} rows of {m_x} x-cells): a run of "
        f"{run} x-cells holds more than range_capacity={range_capacity} atoms. Raise "
        f"system.capacity_multiplier (now {capacity_multiplier:g}) or system.range_capacity. Forces of "
        "this call are NaN."
    )
    sort_one_key = n_cells * n < 2**31  # cell * n + atom fits in int32

    def bin_atoms(positions):
        """Atoms sorted by cell: ``order`` (n,) atom ids, ``rank`` (n,) each atom's place
        in it, ``first`` (n_cells + 1,) index of each cell's first atom in the sorted
        order (``first[c + 1] - first[c]`` atoms in cell c), and the cell coordinates
        (n, 3) as (x-cell, row y, row z). One sort of n keys; no pair work."""
        ix = jnp.clip(jnp.floor(positions[:, 0] * (m_x / box_size)).astype(jnp.int32), 0, m_x - 1)
        iyz = jnp.clip(jnp.floor(positions[:, 1:] * (m / box_size)).astype(jnp.int32), 0, m - 1)
        cell = (iyz[:, 0] * m + iyz[:, 1]) * m_x + ix
        if sort_one_key:
            # A stable argsort as ONE sort of the keys cell * n + atom: sorting a
            # single int32 array is ~6x cheaper on CPU than sorting (key, index) pairs.
            order = jnp.sort(cell * n + jnp.arange(n, dtype=jnp.int32)) % n
        else:
            order = jnp.argsort(cell, stable=True).astype(jnp.int32)
        counts = jnp.zeros((n_cells,), jnp.int32).at[cell].add(1)
        first = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        return order, rank, first, jnp.concatenate([ix[:, None], iyz], axis=1)

    def run_candidates(first, cells):
        """Sorted-order indices (k, 9 range_capacity) of the candidates of atoms in
        ``cells`` (k, 3), with their validity and the overflow flag. A run of x-cells
        ``i - X_DIVISIONS .. i + X_DIVISIONS`` that wraps the box is two pieces:
        ``[max(lo, 0), min(hi, m_x - 1)]`` and the wrapped rest."""
        ix, iy, iz = cells[:, 0], cells[:, 1], cells[:, 2]
        row = (jnp.mod(iy[:, None] + rows[:, 0], m) * m + jnp.mod(iz[:, None] + rows[:, 1], m)) * m_x  # (k, 9)
        lo, hi = (ix - X_DIVISIONS)[:, None], (ix + X_DIVISIONS)[:, None]
        start1 = first[row + jnp.maximum(lo, 0)]
        len1 = first[row + jnp.minimum(hi, m_x - 1) + 1] - start1
        wraps = (lo < 0) | (hi >= m_x)  # m_x >= run: at most one side wraps
        a2, b2 = jnp.where(lo < 0, lo + m_x, 0), jnp.where(lo < 0, m_x - 1, hi - m_x)
        start2 = first[row + a2]
        len2 = jnp.where(wraps, first[row + b2 + 1] - start2, 0)
        t = slots[None, None, :]
        idx = jnp.where(t < len1[..., None], start1[..., None] + t, start2[..., None] + t - len1[..., None])
        valid = t < (len1 + len2)[..., None]
        k = cells.shape[0]
        return idx.reshape(k, -1), valid.reshape(k, -1), jnp.max(len1 + len2) > range_capacity

    def subset_forces(x, sites):
        sites = jnp.asarray(sites, jnp.int32)
        positions = wrap_positions(_positions(x, n), box_size)
        if subset_uses_cells:
            order, rank, first, cells = bin_atoms(positions)
            idx, valid, overflow = run_candidates(first, cells[sites])
            valid = valid & (idx != rank[sites][:, None])
            cand = _candidates(positions[order], idx)
            raise_if(overflow, range_overflow_msg)
        else:
            # Fewer than 3 rows or 2 X_DIVISIONS + 1 x-cells per side (runs would repeat
            # atoms) or fewer atoms than the runs hold: every atom is a candidate (O(k n)
            # pairs, only k forces).
            # A broadcast, not a gather: XLA fuses it into the pair arithmetic.
            valid = jnp.arange(n, dtype=jnp.int32)[None, :] != sites[:, None]
            cand = jnp.broadcast_to(positions.T[:, None, :], (3, sites.shape[0], n))
            overflow = jnp.zeros((), bool)
        forces = atom_forces(positions[sites], cand, valid)
        return jnp.where(overflow, jnp.nan, forces)

    def site_dofs(sites: Int[Array, " k"]) -> Int[Array, " 6k"]:
        """Position coordinates of ``sites`` (3 per atom, in the order of ``sites``),
        then their velocity coordinates: ``[3a, 3a+1, 3a+2, ..., 3n+3a, 3n+3a+1, 3n+3a+2, ...]``."""
        xyz = _xyz(sites)
        return jnp.concatenate([xyz, 3 * n + xyz])

    def subset_force_fn(x: Float[Array, " N"], sites: Int[Array, " k"]) -> Float[Array, " 6k"]:
        """``force_fn(x)[site_dofs(sites)]``: the chosen atoms' velocities, then their forces / mass."""
        forces = subset_forces(x, sites)
        return jnp.concatenate([x[3 * n + _xyz(sites)], (forces / mass).reshape(-1)])

    def observable_fn(x):
        return temperature_scale * observables.temperature(x, n, mass)

    def trajectory_fn(key, n_traj: int, *, dt: float = 0.001, n_steps: int = 250, save_every: int = 1,
                      integrator: str = "velocity_verlet", dtype=jnp.float32, labels: bool = True):
        """``n_traj`` NVE runs (``md.make_lj_dataset`` with ``same_initial``,
        T0 ~ U(T0_range)): ``xs`` and ``forces`` (n_traj, n_steps // save_every,
        6n) in ``dtype``, positions unwrapped; ``labels=False``: ``forces=None``."""
        if integrator != "velocity_verlet":
            raise ValueError(f"data.*_integrator={integrator!r}: particle MD uses 'velocity_verlet'")
        from macro_jax.systems import md  # md imports this module

        return md.make_lj_dataset(calculator, key, n_traj, tuple(T0_range), same_initial=same_initial, dt=dt,
                                  n_steps=n_steps, save_every=save_every, dtype=dtype,
                                  batch_size=md_batch_size, nve_kwargs={"labels": labels},
                                  initial=initial).trajectories

    def pair_energy(r):
        r = jnp.asarray(r)
        return jnp.where(r < cutoff, pair_fn(jnp.where(r < cutoff, r, cutoff)), 0.0)

    system = MicroSystem(
        name="particles",
        n_dof=6 * n,
        n_sites=n,
        dofs_per_site=6,
        n_observables=1,
        force_fn=force_fn,
        subset_force_fn=subset_force_fn,
        observable_fn=observable_fn,
        site_dofs=site_dofs,
        trajectory_fn=trajectory_fn,
        integrators=("velocity_verlet",),
        observable_names=("temperature" if temperature_scale == 1.0 else f"{temperature_scale:g} x temperature",),
        centre_shift=(0.5 * float(box_size), 3 * n),  # positions (the first 3n dofs) from the box centre
    )
    calculator = ParticleCalculator(
        system=system, n_atoms=n, box_size=box_size, cutoff=cutoff, mass=float(mass),
        neighbor_capacity=neighbor_capacity, cells_per_side=m, x_cells=m_x, range_capacity=range_capacity,
        cell_capacity=cell_capacity,
        subset_uses_cells=subset_uses_cells,
        displacement_fn=displacement_fn, neighbor_fn=neighbor_fn, allocate=allocate,
        update_and_forces=update_and_forces, neighbor_forces=neighbor_forces, full_forces=full_forces,
        subset_forces=subset_forces, potential_energy=potential_energy, pair_energy=pair_energy,
        fixed_neighbors=template,
    )
    return calculator  # trajectory_fn reads it


def make_particle_system(n_atoms: int, box_size: float, **kwargs) -> MicroSystem:
    """The ``MicroSystem`` of ``make_particle_calculator`` (same arguments)."""
    return make_particle_calculator(n_atoms, box_size, **kwargs).system


def lattice_state(
    key: PRNGKeyArray,
    n_atoms: int,
    box_size: float,
    temperature: float = 1.0,
    mass: float = 1.0,
    jitter: float = 0.1,
    dtype=jnp.float32,
) -> Float[Array, " N"]:
    """A quick non-overlapping state: atoms on random distinct sites of a simple
    cubic lattice of ``ceil(n^(1/3))^3`` sites filling the box, displaced by up
    to ``jitter`` lattice spacings per coordinate (so no two atoms are closer
    than ``(1 - 2 jitter)`` spacings), with Maxwell-Boltzmann velocities at
    ``temperature`` minus their mean. Not an equilibrium liquid."""
    site_key, jitter_key, v_key = jr.split(key, 3)
    n_side = math.ceil(round(n_atoms ** (1.0 / 3.0), 9))
    spacing = box_size / n_side
    chosen = jr.permutation(site_key, n_side**3)[:n_atoms]  # one-off set-up, not the subset sampler
    grid = jnp.stack(jnp.unravel_index(chosen, (n_side,) * 3), -1).astype(jnp.float64)
    offset = jr.uniform(jitter_key, (n_atoms, 3), jnp.float64, -jitter, jitter)
    positions = (grid + 0.5 + offset) * spacing
    v = jr.normal(v_key, (n_atoms, 3), jnp.float64) * jnp.sqrt(temperature / mass)
    v = v - jnp.mean(v, axis=0)
    return jnp.concatenate([positions.reshape(-1), v.reshape(-1)]).astype(dtype)
