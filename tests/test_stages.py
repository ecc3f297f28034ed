"""Per-stage wall time and peak memory records."""

import time

import numpy as np
import pytest

from macro_jax import stages


def test_stage_peaks_are_each_stages_own():
    stages.clear()
    with stages.stage("big"):
        block = np.ones(40 * 2**20)  # 320 MiB, touched
        time.sleep(0.01)
        del block
    with stages.stage("small"):
        np.ones(1000).sum()
    big, small = stages.records()
    assert (big["stage"], small["stage"]) == ("big", "small")
    assert big["seconds"] >= 0.01 and small["seconds"] >= 0
    assert big["peak_rss_gib"] >= 0.3
    if big["peak_is_stage_own"]:  # the kernel let us reset the peak: the 320 MiB is gone in "small"
        assert small["peak_rss_gib"] < big["peak_rss_gib"] - 0.25
    stages.clear()
    assert stages.records() == []


def test_stages_must_not_nest():
    stages.clear()
    with stages.stage("outer"):
        with pytest.raises(RuntimeError, match="must not nest"):
            with stages.stage("inner"):
                pass
    assert [r["stage"] for r in stages.records()] == ["outer"]
    stages.clear()
