"""Rows I of ``J^+ g`` for the Allen-Cahn encoder: Gram + Cholesky vs a dense SVD pseudo-inverse.

Allen-Cahn on an n x n grid (N = n^2 = 40,000 at n = 200), the experiment's
autoencoder (free energy + 15 closure coordinates: d = 16, encoder N -> 64 ->
64 -> 15, softplus, zero biases, random weights), one annulus configuration x
(the t = 0 frame of ``trajectory_fn``), k = N / 16 sites from ``sample_sites``
and a fixed random g in R^d. Two jitted functions ``(params, x, I, g) ->
(J^+ g)_I``, both taking the encoder's parameters as an argument (so no
per-parameter work is folded into constants):

  * cholesky:  ``jacobian.make_geometry_fn(ae, "linear_first_layer")`` (G = J J^T
               in float64 and J[:, I], never the full J), ``jacobian.cholesky``,
               ``jacobian.pinv_rows``. The per-parameter ``W1 W1^T`` is part of
               every call, so a single configuration pays it in full (float64,
               accumulated in column chunks: no float64 copy of W1).
  * dense_svd: the reference's path: the full d x N J by ``jax.jacrev(ae.encode)``
               (float32, as the encoder), cast to float64, ``jnp.linalg.pinv``
               (SVD) to the N x d pseudo-inverse, ``(J^+ g)[I]``.

``rel_diff`` = ||a - b|| / ||b|| between the two answers is printed, stored
and asserted below 1e-4. Timing: ahead-of-time compile (``compile_s``), one
warm-up call, median of ``repeats`` calls (``median_s``). Memory is XLA's
static buffer assignment for the compiled function (``memory_analysis()``):
``peak_bytes = temp + argument + output`` bytes and ``working_bytes = temp +
output`` (what the method allocates beyond its inputs; no buffers are
donated, so ``alias`` is 0); the arguments are the encoder's parameters (the decoder is
dropped), x, I and g, the same for both methods. With ``--batch B`` (default
64; 0 to skip) both are also timed on B configurations at once (vmap, B
annuli, B site sets, B g's), rows with ``batch`` = B; single rows have
``batch`` = 1.

  python benchmarks/pinv_rows.py --out benchmarks/results/pinv_rows_cpu.json
  python benchmarks/pinv_rows.py --n-grid 16 --k 16 --repeats 1 --batch 4 --out /tmp/pinv.json   # functional check
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import macro_jax  # noqa: E402,F401  (float64 on)
from benchmarks import common  # noqa: E402
from macro_jax import jacobian  # noqa: E402
from macro_jax.models import Autoencoder  # noqa: E402
from macro_jax.systems import make_allen_cahn, sample_sites  # noqa: E402

METHODS = ("cholesky", "dense_svd")
MAX_REL_DIFF = 1e-4
RowsFn = Callable[[Autoencoder, jax.Array, jax.Array, jax.Array], jax.Array]


def _cholesky_rows(ae: Autoencoder) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Per-configuration ``(x, I, g) -> (J^+ g)_I`` from G = J J^T and J[:, I]; build it inside jit."""
    geometry = jacobian.make_geometry_fn(ae, "linear_first_layer")  # W1 W1^T here, once per call

    def rows(x, sites, g):
        geo = geometry(x, sites)
        return jacobian.pinv_rows(jacobian.cholesky(geo.gram), geo.cols, g)

    return rows


def _dense_svd_rows(ae: Autoencoder) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Per-configuration ``(x, I, g) -> (J^+ g)_I`` from the full J and its SVD pseudo-inverse."""

    def rows(x, sites, g):
        jac = jax.jacrev(ae.encode)(x).astype(jnp.float64)  # (d, N)
        return (jnp.linalg.pinv(jac) @ g.astype(jnp.float64))[sites]

    return rows


def make_method_fn(method: str, static: Autoencoder, batched: bool) -> Callable:
    """Jittable ``(params, x, I, g) -> (J^+ g)_I``; with ``batched`` the last three carry a leading axis."""
    per_config = {"cholesky": _cholesky_rows, "dense_svd": _dense_svd_rows}[method]

    def fn(params, x, sites, g):
        rows = per_config(eqx.combine(params, static))
        return jax.vmap(rows)(x, sites, g) if batched else rows(x, sites, g)

    return fn


def _memory(compiled) -> dict[str, int]:
    """XLA's compiled buffer sizes and ``peak_bytes = temp + argument + output``."""
    m = compiled.memory_analysis()
    sizes = {f"{name}_bytes": int(getattr(m, f"{name}_size_in_bytes"))
             for name in ("temp", "argument", "output", "alias")}
    return {"peak_bytes": sizes["temp_bytes"] + sizes["argument_bytes"] + sizes["output_bytes"],
            "working_bytes": sizes["temp_bytes"] + sizes["output_bytes"], **sizes}


