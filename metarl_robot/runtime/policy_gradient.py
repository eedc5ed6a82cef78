"""MB-MPO's inner step on the robot: one vanilla policy-gradient step of a Gaussian MLP policy, numpy only.

Why: MB-MPO (Clavera et al. 2018) meta-learns a policy so that ONE policy-gradient step on a task's own paths adapts
it. The trainer differentiates through that step with torch (:func:`metarl_robot.models.meta_policy.adapt`); the
robot only has to take it, so this module takes it by hand-written backprop with numpy alone (no torch, MuJoCo or
gymnasium on a robot computer). The tests check it against torch's autograd to round-off.

The policy (:data:`PolicyParams`) maps features of the observation (:func:`policy_features`: scaled components,
sine and cosine of the periodic angles) through tanh hidden layers to the mean of a diagonal Gaussian over the
action in normalised units ``[-1, 1]`` (:func:`to_env_action` maps it to the robot's units), with a
state-independent log standard deviation. The step is

    params' = params + step_size * grad mean_i(A_i * log pi(a_i | s_i))

with advantages ``A`` (:func:`advantages`): the discounted returns-to-go minus rllab's linear feature baseline
fitted on the same paths, normalised.
"""

from __future__ import annotations

import math

import numpy as np

from metarl_robot.spec.robot import RobotSpec

PolicyParams = list[np.ndarray]
"""[W0 (F, H0), b0 (H0,), W1 (H0, H1), b1 (H1,), ..., W_out (H_last, a), b_out (a,), log_std (a,)]: tanh hidden layers,
linear mean head, state-independent log standard deviation, all float64."""

FEATURE_CLIP = 10.0
"""Features (and the baseline's inputs) are clipped to ``[-FEATURE_CLIP, FEATURE_CLIP]``: a diverging sensor reading
must not saturate every tanh unit or dominate the baseline's least squares."""

_LOG_2PI = math.log(2.0 * math.pi)


# ---- features and actions ----------------------------------------------------------------------------------------
def feature_dim(robot: RobotSpec) -> int:
    """Width F of :func:`policy_features`: each periodic component becomes two (its sine and cosine)."""
    return robot.obs_dim + int(np.count_nonzero(robot.obs_periodic))


def policy_features(robot: RobotSpec, obs: np.ndarray) -> np.ndarray:
    """(..., obs_dim) -> (..., F): [obs[~periodic] / obs_scale[~periodic], sin(obs[periodic]), cos(obs[periodic])],
    then clipped to [-10, 10] (F = obs_dim + number of periodic components)."""
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape[-1:] != (robot.obs_dim,):
        raise ValueError(f"obs: expected shape (..., {robot.obs_dim}), got {obs.shape}")
    periodic = robot.obs_periodic
    # An unwrapped angle grows without bound as the pole turns over; its sine and cosine do not.
    angles = obs[..., periodic]
    feats = np.concatenate([obs[..., ~periodic] / robot.obs_scale[~periodic], np.sin(angles), np.cos(angles)],
                           axis=-1)
    return np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP)


def to_env_action(robot: RobotSpec, u: np.ndarray) -> np.ndarray:
    """Normalised action ``u`` (..., a) -> robot units: ``low + (u + 1) / 2 * (high - low)``, clipped to
    ``[low, high]`` (a Gaussian sample falls outside ``[-1, 1]``; the robot must never see it)."""
    u = np.asarray(u, dtype=np.float64)
    if u.shape[-1:] != (robot.action_dim,):
        raise ValueError(f"u: expected shape (..., {robot.action_dim}), got {u.shape}")
    low, high = robot.action_low, robot.action_high
    return np.clip(low + (u + 1.0) / 2.0 * (high - low), low, high)


