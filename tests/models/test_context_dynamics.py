"""Properties the design relies on: angle features, permutation invariance, masking, ensemble math."""

from __future__ import annotations

import numpy as np
import torch

from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig
from metarl_robot.models.layers import EnsembleLinear, angle_features

PERIODIC = np.array([False, True, False, False])


def _model(seed=0):
    torch.manual_seed(seed)
    m = ContextDynamics(4, 1, PERIODIC, ContextDynamicsConfig(ensemble_size=3, hidden=16, layers=2, context_window=6))
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(200, 4))
    m.fit_normalizers(obs, rng.normal(size=(200, 1)), obs + 0.1 * rng.normal(size=(200, 4)))
    return m.eval()


def test_angle_features_do_not_see_whole_turns():
    obs = torch.tensor([[0.3, 1.0, -0.2, 2.0]])
    turned = obs.clone()
    turned[0, 1] += 4 * np.pi
    keep, angles = torch.tensor([0, 2, 3]), torch.tensor([1])
    a, b = angle_features(obs, keep, angles), angle_features(turned, keep, angles)
    assert a.shape == (1, 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_encoder_is_permutation_invariant_and_ignores_masked_slots():
    m = _model()
    g = torch.Generator().manual_seed(1)
    obs, nxt = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    act = torch.randn(2, 6, 1, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    z = m.encode(obs, act, nxt, mask)
    perm = torch.tensor([5, 2, 4, 3, 0, 1])
    z_perm = m.encode(obs[:, perm], act[:, perm], nxt[:, perm], mask[:, perm])
    torch.testing.assert_close(z, z_perm, atol=1e-6, rtol=0)
    garbage = obs.clone()
    garbage[0, :2] = 1e3  # masked-out slots hold anything
    torch.testing.assert_close(m.encode(garbage, act, nxt, mask)[0], z[0], atol=1e-6, rtol=0)


def test_ensemble_linear_is_one_linear_layer_per_member():
    layer = EnsembleLinear(3, 5, 2)
    x = torch.randn(3, 7, 5)
    out = layer(x)
    for e in range(3):
        torch.testing.assert_close(out[e], x[e] @ layer.weight[e] + layer.bias[e], atol=1e-6, rtol=0)


def test_forward_is_in_raw_units_and_log_variance_is_bounded():
    m = _model()
    obs, act, z = torch.randn(3, 10, 4), torch.randn(3, 10, 1), torch.zeros(3, 10, 8)
    mean, logvar = m(obs, act, z)
    norm_mean, norm_logvar = m.predict_normalized(obs, act, z)
    # Raw units: next_obs = obs + the de-standardised delta; the variance rescales by std^2.
    torch.testing.assert_close(mean, obs + norm_mean * m.delta_norm.std + m.delta_norm.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(logvar, norm_logvar + 2 * torch.log(m.delta_norm.std), atol=1e-5, rtol=0)
    assert bool((norm_logvar <= m.max_logvar + 1e-6).all() and (norm_logvar >= m.min_logvar - 1e-6).all())
