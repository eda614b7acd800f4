"""2D point navigation (MAML paper §5.3): a batched environment in TensorFlow.

Every task is a goal position; an agent starts at the origin and moves by its
(clipped) action each step. The whole meta-batch steps at once: states are
`[num_tasks, num_trajectories, 2]` and goals `[num_tasks, 2]`, so a rollout is
a handful of tensor operations per time step, inside a graph loop.

An environment, for `tf_maml.rl.sample_trajectories`, is any object with

    observation_dim, action_dim, horizon, dtype
    sample_tasks(num_tasks, seed) -> tasks          # [num_tasks, ...]
    reset(tasks, num_trajectories, seed) -> state   # [num_tasks, num_trajectories, ...]
    observe(state) -> observations                  # [num_tasks, num_trajectories, obs_dim]
    step(tasks, state, action) -> (state, reward, done)   # reward, done: [num_tasks, num_trajectories]

pure functions of tensors (`tf_maml.rl.HalfCheetahGoals` keeps its
simulations in Python and steps them through `tf.numpy_function`).
"""

import tensorflow as tf

__all__ = ["Navigation2D"]


class Navigation2D:
    """Point navigation to a per-task goal in the plane.

    The original code's `PointEnvRandGoal` (rllab) and pytorch-maml-rl's
    `Navigation2DEnv`:

    * goal ~ U[`goal_low`, `goal_high`]² per task (default [-0.5, 0.5]²),
    * the agent starts at the origin; the observation is its position,
    * the action is clipped to [-`max_action`, `max_action`]² (default 0.1);
      with `normalized_actions` the policy acts in [-1, 1]² instead and the
      action is scaled by `max_action` after clipping,
    * next position = position + clipped (scaled) action,
    * reward = −‖next position − goal‖: the distance is measured **after** the
      move, as rllab's `PointEnv` computes it,
    * episodes last `horizon` steps (default 100). With `goal_radius` set, an
      episode also ends (done) once |x − gx| < r and |y − gy| < r, as the
      original's termination (r = 0.01); by default it never ends early, as the
      MAML paper's fixed-length episodes.

    The original launch script (`maml_trpo_point.py`) wraps the environment in
    rllab's `normalize`, which maps a policy action in [-1, 1] to [-0.1, 0.1]
    and clips it: `normalized_actions=True` reproduces that. Without it the
    action is clipped without rescaling (pytorch-maml-rl's convention), so the
    same Gaussian policy explores ten times wider relative to the action range
    (an initial standard deviation of 1 against a clip of 0.1).

    Args:
        horizon: steps per episode.
        goal_low, goal_high: range of each goal coordinate.
        max_action: bound of each action coordinate.
        goal_radius: None (fixed-length episodes) or the termination radius.
        normalized_actions: whether policy actions are in [-1, 1] units, scaled
            by `max_action` (rllab's `normalize`, the original code's setting).
        dtype: dtype of positions, goals and rewards.

    Example:

    ```python
    env = Navigation2D()
    goals = env.sample_tasks(20, tf.constant([0, 1], tf.int64))   # [20, 2]
    state = env.reset(goals, 10)                                   # [20, 10, 2]
    state, reward, done = env.step(goals, state, tf.ones([20, 10, 2]))
    ```
    """

    observation_dim = 2
    action_dim = 2

    def __init__(self, horizon=100, goal_low=-0.5, goal_high=0.5, max_action=0.1,
                 goal_radius=None, normalized_actions=False, dtype=tf.float32):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = int(horizon)
        self.goal_low = goal_low
        self.goal_high = goal_high
        self.max_action = max_action
        self.goal_radius = goal_radius
        self.normalized_actions = bool(normalized_actions)
        self.dtype = tf.as_dtype(dtype)

    @property
    def ends_early(self):
        """Whether an episode can end before the horizon (with `goal_radius`)."""
        return bool(self.goal_radius)

    @property
    def action_bound(self):
        """The largest useful policy action per coordinate: 1 if normalized, else `max_action`."""
        return 1.0 if self.normalized_actions else self.max_action

    def sample_tasks(self, num_tasks, seed):
        """Goals `[num_tasks, 2]`, a pure function of `seed` (a `[2]` integer tensor)."""
        return tf.random.stateless_uniform([num_tasks, 2], seed, self.goal_low, self.goal_high,
                                           dtype=self.dtype)

    def reset(self, tasks, num_trajectories, seed=None):
        """Initial positions (the origin), `[num_tasks, num_trajectories, 2]`; `seed` is unused."""
        del seed
        return tf.zeros(tf.stack([tf.shape(tasks)[0], num_trajectories, 2]), self.dtype)

    def observe(self, state):
        """The observation of a state: the position."""
        return state

    def step(self, tasks, state, action):
        """One step of every trajectory of every task.

        Args:
            tasks: goals `[num_tasks, 2]`.
            state: positions `[num_tasks, num_trajectories, 2]`.
            action: `[num_tasks, num_trajectories, 2]` in policy units, clipped
                (and with `normalized_actions`, scaled) here.

        Returns:
            `(next_state, reward, done)`; `reward` and `done` (bool) are
            `[num_tasks, num_trajectories]`.
        """
        bound = self.action_bound
        action = tf.clip_by_value(tf.cast(action, self.dtype), -bound, bound)
        if self.normalized_actions:
            action = action * self.max_action
        next_state = state + action
        offset = next_state - tasks[:, None, :]
        reward = -tf.norm(offset, axis=-1)
        if self.goal_radius is None:
            done = tf.zeros(tf.shape(reward), tf.bool)
        else:
            done = tf.reduce_all(tf.abs(offset) < self.goal_radius, axis=-1)
        return next_state, reward, done

    def oracle_returns(self, tasks, horizon=None):
        """Each task's return of the oracle that sees the goal: straight to it, full speed.

        The action is the (clipped) offset to the goal; with rewards measured
        after the move, this is the best return a policy can get (about −0.5
        on average over U[-0.5, 0.5]² goals with the defaults).

        Args:
            tasks: goals `[num_tasks, 2]`.
            horizon: steps (default `self.horizon`).

        Returns:
            `[num_tasks]` undiscounted returns (one deterministic episode each).
        """
        tasks = tf.convert_to_tensor(tasks, self.dtype)
        state = self.reset(tasks, 1)
        total = tf.zeros(tf.shape(tasks)[:1], self.dtype)
        alive = tf.ones(tf.shape(tasks)[:1], self.dtype)
        for _ in range(self.horizon if horizon is None else int(horizon)):
            offset = tasks[:, None, :] - state
            if self.normalized_actions:
                offset = offset / self.max_action
            state, reward, done = self.step(tasks, state, offset)
            total += alive * reward[:, 0]
            alive *= 1.0 - tf.cast(done[:, 0], self.dtype)
        return total