# ---- the policy ---------------------------------------------------------------------------------------------------
def _split(params: PolicyParams) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Check the layout of ``params``: the (weight, bias) pairs of every layer (the mean head last) and log_std."""
    if len(params) < 3 or len(params) % 2 == 0:
        raise ValueError(f"params: expected [W0, b0, ..., W_out, b_out, log_std] (an odd count >= 3), got "
                         f"{len(params)} arrays")
    arrays = [np.asarray(p, dtype=np.float64) for p in params]
    layers = list(zip(arrays[:-1:2], arrays[1:-1:2], strict=True))
    width = layers[0][0].shape[0] if layers[0][0].ndim == 2 else -1
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(f"params: layer {i} has weight {w.shape} and bias {b.shape}; expected ({width}, H) "
                             f"and (H,)")
        width = w.shape[1]
    log_std = arrays[-1]
    if log_std.shape != (width,):
        raise ValueError(f"params: log_std has shape {log_std.shape}, expected ({width},) like the mean head's bias")
    return layers, log_std


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], feats: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The hidden activations (the input first, kept for backprop) and the mean."""
    if feats.shape[-1:] != (layers[0][0].shape[0],):
        raise ValueError(f"feats: expected shape (..., {layers[0][0].shape[0]}), got {feats.shape}")
    acts = [feats]
    for w, b in layers[:-1]:
        acts.append(np.tanh(acts[-1] @ w + b))
    w_out, b_out = layers[-1]
    return acts, acts[-1] @ w_out + b_out


def policy_mean(params: PolicyParams, feats: np.ndarray) -> np.ndarray:
    """(..., F) -> (..., a): the mean action in normalised units (what the robot commands when not exploring)."""
    layers, _ = _split(params)
    return _forward(layers, np.asarray(feats, dtype=np.float64))[1]


