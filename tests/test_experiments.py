"""Smoke runs of every config end to end; determinism; the evaluation metric."""

import copy
import glob
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import predator_prey
from macro_jax import eval as evaluation
from macro_jax import checkpoint, experiment, sweep
from macro_jax.config import ConfigError, validate

ROOT = os.path.join(os.path.dirname(__file__), "..")
RESULT_KEYS = {"loss", "n_configs", "n_force_computations", "force_seconds", "test_error_mean", "test_error_std"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pp_smoke"))
    config = predator_prey.get_config("smoke")
    return workdir, config, experiment.train_and_evaluate(config, workdir)


def test_smoke_run_writes_everything(smoke_run):
    workdir, config, results = smoke_run
    for name in ("config.json", "results.json", "rollout.png", "table.txt", "autoencoder/model.eqx"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert [r["loss"] for r in saved] == ["L_z", "L_x", "L_x,p"]
    for r in saved:
        assert RESULT_KEYS <= set(r)
        assert np.isfinite(r["test_error_mean"]) and r["test_error_mean"] > 0
        # equal force budget: configurations x sites with forces
        assert r["n_force_computations"] == config.train.budget == r["n_configs"] * r["sites_per_config"]
        assert r["force_seconds"] > 0
    assert saved[2]["n_configs"] == 5 * saved[0]["n_configs"]  # p = 1/5


def test_same_config_same_numbers(smoke_run, tmp_path):
    """Determinism on CPU: a fresh workdir reproduces every number."""
    _, config, results = smoke_run
    again = experiment.train_and_evaluate(config, str(tmp_path))
    for a, b in zip(results, again):
        assert a["test_errors"] == b["test_errors"]
        assert a["final_train_loss"] == b["final_train_loss"]


def test_second_call_reports_finished_runs_without_training(smoke_run, monkeypatch):
    workdir, config, results = smoke_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiment, "run_loss", no_training)
    again = experiment.train_and_evaluate(config, workdir)
    for a, b in zip(results, again):
        assert experiment.public(a) == experiment.public(b)
        np.testing.assert_array_equal(a["_pred_obs"], b["_pred_obs"])
    one = predator_prey.get_config("smoke")  # which runs a call makes is not a run's setting
    one.train.runs = config.train.runs[-1:]
    (only,) = experiment.train_and_evaluate(one, workdir)
    assert only["test_errors"] == results[-1]["test_errors"]
    changed = predator_prey.get_config("smoke")
    changed.train.lr = 0.5 * config.train.lr
    with pytest.raises(RuntimeError, match="other settings"):
        experiment.train_and_evaluate(changed, workdir)


def test_finished_run_without_saved_rollouts_is_re_evaluated_and_checked(smoke_run, tmp_path, monkeypatch):
    """Runs finished before rollouts.npz existed: the saved members are evaluated
    again and must reproduce the saved errors."""
    import shutil

    workdir, config, results = smoke_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    for path in glob.glob(os.path.join(copy, "runs", "*", "rollouts.npz*")):
        os.remove(path)
    monkeypatch.setattr(experiment, "run_loss", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = experiment.train_and_evaluate(config, copy)
    for a, b in zip(results, again):
        np.testing.assert_allclose(b["_pred_obs"], a["_pred_obs"], rtol=1e-6)
    assert len(glob.glob(os.path.join(copy, "runs", "*", "rollouts.npz"))) == len(results)  # saved this time
    # a saved error this code does not reproduce is refused
    (first,) = glob.glob(os.path.join(copy, "runs", "z_*", "result.json"))
    os.remove(os.path.join(os.path.dirname(first), "rollouts.npz"))
    with open(first) as f:
        saved = json.load(f)
    saved["test_errors"] = [2.0 * e for e in saved["test_errors"]]
    with open(first, "w") as f:
        json.dump(saved, f)
    with pytest.raises(RuntimeError, match="re-evaluated errors"):
        experiment.train_and_evaluate(config, copy)


def test_corrupt_data_file_is_reported(smoke_run, tmp_path):
    workdir, config, _ = smoke_run
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "data", "test.npz"), "ab") as f:
        f.write(b"garbage")
    from macro_jax.checkpoint import DataFileError

    with pytest.raises(DataFileError, match="test.npz: checksum mismatch"):
        experiment.prepare(config, copy)


