"""Policy-gradient losses as task loss closures, per-task surrogate and KL.

The inner loop of MAML-RL is `tf_maml.core.adapt` on `reinforce_loss`: a task
loss closure like the supervised one, whose data are sampled trajectories.
"""

import tensorflow as tf

from tf_maml.rl import policy as policy_lib

__all__ = ["masked_task_mean", "flatten_time", "pack_valid_steps", "reinforce_loss",
           "surrogate_and_kl"]


def masked_task_mean(values, mask):
    """Mean of `values` over the valid steps of each task: `[T, ...] -> [T]`."""
    axes = list(range(1, values.shape.rank))
    return (tf.reduce_sum(values * mask, axes)
            / tf.maximum(tf.reduce_sum(mask, axes), tf.ones([], mask.dtype)))


def flatten_time(trajectories):
    """`Trajectories` with `[T, B, H, ...]` fields reshaped to `[T, B·H, ...]`."""
    def flat(x):
        if x is None:
            return None
        shape = tf.shape(x)
        return tf.reshape(x, tf.concat([shape[:1], [-1], shape[3:]], 0))
    return type(trajectories)(*[flat(x) for x in trajectories])


def pack_valid_steps(trajectories, max_valid_steps):
    """Each task's valid steps gathered first, in order, as one `[T, 1, max_valid_steps, ...]` row.

    For the losses, which are means over valid steps: a step budget's many
    mostly empty trajectory slots (`MAMLRL(sample_by_steps=True)`) then cost
    what their valid steps do. Returns and anything per episode must be read
    before packing. Valid steps beyond `max_valid_steps` are dropped.

    Args:
        trajectories: processed `Trajectories` `[T, B, H, ...]`.
        max_valid_steps: a bound on each task's valid steps (a Python int).

    Returns:
        `Trajectories` `[T, 1, max_valid_steps, ...]`.
    """
    flat = flatten_time(trajectories)
    # Valid steps (mask 1) first; a stable sort keeps their order.
    order = tf.argsort(-flat.mask, axis=1, stable=True)[:, :max_valid_steps]

    def gather(x):
        return None if x is None else tf.gather(x, order, axis=1, batch_dims=1)[:, None]
    return type(trajectories)(*[gather(x) for x in flat])


def reinforce_loss(policy, trajectories):
    """The REINFORCE task loss closure: `−mean(log π(a|s) · A)` per task over valid steps.

    Args:
        policy: a `GaussianPolicy`.
        trajectories: processed `Trajectories` (with advantages), or a list of
            them, one per inner step (step `s` reads entry `s`: data sampled
            with the policy after `s` steps).

    Returns:
        `task_loss(weights, step) -> [num_tasks]` for `tf_maml.core.adapt`
        with a Python int `num_steps` (the inner loop unrolled: step `s`
        picks its batch in Python).

    Raises:
        ValueError: (from the closure) a tensor `step`, i.e. `adapt` with a
            tensor `num_steps`.

    Example:

    ```python
    adapted, _ = core.adapt(reinforce_loss(policy, batch), weights, 1, core.SGD(0.1))
    ```
    """
    batches = list(trajectories) if isinstance(trajectories, (list, tuple)) and not hasattr(
        trajectories, "_fields") else [trajectories]
    batches = [flatten_time(b) for b in batches]

    def task_loss(weights, step):
        if not isinstance(step, int):
            raise ValueError("reinforce_loss needs a Python int step (unrolled inner loop)")
        batch = batches[min(step, len(batches) - 1)]
        logp = policy.log_prob(weights, batch.observations, batch.actions)
        return -masked_task_mean(logp * batch.advantages, batch.mask)

    return task_loss


def surrogate_and_kl(policy, weights, trajectories, old_mean, old_log_std):
    """TRPO's per-task surrogate loss and mean KL against the sampling policy.

    `surrogate = −mean(exp(log π(a|s) − log π_old(a|s)) · A)` and
    `kl = mean KL(π_old(·|s) ‖ π(·|s))`, both over each task's valid steps.

    Args:
        policy: a `GaussianPolicy`.
        weights: task-batched weights of π.
        trajectories: processed `Trajectories`, flattened (`flatten_time`).
        old_mean, old_log_std: π_old's distribution at the observations
            (constants).

    Returns:
        `(surrogate, kl)`, each `[num_tasks]`.
    """
    t = trajectories
    mean, log_std = policy.distribution(weights, t.observations)
    logp = policy_lib.log_prob(t.actions, mean, log_std)
    old_logp = policy_lib.log_prob(t.actions, old_mean, old_log_std)
    ratio = tf.exp(logp - old_logp)
    surrogate = -masked_task_mean(ratio * t.advantages, t.mask)
    kl = masked_task_mean(policy_lib.kl_divergence(old_mean, old_log_std, mean, log_std), t.mask)
    return surrogate, kl
