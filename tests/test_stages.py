"""Per-stage wall time and peak memory records."""

import time

import numpy as np
import pytest

from macro_jax import stages


def test_stage_peaks_are_each_stages_own():
    stages.clear()
    with stages.stage("big"):
        block = np.ones(40 * 2**20)  # 320 MiB, touched
        time.sleep(0.1)  # several samples of the anonymous memory
        del block
    with stages.stage("small"):
        np.ones(1000).sum()
    big, small = stages.records()
    assert (big["stage"], small["stage"]) == ("big", "small")
    assert big["seconds"] >= 0.1 and small["seconds"] >= 0
    assert big["peak_rss_gib"] >= 0.3
    if big["peak_is_stage_own"]:  # the kernel let us reset the peak: the 320 MiB is gone in "small"
        assert small["peak_rss_gib"] < big["peak_rss_gib"] - 0.25
    if "peak_anon_gib" in big:  # Linux: the sampled anonymous peak saw the array too
        assert big["peak_anon_gib"] >= 0.3 and small["peak_anon_gib"] < big["peak_anon_gib"] - 0.25
    stages.clear()
    assert stages.records() == []


def test_anonymous_peak_leaves_out_memory_mapped_pages(tmp_path):
    """Reading a 256 MiB memory-mapped file raises the resident set, not the anonymous peak."""
    path = tmp_path / "pool.npy"
    np.save(path, np.ones(32 * 2**20))
    stages.clear()
    with stages.stage("baseline"):
        time.sleep(0.05)
    with stages.stage("read"):
        mapped = np.load(path, mmap_mode="r")
        assert float(mapped.sum()) == 32 * 2**20  # every page touched
        time.sleep(0.1)
        del mapped
    baseline, read = stages.records()
    stages.clear()
    if "peak_anon_gib" not in read or not read["peak_is_stage_own"]:
        pytest.skip("needs Linux /proc/self/status and clear_refs")
    file_pages = read["peak_rss_gib"] - read["peak_anon_gib"]
    assert file_pages - (baseline["peak_rss_gib"] - baseline["peak_anon_gib"]) >= 0.2
    assert read["peak_anon_gib"] < baseline["peak_anon_gib"] + 0.1


def test_stages_must_not_nest():
    stages.clear()
    with stages.stage("outer"):
        with pytest.raises(RuntimeError, match="must not nest"):
            with stages.stage("inner"):
                pass
    assert [r["stage"] for r in stages.records()] == ["outer"]
    stages.clear()
