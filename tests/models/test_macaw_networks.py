"""MACAW's torch networks: the losses against values computed by hand on tiny inputs, the inner step lowering the inner
losses, the second-order meta-gradient through it against finite differences, the weight-transform layers, and the
adapted policy in the robot's numpy layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarl_robot.models.macaw import (
    AdvantageWeighting,
    Batch,
    MACAWNetConfig,
    MACAWNetworks,
    MLPLayout,
    awr_loss,
    awr_weights,
    inverse_softplus,
)
from metarl_robot.runtime.policy_gradient import policy_mean

torch.set_num_threads(1)
F, A = 3, 2
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _nets(hidden=(8,), advantage_weight: float = 0.5, transform: int = 0, seed: int = 0, lr: float = 0.05
          ) -> MACAWNetworks:
    torch.manual_seed(seed)
    cfg = MACAWNetConfig(hidden=list(hidden), advantage_head_hidden=4, action_std=0.5, weight_transform_dim=transform)
    return MACAWNetworks(F, A, cfg, inner_value_lr=lr, inner_policy_lr=lr, advantage_weight=advantage_weight).double()


def _batch(n: int = 24, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return Batch(feats=r(n, F), actions=torch.tanh(r(n, A)), returns=r(n), tail_discount=torch.rand(n, generator=g,
                 dtype=torch.float64), tail_feats=r(n, F))


# ---- the losses by hand ------------------------------------------------------------------------------------------
def test_awr_weights_by_hand():
    adv = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    raw = AdvantageWeighting(temperature=1.0, clip=20.0, normalize=False)
    torch.testing.assert_close(awr_weights(adv, raw), torch.tensor([1.0, math.e, math.e**2], dtype=torch.float64))
    clipped = AdvantageWeighting(temperature=0.5, clip=20.0, normalize=False)  # exp(0, 2, 4): the last clipped at 20
    torch.testing.assert_close(awr_weights(adv, clipped), torch.tensor([1.0, math.e**2, 20.0], dtype=torch.float64))
    normed = AdvantageWeighting(temperature=2.0, clip=20.0, normalize=True)  # (A - 1) / sqrt(2/3), then / 2
    z = 1.0 / math.sqrt(2.0 / 3.0) / 2.0
    torch.testing.assert_close(awr_weights(adv, normed), torch.tensor([math.exp(-z), 1.0, math.exp(z)],
                                                                        dtype=torch.float64), rtol=1e-6, atol=1e-8)
    assert awr_weights(torch.tensor([5.0]), normed).item() == pytest.approx(1.0)  # one row: weight 1, not NaN
    huge = awr_weights(torch.tensor([0.0, 1e4]), raw)  # exp(1e4) would overflow: the weight stops at the clip
    assert torch.isfinite(huge).all() and huge[1].item() == pytest.approx(20.0)
    assert awr_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 3.0])).item() == pytest.approx(3.5)


def test_inverse_softplus_gives_the_initial_rates():
    for y in (1e-4, 0.01, 1.0, 5.0):
        assert torch.nn.functional.softplus(torch.tensor(inverse_softplus(y), dtype=torch.float64)).item() \
            == pytest.approx(y, rel=1e-9)
    nets = _nets(lr=0.02, advantage_weight=0.3)
    torch.testing.assert_close(nets.inner_value_lr(), torch.full((4,), 0.02, dtype=torch.float64))
    torch.testing.assert_close(nets.inner_policy_lr(), torch.full((8,), 0.02, dtype=torch.float64))  # policy + head
    assert nets.advantage_weight().item() == pytest.approx(0.3)


def _set_scalar_nets(nets: MACAWNetworks, value: tuple[float, ...], policy: tuple[float, ...]) -> None:
    """hidden=(1,), F = A = 1: V(s) = v1 tanh(w0 s + b0) + b1, mean(s) = p1 tanh(q0 s + c0) + c1."""
    with torch.no_grad():
        for p, x in zip(nets.value, value, strict=True):
            p.fill_(x)
        for p, x in zip(nets.policy, policy, strict=True):
            p.fill_(x)


def test_value_loss_targets_and_policy_loss_by_hand():
    torch.manual_seed(0)
    cfg = MACAWNetConfig(hidden=[1], advantage_head_hidden=2, action_std=0.5)
    nets = MACAWNetworks(1, 1, cfg, 0.1, 0.1, advantage_weight=0.25).double()
    w0, b0, v1, b1 = 0.7, -0.2, 1.5, 0.3
    q0, c0, p1, c1 = -0.4, 0.1, 0.8, -0.05
    _set_scalar_nets(nets, (w0, b0, v1, b1), (q0, c0, p1, c1))
    s, a, ret, disc, tail = [0.5, -1.0], [0.2, -0.6], [1.0, 2.0], [0.9, 0.0], [0.3, 0.3]
    t64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    batch = Batch(feats=t64(s)[:, None], actions=t64(a)[:, None], returns=t64(ret), tail_discount=t64(disc),
                  tail_feats=t64(tail)[:, None])
    value = lambda x: v1 * math.tanh(w0 * x + b0) + b1  # noqa: E731
    targets = [r + d * value(x) for r, d, x in zip(ret, disc, tail, strict=True)]
    torch.testing.assert_close(nets.targets(list(nets.value), batch, bootstrap=True), t64(targets))
    torch.testing.assert_close(nets.targets(list(nets.value), batch, bootstrap=False), t64(ret))
    mse = np.mean([(value(x) - y) ** 2 for x, y in zip(s, targets, strict=True)])
    assert nets.value_loss(list(nets.value), batch, True).item() == pytest.approx(mse, rel=1e-12)
    adv = [y - value(x) for x, y in zip(s, targets, strict=True)]
    torch.testing.assert_close(nets.advantages(list(nets.value), batch, True), t64(adv))

    # AWR: -mean w log N(a; mean(s), 0.5) with w = exp(A) (no normalisation, T = 1)
    weighting = AdvantageWeighting(temperature=1.0, clip=20.0, normalize=False)
    mean = [p1 * math.tanh(q0 * x + c0) + c1 for x in s]
    log_prob = [-0.5 * ((u - m) / 0.5) ** 2 - math.log(0.5) - _HALF_LOG_2PI for u, m in zip(a, mean, strict=True)]
    awr = -np.mean([math.exp(x) * lp for x, lp in zip(adv, log_prob, strict=True)])
    loss, parts = nets.policy_loss(list(nets.policy), None, batch, t64(adv), weighting)
    assert loss.item() == pytest.approx(awr, rel=1e-12) and parts["awr"] == pytest.approx(awr, rel=1e-12)
    # with the head: + lambda * mean (head([tanh(q0 s + c0), a]) - A)^2, lambda = 0.25
    hidden = t64([math.tanh(q0 * x + c0) for x in s])[:, None]
    head = nets.predicted_advantage(list(nets.head), hidden, batch.actions)
    hw0, hb0, hw1, hb1 = (p.detach() for p in nets.head)
    by_hand = (torch.tanh(torch.cat([hidden, batch.actions], 1) @ hw0 + hb0) @ hw1 + hb1)[:, 0]
    torch.testing.assert_close(head, by_hand)
    with_head, parts = nets.policy_loss(list(nets.policy), list(nets.head), batch, t64(adv), weighting)
    head_mse = float(((by_hand - t64(adv)) ** 2).mean())
    assert with_head.item() == pytest.approx(awr + 0.25 * head_mse, rel=1e-9)
    assert parts["advantage_head"] == pytest.approx(head_mse, rel=1e-12)


# ---- the inner step ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform", [0, 6])
def test_the_inner_step_lowers_the_inner_losses(transform):
    nets, batch = _nets(transform=transform, lr=0.01 if transform else 0.05), _batch()
    weighting = AdvantageWeighting()
    meta = nets.meta_params()
    adapted, info = nets.adapt(meta, batch, weighting, bootstrap=True)
    assert info["value"] == pytest.approx(nets.value_loss(meta.value, batch, True).item())
    # the value step on its own loss (targets bootstrapped with the pre-step values: the loss the step descended)
    before = nets.value_loss(meta.value, batch, False).item()
    after_value = nets.adapt(meta, batch, weighting, bootstrap=False)[0].value
    assert nets.value_loss(after_value, batch, False).item() < before
    # the policy step on its own loss (AWR + lambda * head), with the adapted value function's advantages
    adv = nets.advantages(adapted.value, batch, True)
    loss_before = nets.policy_loss(meta.policy, meta.head, batch, adv, weighting)[0].item()
    loss_after = nets.policy_loss(adapted.policy, adapted.head, batch, adv, weighting)[0].item()
    assert loss_after < loss_before
    assert info["awr"] + nets.advantage_weight().item() * info["advantage_head"] == pytest.approx(loss_before)
    # more steps, further down; the meta-parameters are untouched
    more, _ = nets.adapt(meta, batch, weighting, bootstrap=True, steps=3)
    assert nets.policy_loss(more.policy, more.head, batch, nets.advantages(more.value, batch, True),
                            weighting)[0].item() < loss_before
    assert all(p is q for p, q in zip(meta.policy, nets.policy, strict=True))


def test_second_order_meta_gradient_matches_finite_differences():
    nets, batch, query = _nets(), _batch(seed=1), _batch(seed=2)
    weighting = AdvantageWeighting(normalize=False)

    def meta_losses() -> tuple[torch.Tensor, torch.Tensor]:
        adapted, _ = nets.adapt(nets.meta_params(), batch, weighting, bootstrap=False, create_graph=True)
        return nets.query_losses(adapted, query, weighting, bootstrap=False)[:2]

    # Advantages are detached by design (they weigh the policy's losses, they do not train the value function), so
    # the value parameters are checked on the value meta-loss, the policy's and the head's on the policy meta-loss.
    eps = 1e-6
    for group, index, which in ((nets.value, 0, 0), (nets.value, 3, 0), (nets.policy, 0, 1), (nets.policy, 2, 1),
                                (nets.head, 0, 1), (nets.head, 2, 1)):
        p = group[index]
        p.grad = None
        meta_losses()[which].backward()
        k = p.numel() - 1
        grad = p.grad.view(-1)[k].item()
        losses = []
        for shift in (eps, -2 * eps, eps):  # up, down, back
            with torch.no_grad():
                p.view(-1)[k] += shift
            losses.append(meta_losses()[which].item())
        assert grad == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-5, abs=1e-9)
    nets.zero_grad()
    sum(meta_losses()).backward()
    # the learned rates get their meta-gradient too; lambda only through the head's effect on the policy step
    for raw in nets.rate_params():
        assert raw.grad is not None and torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    # first order: the head (used in the inner loop only) gets no meta-gradient at all
    nets.zero_grad()
    adapted, _ = nets.adapt(nets.meta_params(), batch, weighting, bootstrap=False, create_graph=False)
    sum(nets.query_losses(adapted, query, weighting, bootstrap=False)[:2]).backward()
    assert all(p.grad is None for p in nets.head) and nets.policy[0].grad is not None


# ---- layouts --------------------------------------------------------------------------------------------------------
def test_weight_transform_layers_make_plain_layers():
    torch.manual_seed(0)
    layout = MLPLayout((3, 4, 2), transform_dim=5)
    params = layout.init()
    assert [tuple(p.shape) for p in params] == [(5,), (5, 16), (16,), (5,), (5, 10), (10,)]
    z, m, c = params[:3]
    w, b = layout.layers(params)[:2]
    torch.testing.assert_close(w, (c + z @ m)[:12].reshape(3, 4))
    torch.testing.assert_close(b, (c + z @ m)[12:])
    plain = MLPLayout((3, 4, 2))
    assert [tuple(p.shape) for p in plain.layers(plain.init())] == [tuple(x.shape) for x in layout.layers(params)]


@pytest.mark.parametrize("transform", [0, 4])
def test_the_adapted_policy_in_the_robots_layout_acts_as_torch(transform):
    nets, batch = _nets(transform=transform), _batch()
    adapted, _ = nets.adapt(nets.meta_params(), batch, AdvantageWeighting(), bootstrap=True, create_graph=False)
    params = nets.numpy_policy(adapted.policy)
    assert [p.shape for p in params] == [(F, 8), (8,), (8, A), (A,), (A,)]
    np.testing.assert_allclose(params[-1], np.log(0.5))
    feats = batch.feats.numpy()
    np.testing.assert_allclose(policy_mean(params, feats), nets.policy_forward(adapted.policy, batch.feats)[1]
                               .detach().numpy(), rtol=1e-10, atol=1e-12)


def test_without_an_advantage_head():
    nets = _nets(advantage_weight=0.0)
    assert nets.head_layout is None and len(nets.head) == 0 and len(nets.rate_params()) == 2
    adapted, info = nets.adapt(nets.meta_params(), _batch(), AdvantageWeighting(), bootstrap=True)
    assert adapted.head == [] and "advantage_head" not in info
