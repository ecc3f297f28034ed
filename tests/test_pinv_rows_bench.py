"""Smoke test of benchmarks/pinv_rows.py at a tiny grid: both methods agree, rows carry their fields."""

import json

from benchmarks import common, pinv_rows

FIELDS = {"method", "n", "d", "k", "median_s", "peak_bytes", "compile_s", "device", "batch", "rel_diff"}


def test_pinv_rows_benchmark_tiny(tmp_path):
    rows = pinv_rows.run(n_grid=16, k=16, repeats=1, batch=2)  # asserts rel_diff < MAX_REL_DIFF itself
    path = tmp_path / "pinv_rows.json"
    common.write_rows(str(path), rows)
    saved = json.loads(path.read_text())
    assert [(r["method"], r["batch"]) for r in saved] == [
        ("cholesky", 1), ("dense_svd", 1), ("cholesky", 2), ("dense_svd", 2)]
    for r in saved:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["n"], r["d"], r["k"]) == (256, 16, 16)
        assert r["rel_diff"] < pinv_rows.MAX_REL_DIFF
        assert r["median_s"] > 0 and r["compile_s"] > 0
        assert r["peak_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"] > 0
        assert r["working_bytes"] == r["temp_bytes"] + r["output_bytes"] > 0
