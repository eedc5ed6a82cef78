"""MB-MPO's torch meta-policy: its initialisation and numpy round trip, its density and KL against
torch.distributions, and the second-order inner step (the outer gradient through ``adapt``) against finite
differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from metarl_robot.models.meta_policy import (
    GaussianMLPPolicy,
    adapt,
    functional_log_prob,
    functional_mean,
    kl_divergence,
)
from metarl_robot.runtime.policy_gradient import policy_mean

torch.set_num_threads(1)
F, A = 5, 2


def _batch(n: int = 32, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, F, generator=g, dtype=dtype), torch.randn(n, A, generator=g, dtype=dtype),
            torch.randn(n, generator=g, dtype=dtype))


def test_init_layout_zero_biases_and_initial_std():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(F, A, hidden=(32, 16), init_std=0.5)
    shapes = [tuple(p.shape) for p in policy.param_list()]
    assert shapes == [(F, 32), (32,), (32, 16), (16,), (16, A), (A,), (A,)]
    for w in policy.param_list()[:-1:2]:
        bound = math.sqrt(6.0 / sum(w.shape))  # Xavier-uniform
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    for b in policy.param_list()[1:-1:2]:
        assert torch.count_nonzero(b) == 0
    torch.testing.assert_close(policy.param_list()[-1], torch.full((A,), math.log(0.5)))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.param_list())
    assert len(list(policy.parameters())) == 7  # registered, so an optimiser sees every one


def test_numpy_round_trip_and_parity_with_the_robots_mean():
    torch.manual_seed(1)
    source, target = GaussianMLPPolicy(F, A, hidden=(8,)), GaussianMLPPolicy(F, A, hidden=(8,))
    params = source.numpy_params()
    assert all(p.dtype == np.float64 for p in params)
    params[1] += 0.25  # non-zero biases travel too
    target.load_numpy_params(params)
    back = target.numpy_params()
    for p, q in zip(params, back, strict=True):
        np.testing.assert_allclose(q, p, rtol=1e-7)  # the module is float32
    back[0][0, 0] = 123.0  # copies: editing them leaves the module alone
    assert target.param_list()[0][0, 0].item() != 123.0
    feats, _, _ = _batch()
    with torch.no_grad():
        np.testing.assert_allclose(target(feats.float()).double().numpy(), policy_mean(params, feats.numpy()),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        target.load_numpy_params([p.T for p in params])
    with pytest.raises(ValueError, match="arrays"):
        target.load_numpy_params(params[:-1])


def test_functional_log_prob_is_normal_log_prob():
    torch.manual_seed(2)
    params = [p.detach().double() for p in GaussianMLPPolicy(F, A, hidden=(16, 16), init_std=0.3).param_list()]
    feats, actions, _ = _batch()
    want = Normal(functional_mean(params, feats), params[-1].exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(functional_log_prob(params, feats, actions), want, rtol=1e-12, atol=1e-12)


def test_kl_divergence_is_torchs_and_zero_between_equal_gaussians():
    g = torch.Generator().manual_seed(3)
    m0, m1 = torch.randn(10, A, generator=g, dtype=torch.float64), torch.randn(10, A, generator=g, dtype=torch.float64)
    s0, s1 = torch.randn(A, generator=g, dtype=torch.float64), torch.randn(10, A, generator=g, dtype=torch.float64)
    want = torch_kl(Normal(m0, s0.exp()), Normal(m1, s1.exp())).sum(-1)
    got = kl_divergence(m0, s0, m1, s1)
    assert got.shape == (10,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_divergence(m0, s0, m0, s0), torch.zeros(10, dtype=torch.float64))


def _outer(params: list[torch.Tensor], create_graph: bool = True) -> torch.Tensor:
    """A MAML-style outer loss: the adapted policy's weighted log-likelihood on a second batch."""
    feats, actions, adv = _batch(seed=4)
    new = adapt(params, feats, actions, adv, 0.3, create_graph=create_graph)
    feats2, actions2, adv2 = _batch(seed=5)
    return (adv2 * functional_log_prob(new, feats2, actions2)).mean()


def test_the_outer_gradient_through_adapt_is_second_order():
    torch.manual_seed(6)
    params = [p.detach().double().requires_grad_() for p in GaussianMLPPolicy(F, A, hidden=(8,)).param_list()]
    with torch.no_grad():
        params[1].normal_(0.0, 0.3)
    grads = torch.autograd.grad(_outer(params), params)
    eps = 1e-6
    rng = np.random.default_rng(0)
    for k, p in enumerate(params):
        for flat in rng.choice(p.numel(), size=min(3, p.numel()), replace=False):
            idx = np.unravel_index(flat, tuple(p.shape))
            values = []
            for sign in (1.0, -1.0):
                moved = [q.detach().clone().requires_grad_() for q in params]
                with torch.no_grad():
                    moved[k][idx] += sign * eps
                values.append(_outer(moved).item())
            numeric = (values[0] - values[1]) / (2 * eps)
            assert grads[k][idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), (k, idx)
    # Without create_graph the step's own dependence on the parameters is dropped (first-order MAML): different.
    first_order = torch.autograd.grad(_outer(params, create_graph=False), params)
    assert max((a - b).abs().max().item() for a, b in zip(grads, first_order, strict=True)) > 1e-4


def test_adapt_keeps_float32():
    torch.manual_seed(7)
    policy = GaussianMLPPolicy(F, A)
    feats, actions, adv = _batch(dtype=torch.float32)
    new = adapt(policy.param_list(), feats, actions, adv, 0.1)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in new)
    assert all(n.shape == p.shape for n, p in zip(new, policy.param_list(), strict=True))
