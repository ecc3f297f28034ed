"""Safe on-disk formats: nothing is ever unpickled.

* Models: ``equinox.tree_serialise_leaves`` (raw ``.npy`` leaves; loading
  needs a skeleton built from the config, and ``numpy.load`` refuses pickles).
* Arrays (data sets): ``.npz`` (or ``.npy`` for memory-mapped blocks) written
  with ``allow_pickle=False`` plus a JSON sidecar holding metadata and a
  SHA-256 of the file, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import equinox as eqx
import jax
import numpy as np


class DataFileError(RuntimeError):
    """A data or checkpoint file is missing, corrupt, or from another configuration."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_sidecar(path: str, metadata: dict[str, Any]) -> None:
    meta = dict(metadata, sha256=_sha256(path))
    tmp = f"{path}.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path + ".json")


def _check_sidecar(path: str, expect: dict[str, Any] | None) -> dict[str, Any]:
    if not os.path.exists(path):
        raise DataFileError(f"{path}: file not found")
    if not os.path.exists(path + ".json"):
        raise DataFileError(f"{path}: metadata file {path}.json not found")
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}.json: not valid JSON ({e})") from e
    if meta.get("sha256") != _sha256(path):
        raise DataFileError(f"{path}: checksum mismatch, the file is corrupt or was modified")
    for key, value in (expect or {}).items():
        if json.loads(json.dumps(value, default=str)) != meta.get(key):
            raise DataFileError(
                f"{path}: metadata field {key!r} is {meta.get(key)!r}, expected {value!r}; "
                "the file was made by another configuration (delete it to regenerate)"
            )
    return meta


def load_sidecar(path: str) -> dict[str, Any]:
    """The metadata of a file saved here (its checksum checked)."""
    return _check_sidecar(path, None)


def save_arrays(path: str, arrays: dict[str, Any], metadata: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique: processes may write the same file
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    _write_sidecar(path, metadata)


def load_arrays(path: str, expect: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Loads arrays saved by ``save_arrays`` after checking checksum and ``expect``."""
    meta = _check_sidecar(path, expect)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:
        raise DataFileError(f"{path}: cannot be read as an npz archive ({e})") from e
    return arrays, meta


def save_npy(path: str, array, metadata: dict[str, Any]) -> None:
    """One array as ``.npy`` (memory-mappable) plus the JSON sidecar."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)
    _write_sidecar(path, metadata)


def load_npy(path: str, expect: dict[str, Any] | None = None, mmap: bool = False) -> np.ndarray:
    """An array saved by ``save_npy`` (checksum and ``expect`` checked); ``mmap``
    maps it read-only instead of reading it into memory."""
    _check_sidecar(path, expect)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataFileError(f"{path}: cannot be read as an npy array ({e})") from e


def save_model(path: str, model, metadata: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # unique: processes may write the same file
    eqx.tree_serialise_leaves(tmp, model)
    os.replace(tmp, path)
    _write_sidecar(path, metadata)


def load_model(path: str, skeleton, expect: dict[str, Any] | None = None):
    """Fills ``skeleton`` (a model of the right structure) with the saved leaves."""
    _check_sidecar(path, expect)
    try:
        return eqx.tree_deserialise_leaves(path, skeleton)
    except Exception as e:  # shape or structure mismatch
        raise DataFileError(f"{path}: does not match the model built from the config ({e})") from e


def cpu_description() -> str:
    """The CPU: its model name, family/model/stepping and a short hash of its
    feature flags (``/proc/cpuinfo``; ``platform.processor()`` elsewhere). Saved
    beside every file because a model trained from the same data, config and
    seed has come out as a different file on another machine (the simulated
    data did not), and virtual machines often report only "AMD EPYC"."""
    import platform

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "unknown"
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:8]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}, flags {flags})")


def versions() -> dict[str, str]:
    """Library versions and the machine (CPU, the device JAX computes on, the
    XLA_FLAGS in force, the cores the process may use) that made a file: what to
    compare when a rebuild differs. XLA's CPU thread pool follows the usable
    cores and ``--xla_cpu_multi_thread_eigen``, and a trained model's bits
    depend on it (3 autoencoder epochs on LJ-800 data: one file with one
    thread, another with two)."""
    import equinox
    import optax

    import macro_jax

    return {"jax": jax.__version__, "equinox": equinox.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "macro_jax": macro_jax.__version__,
            "cpu": cpu_description(), "device": jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "usable_cores": str(usable_cores())}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
