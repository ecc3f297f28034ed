"""MD data generation (issue 3 item 4): insertion + FIRE, velocities at T0 with zero
momentum, NVE velocity Verlet with skin neighbour lists, unwrapped positions, exact
force labels, overflow handling, and the dataset protocols. 108 atoms at density 0.8
(box 5.13, the smallest box the cut-off 2.5 allows), float64."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax_md import energy

from macro_jax import observables
from macro_jax.systems import md
from macro_jax.systems.particles import make_particle_calculator

pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning",
                                        "ignore:Explicitly requested dtype:UserWarning")

N_ATOMS = 108
BOX = (N_ATOMS / 0.8) ** (1.0 / 3.0)
LJ = functools.partial(energy.lennard_jones, sigma=1.0, epsilon=1.0)
MINIMIZE = {"max_steps": 300}  # enough to clear insertion overlaps; keeps the tests at seconds


@functools.lru_cache(maxsize=None)
def calculator(shifted=False):
    pair_fn = (lambda r: LJ(r) - LJ(2.5)) if shifted else LJ
    return make_particle_calculator(N_ATOMS, BOX, pair_fn=pair_fn)


@functools.lru_cache(maxsize=None)
def minimised(shifted=False):
    return md.initial_positions(calculator(shifted), jr.PRNGKey(0), **MINIMIZE)


def min_pair_distance(positions, box_size):
    p = np.asarray(positions, np.float64).reshape(-1, 3)
    d = p[:, None] - p[None]
    d -= box_size * np.round(d / box_size)
    r = np.linalg.norm(d, axis=-1)
    return r[~np.eye(len(p), dtype=bool)].min()


def state(shifted=False, T0=1.0, key=1):
    v = md.initial_velocities(jr.PRNGKey(key), N_ATOMS, T0)
    return jnp.concatenate([minimised(shifted), v])


def test_initial_velocities_zero_momentum_and_exact_temperature():
    for T0 in [0.5, 1.234, 1.5]:
        v = md.initial_velocities(jr.PRNGKey(3), N_ATOMS, T0, mass=2.0)
        x = jnp.concatenate([jnp.zeros_like(v), v])
        assert abs(float(observables.temperature(x, N_ATOMS, 2.0)[0]) - T0) < 1e-12
        assert float(jnp.max(jnp.abs(2.0 * v.reshape(-1, 3).sum(0)))) < 1e-12
    # one key: same directions at every T0
    a, b = md.initial_velocities(jr.PRNGKey(3), N_ATOMS, 0.5), md.initial_velocities(jr.PRNGKey(3), N_ATOMS, 1.5)
    np.testing.assert_allclose(np.asarray(b), np.sqrt(3.0) * np.asarray(a), rtol=1e-13)


def test_minimisation_lowers_energy_and_removes_close_pairs():
    calc = calculator()
    inserted = md.random_insertion(jr.PRNGKey(0), N_ATOMS, BOX)  # the insertion initial_positions starts from
    assert min_pair_distance(inserted, BOX) >= 0.75 - 1e-12
    positions = minimised()
    e_before = float(calc.potential_energy(inserted, calc.allocate(inserted)))
    e_after = float(calc.potential_energy(positions, calc.allocate(positions)))
    assert e_after < e_before and e_after < -4.0 * N_ATOMS  # a dense LJ liquid/solid is about -5 to -7 per atom
    assert min_pair_distance(positions, BOX) > 0.8
    p = np.asarray(positions)
    assert np.all((p >= 0) & (p < BOX))


def energies(calc, xs):
    return np.asarray([float(md.total_energy(calc, x)) for x in xs])


@pytest.mark.parametrize("shifted,tol", [
    # Shifted LJ: energy is continuous, only the force jumps at the cut-off; measured 1.2e-5.
    (True, 5e-5),
    # The reference's truncated, unshifted LJ: each pair crossing r = 2.5 changes E by |u(2.5)| = 0.0163,
    # tens of crossings in 0.2 time units, biased while the just-minimised state relaxes; measured 9e-4 to
    # 1.4e-3 relative spread of E (E ~ -510) over 200-250 steps.
    (False, 3e-3),
])
def test_nve_conserves_energy_and_momentum(shifted, tol):
    calc = calculator(shifted)
    traj = md.run_nve(calc, state(shifted), dt=0.001, n_steps=200)
    assert traj.xs.shape == traj.forces.shape == (1, 200, 6 * N_ATOMS) and traj.xs.dtype == jnp.float64
    xs = traj.xs[0]
    e = energies(calc, xs[::10])
    assert (e.max() - e.min()) / abs(e[0]) < tol
    momentum = np.asarray(xs[:, 3 * N_ATOMS:]).reshape(200, N_ATOMS, 3).sum(1)
    assert np.abs(momentum).max() < 1e-11
    np.testing.assert_allclose(np.asarray(traj.times), 0.001 * np.arange(200), rtol=0, atol=1e-15)


def test_stored_forces_are_force_fn_and_positions_are_unwrapped():
    calc = calculator()
    x0 = state(T0=1.5)
    # put an atom at a face, moving out of the box, so it crosses during the run
    x0 = x0.at[0].set(BOX - 0.01).at[3 * N_ATOMS].set(3.0)
    traj = md.run_nve(calc, x0, n_steps=100)
    xs, labels = traj.xs[0], traj.forces[0]
    np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(x0))  # frame 0 is the state before step 0
    ref = jax.jit(jax.vmap(calc.system.force_fn))(xs[::9])
    np.testing.assert_allclose(np.asarray(labels[::9]), np.asarray(ref), rtol=0,
                               atol=1e-10 * float(jnp.max(jnp.abs(ref))))
    pos = np.asarray(xs[:, : 3 * N_ATOMS])
    assert pos[:, 0].max() > BOX  # atom 0 left the box and was not wrapped back
    assert np.abs(np.diff(pos, axis=0)).max() < 0.1 < BOX / 2
    # float32 storage: labels are f of the rounded stored states
    run32, _ = md.make_nve(calc, 0.001, 20, dtype=jnp.float32)(x0)
    assert run32.xs.dtype == run32.forces.dtype == jnp.float32
    ref32 = jax.vmap(calc.system.force_fn)(run32.xs[0].astype(jnp.float64))
    np.testing.assert_allclose(np.asarray(run32.forces[0]), np.asarray(ref32), rtol=1e-6,
                               atol=1e-6 * float(jnp.max(jnp.abs(ref32))))


def test_neighbor_overflow_is_reallocated_or_raises():
    calc = calculator()
    x0 = state()
    good = md.run_nve(calc, x0, n_steps=20)
    # a list at 30 % of the occupancy of x0 overflows at once: the run reallocates and reruns
    traj, reallocations = md.make_nve(calc, 0.001, 20, capacity_multiplier=0.3)(x0)
    assert reallocations >= 1
    np.testing.assert_allclose(np.asarray(traj.xs), np.asarray(good.xs), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(traj.forces), np.asarray(good.forces), rtol=0, atol=1e-9)
    with pytest.raises(RuntimeError, match="overflow"):
        md.make_nve(calc, 0.001, 20, capacity_multiplier=0.3, max_reallocations=0)(x0)


def test_vmapped_runs_equal_sequential_runs():
    """vmap_size only changes how runs are batched (under vmap the skin list
    rebuilds every step instead of when needed): same trajectories."""
    calc = calculator()
    x0 = jnp.stack([state(T0=0.7, key=1), state(T0=1.3, key=2)])
    seq = md.make_nve(calc, 0.001, 30, vmap_size=1)(x0)[0]
    vec = md.make_nve(calc, 0.001, 30, vmap_size=2)(x0)[0]
    assert seq.xs.shape == (2, 30, 6 * N_ATOMS)
    np.testing.assert_allclose(np.asarray(vec.xs), np.asarray(seq.xs), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.asarray(vec.forces), np.asarray(seq.forces), rtol=0, atol=1e-8)


def test_dataset_same_initial_and_independent_runs():
    calc = calculator()
    kw = {"n_steps": 5, "minimize_kwargs": MINIMIZE}
    same = md.make_lj_dataset(calc, jr.PRNGKey(5), 3, same_initial=True, **kw)
    xs = np.asarray(same.trajectories.xs)
    assert xs.shape == (3, 5, 6 * N_ATOMS)
    T0 = np.asarray(same.T0)
    assert np.all((T0 >= 0.5) & (T0 <= 1.5)) and len(set(T0)) == 3
    np.testing.assert_array_equal(xs[0, 0, : 3 * N_ATOMS], xs[1, 0, : 3 * N_ATOMS])
    v = xs[:, 0, 3 * N_ATOMS:]
    np.testing.assert_allclose(v[1] / np.sqrt(T0[1]), v[0] / np.sqrt(T0[0]), rtol=1e-12)
    for i in range(3):
        temp = observables.temperature(jnp.asarray(xs[i, 0]), N_ATOMS)[0]
        assert abs(float(temp) - T0[i]) < 1e-12
    diff = md.make_lj_dataset(calc, jr.PRNGKey(5), 2, same_initial=False, batch_size=1, **kw)
    dx = np.asarray(diff.trajectories.xs)
    assert np.abs(dx[0, 0, : 3 * N_ATOMS] - dx[1, 0, : 3 * N_ATOMS]).max() > 0.1
    cos = np.dot(dx[0, 0, 3 * N_ATOMS:], dx[1, 0, 3 * N_ATOMS:]) / (
        np.linalg.norm(dx[0, 0, 3 * N_ATOMS:]) * np.linalg.norm(dx[1, 0, 3 * N_ATOMS:]))
    assert abs(cos) < 0.5


def test_system_trajectory_fn_runs_the_protocol():
    calc = calculator()
    traj = calc.system.trajectory_fn(jr.PRNGKey(6), 2, dt=0.001, n_steps=6, save_every=2, dtype=jnp.float32)
    assert traj.xs.shape == traj.forces.shape == (2, 3, 6 * N_ATOMS) and traj.xs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(traj.times), [0.0, 0.002, 0.004], rtol=1e-6)
    x0 = np.asarray(traj.xs[:, 0, : 3 * N_ATOMS])
    np.testing.assert_array_equal(x0[0], x0[1])  # the reference protocol: one initial configuration
    independent = make_particle_calculator(N_ATOMS, BOX, pair_fn=LJ, same_initial=False)
    y0 = np.asarray(independent.system.trajectory_fn(jr.PRNGKey(6), 2, n_steps=2, save_every=2).xs[:, 0, : 3 * N_ATOMS])
    assert np.abs(y0[0] - y0[1]).max() > 0.1  # one insertion and minimisation per run
    # labels=False: the same frames without the labels (the experiment labels later)
    bare = calc.system.trajectory_fn(jr.PRNGKey(6), 2, dt=0.001, n_steps=6, save_every=2, dtype=jnp.float32,
                                     labels=False)
    assert bare.forces is None
    np.testing.assert_array_equal(np.asarray(bare.xs), np.asarray(traj.xs))


def test_lammps_reference_state_matches_our_potential_and_protocol():
    """The reference's LAMMPS start (create_atoms seed 34141, velocity seed 87878, its
    short minimisation): our truncated LJ energy at LAMMPS's positions is LAMMPS's, the
    velocities are at T = 1 with zero momentum, and every run of a dataset starts from
    that one state with its velocities scaled to the run's T0."""
    from macro_jax.systems import lammps_initial

    calc = calculator()
    positions, unit_v, info = lammps_initial.reference_initial_state(N_ATOMS, BOX)
    assert positions.shape == unit_v.shape == (3 * N_ATOMS,)
    assert positions.min() >= 0.0 and positions.max() < BOX
    # A short minimisation: far below the inserted energy (overlaps), far above a minimum.
    assert 0 < info["minimize_iterations"] < 1000 and info["pe_per_atom_inserted"] > 1e3
    energy = float(calc.potential_energy(jnp.asarray(positions), calc.allocate(jnp.asarray(positions))))
    assert abs(energy / N_ATOMS - info["pe_per_atom_minimised"]) < 1e-10
    assert energy / N_ATOMS > float(calc.potential_energy(minimised(), calc.allocate(minimised()))) / N_ATOMS + 0.5
    x = jnp.concatenate([jnp.zeros(3 * N_ATOMS), jnp.asarray(unit_v)])
    assert abs(float(observables.temperature(x, N_ATOMS)[0]) - 1.0) < 1e-12
    assert np.abs(unit_v.reshape(-1, 3).sum(0)).max() < 1e-12
    # the same state again (fixed seeds), and in a dataset: one start, velocities sqrt(T0) x unit
    again, _, _ = lammps_initial.reference_initial_state(N_ATOMS, BOX)
    np.testing.assert_array_equal(again, positions)
    data = md.make_lj_dataset(calc, jr.PRNGKey(5), 2, n_steps=3, initial="lammps_reference")
    xs, T0 = np.asarray(data.trajectories.xs), np.asarray(data.T0)
    for i in range(2):
        np.testing.assert_allclose(xs[i, 0, : 3 * N_ATOMS], positions, rtol=0, atol=1e-14)
        np.testing.assert_allclose(xs[i, 0, 3 * N_ATOMS:], np.sqrt(T0[i]) * unit_v, rtol=1e-12)


