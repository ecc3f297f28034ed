"""Autoencoder whose latent is the fixed observables followed by a learned closure.

``encode(x) = (phi*(x), phi_hat(x))`` in R^d with ``phi*`` the system's
observables (no parameters) and ``phi_hat`` an MLP whose first layer is
linear, which the Jacobian fast path exploits (``macro_jax.jacobian``).

``input_shift = (c, m)`` moves the origin of the encoder's input: the MLP
reads ``x`` less ``c`` on its first ``m`` coordinates and the decoder's output
gets ``c`` back, so reconstruction is scored in the shifted frame (the
reference's, for particles: ``MicroSystem.centre_shift``). The Jacobian is
unchanged by the shift; what changes is the unnormalised input the network
is trained on. ``(0.0, 0)`` is no shift.
"""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from macro_jax.models.layers import MLP


class Autoencoder(eqx.Module):
    encoder: MLP
    decoder: MLP
    observable_fn: Callable = eqx.field(static=True)
    n_observables: int = eqx.field(static=True)
    decoder_uses_observables: bool = eqx.field(static=True)
    input_shift: tuple[float, int] = eqx.field(static=True)

    def __init__(
        self,
        n_dof: int,
        n_observables: int,
        closure_dim: int,
        hidden: Sequence[int],
        act: str,
        observable_fn: Callable,
        *,
        decoder_uses_observables: bool,
        bias_init: str,
        key,
        input_shift: tuple[float, int] = (0.0, 0),
    ):
        enc_key, dec_key = jr.split(key)
        dec_in = closure_dim + (n_observables if decoder_uses_observables else 0)
        self.encoder = MLP([n_dof, *hidden, closure_dim], act, key=enc_key, bias=bias_init)
        self.decoder = MLP([dec_in, *reversed(hidden), n_dof], act, key=dec_key, bias=bias_init)
        self.observable_fn = observable_fn
        self.n_observables = n_observables
        self.decoder_uses_observables = decoder_uses_observables
        c, m = input_shift
        if not 0 <= int(m) <= n_dof:
            raise ValueError(f"input_shift=({c}, {m}): the shifted coordinates must number 0..n_dof={n_dof}")
        self.input_shift = (float(c), int(m))

    @property
    def latent_dim(self) -> int:
        return self.n_observables + self.encoder.layers[-1].out_features

    def _shifted(self, x, sign: float):
        c, m = self.input_shift
        return x if m == 0 or c == 0.0 else x.at[:m].add(sign * c)

    def encoder_input(self, x: Float[Array, " N"]) -> Float[Array, " N"]:
        """What the closure MLP reads: ``x`` in the ``input_shift`` frame."""
        return self._shifted(x, -1.0)

    def encode(self, x: Float[Array, " N"]) -> Float[Array, " d"]:
        obs = self.observable_fn(x).astype(jnp.float32)
        return jnp.concatenate([obs, self.encoder(self.encoder_input(x))])

    def decode(self, z: Float[Array, " d"]) -> Float[Array, " N"]:
        dec_in = z if self.decoder_uses_observables else z[self.n_observables :]
        return self._shifted(self.decoder(dec_in), 1.0)

    def __call__(self, x):
        return self.decode(self.encode(x))
