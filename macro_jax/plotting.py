"""Matplotlib for files only: the non-interactive Agg backend, imported lazily
(plots are optional output; importing macro_jax never loads matplotlib)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
