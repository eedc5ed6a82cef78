"""MB-MPO's inner step on the robot: one vanilla policy-gradient step of a Gaussian MLP policy, numpy only.

Why: MB-MPO (Clavera et al. 2018) meta-learns a policy so that ONE policy-gradient step on a task's own paths adapts
it. The trainer differentiates through that step with torch (:func:`metarl_robot.models.meta_policy.adapt`); the
robot only has to take it, so this module takes it by hand-written backprop with numpy alone (no torch, MuJoCo or
gymnasium on a robot computer). The tests check it against torch's autograd to round-off.

The policy (:data:`PolicyParams`) maps features of the observation (:func:`policy_features`: scaled components,
sine and cosine of the periodic angles) through tanh hidden layers to the mean of a diagonal Gaussian over the
action in normalised units ``[-1, 1]`` (:func:`to_env_action` maps it to the robot's units, :func:`from_env_action`
back), with a state-independent log standard deviation. The step is

    params' = params + step_size * grad mean_i(A_i * log pi(a_i | s_i))

with advantages ``A`` (:func:`advantages`): the discounted returns-to-go minus rllab's linear feature baseline
fitted on the same paths, normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def from_env_action(robot: RobotSpec, action: np.ndarray) -> np.ndarray:
    """Robot units (..., a) -> normalised units: ``2 * (action - low) / (high - low) - 1``, the inverse of
    :func:`to_env_action` inside the box (a logged command outside it maps outside ``[-1, 1]``; not clipped)."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape[-1:] != (robot.action_dim,):
        raise ValueError(f"action: expected shape (..., {robot.action_dim}), got {action.shape}")
    low, high = robot.action_low, robot.action_high
    return 2.0 * (action - low) / (high - low) - 1.0


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


def forward_layers(layers: list[tuple[np.ndarray, np.ndarray]], feats: np.ndarray
                   ) -> tuple[list[np.ndarray], np.ndarray]:
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
    return forward_layers(layers, np.asarray(feats, dtype=np.float64))[1]


