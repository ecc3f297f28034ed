"""Configuration pools larger than memory: blocks of ``.npy`` files read by memory map.

A ``BlockPool`` is a directory of blocks ``block_00000.npy`` ... (each the
kept frames of one block of trajectories, with a JSON sidecar holding its
metadata and SHA-256) plus ``manifest.npz`` (rows per block) once every
block is written.
Blocks are written as they are simulated, so an interrupted generation
resumes at the first missing block. Reading never loads the whole pool:
``take(indices)`` gathers rows, ``chunks`` streams them.

``take(pool, indices)`` and ``n_configs(pool)`` accept a ``BlockPool`` or an
in-memory array, so every stage handles both.
"""

from __future__ import annotations

import os
import socket

import jax.numpy as jnp
import numpy as np

from macro_jax import checkpoint


class BlockPool:
    """Read-only, memory-mapped view of the blocks of one pool (see module doc)."""

    def __init__(self, directory: str, expect: dict):
        manifest, _ = checkpoint.load_arrays(os.path.join(directory, "manifest.npz"), expect=expect)
        self.directory = directory
        self.rows = [int(r) for r in manifest["rows"]]
        self.blocks = [
            checkpoint.load_npy(block_path(directory, b), expect=expect, mmap=True) for b in range(len(self.rows))
        ]
        for b, (block, rows) in enumerate(zip(self.blocks, self.rows)):
            if block.shape[0] != rows:
                raise checkpoint.DataFileError(
                    f"{block_path(directory, b)}: {block.shape[0]} rows, the manifest says {rows}")
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        width = {b.shape[1] for b in self.blocks}
        if len(width) != 1:
            raise checkpoint.DataFileError(f"{directory}: blocks have different widths {sorted(width)}")
        self.shape = (int(self.offsets[-1]), width.pop())
        self.dtype = self.blocks[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, indices) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) as one in-memory array."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"pool row out of range [0, {len(self)})")
        out = np.empty((indices.size, self.shape[1]), self.dtype)
        block = np.searchsorted(self.offsets, indices, side="right") - 1
        for b in np.unique(block):
            sel = np.flatnonzero(block == b)
            out[sel] = self.blocks[b][indices[sel] - self.offsets[b]]
        return out


def claim(path: str) -> bool:
    """Takes the lock ``path + ".lock"`` for this process (host and pid inside);
    False if another live process holds it. A lock left by a dead process on
    this host is taken over, so processes sharing a directory split the
    blocks between them and a crash loses no block for good."""
    lock = path + ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not _stale(lock):
            return False
        os.remove(lock)
        return claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    return True


def release(path: str) -> None:
    if os.path.exists(path + ".lock"):
        os.remove(path + ".lock")


def _stale(lock: str) -> bool:
    try:
        with open(lock) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        return False  # being written right now
    if host != socket.gethostname():
        return False  # cannot tell; assume alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def block_path(directory: str, b: int, ext: str = "npy") -> str:
    return os.path.join(directory, f"block_{b:05d}.{ext}")


def n_configs(pool) -> int:
    return int(pool.shape[0])


def take(pool, indices) -> jnp.ndarray:
    """Rows ``indices`` of a ``BlockPool`` or an in-memory array, as a jax array."""
    if isinstance(pool, BlockPool):
        return jnp.asarray(pool.take(indices))
    return jnp.asarray(pool)[jnp.asarray(indices)]


def chunks(n: int, chunk: int):
    """``(start, stop)`` pairs covering range(n) in steps of ``chunk``."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
