"""Returns, a per-task linear feature baseline, GAE advantages and their normalization.

Everything is task-batched: rewards and masks are `[num_tasks, num_trajectories,
horizon]` and observations `[num_tasks, num_trajectories, horizon, obs_dim]`; a
mask is 1 on an episode's steps and 0 after it ended. Nothing here is
differentiated (advantages are data for the policy-gradient losses).
"""

import tensorflow as tf

from tf_maml.tasks import sources

__all__ = ["discount_cumsum", "discounted_returns", "gae_advantages", "baseline_features",
           "fit_linear_baseline", "predict_linear_baseline", "normalize_advantages",
           "process_trajectories"]


def discount_cumsum(values, discount):
    """`out[t] = Σ_{k≥0} discount^k · values[t + k]` along the last axis.

    Computed as one product with the `[H, H]` upper-triangular matrix of
    discount powers (no loop over time).

    Args:
        values: `[..., H]`.
        discount: a float.

    Returns:
        `[..., H]`.
    """
    values = tf.convert_to_tensor(values)
    horizon = tf.shape(values)[-1]
    steps = tf.range(horizon)
    lag = steps[None, :] - steps[:, None]                        # [t, t'] = t' - t
    powers = tf.pow(tf.cast(discount, values.dtype), tf.cast(tf.maximum(lag, 0), values.dtype))
    matrix = tf.where(lag >= 0, powers, tf.zeros_like(powers))   # [t, t']
    return tf.einsum("...j,ij->...i", values, matrix)


def discounted_returns(rewards, mask, gamma):
    """Discounted returns-to-go of every step, zero at invalid steps.

    Args:
        rewards: `[..., H]`.
        mask: `[..., H]`, 1 on valid steps (valid steps first).
        gamma: the discount.

    Returns:
        `[..., H]`.
    """
    return discount_cumsum(rewards * mask, gamma) * mask


def gae_advantages(rewards, values, mask, gamma, gae_lambda=1.0):
    """Generalized advantage estimates (Schulman et al., 2016).

    `δ_t = r_t + γ V(s_{t+1}) − V(s_t)` with `V = 0` after the last valid step
    (episode end or horizon, as the original code), and
    `A_t = Σ_k (γλ)^k δ_{t+k}`. With λ = 1 this is the discounted return minus
    the baseline.

    Args:
        rewards, values, mask: `[..., H]`.
        gamma: the discount γ.
        gae_lambda: λ.

    Returns:
        `[..., H]`, zero at invalid steps.
    """
    values = values * mask
    next_values = tf.concat([values[..., 1:], tf.zeros_like(values[..., :1])], -1)
    deltas = (rewards + gamma * next_values - values) * mask
    return discount_cumsum(deltas, gamma * gae_lambda) * mask


def baseline_features(observations, time_scale=100.0):
    """The features of rllab's `LinearFeatureBaseline`.

    `[clip(o, -10, 10), clip(o, -10, 10)², t/100, (t/100)², (t/100)³, 1]`
    where t is the step index within the trajectory.

    Args:
        observations: `[..., H, obs_dim]`.
        time_scale: the divisor of t (100 in the original).

    Returns:
        `[..., H, 2 · obs_dim + 4]`.
    """
    o = tf.clip_by_value(observations, -10.0, 10.0)
    horizon = tf.shape(observations)[-2]
    t = tf.cast(tf.range(horizon), observations.dtype)[:, None] / time_scale   # [H, 1]
    t = tf.broadcast_to(t, tf.concat([tf.shape(observations)[:-1], [1]], 0))
    return tf.concat([o, tf.square(o), t, t ** 2, t ** 3, tf.ones_like(t)], -1)