def test_sweep_smoke_resumes(tmp_path):
    config = predator_prey.get_config("smoke")
    config.train.epochs = 2
    results = sweep.run_sweep(config, str(tmp_path))
    assert len(results) == len(config.sweep.budgets) * len(config.sweep.runs)
    rows = sweep.rows(results)
    assert {"loss", "p", "budget", "seed", "test_error"} <= set(rows[0])
    assert sweep.run_sweep(config, str(tmp_path)) == results  # second call only reads
    for r in results:  # the paper's Fig. 4 metric: against the last member, which scores 0
        assert len(r["last_member_errors"]) == len(r["seeds"]) and r["last_member_errors"][-1] == 0.0
        assert min(r["last_member_errors"][:-1]) > 0
    # a run saved before results carried that metric gets it from its saved rollouts
    (old,) = glob.glob(os.path.join(str(tmp_path), "runs", "z_budget2000*", "result.json"))
    with open(old) as f:
        saved = json.load(f)
    del saved["last_member_errors"]
    with open(old, "w") as f:
        json.dump(saved, f)
    assert sweep.run_sweep(config, str(tmp_path)) == results
    # bookkeeping is not part of a result's settings (results saved before
    # autoencoder.checkpoint_every existed stay valid) and does not invalidate one
    for path in glob.glob(os.path.join(str(tmp_path), "runs", "*", "result.json")):
        with open(path) as f:
            assert "checkpoint_every" not in json.load(f)["settings"]["autoencoder"]
    config.autoencoder.checkpoint_every = 3
    assert sweep.run_sweep(config, str(tmp_path)) == results
    config.train.lr = 1e-3
    with pytest.raises(RuntimeError, match="other settings"):
        sweep.run_sweep(config, str(tmp_path))


def test_draw_seed_repeats_a_sweep_over_data_draws_on_the_same_data(tmp_path):
    """train.draw_seed: None draws with the experiment seed (same rows as setting
    it to that seed); another seed draws other rows, nested, without repeats;
    its runs sit beside the default draw's in one workdir (runs/<name>_draw<seed>)
    and its rows carry the seed."""
    from macro_jax import scaling
    from macro_jax.config import run_settings

    config = predator_prey.get_config("smoke")
    config.train.epochs = 2
    config.sweep.runs, config.sweep.budgets = ("z",), (2_000,)
    config.train.draw_configs = "random"
    pick = lambda n: experiment.config_indices(config, run_settings(config, "z"), 500, n)
    default = pick(40)
    config.train.draw_seed = config.seed
    np.testing.assert_array_equal(pick(40), default)
    config.train.draw_seed = 7
    other = pick(40)
    assert len(set(other)) == 40 and other.min() >= 0 and other.max() < 500 and set(other) != set(default)
    np.testing.assert_array_equal(pick(20), other[:20])  # nested: a smaller run takes a prefix

    workdir = str(tmp_path)
    drawn = sweep.run_sweep(config, workdir)
    config.train.draw_seed = None
    plain = sweep.run_sweep(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "runs"))) == ["z_budget2000", "z_budget2000_draw7"]
    assert drawn[0]["test_errors"] != plain[0]["test_errors"]  # other configurations, other numbers
    rows = sweep.rows(drawn)
    assert {r["draw_seed"] for r in rows} == {7} and "draw_seed" not in sweep.rows(plain)[0]
    (again,) = sweep.results_from_rows(rows)
    assert again["draw_seed"] == 7 and again["test_errors"] == drawn[0]["test_errors"]
    config.train.draw_seed = 7
    assert sweep.run_sweep(config, workdir) == drawn  # read back from runs/z_budget2000_draw7
    with pytest.raises(ValueError, match="mix data draws"):
        scaling.collect([rows + sweep.rows(plain)])


