"""The robot's online last layer (numpy, one rank-one update per transition) against the trainer's closed-form
posterior (torch, Woodbury), and its refusals: a diverging update never replaces the last good posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.models.online_dynamics import OnlineContextDynamics, OnlineHeadConfig
from metarl_robot.runtime.last_layer import LastLayerConfig, LastLayerPosterior

OBS, ACT = 4, 1
CFG = ContextDynamicsConfig(ensemble_size=3, hidden=16, layers=2, context_dim=2, context_window=6)


@pytest.fixture(scope="module")
def model() -> OnlineContextDynamics:
    torch.manual_seed(0)
    return OnlineContextDynamics(OBS, ACT, np.array([False, True, False, False]), CFG,
                                 OnlineHeadConfig(prior_precision=0.7)).double()


def context(model: OnlineContextDynamics, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(E, 1, n, F)`` of ``n`` random transitions and their normalised deltas ``(E, 1, n, o)``."""
    g = torch.Generator().manual_seed(seed)
    e = CFG.ensemble_size
    obs = torch.randn(n, OBS, generator=g, dtype=torch.float64)
    act = torch.rand(n, ACT, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(n, CFG.context_dim, generator=g, dtype=torch.float64)
    tile = lambda x: x.unsqueeze(0).expand(e, *x.shape)  # noqa: E731
    with torch.no_grad():
        phi = model.head_features(tile(obs), tile(act), tile(z))
    target = torch.randn(n, OBS, generator=g, dtype=torch.float64)
    return phi.unsqueeze(1), tile(target).unsqueeze(1)


def rls(model: OnlineContextDynamics, phi: torch.Tensor, target: torch.Tensor) -> LastLayerPosterior:
    posterior = LastLayerPosterior(model.prior_head().detach().numpy(), LastLayerConfig(model.prior_precision()))
    for i in range(phi.shape[2]):
        assert posterior.update(phi[:, :, i].numpy().transpose(1, 0, 2), target[0, :, i].numpy()).all()
    return posterior


def test_rank_one_updates_reach_the_closed_form_posterior(model):
    phi, target = context(model, 6)
    with torch.no_grad():
        closed = model.posterior_head(phi, target, torch.ones(phi.shape[:3], dtype=torch.float64))
    posterior = rls(model, phi, target)
    np.testing.assert_allclose(posterior.weights[0], closed[:, 0].numpy(), rtol=1e-9, atol=1e-10)
    assert posterior.updates[0] == 6
    # P is the inverse of alpha I + sum phi phi^T
    gram = np.einsum("eki,ekj->eij", phi[:, 0].numpy(), phi[:, 0].numpy()) + model.prior_precision() * np.eye(17)
    np.testing.assert_allclose(posterior.covariance[0] @ gram, np.broadcast_to(np.eye(17), gram.shape), atol=1e-8)


def test_masked_context_rows_drop_out_of_the_closed_form(model):
    phi, target = context(model, 6)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64).expand(CFG.ensemble_size, 1, 6)
    with torch.no_grad():
        masked = model.posterior_head(phi, target, mask)
        kept = [0, 2, 3, 5]
        subset = model.posterior_head(phi[:, :, kept], target[:, :, kept], mask[:, :, kept])
        empty = model.posterior_head(phi, target, torch.zeros_like(mask))
    np.testing.assert_allclose(masked.numpy(), subset.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(empty[:, 0].numpy(), model.prior_head().detach().numpy(), atol=1e-12)


def test_the_posterior_learns_a_last_layer_outside_the_prior(model):
    """Targets from another last layer: the posterior's prediction error on held-out transitions falls as
    transitions accumulate, far below the prior's (the features are correlated, so the weights themselves are not
    all identified; the predictions are)."""
    rng = np.random.default_rng(3)
    prior = model.prior_head().detach().numpy()
    true = prior + rng.normal(0, 0.5, prior.shape)
    held_out = context(model, 50, seed=99)[0][:, 0].numpy()  # (E, 50, F)

    def error(weights: np.ndarray) -> float:
        return float(np.sqrt(np.mean((np.einsum("ekf,efo->eko", held_out, weights - true)) ** 2)))

    posterior = LastLayerPosterior(prior, LastLayerConfig(model.prior_precision()))
    errors = []
    for n in range(1, 201):
        phi = context(model, 1, seed=100 + n)[0][:, 0, 0].numpy()
        target = np.einsum("ef,efo->eo", phi, true) + rng.normal(0, 0.01, (CFG.ensemble_size, OBS))
        assert posterior.update(phi[None], target[None])[0]
        if n in (1, 10, 200):
            errors.append(error(posterior.weights[0]))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1 * error(prior), (errors, error(prior))


def test_a_diverging_update_is_refused_and_the_last_good_posterior_kept(model):
    phi, target = context(model, 3)
    posterior = rls(model, phi, target)
    good_w, good_p = posterior.weights.copy(), posterior.covariance.copy()
    x, y = phi[:, :, 0].numpy().transpose(1, 0, 2), target[0, :, 0].numpy()
    assert not posterior.update(x, np.full_like(y, np.nan))[0]
    assert "non-finite" in posterior.last_failure[0]
    assert not posterior.update(x, y * 1e9)[0]
    assert "from the prior" in posterior.last_failure[0] and "diverging" in posterior.last_failure[0]
    np.testing.assert_array_equal(posterior.weights, good_w)
    np.testing.assert_array_equal(posterior.covariance, good_p)
    assert posterior.rejected[0] == 2 and posterior.updates[0] == 3
    assert posterior.update(x, y)[0] and posterior.last_failure[0] is None  # a sane transition is taken again


def test_envs_update_and_reset_independently(model):
    prior = model.prior_head().detach().numpy()
    posterior = LastLayerPosterior(prior, LastLayerConfig(1.0), batch=2)
    phi, target = context(model, 1)
    x = np.repeat(phi[:, :, 0].numpy().transpose(1, 0, 2), 2, axis=0)
    y = np.repeat(target[0, :, 0].numpy(), 2, axis=0)
    assert posterior.update(x, y, which=np.array([False, True])).tolist() == [False, True]
    np.testing.assert_array_equal(posterior.weights[0], prior)
    assert not np.array_equal(posterior.weights[1], prior)
    posterior.reset(np.array([False, True]))
    np.testing.assert_array_equal(posterior.weights[1], prior)
    assert posterior.updates.tolist() == [0, 0]


@pytest.mark.parametrize(("kwargs", "match"), [({"prior_precision": 0.0}, "prior_precision: must be a finite"),
                                               ({"prior_precision": float("nan")}, "prior_precision"),
                                               ({"prior_precision": 1.0, "max_deviation": -1.0}, "max_deviation")])
def test_bad_settings_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LastLayerPosterior(np.zeros((2, 3, 4)), LastLayerConfig(**kwargs))
    with pytest.raises(ValueError, match="prior_weights"):
        LastLayerPosterior(np.zeros((3, 4)), LastLayerConfig(1.0))
