"""PEARL's networks: the posterior's algebra, the KL, and the action heads (checked against independent math)."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution, kl_divergence

from metarl_robot.models.pearl import PEARLAgent, PEARLNetConfig, kl_to_standard_normal, product_of_gaussians

torch.set_num_threads(1)
PERIODIC = np.array([False, True, False])
LOW, HIGH = np.array([-2.0, 0.0]), np.array([1.0, 4.0])  # asymmetric box: the affine map must be right


def _agent(seed=0):
    torch.manual_seed(seed)
    return PEARLAgent(3, 2, PERIODIC, LOW, HIGH, PEARLNetConfig(latent_dim=3, hidden=16, layers=1,
                                                                encoder_hidden=16, encoder_layers=1)).eval()


def _context(g, batch=2, k=6):
    return (torch.randn(batch, k, 3, generator=g), torch.rand(batch, k, 2, generator=g) * 3 - 2,
            torch.randn(batch, k, generator=g), torch.randn(batch, k, 3, generator=g))


def test_product_of_gaussians_is_the_closed_form_with_the_prior_and_ignores_order_and_masked_slots():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    variances = torch.rand(2, 5, 3, generator=g, dtype=torch.float64) + 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], dtype=torch.float64)
    mean, var = product_of_gaussians(means, variances, mask)
    for b in range(2):
        keep = mask[b].bool()
        # N(0, 1) * prod_k N(m_k, v_k) per dimension, written out the textbook way
        precision = 1.0 + (1.0 / variances[b, keep]).sum(0)
        expected_mean = (means[b, keep] / variances[b, keep]).sum(0) / precision
        torch.testing.assert_close(var[b], 1.0 / precision, rtol=1e-12, atol=0)
        torch.testing.assert_close(mean[b], expected_mean, rtol=1e-12, atol=0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    mean_p, var_p = product_of_gaussians(means[:, perm], variances[:, perm], mask[:, perm])
    torch.testing.assert_close(mean_p, mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(var_p, var, rtol=1e-12, atol=1e-15)
    garbage = means.clone()
    garbage[1, 1] = 1e6  # a masked slot holds anything finite
    torch.testing.assert_close(product_of_gaussians(garbage, variances, mask)[0][1], mean[1], rtol=0, atol=1e-12)


def test_agent_posterior_is_permutation_invariant_and_empty_context_is_the_prior():
    agent = _agent()
    g = torch.Generator().manual_seed(1)
    obs, act, rew, nxt = _context(g)
    mask = torch.ones(2, 6)
    mean, var = agent.posterior(obs, act, rew, nxt, mask)
    perm = torch.tensor([5, 2, 4, 3, 0, 1])
    mean_p, var_p = agent.posterior(obs[:, perm], act[:, perm], rew[:, perm], nxt[:, perm], mask)
    torch.testing.assert_close(mean_p, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(var_p, var, atol=1e-6, rtol=0)
    assert torch.all(var < 1.0)  # evidence tightens the belief
    for empty in (agent.posterior(obs[:, :0], act[:, :0], rew[:, :0], nxt[:, :0], mask[:, :0]),
                  agent.posterior(obs, act, rew, nxt, torch.zeros(2, 6))):
        torch.testing.assert_close(empty[0], torch.zeros(2, 3), atol=0, rtol=0)
        torch.testing.assert_close(empty[1], torch.ones(2, 3), atol=0, rtol=0)


def test_the_encoder_reads_the_next_observation():
    """Dynamics-shift families: two transitions that differ only in where they led must be told apart."""
    agent = _agent()
    g = torch.Generator().manual_seed(6)
    obs, act, rew, nxt = (x[0] for x in _context(g, batch=1))
    mean_a, var_a = agent.transition_factors(obs, act, rew, nxt)
    mean_b, var_b = agent.transition_factors(obs, act, rew, nxt + 0.5)
    assert (mean_a - mean_b).abs().min() > 0 and (var_a - var_b).abs().max() > 0


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(4, 5, generator=g, dtype=torch.float64)
    var = torch.rand(4, 5, generator=g, dtype=torch.float64) * 3 + 0.01
    expected = kl_divergence(Normal(mean, var.sqrt()), Normal(torch.zeros_like(mean), torch.ones_like(var))).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mean, var), expected, rtol=1e-12, atol=1e-12)
    assert float(kl_to_standard_normal(torch.zeros(5), torch.ones(5))) == 0.0


def test_deterministic_head_is_box_of_tanh_mean_and_stays_in_the_box():
    agent = _agent()
    g = torch.Generator().manual_seed(3)
    obs, z = torch.randn(64, 3, generator=g) * 50, torch.randn(64, 3, generator=g) * 10  # extreme inputs too
    mean, _ = agent.policy(obs, z)
    expected = torch.as_tensor((HIGH + LOW) / 2, dtype=torch.float32) + \
        torch.as_tensor((HIGH - LOW) / 2, dtype=torch.float32) * torch.tanh(mean)
    action = agent.deterministic_action(obs, z)
    torch.testing.assert_close(action, expected, atol=1e-6, rtol=0)
    assert torch.all(action >= torch.as_tensor(LOW, dtype=torch.float32))
    assert torch.all(action <= torch.as_tensor(HIGH, dtype=torch.float32))


def test_sampled_log_density_matches_the_transformed_distribution():
    agent = _agent()
    g = torch.Generator().manual_seed(4)
    obs, z = torch.randn(32, 3, generator=g), torch.randn(32, 3, generator=g)
    action, log_prob = agent.sample_action(obs, z, torch.Generator().manual_seed(5))
    mean, log_std = agent.policy(obs, z)
    centre, half = torch.as_tensor((HIGH + LOW) / 2), torch.as_tensor((HIGH - LOW) / 2)
    dist = TransformedDistribution(Normal(mean.double(), log_std.double().exp()),
                                   [TanhTransform(), AffineTransform(centre, half)])
    inside = ((action.double() - centre).abs() / half < 0.999).all(-1)  # tanh's inverse is ill-conditioned at ±1
    assert inside.sum() > 16
    expected = dist.log_prob(action.double()).sum(-1)
    torch.testing.assert_close(log_prob.double()[inside], expected[inside], atol=2e-3, rtol=1e-4)
    assert torch.all(action >= torch.as_tensor(LOW, dtype=torch.float32))
    assert torch.all(action <= torch.as_tensor(HIGH, dtype=torch.float32))


def test_target_critics_start_equal_are_frozen_and_follow_by_polyak():
    agent = _agent()
    assert all(not p.requires_grad for p in agent.target_critic.parameters())
    obs, act, z = torch.randn(5, 3), torch.rand(5, 2), torch.randn(5, 3)
    torch.testing.assert_close(agent.q_values(obs, act, z)[0], agent.q_values(obs, act, z, target=True)[0])
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.target_critic.parameters()]
    agent.update_target(0.25)
    for old, new, src in zip(before, agent.target_critic.parameters(), agent.critic.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * src)


class _Graph(torch.nn.Module):
    """One of the agent's inference methods as a module, for export."""

    def __init__(self, agent: PEARLAgent, method: str) -> None:
        super().__init__()
        self.agent, self.method = agent, method

    def forward(self, *args):
        return getattr(self.agent, self.method)(*args)


