"""Reading and checking experiment configs: every bad value names its field."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_collections

from macro_jax.jacobian import JACOBIAN_METHODS
from macro_jax.losses import LOSSES, is_partial
from macro_jax.models.latent import LATENT_MODELS
from macro_jax.systems.integrators import INTEGRATORS


INPUT_ORIGINS = ("data", "box_centre")  # autoencoder.input_origin


class ConfigError(ValueError):
    """A config value is out of range; the message names the field."""


SITE_SAMPLINGS = ("uniform", "importance")
ZP_LABELS = ("unbiased", "regression")  # the label of L_z,p: "zp:<p>" and "zp:<p>:regression"
Z_WEIGHTINGS = ("physical", "normalised")


def _split_run(spec: str) -> tuple[str, str, str]:
    """``(loss, p, option)``: ``"xp:<p>[:<sampling>]"``, ``"zp:<p>[:<sampling>]"``, ``"z[:<weighting>]"``, ``"x"``."""
    loss, _, rest = str(spec).partition(":")
    if loss == "z":
        return loss, "", rest
    p_text, _, option = rest.partition(":")
    return loss, p_text, option


def parse_run(spec: str) -> tuple[str, float]:
    """``"z"`` or ``"z:normalised"`` -> (z, 1); ``"x"`` -> (x, 1); ``"xp:0.2"``,
    ``"xp:1/5"`` or ``"xp:1/5:importance"`` -> (xp, 0.2). The option after ``z``
    is its weighting (``z_weighting``), the third field of ``xp`` its site
    sampling (``site_sampling``). ``"zp:<p>[:<sampling>]"`` (our ``L_z,p``,
    ``macro_jax.losses``) takes the same fields as ``xp``."""
    loss, p_text, option = _split_run(spec)
    if loss not in LOSSES:
        raise ConfigError(f"train.runs entry {spec!r}: loss {loss!r} is not one of {list(LOSSES)}")
    if loss == "z":
        if option and option not in Z_WEIGHTINGS:
            raise ConfigError(f"train.runs entry {spec!r}: the L_z weighting {option!r} is not one of "
                              f"{list(Z_WEIGHTINGS)} ('z' or 'z:normalised')")
        return loss, 1.0
    if loss == "x":
        if p_text or option:
            raise ConfigError(f"train.runs entry {spec!r}: 'x' takes no options; only 'xp' and 'zp' take a "
                              "fraction p and a site sampling, only 'z' a weighting")
        return loss, 1.0
    try:
        p = float(Fraction(p_text))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"train.runs entry {spec!r}: p must be a number in (0, 1], e.g. 'xp:0.2' or 'xp:1/5'")
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"train.runs entry {spec!r}: p = {p} must be in (0, 1]")
    if loss == "zp" and option == ZP_LABELS[1]:
        return loss, p
    if option and option not in SITE_SAMPLINGS:
        also = f" (or, for 'zp', {ZP_LABELS[1]!r})" if loss == "zp" else ""
        raise ConfigError(f"train.runs entry {spec!r}: site sampling {option!r} is not one of {list(SITE_SAMPLINGS)}"
                          + also)
    return loss, p


def site_sampling(spec: str) -> str:
    """How an ``xp`` (or ``zp``) run draws its sites: ``"uniform"`` (default: k distinct sites,
    uniformly, the paper's) or ``"importance"`` (``"xp:<p>:importance"``: k i.i.d.
    draws from the system's proposal, each weighted by 1 / (n_sites q); an
    improvement of ours, not the paper's protocol). Runs with all forces: ``"uniform"``."""
    loss, _ = parse_run(spec)
    option = _split_run(spec)[2]
    return option if is_partial(loss) and option in SITE_SAMPLINGS else "uniform"


def zp_label(spec: str) -> str:
    """What an ``L_z,p`` run fits: ``"unbiased"`` (``"zp:<p>"``: the k-site
    estimate ``(n / k) J_I f_I`` of ``J f``) or ``"regression"``
    (``"zp:<p>:regression"``, uniform sites: ``G (J_I J_I^T)^{-1} J_I f_I``,
    see ``data.partial_sample``). Other losses: ``"unbiased"``."""
    loss, _ = parse_run(spec)
    return ZP_LABELS[1] if loss == "zp" and _split_run(spec)[2] == ZP_LABELS[1] else ZP_LABELS[0]


def z_weighting(spec: str) -> str:
    """How an ``L_z`` run weighs the d components of the rate residual
    ``J f - g(z)``: ``"physical"`` (default: the plain squared norm, as in the
    paper and the reference code) or ``"normalised"`` (``"z:normalised"``: each
    component divided by the std of its rate over the run's labels, i.e. the
    squared error in normalised target space; ours, not the paper's protocol).
    ``L_x`` and ``L_x,p`` have no such choice: ``J^+ g`` does not change under
    a linear change of latent coordinates. Other losses: ``"physical"``."""
    loss, _ = parse_run(spec)
    return (_split_run(spec)[2] or "physical") if loss == "z" else "physical"


def run_option(spec: str) -> str | None:
    """The option of ours a run uses (``"normalised"`` for ``"z:normalised"``,
    ``"importance"`` for ``"xp:<p>:importance"``), or None for the paper's runs:
    what names, labels and reference comparisons tell apart."""
    loss, _ = parse_run(spec)
    if zp_label(spec) != ZP_LABELS[0]:
        return zp_label(spec)
    option = z_weighting(spec) if loss == "z" else site_sampling(spec)
    return None if option in (Z_WEIGHTINGS[0], SITE_SAMPLINGS[0]) else option


def subset_size(p: float, n_sites: int, spec: str = "") -> int:
    """k = p n_sites, which must be a whole number of sites."""
    k = round(p * n_sites)
    if k < 1 or abs(k - p * n_sites) > 1e-6 * n_sites:
        raise ConfigError(f"train.runs entry {spec!r}: p * n_sites = {p * n_sites:g} must be a whole number >= 1")
    return k


def run_settings(config, loss: str) -> ml_collections.ConfigDict:
    """``config.train`` with the per-loss overrides for ``loss`` applied. ``zp``
    takes ``xp``'s overrides first, then its own: it trains on the same partial
    labels, so by default with the same settings."""
    cfg = ml_collections.ConfigDict(config.train.to_dict())
    for name in (("xp", "zp") if loss == "zp" else (loss,)):
        overrides = config.train.per_loss.get(name, None)
        for key, value in dict(overrides or {}).items():
            if key not in cfg:
                raise ConfigError(f"train.per_loss.{name}.{key}: not a field of train")
            cfg[key] = value
    return cfg


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def validate(config, n_observables: int | None = None, integrators: tuple[str, ...] = INTEGRATORS) -> None:
    """Raises ``ConfigError`` naming the first field out of range.

    ``n_observables`` and ``integrators`` come from the system when it is known.
    """
    d, a, t, m = config.data, config.autoencoder, config.train, config.model
    for field in ("n_pool_trajectories", "n_test_trajectories", "pool_steps", "test_steps",
                  "pool_save_every", "test_save_every"):
        _require(int(d[field]) >= 1, f"data.{field}", d[field], "must be an integer >= 1")
    for field in ("pool_dt", "test_dt"):
        _require(float(d[field]) > 0, f"data.{field}", d[field], "must be > 0")
    for field in ("pool_integrator", "test_integrator"):
        _require(d[field] in integrators, f"data.{field}", d[field], f"must be one of {list(integrators)}")
    _require(d.dtype in ("float32", "float64"), "data.dtype", d.dtype, "must be 'float32' or 'float64'")
    _require(d.test_steps // d.test_save_every >= 2, "data.test_steps", d.test_steps,
             "must keep at least 2 test frames (test_steps // test_save_every >= 2)")
    if d.one_ensemble:
        for field in ("integrator", "dt", "steps", "save_every"):
            _require(d[f"test_{field}"] == d[f"pool_{field}"], f"data.test_{field}", d[f"test_{field}"],
                     f"must equal data.pool_{field}={d[f'pool_{field}']!r} when data.one_ensemble is True")
    _require(int(d.block_trajectories) >= 0, "data.block_trajectories", d.block_trajectories, "must be >= 0 (0 = one call)")
    _require(not (d.block_trajectories and d.one_ensemble), "data.block_trajectories", d.block_trajectories,
             "must be 0 when data.one_ensemble is True (one ensemble is one call)")
    _require(d.pool_keep_above is None or math.isfinite(float(d.pool_keep_above)), "data.pool_keep_above",
             d.pool_keep_above, "must be None or a finite number")

    if n_observables is not None:
        _require(a.latent_dim > n_observables, "autoencoder.latent_dim", a.latent_dim,
                 f"must exceed the number of observables ({n_observables}) by at least one closure variable")
    _require(a.lambda_cond >= 0, "autoencoder.lambda_cond", a.lambda_cond, "must be >= 0")
    _require(a.cond_rows in ("all", "closure"), "autoencoder.cond_rows", a.cond_rows, "must be 'all' or 'closure'")
    _require(a.jacobian in JACOBIAN_METHODS, "autoencoder.jacobian", a.jacobian, f"must be one of {list(JACOBIAN_METHODS)}")
    _require(a.bias_init in ("torch", "zeros"), "autoencoder.bias_init", a.bias_init, "must be 'torch' or 'zeros'")
    _require(a.get("input_origin", "data") in INPUT_ORIGINS, "autoencoder.input_origin", a.get("input_origin"),
             f"must be one of {list(INPUT_ORIGINS)}")
    _require(len(a.hidden) >= 1 and all(int(w) >= 1 for w in a.hidden), "autoencoder.hidden", a.hidden,
             "must be a non-empty tuple of positive widths")
    for field in ("epochs", "batch_size"):
        _require(int(a[field]) >= 1, f"autoencoder.{field}", a[field], "must be an integer >= 1")
    _require(a.lr > 0, "autoencoder.lr", a.lr, "must be > 0")
    _require(a.n_configs >= 0, "autoencoder.n_configs", a.n_configs, "must be >= 0 (0 = all)")
    _require(int(a.get("checkpoint_every", 0)) >= 0, "autoencoder.checkpoint_every", a.get("checkpoint_every"),
             "must be >= 0 (0 = never)")

    _require(m.name in LATENT_MODELS, "model.name", m.name, f"must be one of {list(LATENT_MODELS)}")
    for name in config.structures.models:
        _require(name in LATENT_MODELS, "structures.models", config.structures.models,
                 f"every entry must be one of {list(LATENT_MODELS)}")
    group_size = config.structures.get("group_size", 0)
    _require(isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 0,
             "structures.group_size", group_size, "must be an integer >= 0 (0 = one run per ensemble)")
    _require(m.onsagernet.variant in ("separate", "shared"), "model.onsagernet.variant", m.onsagernet.variant,
             "must be 'separate' or 'shared'")

    _require(len(t.runs) >= 1, "train.runs", t.runs, "must name at least one loss")
    for spec in tuple(t.runs) + tuple(config.sweep.runs):
        parse_run(spec)
    _require(t.label_mode in ("offline", "online"), "train.label_mode", t.label_mode, "must be 'offline' or 'online'")
    if t.label_mode == "online":
        for spec in t.runs:
            _require(is_partial(parse_run(spec)[0]), "train.label_mode", t.label_mode,
                     f"'online' needs every train.runs entry to be 'xp:<p>' or 'zp:<p>' (got {spec!r})")
    _require(len(t.seeds) >= 1 and len(set(t.seeds)) == len(t.seeds), "train.seeds", t.seeds,
             "must be a non-empty tuple of distinct integers")
    subset_seed = t.get("subset_seed", None)
    _require(subset_seed is None or (isinstance(subset_seed, int) and not isinstance(subset_seed, bool)),
             "train.subset_seed", subset_seed, "must be None (the first of train.seeds) or an integer seed")
    _require(subset_seed is None or t.shared_subsets, "train.subset_seed", subset_seed,
             "only shared subsets have one draw: set train.shared_subsets=True or leave subset_seed None")
    _require(t.budget >= 1, "train.budget", t.budget, "must be a positive number of site forces")
    for loss in LOSSES:
        s = run_settings(config, loss)
        source = {field: f"train.per_loss.{by}.{field}" for by in (("xp", "zp") if loss == "zp" else (loss,))
                  for field in dict(config.train.per_loss.get(by, None) or {})}

        def name(field):
            return source.get(field, f"train.{field}")

        for field in ("epochs", "batch_size"):
            _require(int(s[field]) >= 1, name(field), s[field], "must be an integer >= 1")
        select_every = int(s.get("select_every", 0) or 0)
        _require(select_every >= 0, name("select_every"), s.get("select_every"),
                 "must be an integer >= 0 (0 = no model selection)")
        if select_every > 0:
            _require(0.0 < float(s["select_fraction"]) < 1.0, name("select_fraction"), s["select_fraction"],
                     "must be in (0, 1) when train.select_every > 0")
            _require(t.label_mode == "offline", name("select_every"), select_every,
                     "needs train.label_mode='offline' (online labels are drawn inside the step)")
        _require(s.patience >= 0, name("patience"), s.patience, "must be >= 0")
        _require(int(s.checkpoint_every) >= 0, name("checkpoint_every"), s.checkpoint_every, "must be >= 0 (0 = never)")
        _require(int(s.get("monitor_every", 0)) >= 0, name("monitor_every"), s.get("monitor_every", 0),
                 "must be >= 0 (0 = off)")
        _require(s.lr > 0 and math.isfinite(s.lr), name("lr"), s.lr, "must be a finite number > 0")
        _require(0 < s.min_lr <= s.lr, name("min_lr"), s.min_lr, "must be in (0, lr]")
        _require(0 < s.plateau_factor < 1, name("plateau_factor"), s.plateau_factor, "must be in (0, 1)")
        _require(isinstance(s.get("xp_excess", False), bool), name("xp_excess"), s.get("xp_excess", False),
                 "must be True or False")
        # per loss, as config_indices and the run's directory name read it
        draw_seed = s.get("draw_seed", None)
        _require(draw_seed is None or (isinstance(draw_seed, int) and not isinstance(draw_seed, bool) and draw_seed >= 0),
                 name("draw_seed"), draw_seed, "must be None (the experiment seed) or an integer >= 0")
        _require(draw_seed is None or s.draw_configs == "random", name("draw_seed"), draw_seed,
                 "only the 'random' draw has a seed: set train.draw_configs='random' or leave draw_seed None")
    _require(t.draw_configs in ("first", "random"), "train.draw_configs", t.draw_configs, "must be 'first' or 'random'")
    _require(0.0 <= config.eval.relative_floor < 1.0, "eval.relative_floor", config.eval.relative_floor, "must be in [0, 1)")
    _require(config.eval.substeps >= 1, "eval.substeps", config.eval.substeps, "must be an integer >= 1")
    g = config.get("diagnostics", None)
    if g is not None:
        _require(int(g.holdout) >= 1, "diagnostics.holdout", g.holdout, "must be an integer >= 1")
        _require(int(g.cond_configs) >= 0, "diagnostics.cond_configs", g.cond_configs, "must be >= 0 (0 = all)")
        _require(len(g.lambda_values) >= 1 and len(set(g.lambda_values)) == len(g.lambda_values)
                 and all(math.isfinite(float(v)) and float(v) >= 0 for v in g.lambda_values),
                 "diagnostics.lambda_values", g.lambda_values, "must be distinct finite numbers >= 0")
    for b in config.sweep.budgets:
        _require(b >= 1, "sweep.budgets", config.sweep.budgets, "must hold positive budgets")
    for loss, sizes in dict(config.sweep.n_configs).items():
        _require(loss in LOSSES, "sweep.n_configs", dict(config.sweep.n_configs), f"keys must be in {list(LOSSES)}")
        _require(len(sizes) >= 1 and all(int(n) >= 1 for n in sizes), f"sweep.n_configs.{loss}", sizes,
                 "must be a non-empty tuple of positive configuration counts")