def _one_budget_sweep(tmp_path):
    """A 2-epoch Predator-Prey smoke sweep at one budget in ``tmp_path/first``:
    its config, workdir, results and autoencoder SHA-256."""
    config = predator_prey.get_config("smoke")
    config.train.epochs = 2
    config.sweep.budgets = (2_000,)
    first = str(tmp_path / "first")
    results = sweep.run_sweep(config, first)
    return config, first, results, experiment.autoencoder_sha256(first)


def test_results_copied_into_a_fresh_workdir_are_reused_only_with_the_same_autoencoder(tmp_path, monkeypatch):
    """The cross-session path: a sweep's exported run results, imported into a
    fresh workdir, are reused; the autoencoder the fresh workdir trains (same
    config, same seed) is the same file, so they pass; a result trained on
    another autoencoder is refused, also when found before the autoencoder existed."""
    import shutil

    config, first, results, sha = _one_budget_sweep(tmp_path)
    assert sha and all(r["autoencoder_sha256"] == sha for r in results)
    data_sha = {split: checkpoint.load_sidecar(os.path.join(first, "data", f"{split}.npz"))["sha256"]
                for split in ("pool", "test")}
    assert all(r["data_sha256"] == data_sha for r in results)
    exported, fresh = str(tmp_path / "exported"), str(tmp_path / "fresh")
    sweep.export_runs(results, exported)
    assert sorted(sweep.import_runs(exported, fresh)) == sorted(os.listdir(os.path.join(first, "runs")))
    assert sweep.import_runs(exported, fresh) == []  # never over a workdir's own results
    with pytest.raises(FileNotFoundError, match="no exported run results"):
        sweep.import_runs(str(tmp_path), fresh)
    trained = []
    real_run_loss = experiment.run_loss
    monkeypatch.setattr(experiment, "run_loss", lambda *a, **k: trained.append(a[3]) or real_run_loss(*a, **k))
    config.sweep.budgets = (2_000, 4_000)  # one more budget: the fresh workdir trains its autoencoder
    again = sweep.run_sweep(config, fresh)
    assert trained == [4_000, 4_000]  # the copied runs were reused, the new ones trained
    assert experiment.autoencoder_sha256(fresh) == sha  # determinism: the same encoder file
    assert [r for r in again if r["budget"] == 2_000] == results
    (copied,) = glob.glob(os.path.join(fresh, "runs", "z_budget2000*", "result.json"))
    with open(copied) as f:
        saved = json.load(f)
    saved["autoencoder_sha256"] = "0" * 64
    with open(copied, "w") as f:
        json.dump(saved, f)
    with pytest.raises(RuntimeError, match="another autoencoder"):
        sweep.run_sweep(config, fresh)
    # found before the autoencoder exists (a run still to train makes it): checked once it does
    os.remove(os.path.join(fresh, "autoencoder", "model.eqx"))
    shutil.rmtree(os.path.dirname(glob.glob(os.path.join(fresh, "runs", "z_budget4000*", "result.json"))[0]))
    with pytest.raises(RuntimeError, match="another autoencoder"):
        sweep.run_sweep(config, fresh)