def test_lammps_reference_state_with_overlapping_atoms_is_refused(monkeypatch):
    """The reference's short minimisation leaves atoms overlapping from about 4,000
    atoms on (measured: +7.6 per atom at 4,000, +28.7 at 6,400, +2,777 at 21,600);
    such a start is refused with the field named, never simulated."""
    from macro_jax.systems import lammps_initial

    positions, unit_v, info = lammps_initial.reference_initial_state(N_ATOMS, BOX)
    assert info["pe_per_atom_minimised"] < 0  # a small box minimises fine
    overlapping = dict(info, minimize_iterations=18, pe_per_atom_minimised=2777.5)
    monkeypatch.setattr(lammps_initial, "reference_initial_state", lambda *a, **k: (positions, unit_v, overlapping))
    with pytest.raises(ValueError, match=r"initial='lammps_reference' is unusable .* \+2778 per atom.*use "
                                         r"system.params.initial='fire'"):
        md.make_lj_dataset(calculator(), jr.PRNGKey(0), 2, n_steps=3, initial="lammps_reference")


def test_initial_state_option_is_checked():
    with pytest.raises(ValueError, match="system.params.initial='lamps'.*must be one of"):
        make_particle_calculator(N_ATOMS, BOX, initial="lamps")
    with pytest.raises(ValueError, match="initial='lammps_reference'.*pair_fn='lennard_jones'"):
        make_particle_calculator(N_ATOMS, BOX, pair_fn="morse", initial="lammps_reference")
    with pytest.raises(ValueError, match="needs system.params.same_initial=True"):
        md.make_lj_dataset(calculator(), jr.PRNGKey(0), 2, same_initial=False, initial="lammps_reference")
