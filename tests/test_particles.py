"""Particles (jax-md): subset forces == full forces == a dense reference; the
truncated unshifted pair energy; overflow is never silent; layout; temperature."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import pytest
from jax_md import energy

from macro_jax import observables
from macro_jax.systems import make_system, sample_sites
from macro_jax.systems.particles import lattice_state, make_particle_calculator

# jax-md's all-pairs candidate path scatters int64 into int32 under x64 (its code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")

LJ = functools.partial(energy.lennard_jones, sigma=1.0, epsilon=1.0)
MORSE = functools.partial(energy.morse, sigma=1.0, epsilon=5.0, alpha=5.0)
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}  # two calculators in the same dtype, relative to max |F|
# Against the float64 dense reference a float32 calculator carries its own rounding: displacements of
# positions ~10 lose ~1e-7 relative, and close pairs (F ~ 13 F/r sensitivity) turn that into ~2e-5 of max |F|.
REF_TOL = {jnp.float32: 1e-4, jnp.float64: 1e-10}


def box(n_atoms, density=0.8):
    return (n_atoms / density) ** (1.0 / 3.0)


@functools.lru_cache(maxsize=None)
def calculator(n_atoms, density, pair, cutoff):
    return make_particle_calculator(n_atoms, box(n_atoms, density), pair_fn={"lj": LJ, "morse": MORSE}[pair],
                                    cutoff=cutoff)


def dense_forces(positions, box_size, pair_fn, cutoff):
    """Independent O(n^2) reference: -grad of the total truncated energy, minimum image by rounding."""

    def total_energy(r):
        dr = r[:, None, :] - r[None, :, :]
        dr = dr - box_size * jnp.round(dr / box_size)
        dr_sq = jnp.sum(dr**2, -1)
        mask = ~jnp.eye(r.shape[0], dtype=bool) & (dr_sq < cutoff**2)
        u = pair_fn(jnp.sqrt(jnp.where(mask, dr_sq, 1.0)))
        return 0.5 * jnp.sum(jnp.where(mask, u, 0.0))

    return -jax.grad(total_energy)(positions)


def edge_sites(x, n_atoms, box_size, extra_key, n_extra=12):
    """Atoms within 0.6 of a box face (periodic images matter), the atom nearest a
    corner, and random others (``sample_sites``), in scrambled order."""
    p = np.mod(np.asarray(x[: 3 * n_atoms], np.float64).reshape(n_atoms, 3), box_size)
    to_face = np.minimum(p, box_size - p)
    face = np.flatnonzero(to_face.min(1) < 0.6)[:12]
    corner = np.argmin(to_face.sum(1))
    rest = np.asarray(sample_sites(extra_key, n_atoms, n_extra))
    sites = np.concatenate([[corner], face, rest])
    assert len(face) >= 4
    return jnp.asarray(np.random.default_rng(0).permutation(sites), jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "n_atoms,density,pair,cutoff,cells",
    [(256, 0.8, "lj", 2.5, 0),  # 2 cells per side: the all-pairs path of the subset kernel
     (864, 0.8, "lj", 2.5, 4),  # cell list, 4^3 cells
     (500, 0.8, "morse", 1.6, 5)],  # a second jax-md potential through the same plug-in, 5^3 cells
)
def test_subset_forces_equal_full_forces(n_atoms, density, pair, cutoff, cells, dtype):
    calc = calculator(n_atoms, density, pair, cutoff)
    assert calc.subset_uses_cells == (cells > 0) and (cells == 0 or calc.cells_per_side == cells)
    system, n, size = calc.system, n_atoms, calc.box_size
    x = lattice_state(jr.PRNGKey(0), n, size, dtype=dtype)
    # unwrap some atoms by whole boxes: forces must not change
    shift = jr.randint(jr.PRNGKey(1), (n, 3), -1, 2).astype(dtype) * size
    x = x.at[: 3 * n].add(shift.reshape(-1))
    sites = edge_sites(x, n, size, jr.PRNGKey(2))

    full = jax.jit(system.force_fn)(x)
    sub = jax.jit(system.subset_force_fn)(x, sites)
    assert full.dtype == sub.dtype == dtype and sub.shape == (6 * len(sites),)
    scale = float(jnp.max(jnp.abs(full[3 * n:])))
    np.testing.assert_allclose(np.asarray(sub), np.asarray(full)[np.asarray(system.site_dofs(sites))],
                               rtol=0, atol=TOL[dtype] * scale)
    # and the subset forces against the independent dense reference
    ref = dense_forces(x[: 3 * n].reshape(n, 3).astype(jnp.float64), size, {"lj": LJ, "morse": MORSE}[pair], cutoff)
    np.testing.assert_allclose(np.asarray(sub[3 * len(sites):]).reshape(-1, 3), np.asarray(ref)[np.asarray(sites)],
                               rtol=0, atol=REF_TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_neighbor_list_forces_equal_dense_forces(dtype):
    calc = calculator(500, 0.8, "lj", 2.5)
    n, size = 500, calc.box_size
    xs = jnp.stack([lattice_state(jr.PRNGKey(i), n, size, dtype=dtype) for i in range(2)])
    full = jax.jit(jax.vmap(calc.system.force_fn))(xs)  # vmapped, as data.label_full calls it
    for x, f in zip(xs, full):
        ref = dense_forces(x[: 3 * n].reshape(n, 3).astype(jnp.float64), size, LJ, 2.5)
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(f[3 * n:]).reshape(n, 3), np.asarray(ref), rtol=0,
                                   atol=REF_TOL[dtype] * scale)
        np.testing.assert_array_equal(np.asarray(f[: 3 * n]), np.asarray(x[3 * n:]))  # d(position)/dt = v
    # the explicit discipline: allocate outside jit, forces from the existing list, energy
    x = xs[0]
    nbrs = calc.allocate(x)
    forces = jax.jit(calc.neighbor_forces)(x, nbrs)
    np.testing.assert_allclose(np.asarray(forces).reshape(-1), np.asarray(full[0, 3 * n:]), rtol=0,
                               atol=TOL[dtype] * float(jnp.max(jnp.abs(forces))))
    minus_grad = -jax.grad(lambda y: calc.potential_energy(y, nbrs))(x)[: 3 * n]
    np.testing.assert_allclose(np.asarray(minus_grad), np.asarray(forces).reshape(-1), rtol=0,
                               atol=TOL[dtype] * float(jnp.max(jnp.abs(forces))))


def test_lennard_jones_is_truncated_not_shifted_or_smoothed():
    size = 10.0
    calc = make_particle_calculator(2, size)  # defaults: LJ eps = sigma = 1, cut-off 2.5
    r = jnp.asarray([0.95, 2 ** (1 / 6), 1.5, 2.2, 2.49, 2.51, 3.0, 4.9], jnp.float64)
    analytic = np.where(np.asarray(r) < 2.5, 4 * (np.asarray(r) ** -12 - np.asarray(r) ** -6), 0.0)
    np.testing.assert_allclose(np.asarray(calc.pair_energy(r)), analytic, rtol=1e-13, atol=0)
    # jax-md's neighbour-list LJ smooths from 2.0: at r = 2.2 its energy differs from ours
    smoothed = energy.multiplicative_isotropic_cutoff(LJ, 2.0, 2.5)(jnp.asarray(2.2))
    assert abs(float(smoothed) - analytic[3]) > 1e-3 * abs(analytic[3])

    # two atoms across the periodic boundary at distance rr: force = -du/dr along the bond
    force_fn, subset_force_fn = jax.jit(calc.system.force_fn), jax.jit(calc.system.subset_force_fn)
    for rr in [1.1, 2.2, 2.49, 2.51]:
        x = jnp.zeros(12, jnp.float64).at[0:3].set(jnp.asarray([0.3, 5.0, 5.0]))
        x = x.at[3:6].set(jnp.asarray([size + 0.3 - rr, 5.0, 5.0]))
        du = 24 * (rr**-7 - 2 * rr**-13) if rr < 2.5 else 0.0  # du/dr
        f_x = -du  # atom 0 sits at +rr from atom 1 along x (through the boundary)
        full = force_fn(x)
        np.testing.assert_allclose(np.asarray(full[6:]), [f_x, 0, 0, -f_x, 0, 0], rtol=1e-12, atol=1e-14)
        sub = subset_force_fn(x, jnp.asarray([1], jnp.int32))
        np.testing.assert_allclose(np.asarray(sub[3:]), [-f_x, 0, 0], rtol=1e-12, atol=1e-14)


def test_site_dofs_layout_and_all_sites_is_force_fn():
    calc = calculator(500, 0.8, "lj", 2.5)
    system, n = calc.system, 500
    np.testing.assert_array_equal(
        np.asarray(system.site_dofs(jnp.asarray([2, 0], jnp.int32))),
        [6, 7, 8, 0, 1, 2, 3 * n + 6, 3 * n + 7, 3 * n + 8, 3 * n, 3 * n + 1, 3 * n + 2],
    )
    every = jnp.arange(n, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(system.site_dofs(every)), np.arange(6 * n))  # identity layout
    x = lattice_state(jr.PRNGKey(3), n, calc.box_size, dtype=jnp.float64)
    full = jax.jit(system.force_fn)(x)
    np.testing.assert_allclose(np.asarray(jax.jit(system.subset_force_fn)(x, every)), np.asarray(full), rtol=0,
                               atol=1e-10 * float(jnp.max(jnp.abs(full))))


def test_subset_force_reads_only_atoms_within_the_cutoff():
    """The force on an atom depends on its own position and its neighbours' only."""
    calc = calculator(500, 0.8, "morse", 1.6)
    n = 500
    x = lattice_state(jr.PRNGKey(4), n, calc.box_size, dtype=jnp.float64)
    a = 7
    grad = jax.jacrev(lambda y: calc.subset_forces(y, jnp.asarray([a], jnp.int32))[0])(x)  # (3, 6n)
    touched = set(np.flatnonzero(np.any(np.asarray(grad) != 0, axis=0)) // 3)
    p = np.asarray(x[: 3 * n]).reshape(n, 3)
    d = p - p[a]
    d -= calc.box_size * np.round(d / calc.box_size)
    within = set(np.flatnonzero(np.linalg.norm(d, axis=1) < 1.6))  # includes a itself
    assert touched == within and len(within) > 5


def test_neighbor_list_overflow_is_reallocated_or_raises():
    calc = calculator(500, 0.8, "lj", 2.5)
    n, size = 500, calc.box_size
    sparse = lattice_state(jr.PRNGKey(5), n, size, dtype=jnp.float64)
    # the same atoms squeezed into 0.6^3 of the box: ~4.6x the density
    compressed = sparse.at[: 3 * n].multiply(0.6)
    nbrs = calc.allocate(sparse)
    _, updated = jax.jit(calc.update_and_forces)(compressed, nbrs)
    assert updated.did_buffer_overflow
    # the host driver reallocates and returns correct forces
    f, new_nbrs = calc.full_forces(compressed, nbrs)
    assert not new_nbrs.did_buffer_overflow and new_nbrs.max_occupancy > nbrs.max_occupancy
    ref = dense_forces(compressed[: 3 * n].reshape(n, 3), size, LJ, 2.5)
    np.testing.assert_allclose(np.asarray(f[3 * n:]), np.asarray(ref).reshape(-1), rtol=0,
                               atol=1e-10 * float(jnp.max(jnp.abs(ref))))
    # the pure force_fn (fixed capacity) raises, naming the setting
    with pytest.raises(Exception, match="capacity_multiplier"):
        jax.block_until_ready(jax.jit(calc.system.force_fn)(compressed))


def test_subset_kernel_overflow_raises():
    calc = calculator(500, 0.8, "morse", 1.6)
    n = 500
    x = lattice_state(jr.PRNGKey(6), n, calc.box_size, dtype=jnp.float64)
    compressed = x.at[: 3 * n].multiply(0.4)
    sites = jnp.asarray([0, 1, 2], jnp.int32)
    with pytest.raises(Exception, match="range_capacity"):
        jax.block_until_ready(jax.jit(calc.system.subset_force_fn)(compressed, sites))
    # an explicitly tiny capacity overflows on the ordinary configuration too
    tight = make_particle_calculator(n, calc.box_size, pair_fn=MORSE, cutoff=1.6, range_capacity=2)
    with pytest.raises(Exception, match="range_capacity=2"):
        jax.block_until_ready(tight.system.subset_force_fn(x, sites))


def test_temperature_by_hand():
    v = np.asarray([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.5, 0.5, 0.5], [-1.5, 1.5, -0.5]])
    x = jnp.concatenate([jnp.zeros(12), jnp.asarray(v.reshape(-1))])
    # sum |v|^2 = 1 + 4 + 0.75 + 4.75 = 10.5; T = m 10.5 / (3 (4 - 1))
    np.testing.assert_allclose(np.asarray(observables.temperature(x, 4, 2.0)), [2.0 * 10.5 / 9.0], rtol=1e-15)
    calc = make_particle_calculator(4, 10.0, mass=2.0)
    np.testing.assert_allclose(np.asarray(calc.system.observable_fn(x)), [21.0 / 9.0], rtol=1e-15)