def test_an_exported_autoencoder_is_installed_in_a_fresh_workdir_and_checked(tmp_path, monkeypatch):
    """Exports carry the workdir's autoencoder; importing them into a fresh
    workdir installs it instead of training another (a machine that would
    train a different encoder continues the same ensembles). A corrupt copy,
    or two folders exporting different encoders, are refused before anything
    is copied; a workdir's own encoder is never replaced."""
    config, first, results, sha = _one_budget_sweep(tmp_path)
    exported = str(tmp_path / "exported")
    sweep.export_runs(results, exported, workdir=first)
    assert checkpoint.load_sidecar(os.path.join(exported, experiment.AUTOENCODER_FILE))["sha256"] == sha

    def no_training(*args, **kwargs):
        raise AssertionError("the autoencoder was trained, not installed")

    monkeypatch.setattr(experiment, "_train_autoencoder", no_training)
    fresh = str(tmp_path / "fresh")
    assert sweep.import_runs(exported, fresh) == [experiment.result_run_name(r) for r in results]
    assert experiment.autoencoder_sha256(fresh) == sha
    config.sweep.budgets = (2_000, 4_000)  # a new run trains on the installed encoder
    again = sweep.run_sweep(config, fresh)
    assert [r for r in again if r["budget"] == 2_000] == results
    assert all(r["autoencoder_sha256"] == sha for r in again)

    other = str(tmp_path / "other")  # another encoder, exported beside the first
    os.makedirs(other)
    checkpoint.save_model(os.path.join(other, experiment.AUTOENCODER_FILE), {"w": jnp.zeros(3)}, {"spec": {}})
    with open(os.path.join(other, "r.json"), "w") as f:
        json.dump({"test_error_mean": 1.0}, f)
    with pytest.raises(ValueError, match="different autoencoders"):
        sweep.import_runs([exported, other], str(tmp_path / "mixed"))
    assert not os.path.exists(tmp_path / "mixed")
    sweep.import_runs(other, first)  # a workdir's own encoder stays
    assert experiment.autoencoder_sha256(first) == sha

    with open(os.path.join(exported, experiment.AUTOENCODER_FILE), "ab") as f:
        f.write(b"\0")  # a corrupt copy
    with pytest.raises(checkpoint.DataFileError, match="checksum mismatch"):
        sweep.import_runs(exported, str(tmp_path / "third"))
    assert not os.path.exists(tmp_path / "third")


