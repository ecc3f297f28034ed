"""Dense layers with the reference code's initialisers, and a plain MLP."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

DTYPE = jnp.float32

ACTIVATIONS: dict[str, Callable] = {
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    # OnsagerNet's smoothed ReLU^2: x^2 on [0, 1/2], x - 1/4 beyond, 0 below 0.
    "relu2_smooth": lambda x: jax.nn.relu(x) ** 2 - jax.nn.relu(x - 0.5) ** 2,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _weight(key, n_in, n_out, kind, gain):
    if kind == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (n_in + n_out))
        return jr.uniform(key, (n_out, n_in), DTYPE, -bound, bound)
    if kind == "orthogonal":
        return jax.nn.initializers.orthogonal(scale=gain)(key, (n_out, n_in), DTYPE)
    raise ValueError(f"weight init {kind!r} is not one of ['orthogonal', 'xavier_uniform']")


def dense(
    key,
    n_in: int,
    n_out: int,
    *,
    weight: str = "xavier_uniform",
    gain: float = 1.0,
    bias: str | tuple[float, float] | jnp.ndarray | None = "torch",
) -> eqx.nn.Linear:
    """A float32 ``eqx.nn.Linear`` with a chosen initialiser.

    ``bias``: "torch" (PyTorch's default U(+-1/sqrt(n_in))), "zeros", a
    ``(low, high)`` uniform range, an explicit array, or None for no bias.
    """
    w_key, b_key, l_key = jr.split(key, 3)
    layer = eqx.nn.Linear(n_in, n_out, use_bias=bias is not None, key=l_key, dtype=DTYPE)
    layer = eqx.tree_at(lambda l: l.weight, layer, _weight(w_key, n_in, n_out, weight, gain))
    if bias is None:
        return layer
    if isinstance(bias, str) and bias == "torch":
        bound = 1.0 / math.sqrt(n_in)
        b = jr.uniform(b_key, (n_out,), DTYPE, -bound, bound)
    elif isinstance(bias, str) and bias == "zeros":
        b = jnp.zeros((n_out,), DTYPE)
    elif isinstance(bias, tuple):
        b = jr.uniform(b_key, (n_out,), DTYPE, bias[0], bias[1])
    else:
        b = jnp.asarray(bias, DTYPE).reshape(n_out)
    return eqx.tree_at(lambda l: l.bias, layer, b)


class MLP(eqx.Module):
    """Linear layers with an activation between them (none after the last)."""

    layers: list[eqx.nn.Linear]
    act: Callable = eqx.field(static=True)

    def __init__(self, widths: Sequence[int], act: str, *, key, **dense_kwargs):
        keys = jr.split(key, len(widths) - 1)
        self.layers = [dense(k, a, b, **dense_kwargs) for k, a, b in zip(keys, widths[:-1], widths[1:])]
        self.act = activation(act)

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def tail(self, h1):
        """The network after its first linear layer: maps ``W1 x + b1`` to the output."""
        x = h1
        for layer in self.layers[1:]:
            x = layer(self.act(x))
        return x
