"""Latent models: OnsagerNet's structure by construction; the autoencoder's latent layout."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from macro_jax.models import Autoencoder, LatentMLP, NormalisedField, OnsagerNet, count_params
from macro_jax.systems import make_predator_prey


def _nets():
    return [
        OnsagerNet(4, variant="separate", key=jr.PRNGKey(0)),
        OnsagerNet(6, variant="shared", trunk_widths=(16, 16), key=jr.PRNGKey(1)),
    ]


@pytest.mark.parametrize("net", _nets(), ids=["separate", "shared"])
def test_onsagernet_matrices_are_psd_and_skew(net):
    for z in jr.normal(jr.PRNGKey(2), (8, net.dim)):
        m, w = net.matrices(net.features(z))
        np.testing.assert_allclose(np.asarray(m), np.asarray(m.T), atol=1e-6)
        assert np.linalg.eigvalsh(np.asarray(m, np.float64)).min() > -1e-6
        np.testing.assert_allclose(np.asarray(w), -np.asarray(w.T), atol=0)


@pytest.mark.parametrize("net", _nets(), ids=["separate", "shared"])
def test_onsagernet_gradient_and_coercive_potential(net):
    z = jr.normal(jr.PRNGKey(3), (net.dim,))
    v, grad_v, _ = net.potential_and_grad(z)
    expected = jax.grad(lambda y: net.potential(y, net.features(y)))(z)
    np.testing.assert_allclose(np.asarray(grad_v), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert float(v) >= net.beta * float(jnp.sum(z**2)) - 1e-6


def test_onsagernet_dissipates_without_forcing():
    """dV/dt = grad V . g <= -alpha |grad V|^2 < 0 for the unforced (separate) variant."""
    net = OnsagerNet(4, variant="separate", key=jr.PRNGKey(4))
    assert net.forcing is None
    for z in jr.normal(jr.PRNGKey(5), (64, 4)) * 3.0:
        _, grad_v, _ = net.potential_and_grad(z)
        dv_dt = float(grad_v @ net(0.0, z))
        assert dv_dt <= -net.alpha * float(grad_v @ grad_v) * (1 - 1e-4) + 1e-7


def test_parameter_counts_match_reference():
    assert count_params(OnsagerNet(4, variant="separate", key=jr.PRNGKey(0))) == 7_920
    assert count_params(OnsagerNet(16, variant="shared", trunk_widths=(64, 64), key=jr.PRNGKey(0))) == 24_240
    assert count_params(OnsagerNet(32, variant="shared", trunk_widths=(256,) * 3, key=jr.PRNGKey(0))) == 420_704
    assert count_params(LatentMLP(32, (256, 256), key=jr.PRNGKey(0))) == 82_464


def test_models_are_float32():
    for net in _nets():
        leaves = [x for x in jax.tree_util.tree_leaves(net) if hasattr(x, "dtype")]
        assert all(x.dtype == jnp.float32 for x in leaves)
        assert net(0.0, jnp.ones(net.dim, jnp.float32)).dtype == jnp.float32


def test_normalised_field_rescales():
    net = LatentMLP(3, (8,), key=jr.PRNGKey(0))
    mean, std = jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([2.0, 2.0, 4.0])
    rm, rs = jnp.asarray([0.1, 0.2, 0.3]), jnp.asarray([10.0, 1.0, 0.5])
    field = NormalisedField(net, mean, std, rm, rs)
    z = jnp.asarray([0.5, -1.0, 2.0])
    np.testing.assert_allclose(np.asarray(field(0.0, z)), np.asarray(net(0.0, (z - mean) / std) * rs + rm), rtol=1e-6)


def test_autoencoder_latent_starts_with_observables():
    system = make_predator_prey()
    ae = Autoencoder(system.n_dof, 2, 3, (16,), "softplus", system.observable_fn,
                     decoder_uses_observables=False, bias_init="zeros", key=jr.PRNGKey(0))
    x = jr.uniform(jr.PRNGKey(1), (system.n_dof,))
    z = ae.encode(x)
    assert ae.latent_dim == 5 and z.shape == (5,)
    np.testing.assert_allclose(np.asarray(z[:2]), [float(x[:50].mean()), float(x[50:].mean())], rtol=1e-6)
    assert ae(x).shape == x.shape


def test_autoencoder_input_shift_moves_the_encoders_origin():
    """With input_shift = (c, m) the closure MLP reads x less c on its first m
    coordinates and the decoder gives c back; the Jacobian is the unshifted
    network's at the shifted point, and the fast Gram path agrees with jacrev."""
    from macro_jax import jacobian

    system = make_predator_prey()
    c, m = 2.5, 40
    kw = dict(decoder_uses_observables=False, bias_init="torch", key=jr.PRNGKey(0))
    plain = Autoencoder(system.n_dof, 2, 3, (16,), "softplus", system.observable_fn, **kw)
    shifted = Autoencoder(system.n_dof, 2, 3, (16,), "softplus", system.observable_fn, input_shift=(c, m), **kw)
    x = jr.uniform(jr.PRNGKey(1), (system.n_dof,)) + 1.0
    moved = x.at[:m].add(-c)
    np.testing.assert_allclose(np.asarray(shifted.encode(x)[:2]), np.asarray(plain.encode(x)[:2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(shifted.encode(x)[2:]), np.asarray(plain.encode(moved)[2:]), rtol=1e-6)
    assert not np.allclose(np.asarray(shifted.encode(x)[2:]), np.asarray(plain.encode(x)[2:]), rtol=1e-3)
    z = shifted.encode(x)
    np.testing.assert_allclose(np.asarray(shifted.decode(z)), np.asarray(plain.decode(z).at[:m].add(c)), rtol=1e-6)
    j_shifted = np.asarray(jax.jacrev(shifted.encode)(x))[2:]
    np.testing.assert_allclose(j_shifted, np.asarray(jax.jacrev(plain.encode)(moved))[2:], rtol=1e-5, atol=1e-8)
    dofs = jnp.asarray([0, 39, 40, 99], jnp.int32)
    a = jacobian.make_geometry_fn(shifted, "generic")(x, dofs)
    b = jacobian.make_geometry_fn(shifted, "linear_first_layer")(x, dofs)
    np.testing.assert_allclose(np.asarray(a.gram), np.asarray(b.gram), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(np.asarray(a.cols), np.asarray(b.cols), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="input_shift"):
        Autoencoder(system.n_dof, 2, 3, (16,), "softplus", system.observable_fn, input_shift=(c, 101), **kw)


def test_gfinn_generic_structure_holds_by_construction():
    """L skew, M symmetric PSD, L grad S = 0 and M grad E = 0 at random points, so
    along the field dE/dt = grad E . g = 0 and dS/dt = grad S . g >= 0."""
    from macro_jax.models import GFINN

    net = GFINN(6, widths=(16, 16), key=jr.PRNGKey(0))
    for z in jr.normal(jr.PRNGKey(1), (5, 6), jnp.float32):
        l_op, m_op, grad_e, grad_s = net.operators(z)
        scale = float(jnp.max(jnp.abs(l_op)) + jnp.max(jnp.abs(m_op)))
        assert scale > 1e-6  # the operators are not trivially zero
        np.testing.assert_allclose(l_op, -l_op.T, atol=1e-6 * scale)
        np.testing.assert_allclose(m_op, m_op.T, atol=1e-6 * scale)
        assert float(jnp.min(jnp.linalg.eigvalsh(m_op.astype(jnp.float64)))) > -1e-6 * scale
        np.testing.assert_allclose(l_op @ grad_s, 0.0, atol=1e-6 * scale * float(jnp.linalg.norm(grad_s)))
        np.testing.assert_allclose(m_op @ grad_e, 0.0, atol=1e-6 * scale * float(jnp.linalg.norm(grad_e)))
        g = net(0.0, z)  # matrix-vector products only: the same field as the operators
        np.testing.assert_allclose(g, l_op @ grad_e + m_op @ grad_s, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(g))))
        assert abs(float(grad_e @ g)) < 1e-5 * float(jnp.linalg.norm(grad_e) * jnp.linalg.norm(g))
        assert float(grad_s @ g) > -1e-5 * float(jnp.linalg.norm(grad_s) * jnp.linalg.norm(g))


def test_gfinn_parameter_count_matches_reference():
    from macro_jax.models import GFINN

    assert count_params(GFINN(32, widths=(256, 256), key=jr.PRNGKey(0))) == 889_346