def log_prob(params: PolicyParams, feats: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """(...,): the diagonal Gaussian log density of ``actions`` (..., a), incl. the -0.5*a*log(2*pi) constant."""
    layers, log_std = _split(params)
    mean = _forward(layers, np.asarray(feats, dtype=np.float64))[1]
    z = (np.asarray(actions, dtype=np.float64) - mean) * np.exp(-log_std)
    return -0.5 * np.sum(z**2, axis=-1) - np.sum(log_std) - 0.5 * log_std.size * _LOG_2PI


def log_prob_gradient(params: PolicyParams, feats: np.ndarray, actions: np.ndarray,
                      weights: np.ndarray) -> PolicyParams:
    """Gradient w.r.t. every parameter of mean_i(weights_i * log_prob(params, feats_i, actions_i)) over the N rows
    (feats (N, F), actions (N, a), weights (N,)): hand-written backprop through the tanh MLP and the log-std.

    Any leading shape works (e.g. (N, T, F) paths): the mean is over all its rows."""
    layers, log_std = _split(params)
    feats = np.asarray(feats, dtype=np.float64)
    f, a = layers[0][0].shape[0], log_std.size
    if feats.shape[-1:] != (f,):
        raise ValueError(f"feats: expected shape (..., {f}), got {feats.shape}")
    lead = feats.shape[:-1]
    actions = np.asarray(actions, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if actions.shape != (*lead, a) or weights.shape != lead:
        raise ValueError(f"actions {actions.shape} and weights {weights.shape}: expected {(*lead, a)} and {lead} "
                         f"for feats {feats.shape}")
    n = int(np.prod(lead))
    if n == 0:
        raise ValueError("no rows: the mean over an empty batch is undefined")
    acts, mean = _forward(layers, feats.reshape(n, f))
    w = weights.reshape(n, 1) / n  # the mean over rows, folded into each row's weight
    inv_std = np.exp(-log_std)
    z = (actions.reshape(n, a) - mean) * inv_std
    # d log N(a; m, s) / d m = (a - m) / s^2;  d / d log s = ((a - m) / s)^2 - 1
    grad_log_std = np.sum(w * (z**2 - 1.0), axis=0)
    delta = w * z * inv_std  # d objective / d (pre-activation) of the mean head
    grads: PolicyParams = []
    for i in range(len(layers) - 1, -1, -1):
        weight, _ = layers[i]
        grads[:0] = [acts[i].T @ delta, delta.sum(axis=0)]
        if i > 0:
            delta = (delta @ weight.T) * (1.0 - acts[i] ** 2)  # tanh' = 1 - tanh^2
    return [*grads, grad_log_std]


def inner_step(params: PolicyParams, feats: np.ndarray, actions: np.ndarray, advantages: np.ndarray,
               step_size: float) -> PolicyParams:
    """One gradient ASCENT step: params + step_size * log_prob_gradient(params, feats, actions, advantages) (new arrays;
    inputs untouched)."""
    grads = log_prob_gradient(params, feats, actions, advantages)
    return [np.asarray(p, dtype=np.float64) + step_size * g for p, g in zip(params, grads, strict=True)]


# ---- advantages ---------------------------------------------------------------------------------------------------
def discounted_returns(rewards: np.ndarray, discount: float) -> np.ndarray:
    """(N, T) rewards -> (N, T) reward-to-go ``sum_{k >= t} discount^(k - t) r_k`` of each path."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards: expected (N, T), got shape {rewards.shape}")
    out = np.empty_like(rewards)
    running = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + discount * running
        out[:, t] = running
    return out


def _baseline_features(feats: np.ndarray) -> np.ndarray:
    """(N, T, F) -> (N, T, 2F + 4): rllab's ``[f, f**2, t/100, (t/100)**2, (t/100)**3, 1]``."""
    n, t, _ = feats.shape
    f = np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP)
    # Time enters because the return left shrinks along a path of fixed length whatever the state.
    step = np.broadcast_to((np.arange(t, dtype=np.float64) / 100.0)[None, :, None], (n, t, 1))
    return np.concatenate([f, f**2, step, step**2, step**3, np.ones((n, t, 1))], axis=-1)


def linear_baseline(feats: np.ndarray, returns: np.ndarray, reg: float = 1e-5) -> np.ndarray:
    """rllab's LinearFeatureBaseline, fitted on these paths and evaluated on them: per step features
    [f, f**2, t/100, (t/100)**2, (t/100)**3, 1] (f = feats (N, T, F) clipped to [-10, 10], t the step index),
    ridge least squares on all N*T rows (increase reg x10 up to 5 times if the solve is not finite) -> (N, T)."""
    feats = np.asarray(feats, dtype=np.float64)
    returns = np.asarray(returns, dtype=np.float64)
    if feats.ndim != 3 or returns.shape != feats.shape[:2]:
        raise ValueError(f"feats (N, T, F) and returns (N, T) expected, got {feats.shape} and {returns.shape}")
    x = _baseline_features(feats)
    rows = x.reshape(-1, x.shape[-1])
    gram, moment = rows.T @ rows, rows.T @ returns.reshape(-1)
    eye = np.eye(gram.shape[0])
    for _ in range(6):  # the first try and up to 5 stronger regularisations
        try:
            coeffs = np.linalg.lstsq(gram + reg * eye, moment, rcond=None)[0]
        except np.linalg.LinAlgError:  # LAPACK's SVD refuses NaN input rather than returning NaN
            coeffs = np.full(gram.shape[0], np.nan)
        if np.isfinite(coeffs).all():
            return x @ coeffs
        reg *= 10.0
    # A finite input always gives a finite ridge solve, so this is a NaN or Inf in the paths themselves.
    raise ValueError("linear_baseline: the least squares stayed non-finite (NaN or Inf in the features or returns)")


def advantages(rewards: np.ndarray, feats: np.ndarray, discount: float, reg: float = 1e-5,
               normalize: bool = True) -> np.ndarray:
    """(N, T) returns-to-go minus the linear baseline; normalised to mean 0, std 1 (std + 1e-8) over all N*T when
    normalize. N paths of one task, equal length T."""
    returns = discounted_returns(rewards, discount)
    adv = returns - linear_baseline(feats, returns, reg)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


__all__ = [
    "FEATURE_CLIP",
    "PolicyParams",
    "advantages",
    "discounted_returns",
    "feature_dim",
    "inner_step",
    "linear_baseline",
    "log_prob",
    "log_prob_gradient",
    "policy_features",
    "policy_mean",
    "to_env_action",
]