def test_registry_builds_particles_and_rejects_small_boxes():
    cfg = ml_collections.ConfigDict({"name": "particles", "params": {"n_atoms": 108, "box_size": 5.2,
                                                                      "pair_fn": "morse", "cutoff": 2.0}})
    system = make_system(cfg)
    assert (system.n_dof, system.n_sites, system.dofs_per_site, system.n_observables) == (648, 108, 6, 1)
    with pytest.raises(ValueError, match="velocity_verlet"):  # MD data (tests/test_md.py) is NVE velocity Verlet
        system.trajectory_fn(jr.PRNGKey(0), 1, integrator="euler")
    with pytest.raises(ValueError, match="at least 2 cutoff"):
        make_particle_calculator(32, box(32))


def _largest_intermediate(jaxpr):
    """Elements of the largest value any equation of ``jaxpr`` (or a sub-jaxpr) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            for inner in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


def test_subset_kernel_does_no_pair_work_for_other_atoms():
    """Structure, not timing: with k = 3 chosen atoms no intermediate of the subset
    kernel is as large as a per-atom pair array over all atoms (n x neighbours); the
    largest are the O(n) binning arrays and the k x 9 x range_capacity candidates."""
    calc = calculator(500, 0.8, "morse", 1.6)
    n, k = 500, 3
    x = lattice_state(jr.PRNGKey(7), n, calc.box_size, dtype=jnp.float32)
    sites = jnp.asarray([0, 1, 2], jnp.int32)
    sub = _largest_intermediate(jax.make_jaxpr(calc.system.subset_force_fn)(x, sites).jaxpr)
    full = _largest_intermediate(jax.make_jaxpr(calc.system.force_fn)(x).jaxpr)
    bound = max(6 * n, calc.cells_per_side**2 * calc.x_cells + 1, k * 9 * calc.range_capacity * 3)
    assert sub <= bound < n * calc.neighbor_capacity <= full


def test_full_force_labels_are_force_fn_per_configuration_in_memory_of_one():
    # The L_z labeller maps force_fn over a chunk; a vmapped neighbour build held every configuration's
    # temporaries at once (27 GB for a chunk of 256 at 2,700 atoms).
    from macro_jax.data import labeller

    calc = calculator(256, 0.8, "lj", 2.5)
    system = calc.system
    xs = jnp.stack([lattice_state(k, 256, calc.box_size) for k in jr.split(jr.PRNGKey(5), 16)])
    label = jax.jit(labeller(system, "z"))
    one = jax.jit(system.force_fn)
    np.testing.assert_array_equal(np.asarray(label(xs[:4], None)), np.stack([np.asarray(one(x)) for x in xs[:4]]))

    def temp_bytes(batch):
        return label.lower(xs[:batch], None).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(16) < 2 * temp_bytes(1) + 4 * xs[0].size * 16  # no per-configuration temporaries
