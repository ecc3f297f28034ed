"""Smoke test of benchmarks/label_seconds.py on the Allen-Cahn smoke config."""

from benchmarks import label_seconds
from configs import allen_cahn


def test_label_seconds_tiny(tmp_path):
    config = allen_cahn.get_config("smoke")
    rows = label_seconds.label_seconds(config, str(tmp_path))
    assert [r["run"] for r in rows] == list(config.train.runs)
    z, xp = rows
    assert z["sites_per_config"] == 256 and xp["sites_per_config"] == 16  # 16 x 16 grid, p = 1/16
    # equal budgets: the same number of force computations either way
    assert z["n_force_computations"] == xp["n_force_computations"] == config.train.budget
    assert xp["n_configs"] == 16 * z["n_configs"]
    for r in rows:
        assert r["force_seconds"] > 0
        assert abs(r["ns_per_force"] - r["force_seconds"] / r["n_force_computations"] * 1e9) < 1e-6
