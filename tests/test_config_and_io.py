"""Bad config values name their field; files on disk are checked, never unpickled."""

import json
import os

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from configs import allen_cahn, lj800, predator_prey
from macro_jax import checkpoint
from macro_jax.config import ConfigError, parse_run, subset_size, validate
from macro_jax.models import OnsagerNet


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("train.runs", ("xp:1.5",), "p = 1.5 must be in \\(0, 1\\]"),
        ("train.runs", ("xp:0",), "must be in \\(0, 1\\]"),
        ("train.runs", ("xp:-0.2",), "must be in \\(0, 1\\]"),
        ("train.runs", ("xp:abc",), "p must be a number"),
        ("train.runs", ("lz",), "loss 'lz' is not one of"),
        ("model.name", "transformer", "model.name='transformer' is invalid: must be one of \\['mlp', 'onsagernet', 'gfinn'\\]"),
        ("autoencoder.latent_dim", 2, "autoencoder.latent_dim=2 is invalid: must exceed the number of observables \\(2\\)"),
        ("autoencoder.latent_dim", 1, "autoencoder.latent_dim=1"),
        ("autoencoder.lambda_cond", -1.0, "autoencoder.lambda_cond"),
        ("autoencoder.cond_rows", "some", "autoencoder.cond_rows"),
        ("autoencoder.input_origin", "corner", "autoencoder.input_origin='corner' is invalid: must be one of"),
        ("train.lr", 0.0, "train.lr=0.0 is invalid"),
        ("train.label_mode", "live", "train.label_mode"),
        ("train.seeds", (1, 1), "train.seeds"),
        ("data.pool_integrator", "leapfrog", "data.pool_integrator"),
        ("model.onsagernet.variant", "C", "model.onsagernet.variant"),
        ("structures.models", ("mlp", "gpt"), "structures.models"),
        ("structures.group_size", -1, "structures.group_size=-1 is invalid: must be an integer >= 0"),
        ("train.subset_seed", 3, "train.subset_seed=3 is invalid: only shared subsets have one draw"),
        ("data.block_trajectories", -1, "data.block_trajectories=-1 is invalid"),
        ("data.pool_keep_above", float("nan"), "data.pool_keep_above"),
        ("train.draw_configs", "last", "train.draw_configs='last' is invalid: must be 'first' or 'random'"),
        ("train.draw_seed", -1, "train.draw_seed=-1 is invalid: must be None \\(the experiment seed\\) or an integer >= 0"),
        ("train.draw_seed", 3, "train.draw_seed=3 is invalid: only the 'random' draw has a seed"),
        ("eval.relative_floor", 1.0, "eval.relative_floor=1.0 is invalid"),
        ("train.monitor_every", -1, "train.monitor_every=-1 is invalid: must be >= 0"),
        ("diagnostics.holdout", 0, "diagnostics.holdout=0 is invalid"),
        ("diagnostics.cond_configs", -5, "diagnostics.cond_configs=-5 is invalid"),
        ("diagnostics.lambda_values", (0.0, -1e-6), "diagnostics.lambda_values"),
    ],
)
def test_bad_config_values_name_the_field(field, value, match):
    config = predator_prey.get_config("smoke")
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate(config, n_observables=2)


def test_online_mode_needs_partial_losses():
    config = predator_prey.get_config("smoke")
    config.train.label_mode = "online"
    with pytest.raises(ConfigError, match="'online' needs every train.runs entry to be 'xp:<p>'"):
        validate(config, 2)


def test_per_loss_override_of_unknown_field():
    config = predator_prey.get_config("smoke")
    config.train.per_loss = {"z": {"patient": 3}}
    with pytest.raises(ConfigError, match="train.per_loss.z.patient"):
        validate(config, 2)


def test_parse_run_and_subset_size():
    assert parse_run("xp:1/5") == ("xp", 0.2)
    assert parse_run("zp:1/5") == ("zp", 0.2) and parse_run("zp:0.25:importance") == ("zp", 0.25)
    from macro_jax.config import site_sampling, zp_label

    assert zp_label("zp:1/5:regression") == "regression" and site_sampling("zp:1/5:regression") == "uniform"
    assert zp_label("zp:1/5") == "unbiased" == zp_label("xp:1/5")
    with pytest.raises(ConfigError, match="site sampling 'regression' is not one of"):
        parse_run("xp:1/5:regression")
    with pytest.raises(ConfigError, match="p must be a number"):
        parse_run("zp")
    assert parse_run("z") == ("z", 1.0)
    assert subset_size(0.2, 100) == 20 and subset_size(0.33, 100) == 33
    with pytest.raises(ConfigError, match="whole number"):
        subset_size(0.333, 100, "xp:0.333")