def test_import_runs_from_several_folders_refuses_a_run_exported_twice_differently(tmp_path):
    """The exports of two commands that make one table are imported together; a
    run in both folders is copied once if the files agree, refused if not."""
    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
    (folders["a"] / "r1.json").write_text('{"test_error_mean": 1.0}')
    (folders["b"] / "r1.json").write_text('{"test_error_mean": 1.0}')
    (folders["b"] / "r2.json").write_text('{"test_error_mean": 2.0}')
    (folders["c"] / "r1.json").write_text('{"test_error_mean": 3.0}')
    workdir = str(tmp_path / "work")
    assert sorted(sweep.import_runs([str(folders["a"]), str(folders["b"])], workdir)) == ["r1", "r2"]
    with open(os.path.join(workdir, "runs", "r2", "result.json")) as f:
        assert json.load(f) == {"test_error_mean": 2.0}
    with pytest.raises(ValueError, match="r1.*exported twice with different results"):
        sweep.import_runs([str(folders["a"]), str(folders["c"])], str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")  # refused before anything is copied


def test_relative_error_metric():
    true = jnp.asarray([[[3.0, 4.0], [3.0, 4.0]]])  # |z| = 5 at both times
    pred = true + jnp.asarray([[[0.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(np.asarray(evaluation.trajectory_errors(pred, true)), [1.0 / 10.0])


def test_last_member_metric_is_the_spread_around_the_last_member():
    """The paper's Fig. 4 number: member m against the last member's rollout."""
    t = jnp.linspace(1.0, 2.0, 5)[None, :, None]  # (traj, T, 1)
    pred = jnp.stack([t * 1.1, t * 0.8, t])  # members 10% above, 20% below, and the last
    np.testing.assert_allclose(evaluation.last_member_errors(pred), [0.1, 0.2, 0.0], rtol=1e-5)


def test_relative_floor_drops_vanished_frames():
    true = jnp.array([[[4.0], [2.0], [1e-5], [0.0]]])
    pred = jnp.array([[[4.0], [3.0], [1.0], [1.0]]])
    # every frame: (0 + 1 + 1 + 1) / (4 + 2 + 1e-5); with the floor only the first two count
    np.testing.assert_allclose(evaluation.trajectory_errors(pred, true), [(3.0 - 1e-5) / (6.0 + 1e-5)], rtol=1e-6)
    np.testing.assert_allclose(evaluation.trajectory_errors(pred, true, relative_floor=1e-4), [1.0 / 6.0], rtol=1e-6)


def test_rollout_of_linear_field_is_exact():
    rate = -0.7
    zs = evaluation.rollout(lambda t, z: rate * z, jnp.ones(2), dt=0.1, n_steps=10, substeps=4)
    np.testing.assert_allclose(np.asarray(zs[:, 0]), np.exp(rate * 0.1 * np.arange(11)), rtol=1e-6)


def test_launcher_runs_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config",
         os.path.join(ROOT, "configs", "predator_prey.py") + ":smoke", "--workdir", str(tmp_path),
         "--config.train.runs=('z',)", "--config.train.epochs=1", "--out", str(tmp_path / "docs" / "pp.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "force computations" in out.stdout and "L_z" in out.stdout
    with open(tmp_path / "docs" / "pp.json") as f:
        rows = json.load(f)
    assert [(r["loss"], r["seed"]) for r in rows] == [("L_z", 1), ("L_z", 2)]
    assert {"loss", "seed", "test_error", "n_force_computations"} <= set(rows[0])
    assert os.path.getsize(tmp_path / "docs" / "pp.png") > 0 and os.path.exists(tmp_path / "docs" / "pp.md")


def test_launcher_reports_bad_value(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config",
         os.path.join(ROOT, "configs", "predator_prey.py") + ":smoke", "--workdir", str(tmp_path),
         "--config.train.runs=('xp:2',)"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode != 0
    assert "p = 2.0 must be in (0, 1]" in out.stderr


def test_online_label_mode_end_to_end(smoke_run, tmp_path):
    """Online mode: forces are drawn and computed inside the step every epoch and counted."""
    import shutil

    workdir, config, _ = smoke_run
    copy = str(tmp_path / "online")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    shutil.copytree(os.path.join(workdir, "autoencoder"), os.path.join(copy, "autoencoder"))
    config = predator_prey.get_config("smoke")
    config.train.label_mode = "online"
    config.train.runs = ("xp:0.2",)
    (result,) = experiment.train_and_evaluate(config, copy)
    n, k = result["n_configs"], result["sites_per_config"]
    assert result["label_mode"] == "online"
    # one labelling for the normalisation, then n x k fresh site forces per epoch
    assert result["n_force_computations"] == n * k * (1 + config.train.epochs)
    assert np.isfinite(result["test_error_mean"])


def test_partial_lz_end_to_end(smoke_run, tmp_path):
    """'zp:<p>' (L_z with the k-site estimate of J f as label) pays L_x,p's
    forces, in its own run directory, and trains to a finite error."""
    import shutil

    workdir, config, results = smoke_run
    copy = str(tmp_path / "zp")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    shutil.copytree(os.path.join(workdir, "autoencoder"), os.path.join(copy, "autoencoder"))
    config = predator_prey.get_config("smoke")
    config.train.runs = ("zp:0.2", "zp:0.2:regression")
    unbiased, regression = experiment.train_and_evaluate(config, copy)
    xp = results[2]
    assert unbiased["loss"] == regression["loss"] == "L_z,p" and xp["loss"] == "L_x,p"
    assert (unbiased["zp_label"], regression["zp_label"]) == ("unbiased", "regression")
    for result in (unbiased, regression):
        for key in ("n_configs", "sites_per_config", "n_force_computations"):
            assert result[key] == xp[key], key
        assert np.isfinite(result["test_error_mean"]) and result["test_error_mean"] != xp["test_error_mean"]
    assert unbiased["test_error_mean"] != regression["test_error_mean"]
    for name in ("zp_p0.2", "zp_p0.2_regression"):
        assert os.path.exists(os.path.join(copy, "runs", f"{name}_budget{config.train.budget}", "result.json"))


def test_model_selection_end_to_end(smoke_run, tmp_path):
    """train.select_every: the last tenth of a run's labelled configurations is
    held out (still counted in its budget), each member keeps its best epoch."""
    import shutil

    workdir, config, results = smoke_run
    copy = str(tmp_path / "select")
    shutil.copytree(os.path.join(workdir, "data"), os.path.join(copy, "data"))
    shutil.copytree(os.path.join(workdir, "autoencoder"), os.path.join(copy, "autoencoder"))
    config = predator_prey.get_config("smoke")
    config.train.select_every = 2
    selected = experiment.train_and_evaluate(config, copy)
    for plain, r in zip(results, selected):
        assert r["n_force_computations"] == plain["n_force_computations"] == config.train.budget
        assert r["n_select_configs"] == round(0.1 * r["n_configs"]) >= 1
        assert all(1 <= e <= config.train.epochs for e in r["select_best_epoch"])
        assert np.isfinite(r["test_error_mean"])
        assert r["settings"] != plain["settings"]  # a selected run is not reused as the protocol's
    history = np.load(os.path.join(copy, "runs", experiment.run_name(selected[2]["run"], config.train.budget),
                                   "history.npz"))
    np.testing.assert_array_equal(history["select/best_epoch"], selected[2]["select_best_epoch"])
    config.train.select_fraction = 1.0
    with pytest.raises(ConfigError, match=r"train.select_fraction=1.0 is invalid"):
        validate(config, n_observables=2)
    config.train.select_fraction, config.train.label_mode = 0.1, "online"
    config.train.runs = ("xp:0.2",)
    with pytest.raises(ConfigError, match=r"train.select_every=2 is invalid: needs train.label_mode='offline'"):
        validate(config, n_observables=2)


def test_budget_beyond_pool_names_the_field(smoke_run):
    _, config, _ = smoke_run
    from macro_jax.config import ConfigError

    prep = experiment.prepare(config, smoke_run[0])
    with pytest.raises(ConfigError, match=r"train.budget=10000000 .*\(data.n_pool_trajectories"):
        experiment.run_loss(prep, config, "z", 10_000_000, smoke_run[0])


def test_xp_excess_changes_the_reported_loss_not_the_training(smoke_run):
    """train.xp_excess subtracts a constant per sample: in the smoke run (3
    epochs, the learning rate never drops) the members end where the plain
    L_x,p run ended, and the loss they report is the plain one less the floor."""
    workdir, config, results = smoke_run
    plain = next(r for r in results if r["loss"] == "L_x,p")
    config = copy.deepcopy(config)
    config.train.xp_excess = True
    prep = experiment.prepare(config, workdir)
    r = experiment.run_loss(prep, config, "xp:0.2", config.train.budget, workdir, tag="excess")
    np.testing.assert_allclose(r["test_errors"], plain["test_errors"], rtol=1e-4)
    assert r["settings"]["train"]["xp_excess"] is True and "xp_excess" not in plain["settings"]["train"]
    assert np.all(0 < np.asarray(r["final_train_loss"])) and np.all(
        np.asarray(r["final_train_loss"]) < 0.99 * np.asarray(plain["final_train_loss"]))  # the floor: 9% here


def test_xp_excess_with_too_few_sampled_dofs_is_a_config_error(smoke_run):
    workdir, config, _ = smoke_run
    config = copy.deepcopy(config)
    config.train.xp_excess = True
    prep = experiment.prepare(config, workdir)  # 100 sites of 1 dof each, a 4-dimensional latent space
    with pytest.raises(ConfigError, match=r"train.xp_excess=True with 'xp:0.02'.*samples 2: raise p"):
        experiment.run_loss(prep, config, "xp:0.02", 400, workdir, tag="few")


def test_lj_structures_smoke(tmp_path):
    """The LJ-800 protocol on 100 atoms: the three latent models, L_z vs L_x,p at
    one budget, pool and test runs from one MD ensemble, the observable 20 T."""
    from configs import lj800
    from macro_jax import structures
    from macro_jax.observables import temperature

    config = lj800.get_config("smoke")
    workdir = str(tmp_path)
    results = structures.run_structures(config, workdir)
    assert [(r["model"], r["loss"]) for r in results] == [
        ("mlp", "L_z"), ("mlp", "L_x,p"), ("onsagernet", "L_z"), ("onsagernet", "L_x,p"),
        ("gfinn", "L_z"), ("gfinn", "L_x,p")]
    for r in results:
        assert r["n_force_computations"] == config.train.budget == r["n_configs"] * r["sites_per_config"]
        assert len(r["test_errors"]) == len(config.train.seeds)
        assert all(np.isfinite(e) and 0 < e < 1 for e in r["test_errors"])
        assert os.path.exists(os.path.join(workdir, "runs", experiment.run_name(r["run"], r["budget"], r["model"]),
                                           "members.eqx"))
    assert results[1]["sites_per_config"] == 10 and results[1]["n_configs"] == 10 * results[0]["n_configs"]
    assert results[1]["shared_subsets"] is True and results[0]["shared_subsets"] is None  # the reference ensemble
    rows = structures.rows(results)
    assert len(rows) == 6 * len(config.train.seeds)
    assert {"model", "loss", "member", "test_error"} <= set(rows[0])
    assert {r["initial"] for r in rows} == {"lammps_reference"}  # the smoke config's start, recorded
    assert "| MLP | L_z | 20 x 100 |" in structures.table(results) and "2.60e-02" not in structures.table(results)

    prep = experiment.prepare(config, workdir)  # reads the data back
    n = config.system.params.n_atoms
    pool = prep.pool.reshape(config.data.n_pool_trajectories, -1, 6 * n)
    x0 = prep.test.x0
    # one ensemble: every run starts from the same minimised positions; T0 differs
    np.testing.assert_array_equal(pool[0, 0, : 3 * n], x0[0, : 3 * n])
    assert not np.allclose(pool[0, 0, 3 * n:], x0[0, 3 * n:])
    np.testing.assert_allclose(prep.test.obs[0, 0], 20.0 * temperature(x0[0], n), rtol=1e-6)
    again = structures.run_structures(config, workdir)  # resumes: nothing retrains
    assert [r["test_errors"] for r in again] == [r["test_errors"] for r in results]


def test_structures_member_groups_equal_the_whole_ensemble(tmp_path):
    """An ensemble trained in groups of one seed (structures.group_size) draws the
    whole ensemble's shared subsets and gives its members' errors; a partly
    finished ensemble is reported with fewer members, and groups of different
    data are never merged."""
    from configs import lj800
    from macro_jax import structures

    config = lj800.get_config("smoke")
    config.structures.models = ("mlp",)
    config.train.runs = ("xp:1/10",)
    workdir = str(tmp_path)
    config.structures.group_size = 1
    (grouped,) = structures.run_structures(config, workdir)
    assert grouped["seeds"] == [1, 2] and [g["seeds"] for g in grouped["groups"]] == [[1], [2]]
    assert [g["subset_seed"] for g in grouped["groups"]] == [1, 1]  # the whole ensemble's draw
    assert [name for name, _ in grouped["_runs"]] == ["mlp_seeds1-1_xp_p0.1_budget2000", "mlp_seeds2-2_xp_p0.1_budget2000"]
    # a third seed: its group has not run, so only the two finished groups are reported
    config.train.seeds = (1, 2, 3)
    (partial,) = structures.run_structures(config, workdir, train=False)
    assert partial["test_errors"] == grouped["test_errors"] and partial["n_members_planned"] == 3
    assert "(2 of 3)" in structures.table([partial]) and structures.rows([partial])[0]["ensemble_size"] == 3

    config.structures.group_size, config.train.seeds = 0, (1, 2)
    (whole,) = structures.run_structures(config, workdir)
    assert [name for name, _ in whole["_runs"]] == ["mlp_xp_p0.1_budget2000"]
    assert whole["n_force_computations"] == grouped["n_force_computations"] == config.train.budget
    np.testing.assert_allclose(grouped["test_errors"], whole["test_errors"], rtol=1e-4)
    assert whole["test_errors"] != grouped["test_errors"][::-1]
    other = [r for _, r in grouped["_runs"]]
    other[1] = dict(other[1], data_sha256={"pool": "0" * 64})
    with pytest.raises(RuntimeError, match="different data_sha256"):
        structures.merge_groups(other, 2)


def test_lj51200_config_and_smoke_run_with_stage_records(tmp_path):
    """The large-system protocol on 100 atoms: particle runs written in blocks
    (each block from its own minimised configuration), a one-hidden-layer AE,
    L_z vs L_x,p at one budget, and stages.json with every stage's seconds and
    peak memory."""
    from configs import lj51200
    from macro_jax import pool as pool_lib, stages

    full = lj51200.get_config()
    assert (full.system.params.n_atoms, full.system.params.box_size, tuple(full.autoencoder.hidden)) == (51_200, 40.0, (64,))
    assert full.train.runs == ("z", "xp:50/51200") and full.train.budget == 512_000
    assert full.data.n_pool_trajectories * full.data.pool_steps >= full.train.budget // 50  # the pool holds the L_x,p draw
    with pytest.raises(ValueError, match="unknown lj51200 config variant"):
        lj51200.get_config("big")

    config = lj51200.get_config("smoke")
    workdir = str(tmp_path)
    stages.clear()
    results = experiment.train_and_evaluate(config, workdir)
    assert [r["loss"] for r in results] == ["L_z", "L_x,p"]
    for r in results:
        assert r["n_force_computations"] == config.train.budget
        assert all(np.isfinite(e) and 0 < e < 1 for e in r["test_errors"])
    prep = experiment.prepare(config, workdir)
    assert isinstance(prep.pool, pool_lib.BlockPool) and len(prep.ae.encoder.layers) == 2  # one hidden layer
    n = config.system.params.n_atoms
    first = [np.asarray(prep.pool.take(np.asarray([b * 2 * 50]))[0, : 3 * n]) for b in range(2)]
    assert not np.allclose(first[0], first[1])  # blocks 0 and 1 start from different minimised configurations
    with open(os.path.join(workdir, "stages.json")) as f:
        names = [s["stage"] for s in json.load(f)]
    expected = ["data", "autoencoder", "latent statistics"] + [
        f"{experiment.run_name(spec, config.train.budget)}: {what}"
        for spec in config.train.runs for what in ("labels and precompute", "training", "evaluation")]
    assert [name.split(" (")[0] for name in names] == expected
    stages.clear()


def test_structures_compare_only_the_papers_runs_with_the_paper():
    """A "z:normalised" result at the LJ-800 protocol's budget gets its own label and
    no reference column; the plain "z" result next to it gets the paper's numbers."""
    from macro_jax import structures

    def result(spec):
        return {"model": "mlp", "loss": "L_z", "run": spec, "p": 1.0, "budget": 1_000_000, "sites_per_config": 800,
                "n_configs": 1250, "n_force_computations": 1_000_000, "seeds": [1, 2], "test_errors": [0.01, 0.03],
                "test_error_mean": 0.02, "test_error_std": 0.01, "settings": {"train": {"epochs": 2000}}}

    results = [result("z"), result("z:normalised")]
    lines = structures.table(results).splitlines()
    assert lines[2].startswith("| MLP | L_z | 1,250 x 800 |") and "2.60e-02" in lines[2]
    assert lines[3].startswith("| MLP | L_z normalised | 1,250 x 800 |") and lines[3].endswith("| – | – |")
    rows = structures.rows(results)
    assert {(r["run"], r["label"]) for r in rows} == {("z", "L_z"), ("z:normalised", "L_z normalised")}