def log_prob(params: PolicyParams, feats: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """(...,): the diagonal Gaussian log density of ``actions`` (..., a), incl. the -0.5*a*log(2*pi) constant."""
    layers, log_std = _split(params)
    mean = forward_layers(layers, np.asarray(feats, dtype=np.float64))[1]
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
    acts, mean = forward_layers(layers, feats.reshape(n, f))
    w = weights.reshape(n, 1) / n  # the mean over rows, folded into each row's weight
    inv_std = np.exp(-log_std)
    z = (actions.reshape(n, a) - mean) * inv_std
    # d log N(a; m, s) / d m = (a - m) / s^2;  d / d log s = ((a - m) / s)^2 - 1
    grad_log_std = np.sum(w * (z**2 - 1.0), axis=0)
    delta = w * z * inv_std  # d objective / d (pre-activation) of the mean head
    return [*backprop(layers, acts, delta)[0], grad_log_std]


def backprop(layers: list[tuple[np.ndarray, np.ndarray]], acts: list[np.ndarray], delta: np.ndarray,
             last_hidden_grad: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Backprop through a tanh MLP (``layers`` and the activations ``acts`` of :func:`forward_layers`, rows (N, ·))
    from ``delta`` (N, out), the objective's gradient w.r.t. the output. ``last_hidden_grad`` (N, H): a gradient that
    reaches the last hidden activation from elsewhere (MACAW's advantage head reads it). Returns the gradients
    ``[W0, b0, ..., W_out, b_out]`` and the gradient w.r.t. the input (N, F)."""
    grads: list[np.ndarray] = []
    for i in range(len(layers) - 1, -1, -1):
        weight, _ = layers[i]
        grads[:0] = [acts[i].T @ delta, delta.sum(axis=0)]
        delta = delta @ weight.T
        if i > 0:
            if i == len(layers) - 1 and last_hidden_grad is not None:
                delta = delta + last_hidden_grad
            delta = delta * (1.0 - acts[i] ** 2)  # tanh' = 1 - tanh^2
    return grads, delta


def inner_step(params: PolicyParams, feats: np.ndarray, actions: np.ndarray, advantages: np.ndarray,
               step_size: float) -> PolicyParams:
    """One gradient ASCENT step: params + step_size * log_prob_gradient(params, feats, actions, advantages) (new arrays;
    inputs untouched)."""
    grads = log_prob_gradient(params, feats, actions, advantages)
    return [np.asarray(p, dtype=np.float64) + step_size * g for p, g in zip(params, grads, strict=True)]


# ---- advantages ---------------------------------------------------------------------------------------------------
Episodes = np.ndarray | Sequence[np.ndarray]
"""N episodes of one task: an ``(N, T, ...)`` array (equal lengths) or a sequence of N arrays ``(T_i, ...)`` (any
lengths: the robot's episodes end where the operator or the safety layer ends them). The functions below take either
and answer in the same form: an ``(N, T)`` array for an array, a list of ``(T_i,)`` arrays for a sequence."""


def _episodes(name: str, x: Episodes, ndim: int) -> list[np.ndarray]:
    """Each episode of ``x`` as a float64 array with ``ndim`` axes, time first."""
    if isinstance(x, np.ndarray):
        if x.ndim != ndim + 1:
            raise ValueError(f"{name}: expected an array of {ndim + 1} axes (N, T{', F' * (ndim - 1)}) or a list of "
                             f"episodes, got shape {x.shape}")
        episodes = list(x.astype(np.float64, copy=False))
    else:
        episodes = [np.asarray(e, dtype=np.float64) for e in x]
        for i, e in enumerate(episodes):
            if e.ndim != ndim:
                raise ValueError(f"{name}[{i}]: expected an episode of {ndim} axes (T{', F' * (ndim - 1)}), got shape "
                                 f"{e.shape}")
    if not episodes:
        raise ValueError(f"{name}: no episodes")
    return episodes


def _same_form(like: Episodes, episodes: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """``episodes`` stacked to ``(N, T)`` when ``like`` was an array, else as a list."""
    return np.stack(episodes) if isinstance(like, np.ndarray) else episodes


def discounted_returns(rewards: Episodes, discount: float) -> np.ndarray | list[np.ndarray]:
    """Rewards (:data:`Episodes`: (N, T) or N episodes (T_i,)) -> each episode's reward-to-go
    ``sum_{k >= t} discount^(k - t) r_k``, in the same form."""
    episodes = _episodes("rewards", rewards, 1)
    lengths = [len(e) for e in episodes]
    # One backward pass over all episodes, the shorter ones padded with zero rewards after their end: the padding
    # leaves ``running`` at exactly 0.0 until an episode's own last step, so each result is its own recursion's.
    padded = np.zeros((len(episodes), max(lengths)))
    for i, e in enumerate(episodes):
        padded[i, :len(e)] = e
    out = np.empty_like(padded)
    running = np.zeros(len(episodes))
    for t in range(padded.shape[1] - 1, -1, -1):
        running = padded[:, t] + discount * running
        out[:, t] = running
    return _same_form(rewards, [out[i, :n] for i, n in enumerate(lengths)])


def _baseline_features(feats: np.ndarray) -> np.ndarray:
    """One episode's (T, F) -> (T, 2F + 4): rllab's ``[f, f**2, t/100, (t/100)**2, (t/100)**3, 1]``."""
    t = feats.shape[0]
    f = np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP)
    # Time enters because the return left shrinks along a path of fixed length whatever the state.
    step = (np.arange(t, dtype=np.float64) / 100.0)[:, None]
    return np.concatenate([f, f**2, step, step**2, step**3, np.ones((t, 1))], axis=-1)


def linear_baseline(feats: Episodes, returns: Episodes, reg: float = 1e-5) -> np.ndarray | list[np.ndarray]:
    """rllab's LinearFeatureBaseline, ONE fitted on all these episodes and evaluated on each: per step features
    [f, f**2, t/100, (t/100)**2, (t/100)**3, 1] (f = the episode's feats (T_i, F) clipped to [-10, 10], t the step
    index within its episode), ridge least squares on all rows (increase reg x10 up to 5 times if the solve is not
    finite). ``feats`` (N, T, F) and ``returns`` (N, T), or N episodes of each (:data:`Episodes`) -> the baseline in
    ``returns``' form."""
    feat_eps, return_eps = _episodes("feats", feats, 2), _episodes("returns", returns, 1)
    if (len(feat_eps) != len(return_eps) or len({f.shape[1] for f in feat_eps}) != 1
            or any(f.shape[0] != r.shape[0] for f, r in zip(feat_eps, return_eps, strict=True))):
        raise ValueError(f"feats (N, T, F) and returns (N, T) expected, one (T_i, F) and (T_i,) per episode, got "
                         f"{[f.shape for f in feat_eps]} and {[r.shape for r in return_eps]}")
    x = [_baseline_features(f) for f in feat_eps]
    rows = np.concatenate(x)
    gram, moment = rows.T @ rows, rows.T @ np.concatenate(return_eps)
    eye = np.eye(gram.shape[0])
    for _ in range(6):  # the first try and up to 5 stronger regularisations
        try:
            coeffs = np.linalg.lstsq(gram + reg * eye, moment, rcond=None)[0]
        except np.linalg.LinAlgError:  # LAPACK's SVD refuses NaN input rather than returning NaN
            coeffs = np.full(gram.shape[0], np.nan)
        if np.isfinite(coeffs).all():
            return _same_form(returns, [e @ coeffs for e in x])
        reg *= 10.0
    # A finite input always gives a finite ridge solve, so this is a NaN or Inf in the paths themselves.
    raise ValueError("linear_baseline: the least squares stayed non-finite (NaN or Inf in the features or returns)")


def advantages(rewards: Episodes, feats: Episodes, discount: float, reg: float = 1e-5,
               normalize: bool = True) -> np.ndarray | list[np.ndarray]:
    """Returns-to-go minus ONE linear baseline fitted on all the episodes; normalised to mean 0, std 1 (std + 1e-8)
    over all their rows when normalize. ``rewards`` (N, T) and ``feats`` (N, T, F) of N paths of one task, or N
    episodes of any lengths (:data:`Episodes`) -> the advantages in ``rewards``' form."""
    returns = discounted_returns(rewards, discount)
    baseline = linear_baseline(feats, returns, reg)
    adv = np.concatenate([r - b for r, b in zip(returns, baseline, strict=True)])
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return _same_form(rewards, np.split(adv, np.cumsum([len(r) for r in returns])[:-1]))


__all__ = [
    "FEATURE_CLIP",
    "Episodes",
    "PolicyParams",
    "advantages",
    "discounted_returns",
    "feature_dim",
    "from_env_action",
    "inner_step",
    "linear_baseline",
    "log_prob",
    "log_prob_gradient",
    "policy_features",
    "policy_mean",
    "to_env_action",
]