def fit_linear_baseline(observations, returns, mask, reg_coeff=1e-5, max_tries=5):
    """Fits each task's linear feature baseline on that task's trajectories.

    Ridge-regularized least squares as rllab's `LinearFeatureBaseline.fit`:
    `(FᵀF + c·I) w = FᵀR` over the valid steps of the task's trajectories, with
    c = `reg_coeff`, multiplied by 10 (up to `max_tries` tries) for the tasks
    whose solution is not finite. Solved in float64 for all tasks at once
    through one eigendecomposition of `FᵀF` per task (any c then costs a
    product, and a singular system never raises).

    Args:
        observations: `[T, B, H, obs_dim]`.
        returns: `[T, B, H]` (the discounted returns).
        mask: `[T, B, H]`.
        reg_coeff: the initial ridge coefficient.
        max_tries: how many coefficients c·10^k to try.

    Returns:
        Coefficients `[T, 2 · obs_dim + 4]`, float64.
    """
    features = tf.cast(baseline_features(observations), tf.float64)
    weight = tf.cast(mask, tf.float64)
    num_tasks = tf.shape(features)[0]
    num_features = tf.shape(features)[-1]
    f = tf.reshape(features * weight[..., None], tf.stack([num_tasks, -1, num_features]))
    r = tf.reshape(tf.cast(returns, tf.float64) * weight, tf.stack([num_tasks, -1]))
    gram = tf.linalg.matmul(f, f, transpose_a=True)                         # [T, F, F]
    rhs = tf.einsum("tnf,tn->tf", f, r)                                     # [T, F]
    # NaN or infinite rollouts (a policy that diverged, e.g. after an inner step far too
    # large) would fail in the eigendecomposition with a message naming neither.
    gram, rhs = sources.checked(
        tf.reduce_all(tf.math.is_finite(gram)) & tf.reduce_all(tf.math.is_finite(rhs)),
        tf.constant("the rollouts hold NaN or infinite observations or returns: the policy "
                    "diverged (an inner step too large? lower inner_lr)"), (gram, rhs))
    eigenvalues, eigenvectors = tf.linalg.eigh(gram)
    projected = tf.einsum("tfk,tf->tk", eigenvectors, rhs)                  # Vᵀ b
    coeffs = None
    for attempt in reversed(range(max_tries)):
        reg = reg_coeff * 10.0 ** attempt
        shifted = eigenvalues + reg
        candidate = tf.einsum("tfk,tk->tf", eigenvectors, projected / shifted)
        good = (tf.reduce_all(tf.math.is_finite(candidate), -1)
                & tf.reduce_all(shifted > 0, -1))
        # The smallest coefficient that works wins: later (smaller) tries override.
        coeffs = candidate if coeffs is None else tf.where(good[:, None], candidate, coeffs)
    return coeffs


def predict_linear_baseline(coeffs, observations):
    """Baseline values `[T, B, H]` of each task's coefficients at its observations."""
    features = tf.cast(baseline_features(observations), tf.float64)
    values = tf.einsum("t...f,tf->t...", features, coeffs)
    return tf.cast(values, observations.dtype)


def normalize_advantages(advantages, mask, epsilon=1e-8):
    """Per task: subtract the mean and divide by the standard deviation over valid steps.

    Args:
        advantages, mask: `[T, ...]`.
        epsilon: added to the standard deviation.

    Returns:
        `[T, ...]`, zero at invalid steps.
    """
    axes = list(range(1, advantages.shape.rank))
    count = tf.maximum(tf.reduce_sum(mask, axes, keepdims=True), 1.0)
    mean = tf.reduce_sum(advantages * mask, axes, keepdims=True) / count
    centered = (advantages - mean) * mask
    # The variance of centered / scale, times scale²: squares of large advantages (rewards
    # of 1e18 in a served request) would overflow float32 and zero every advantage.
    scale = tf.reduce_max(tf.abs(centered), axes, keepdims=True)
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    variance = tf.reduce_sum(tf.square(centered / scale), axes, keepdims=True) / count
    return centered / (tf.sqrt(variance) * scale + epsilon) * mask


def process_trajectories(trajectories, gamma=0.99, gae_lambda=1.0, baseline_reg=1e-5,
                         normalize=True):
    """Adds advantages to sampled trajectories (the original sampler's `process_samples`).

    Discounted returns, each task's linear baseline fitted on that task's
    trajectories, GAE(γ, λ) against it and, by default, per-task
    normalization.

    Args:
        trajectories: `Trajectories` from `sample_trajectories`.
        gamma: discount.
        gae_lambda: GAE's λ (1: return minus baseline).
        baseline_reg: the baseline's ridge coefficient; None: no baseline.
        normalize: normalize advantages per task.

    Returns:
        The `Trajectories` with `advantages` set (held constant).
    """
    t = trajectories
    returns = discounted_returns(t.rewards, t.mask, gamma)
    if baseline_reg is None:
        values = tf.zeros_like(returns)
    else:
        coeffs = fit_linear_baseline(t.observations, returns, t.mask, baseline_reg)
        values = predict_linear_baseline(coeffs, t.observations)
    advantages = gae_advantages(t.rewards, values, t.mask, gamma, gae_lambda)
    if normalize:
        advantages = normalize_advantages(advantages, t.mask)
    return t._replace(advantages=tf.stop_gradient(advantages))