def _inputs(n_grid: int, k: int, batch: int) -> tuple[Autoencoder, tuple, tuple | None]:
    """The encoder (decoder dropped), one (x, I, g) and, if ``batch``, ``batch`` of them stacked."""
    system = make_allen_cahn(n_grid=n_grid)
    ae = Autoencoder(system.n_dof, system.n_observables, 15, (64, 64), "softplus", system.observable_fn,
                     decoder_uses_observables=False, bias_init="zeros", key=jr.PRNGKey(0))
    ae = eqx.tree_at(lambda m: m.decoder, ae, None)  # not used by either method; keeps argument bytes honest
    dt = 0.1 / n_grid**2
    x = system.trajectory_fn(jr.PRNGKey(0), 1, dt=dt, n_steps=100, save_every=100, dtype=jnp.float32).xs[0, 0]
    d = ae.latent_dim
    single = (x, sample_sites(jr.PRNGKey(1), system.n_sites, k), jr.normal(jr.PRNGKey(2), (d,), jnp.float64))
    if not batch:
        return ae, single, None
    xs = system.trajectory_fn(jr.PRNGKey(3), batch, dt=dt, n_steps=100, save_every=100, dtype=jnp.float32).xs[:, 0]
    site_sets = jax.vmap(lambda key: sample_sites(key, system.n_sites, k))(jr.split(jr.PRNGKey(4), batch))
    return ae, single, (xs, site_sets, jr.normal(jr.PRNGKey(5), (batch, d), jnp.float64))


def run(n_grid: int = 200, k: int = 2500, repeats: int = 10, batch: int = 64) -> list[dict]:
    """Times both methods on one configuration (and ``batch`` at once if > 0); returns the rows.

    Raises ``AssertionError`` if the two answers differ by more than ``MAX_REL_DIFF``.
    """
    if batch == 1 or batch < 0:
        raise ValueError(f"batch={batch}: 0 (no batched rows) or at least 2")
    ae, single, stacked = _inputs(n_grid, k, batch)
    params, static = eqx.partition(ae, eqx.is_array)
    device = common.device_description()
    rows = []
    for size, args in ((1, single), (batch, stacked)):
        if args is None:
            continue
        outs = {}
        for method in METHODS:
            jitted = jax.jit(make_method_fn(method, static, batched=size > 1))
            compiled, compile_s = common.compile_seconds(jitted, params, *args)
            outs[method] = jax.block_until_ready(compiled(params, *args))  # warm-up
            median, times = common.time_call(compiled, params, *args, repeats=repeats)
            rows.append({"method": method, "batch": size, "n": ae.encoder.layers[0].in_features,
                         "d": ae.latent_dim, "k": k, "median_s": median, "times_s": times,
                         **_memory(compiled), "compile_s": compile_s, "device": device})
        rel = float(jnp.linalg.norm(outs["cholesky"] - outs["dense_svd"]) / jnp.linalg.norm(outs["dense_svd"]))
        same = rows[-len(METHODS):]
        base = next(r for r in same if r["method"] == "dense_svd")
        for r in same:
            r["rel_diff"] = rel
            r["speedup_vs_dense_svd"] = base["median_s"] / r["median_s"]
            r["memory_ratio_vs_dense_svd"] = base["peak_bytes"] / r["peak_bytes"]
            r["working_memory_ratio_vs_dense_svd"] = base["working_bytes"] / r["working_bytes"]
        assert rel < MAX_REL_DIFF, f"batch {size}: cholesky and dense_svd differ, rel_diff={rel:.3g}"
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"{'method':>10} {'batch':>5} {'median_s':>10} {'peak_MiB':>9} {'work_MiB':>9} {'compile_s':>9} "
          f"{'rel_diff':>9} {'speedup':>8} {'mem_ratio':>9} {'work_ratio':>10}")
    for r in rows:
        print(f"{r['method']:>10} {r['batch']:>5} {r['median_s']:>10.5f} {r['peak_bytes'] / 2**20:>9.2f} "
              f"{r['working_bytes'] / 2**20:>9.2f} {r['compile_s']:>9.2f} {r['rel_diff']:>9.2e} "
              f"{r['speedup_vs_dense_svd']:>8.2f} {r['memory_ratio_vs_dense_svd']:>9.2f} "
              f"{r['working_memory_ratio_vs_dense_svd']:>10.2f}")
    print("speedup, mem_ratio, work_ratio: dense_svd's median_s, peak_bytes and working_bytes (temp + output,\n"
          "i.e. without the shared inputs: encoder weights, x, I, g) over the row's, same batch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/pinv_rows_cpu.json", help="JSON output.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per measurement.")
    parser.add_argument("--n-grid", type=int, default=200, help="Grid side n (N = n^2).")
    parser.add_argument("--k", type=int, default=2500, help="Rows (sites) per configuration.")
    parser.add_argument("--batch", type=int, default=64, help="Configurations in the vmapped rows; 0 skips them.")
    args = parser.parse_args()
    rows = run(args.n_grid, args.k, args.repeats, args.batch)
    common.write_rows(args.out, rows)
    _print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