def test_shipped_configs_validate():
    for variant in ("", "quick", "smoke"):
        validate(predator_prey.get_config(variant), n_observables=2)
    with pytest.raises(ValueError, match="unknown predator_prey config variant"):
        predator_prey.get_config("huge")
    for variant in ("", "short", "smoke", "fire", "fire,short", "centred,smoke"):
        validate(lj800.get_config(variant), n_observables=1, integrators=("velocity_verlet",))
    with pytest.raises(ValueError, match="unknown lj800 config variant 'huge'"):
        lj800.get_config("fire,huge")
    for variant in ("", "smoke"):
        validate(allen_cahn.get_config(variant), n_observables=1)
    config = allen_cahn.get_config()
    # the reference protocol: equal budgets, 2,500 full configurations vs 40,000 x 2,500 points
    assert config.train.budget == 2_500 * 200**2 == 40_000 * (200**2 // 16)


def test_blocks_need_separate_calls():
    config = lj800.get_config("smoke")
    config.data.block_trajectories = 2
    with pytest.raises(ConfigError, match="data.block_trajectories=2 is invalid: must be 0 when data.one_ensemble"):
        validate(config, 1, integrators=("velocity_verlet",))


def test_block_pool_reads_rows_and_detects_corruption(tmp_path):
    from macro_jax.pool import BlockPool, block_path, take

    spec = {"what": "test"}
    blocks = [np.arange(12.0).reshape(3, 4), np.arange(12.0, 20.0).reshape(2, 4)]
    for b, block in enumerate(blocks):
        checkpoint.save_npy(block_path(str(tmp_path), b), block, {"spec": spec, "block": b})
    checkpoint.save_arrays(str(tmp_path / "manifest.npz"), {"rows": np.array([3, 2])}, {"spec": spec})
    pool = BlockPool(str(tmp_path), expect={"spec": spec})
    full = np.concatenate(blocks)
    assert pool.shape == (5, 4) and len(pool) == 5
    np.testing.assert_array_equal(pool.take([4, 0, 3, 3]), full[[4, 0, 3, 3]])
    np.testing.assert_array_equal(take(pool, np.array([1, 2])), take(jnp.asarray(full), np.array([1, 2])))
    with pytest.raises(IndexError, match="out of range"):
        pool.take([5])
    with pytest.raises(checkpoint.DataFileError, match="metadata field 'spec'"):
        BlockPool(str(tmp_path), expect={"spec": {"what": "other"}})
    with open(block_path(str(tmp_path), 1), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(checkpoint.DataFileError, match="checksum mismatch"):
        BlockPool(str(tmp_path), expect={"spec": spec})


def test_integrator_must_be_the_systems():
    config = lj800.get_config("smoke")
    with pytest.raises(ConfigError, match="data.pool_integrator='velocity_verlet' is invalid: must be one of"):
        validate(config, 1)  # the default integrators are the ODE ones
    config.data.test_dt = 0.002
    with pytest.raises(ConfigError, match="data.test_dt=0.002 is invalid: must equal data.pool_dt"):
        validate(config, 1, integrators=("velocity_verlet",))  # one_ensemble: one protocol


def test_arrays_round_trip_and_detect_corruption(tmp_path):
    path = str(tmp_path / "d.npz")
    checkpoint.save_arrays(path, {"xs": np.arange(6.0).reshape(2, 3)}, {"spec": {"n": 2}})
    arrays, meta = checkpoint.load_arrays(path, expect={"spec": {"n": 2}})
    np.testing.assert_array_equal(arrays["xs"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(checkpoint.DataFileError, match="metadata field 'spec'"):
        checkpoint.load_arrays(path, expect={"spec": {"n": 3}})
    with open(path, "r+b") as f:  # flip bytes in the middle of the archive
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00\xff\x00\xff")
    with pytest.raises(checkpoint.DataFileError, match="checksum mismatch"):
        checkpoint.load_arrays(path)
    with pytest.raises(checkpoint.DataFileError, match="file not found"):
        checkpoint.load_arrays(str(tmp_path / "missing.npz"))


def test_pickled_array_is_refused(tmp_path):
    """A .npz holding an object array (a pickle) is rejected even with a valid checksum."""
    path = str(tmp_path / "evil.npz")
    np.savez(path, xs=np.array([{"a": 1}], dtype=object))
    checkpoint._write_sidecar(path, {})
    with pytest.raises(checkpoint.DataFileError, match="cannot be read"):
        checkpoint.load_arrays(path)


def test_model_round_trip_and_mismatch(tmp_path):
    path = str(tmp_path / "m.eqx")
    net = OnsagerNet(4, variant="separate", key=jr.PRNGKey(0))
    checkpoint.save_model(path, net, {"run": "z"})
    loaded = checkpoint.load_model(path, OnsagerNet(4, variant="separate", key=jr.PRNGKey(1)), expect={"run": "z"})
    z = jnp.ones(4, jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded(0.0, z)), np.asarray(net(0.0, z)))
    with pytest.raises(checkpoint.DataFileError, match="does not match the model"):
        checkpoint.load_model(path, OnsagerNet(5, variant="separate", key=jr.PRNGKey(1)))
    with open(path + ".json") as f:
        assert json.load(f)["run"] == "z"


def test_run_names_are_flat_directory_names():
    from macro_jax.experiment import run_name

    assert run_name("xp:1/4", 60_000) == run_name("xp:0.25", 60_000) == "xp_p0.25_budget60000"
    assert run_name("z", 600) == "z_budget600"
    assert run_name("xp:1/16", 10**6, "mlp") == "mlp_xp_p0.0625_budget1000000"
    assert run_name("xp:1/16", 10**6, draw_seed=3) == "xp_p0.0625_budget1000000_draw3"
    assert run_name("zp:1/16", 10**5) == "zp_p0.0625_budget100000"
    assert run_name("zp:1/16:regression", 10**5) == "zp_p0.0625_regression_budget100000"


def test_zp_takes_the_xp_overrides_then_its_own():
    from macro_jax.config import run_settings

    config = predator_prey.get_config("smoke")
    config.train.per_loss = {"xp": {"batch_size": 7, "lr": 3e-4}}
    assert run_settings(config, "zp").batch_size == 7 and run_settings(config, "zp").lr == 3e-4
    config.train.per_loss = {"xp": {"batch_size": 7, "lr": 3e-4}, "zp": {"lr": 2e-3}}
    assert run_settings(config, "zp").lr == 2e-3 and run_settings(config, "zp").batch_size == 7
    assert run_settings(config, "z").batch_size == config.train.batch_size
    config.train.per_loss = {"xp": {"batch_size": 0}}
    with pytest.raises(ConfigError, match=r"train.per_loss.xp.batch_size=0 is invalid"):
        validate(config, 2)


def test_lj800_start_and_specs_of_older_data():
    """The reproduction starts from the reference's LAMMPS state; ':fire' from ours,
    which is what data saved before the option existed were made with, so their
    specs (no 'initial' field) still match it and not the LAMMPS start."""
    from macro_jax import experiment

    assert lj800.get_config("").system.params.initial == "lammps_reference"
    fire = lj800.get_config("fire,short")
    assert fire.system.params.initial == "fire" and fire.train.epochs == 200
    older = fire.system.to_dict()
    del older["params"]["initial"]
    assert experiment.system_spec(fire) == older
    assert experiment.system_spec(lj800.get_config(""))["params"]["initial"] == "lammps_reference"


def test_input_origin_needs_a_centre_frame_and_keeps_older_specs():
    """'box_centre' is refused for a system without a centre frame; at its
    default the field is left out of the autoencoder's spec, so autoencoders
    saved before it existed still load."""
    from macro_jax import experiment
    from macro_jax.systems import make_predator_prey
    from macro_jax.systems.particles import make_particle_calculator

    config = predator_prey.get_config("smoke")
    config.autoencoder.input_origin = "box_centre"
    with pytest.raises(ConfigError, match="autoencoder.input_origin='box_centre' needs a system with a centre frame"):
        experiment.input_shift(config, make_predator_prey())
    particles = make_particle_calculator(100, 5.0).system
    assert particles.centre_shift == (2.5, 300)  # positions, the first 3n of x = (positions, velocities)
    assert experiment.input_shift(lj800.get_config("centred,smoke"), particles) == (2.5, 300)
    plain = lj800.get_config("")
    assert experiment.input_shift(plain, particles) == (0.0, 0)
    assert "input_origin" not in experiment.autoencoder_spec(plain)["autoencoder"]
    assert experiment.autoencoder_spec(lj800.get_config("centred"))["autoencoder"]["input_origin"] == "box_centre"


def test_versions_record_the_machine(tmp_path):
    """A rebuilt model has come out as another file on another machine: every
    sidecar names the CPU and device that made the file, so a differing
    rebuild can be traced to the machine."""
    v = checkpoint.versions()
    assert v["cpu"] and v["cpu"] != "unknown"
    assert v["device"]
    assert "xla_flags" in v
    assert 1 <= int(v["usable_cores"]) <= os.cpu_count()
    path = str(tmp_path / "a.npz")
    checkpoint.save_arrays(path, {"x": np.zeros(3)}, {"versions": v})
    assert checkpoint.load_sidecar(path)["versions"]["cpu"] == v["cpu"]
