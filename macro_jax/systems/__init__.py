"""Microscopic systems: one protocol (``MicroSystem``), one factory per system."""

from macro_jax.systems.allen_cahn import make_allen_cahn
from macro_jax.systems.base import MicroSystem, Trajectories, sample_sites, sample_sites_weighted
from macro_jax.systems.predator_prey import make_predator_prey


def _particles(**params) -> MicroSystem:
    # jax-md costs seconds to import; only particle systems pay for it.
    from macro_jax.systems.particles import make_particle_system

    return make_particle_system(**params)


_FACTORIES = {"predator_prey": make_predator_prey, "allen_cahn": make_allen_cahn, "particles": _particles}


def make_system(system_config) -> MicroSystem:
    """Builds the system named by ``system_config.name`` from its ``params``."""
    name = system_config.name
    if name not in _FACTORIES:
        raise ValueError(f"system.name={name!r} is not one of {sorted(_FACTORIES)}")
    return _FACTORIES[name](**dict(system_config.params))


__all__ = ["MicroSystem", "Trajectories", "make_system", "sample_sites", "sample_sites_weighted", "make_predator_prey", "make_allen_cahn"]
