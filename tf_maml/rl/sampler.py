"""Rollouts of every task of a meta-batch at once, in a graph loop over time."""

import collections
import inspect

import tensorflow as tf

__all__ = ["Trajectories", "sample_trajectories", "keep_within_budget", "average_return"]

RESET_SEED_SALT = 0x5EED


class Trajectories(collections.namedtuple(
        "Trajectories", ["observations", "actions", "rewards", "mask", "advantages"],
        defaults=(None,))):
    """Sampled episodes of every task, laid out `[num_tasks, num_trajectories, horizon, ...]`.

    Fields:
        observations: `[T, B, H, obs_dim]`, the observation each action was taken at.
        actions: `[T, B, H, action_dim]`, as sampled (before the environment clips them).
        rewards: `[T, B, H]`, zero at invalid steps.
        mask: `[T, B, H]`, 1 at the steps of an episode, 0 after it ended
            (valid steps always come first within a trajectory).
        advantages: `[T, B, H]` once processed (`tf_maml.rl.process_trajectories`),
            else None.
    """


def sample_trajectories(env, policy, weights, tasks, num_trajectories, seed, horizon=None,
                        max_steps=None):
    """Rolls out `num_trajectories` episodes per task with each task's policy, in a graph loop.

    One `tf.while_loop` over time steps every trajectory of every task
    together: the policy's forward runs once per step on `[num_tasks,
    num_trajectories, obs_dim]`. Actions are `mean + std · ε` with ε drawn from
    `seed` (stateless), so the result is a pure function of `(weights, tasks,
    seed)`. Nothing is differentiated through sampling (`weights` are held
    constant).

    Args:
        env: a batched environment (see `tf_maml.rl.navigation`).
        policy: a `GaussianPolicy` (anything with `distribution(weights, obs)`
            and `action_dim`, `dtype`).
        weights: task-batched policy weights (leading axis: the tasks).
        tasks: the tasks, `[num_tasks, ...]` (e.g. goals).
        num_trajectories: episodes per task (a Python int).
        seed: `[2]` integer tensor for the action noise (and, folded, the
            environment's initial states).
        horizon: steps per episode (default `env.horizon`).
        max_steps: None, or a budget of environment steps per task, as rllab's
            samplers collect: episodes are kept in order while the steps of
            the kept ones before them total less than `max_steps` (the last
            one is finished), so episodes that end early leave room for more;
            `num_trajectories` is then the most episodes a task can get. The
            trajectories beyond the budget are all masked out (see
            `keep_within_budget`).

    Returns:
        `Trajectories` (without advantages). An episode that ends (`done`) at
        step t keeps steps 0..t; later steps are masked out.

    Example:

    ```python
    weights = core.broadcast_to_tasks(policy.variables, 20)
    goals = env.sample_tasks(20, seed)
    trajectories = sample_trajectories(env, policy, weights, goals, 20, seed)
    ```
    """
    horizon = int(env.horizon if horizon is None else horizon)
    weights = [tf.stop_gradient(tf.convert_to_tensor(w)) for w in weights]
    tasks = tf.convert_to_tensor(tasks)
    num_tasks = tasks.shape[0] if tasks.shape[0] is not None else tf.shape(tasks)[0]
    dtype = policy.dtype
    noise = tf.random.stateless_normal(
        tf.stack([horizon, num_tasks, num_trajectories, policy.action_dim]), seed, dtype=dtype)
    # Environments with random initial states (MuJoCo) draw them from their own seed;
    # environments whose reset takes no seed (deterministic starts) are called without one.
    reset_seed = tf.random.experimental.stateless_fold_in(seed, RESET_SEED_SALT)
    if "seed" in inspect.signature(env.reset).parameters:
        state = env.reset(tasks, num_trajectories, seed=reset_seed)
    else:
        state = env.reset(tasks, num_trajectories)
    alive = tf.ones(tf.stack([num_tasks, num_trajectories]), dtype)

    def array():
        return tf.TensorArray(dtype, size=horizon)

    def body(t, state, alive, observations, actions, rewards, masks):
        obs = tf.cast(env.observe(state), dtype)
        mean, log_std = policy.distribution(weights, obs)
        action = mean + tf.exp(log_std) * noise[t]
        next_state, reward, done = env.step(tasks, state, action)
        observations = observations.write(t, obs)
        actions = actions.write(t, action)
        rewards = rewards.write(t, tf.cast(reward, dtype) * alive)
        masks = masks.write(t, alive)
        alive = alive * (1.0 - tf.cast(done, dtype))
        return t + 1, next_state, alive, observations, actions, rewards, masks

    _, _, _, observations, actions, rewards, masks = tf.while_loop(
        lambda t, *_: t < horizon, body,
        (tf.constant(0), state, alive, array(), array(), array(), array()),
        maximum_iterations=horizon)

    def batch_major(ta, trailing):
        value = ta.stack()
        return tf.transpose(value, [1, 2, 0] + list(range(3, 3 + trailing)))

    trajectories = Trajectories(batch_major(observations, 1), batch_major(actions, 1),
                                batch_major(rewards, 0), batch_major(masks, 0))
    return trajectories if max_steps is None else keep_within_budget(trajectories, max_steps)


def keep_within_budget(trajectories, max_steps):
    """Masks out each task's episodes after its first `max_steps` environment steps.

    Episode j of a task is kept when the steps of episodes 0..j−1 total less
    than `max_steps`: the episodes a sampler that collects `max_steps` steps
    one episode after another, finishing the one under way, would have
    collected. That is rllab's `BatchSampler` with one worker (the original
    MAML code evaluated with four, each finishing its own episode); its training sampler (`VectorizedSampler`, one
    environment per task stepped until all tasks together had their steps)
    dropped the episode under way instead, a difference of one episode per
    task.

    Args:
        trajectories: `Trajectories` `[T, B, H, ...]`, episodes in sampling order.
        max_steps: the step budget per task (an int or integer scalar).

    Returns:
        The `Trajectories` with the dropped episodes' mask and rewards zero
        (every one of their steps invalid).
    """
    mask = trajectories.mask
    lengths = tf.reduce_sum(mask, -1)                                    # [T, B]
    before = tf.cumsum(lengths, axis=1, exclusive=True)
    keep = tf.cast(before < tf.cast(max_steps, mask.dtype), mask.dtype)[..., None]
    return trajectories._replace(mask=mask * keep, rewards=trajectories.rewards * keep)


def average_return(trajectories, per_task=False):
    """The undiscounted episode return averaged over each task's episodes, then over tasks.

    An episode is a trajectory whose first step is valid: trajectories masked
    out entirely (beyond a step budget, see `keep_within_budget`) are not
    counted.

    Args:
        trajectories: `Trajectories`.
        per_task: return each task's average `[T]` instead of the mean over tasks.

    Returns:
        A scalar, or `[T]` with `per_task`.
    """
    returns = tf.reduce_sum(trajectories.rewards * trajectories.mask, -1)   # [T, B]
    episodes = trajectories.mask[..., 0]
    per = (tf.reduce_sum(returns * episodes, -1)
           / tf.maximum(tf.reduce_sum(episodes, -1), tf.ones([], episodes.dtype)))
    return per if per_task else tf.reduce_mean(per)