def test_inference_graphs_export_to_onnx_and_match_onnxruntime():
    """The three graphs the bundle will hold (per-transition factors for the robot's incremental belief,
    the batch posterior, the deterministic action head) convert with the TorchScript exporter and agree."""
    import io
    import warnings

    import onnxruntime as ort

    agent = _agent()
    rng = np.random.default_rng(7)
    agent.inputs.fit(rng.normal(size=(100, 3)), rng.normal(size=100) * 3 + 1, rng.normal(size=(100, 3)))
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    cases = {
        "transition_factors": (f32(4, 3), f32(4, 2), f32(4), f32(4, 3)),
        "posterior": (f32(2, 8, 3), f32(2, 8, 2), f32(2, 8), f32(2, 8, 3),
                      (rng.random((2, 8)) > 0.3).astype(np.float32)),
        "deterministic_action": (f32(4, 3), f32(4, 3)),
    }
    for method, args in cases.items():
        graph = _Graph(agent, method).eval()
        tensors = tuple(torch.as_tensor(a) for a in args)
        names = [f"input_{i}" for i in range(len(args))]
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, tensors, buffer, dynamo=False, opset_version=17, input_names=names)
        session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        got = session.run(None, dict(zip(names, args, strict=True)))
        with torch.no_grad():
            expected = graph(*tensors)
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=0, err_msg=method)
