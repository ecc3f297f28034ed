"""Shared timing helpers: warm up, block_until_ready, median of repeats, device string."""

from __future__ import annotations

import json
import os
import statistics
import time

import jax

from macro_jax import checkpoint


def device_description() -> str:
    d = jax.devices()[0]
    cores = checkpoint.usable_cores()  # under taskset, the cores it may use
    kind = d.device_kind if d.platform != "cpu" else checkpoint.cpu_description()
    flags = os.environ.get("XLA_FLAGS", "")
    return f"{d.platform}: {kind}, {cores} cores" + (f", XLA_FLAGS='{flags}'" if flags else "")


def time_call(fn, *args, repeats: int = 5) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``fn(*args)`` to completion (call once first to warm up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def compile_seconds(jitted, *args) -> tuple[object, float]:
    """Ahead-of-time compile; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
