"""Models: the observable-plus-closure autoencoder and latent vector fields."""

from macro_jax.models.autoencoder import Autoencoder
from macro_jax.models.latent import (
    GFINN,
    LATENT_MODELS,
    LatentMLP,
    NormalisedField,
    OnsagerNet,
    count_params,
    make_latent_model,
)

__all__ = [
    "Autoencoder",
    "GFINN",
    "LATENT_MODELS",
    "LatentMLP",
    "NormalisedField",
    "OnsagerNet",
    "count_params",
    "make_latent_model",
]
