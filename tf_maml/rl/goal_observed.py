"""The oracle's environment: observations that end with the task's goal (paper §5.3, Fig. 5).

The MAML paper's oracle is a policy that "receives the parameters of the task as input":
trained on all tasks jointly, it needs no adaptation, and its return bounds what adaptation
can reach. `GoalObserved` wraps a batched environment so that every observation carries the
task; training it with `num_inner_steps=0` (`--goal_observed`, `flags/rl_*_oracle.flags`)
gives that policy, and `evaluate --oracle_dir` reports it beside the run.
"""

import inspect

import tensorflow as tf

__all__ = ["GoalObserved"]


class GoalObserved:
    """A batched environment whose observations end with their task's parameters.

    Tasks, dynamics, rewards and episode ends are the wrapped environment's;
    each observation `[..., obs_dim]` becomes `[..., obs_dim + task_dim]`
    with the task appended: the goal position (2 numbers) for `Navigation2D`,
    the goal velocity or the direction (1 number) for `HalfCheetahGoals`.
    Every other attribute (`action_dim`, `horizon`, `dtype`, `close`, ...)
    is the wrapped environment's.

    Args:
        env: a batched environment (see `tf_maml.rl.navigation`) whose tasks
            are `[num_tasks]` or `[num_tasks, task_dim]` numbers.

    Raises:
        ValueError: tasks of another rank.

    Example:

    ```python
    env = GoalObserved(Navigation2D())
    policy = GaussianPolicy(gaussian_mlp_policy(env.observation_dim, env.action_dim))
    oracle = MAMLRL(env, policy, num_inner_steps=0)   # trained on all goals jointly
    ```
    """

    def __init__(self, env):
        self.env = env
        example = env.sample_tasks(1, tf.constant([0, 0], tf.int64))
        if example.shape.rank not in (1, 2):
            raise ValueError(f"GoalObserved needs tasks of shape [num_tasks] or [num_tasks, d], "
                             f"got {example.shape}")
        self.task_dim = 1 if example.shape.rank == 1 else int(example.shape[1])
        self.observation_dim = env.observation_dim + self.task_dim
        self._reset_takes_seed = "seed" in inspect.signature(env.reset).parameters

    def __getattr__(self, name):
        if name == "env":   # not set yet (during unpickling, say): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def _goals(self, tasks, observations):
        goals = tf.reshape(tf.cast(tasks, observations.dtype), [-1, 1, self.task_dim])
        return tf.broadcast_to(goals, tf.concat([tf.shape(observations)[:2], [self.task_dim]], 0))

    def reset(self, tasks, num_trajectories, seed=None):
        """The wrapped environment's initial state, with the tasks kept beside it."""
        if self._reset_takes_seed:
            state = self.env.reset(tasks, num_trajectories, seed=seed)
        else:
            state = self.env.reset(tasks, num_trajectories)
        return state, tf.convert_to_tensor(tasks)

    def observe(self, state):
        """The wrapped environment's observation with the task appended."""
        inner, tasks = state
        observations = self.env.observe(inner)
        return tf.concat([observations, self._goals(tasks, observations)], -1)

    def step(self, tasks, state, action):
        """The wrapped environment's step; the tasks stay in the state."""
        inner, kept = state
        inner, reward, done = self.env.step(tasks, inner, action)
        return (inner, kept), reward, done
