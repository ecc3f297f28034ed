"""Wall time and peak memory of each stage of a run (data, autoencoder, labels, training, ...).

``with stage("autoencoder"): ...`` appends a record to this process's list
(``records()``): seconds, and the peak resident set size of the process
during the stage. On Linux the kernel's peak (``VmHWM``) is reset at the start
of each stage (``/proc/self/clear_refs``), so each peak is the stage's own;
where that reset is not allowed the record says so and the peak is the
process's maximum so far. On an accelerator the device's peak bytes in use
(``memory_stats``, since the process started) are added where the backend
reports them. Stages must not nest (a nested reset would hide the outer
stage's peak); nesting raises.

The resident set counts the pages of memory-mapped files the stage read (a
15 GB pool read once shows as 15 GB), which the kernel can drop at any time.
So a thread also samples the process's anonymous resident memory (``RssAnon``:
arrays, heap; no file pages) every ``SAMPLE_SECONDS`` and records its maximum
as ``peak_anon_gib``: what the stage itself needed, up to spikes shorter than
the sampling interval.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time

import jax

_RECORDS: list[dict] = []
_OPEN: list[str] = []


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``RssAnon``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


SAMPLE_SECONDS = 0.02


class _AnonPeak:
    """Samples ``RssAnon`` on a daemon thread until ``stop()``; the maximum seen."""

    def __init__(self):
        self.peak = _status_bytes("RssAnon")
        self._done = threading.Event()
        self._thread = None
        if self.peak is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, _status_bytes("RssAnon") or 0)

    def stop(self) -> int | None:
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, _status_bytes("RssAnon") or 0)
        return self.peak


def _device_peak_bytes() -> int | None:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None  # host memory: the RSS above
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


@contextlib.contextmanager
def stage(name: str):
    """Records the wall seconds and peak memory of the block it wraps as ``name``."""
    if _OPEN:
        raise RuntimeError(f"stage {name!r} opened inside stage {_OPEN[-1]!r}: stages must not nest")
    _OPEN.append(name)
    reset = _reset_peak()
    anon = _AnonPeak()
    start = time.perf_counter()
    try:
        yield
    finally:
        _OPEN.pop()
        seconds = time.perf_counter() - start
        anon_peak = anon.stop()
        record = {"stage": name, "seconds": seconds,
                  "peak_rss_gib": _peak_rss_bytes() / 2**30, "peak_is_stage_own": reset}
        if anon_peak is not None:
            record["peak_anon_gib"] = anon_peak / 2**30
        device_peak = _device_peak_bytes()
        if device_peak is not None:
            record["device_peak_gib_so_far"] = device_peak / 2**30
        _RECORDS.append(record)


def records() -> list[dict]:
    """This process's stage records, in order."""
    return [dict(r) for r in _RECORDS]


def clear() -> None:
    _RECORDS.clear()
