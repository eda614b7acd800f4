"""HalfCheetah goal velocity and goal direction (MAML paper §5.3) on Gymnasium and MuJoCo.

The locomotion tasks of the paper, as batched environments for
`tf_maml.rl.sample_trajectories`: every trajectory of every task is one
Gymnasium `HalfCheetah-v5` in a `gymnasium.vector.SyncVectorEnv`, stepped
from inside the graph loop through `tf.numpy_function`. The reward is computed
here, in TensorFlow, from the forward velocity MuJoCo reports and the action,
with each task's own goal:

* velocity: `-|forward velocity - v| - 0.05 ‖a‖²`, v ~ U[0, 2] per task,
* direction: `d · forward velocity - 0.05 ‖a‖²`, d = ±1 per task,

as the original code's rllab environments (`HalfCheetahEnvRand`,
`HalfCheetahEnvRandDirec`). Actions are clipped to [-1, 1]⁶ (rllab's
`normalize` over the same action box). Returns are not comparable with the
paper's: see "Meta-RL" in the README for how the dynamics differ from rllab's.

Needs the optional extra: `pip install -e ".[rl]"` (gymnasium[mujoco]).
"""

import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml.config import MissingExtraError

__all__ = ["HalfCheetahGoals", "LOCOMOTION_TASKS", "MissingExtraError"]

LOCOMOTION_TASKS = ("velocity", "direction")
INSTALL_HINT = 'the HalfCheetah environments need Gymnasium and MuJoCo: pip install -e ".[rl]"'


def _import_simulator():
    """Gymnasium (MuJoCo checked too), or `MissingExtraError` with the install line."""
    try:
        import gymnasium  # noqa: PLC0415 -- the optional extra
        import mujoco  # noqa: F401, PLC0415
    except ImportError as e:
        raise MissingExtraError(f"{INSTALL_HINT} ({e})") from None
    return gymnasium


_SEEN_WARNINGS = set()


def _log_mujoco_warnings_once():
    """Sends MuJoCo's warnings to the log, once per distinct message, from now on.

    MuJoCo's default handler prints every warning and appends it to
    `MUJOCO_LOG.TXT` in the working directory; building hundreds of
    HalfCheetah models would repeat the model's deprecation warning hundreds of
    times, in the user's repository. This replaces MuJoCo's process-wide
    warning handler (`mujoco.set_mju_user_warning`); instabilities are not
    missed: `HalfCheetahGoals` checks every simulation's warning counters.
    """
    import mujoco  # noqa: PLC0415 -- the optional extra

    def warn(message):
        if message not in _SEEN_WARNINGS:
            _SEEN_WARNINGS.add(message)
            # Gymnasium's half_cheetah.xml uses a compiler attribute MuJoCo 3 deprecates:
            # nothing a user can act on, so it is information, not a warning.
            log = logging.info if "deprecated" in message else logging.warning
            log("MuJoCo: %s", message)

    mujoco.set_mju_user_warning(warn)


class HalfCheetahGoals:
    """HalfCheetah with a goal velocity or direction per task, many episodes at once.

    Implements the batched-environment interface of `tf_maml.rl.navigation`:
    the state of a trajectory lives in its MuJoCo simulation; the tensor the
    sampler carries is the observation (17 numbers: joint positions without
    the x coordinate, and velocities; with `rllab_halfcheetah`, 20: the
    torso's centre of mass follows). One vector environment per batch size
    (tasks × episodes) is created on first use and kept (about 1 MB per
    simulation; `close()` frees them).

    Not thread-safe: rollouts of the same batch size share simulations, so
    run one rollout at a time per environment object (as training and
    evaluation do); give each thread its own `HalfCheetahGoals`.

    Args:
        task: "velocity" (goal velocity ~ U[`velocity_low`, `velocity_high`])
            or "direction" (forward or backward, ±1).
        horizon: steps per episode (the paper: 200).
        frame_skip: MuJoCo steps of 0.01 s per action. 1 (default) is the
            time step of the original rllab model, 0.01 s per action;
            Gymnasium's own default is 5.
        velocity_low, velocity_high: range of goal velocities.
        control_cost: weight of ‖a‖² in the reward (the original's 0.05).
        rllab_halfcheetah: the original rllab environment on Gymnasium's model:
            observations end with the torso's centre of mass (its subtree's,
            x included: 20 numbers), the reward's forward velocity is the
            centre of mass's (MuJoCo's `subtree_linvel`, as rllab's
            `get_body_comvel`) rather than the root's finite difference, and
            resets draw qpos + 0.01·N(0, 1) and qvel + 0.1·N(0, 1) (Gymnasium:
            qpos + U(-0.1, 0.1)). About 1.2× the time per simulation step
            (MuJoCo's kinematics and centre-of-mass passes again at the new
            state, the part of rllab's `model.forward()` these need).
        env_id: the Gymnasium environment (default "HalfCheetah-v5").
        dtype: dtype of observations and rewards.
        simulate: false builds an environment that only gives its sizes and
            goals (a policy export's), without Gymnasium and MuJoCo; stepping
            it then needs them.

    Raises:
        MissingExtraError: Gymnasium or MuJoCo is missing (an `ImportError`
            with the install line), with `simulate`.
        ValueError: an unknown task or a non-positive horizon; `rllab_halfcheetah`
            with a model that is not the half cheetah.

    Example:

    ```python
    env = HalfCheetahGoals("velocity")
    goals = env.sample_tasks(4, tf.constant([0, 1], tf.int64))       # [4] velocities
    obs = env.reset(goals, 2, tf.constant([0, 2], tf.int64))         # [4, 2, 17]
    obs, reward, done = env.step(goals, obs, tf.zeros([4, 2, 6]))
    ```
    """

    action_dim = 6
    # Episodes last the horizon (an unstable simulation stops the run instead).
    ends_early = False

    def __init__(self, task="velocity", horizon=200, frame_skip=1, velocity_low=0.0,
                 velocity_high=2.0, control_cost=0.05, rllab_halfcheetah=False,
                 env_id="HalfCheetah-v5", dtype=tf.float32, simulate=True):
        if task not in LOCOMOTION_TASKS:
            raise ValueError(f"task must be one of {', '.join(LOCOMOTION_TASKS)}, got {task!r}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if simulate:
            _import_simulator()
        self.task = task
        self.horizon = int(horizon)
        self.frame_skip = int(frame_skip)
        self.velocity_low, self.velocity_high = float(velocity_low), float(velocity_high)
        self.control_cost = float(control_cost)
        self.rllab_halfcheetah = bool(rllab_halfcheetah)
        self.observation_dim = 20 if self.rllab_halfcheetah else 17
        self.env_id = env_id
        self.dtype = tf.as_dtype(dtype)
        self._vectors = {}
        self._model_checked = False
        if simulate:
            self._check_model()

    # -- tasks ---------------------------------------------------------------------------------

    def sample_tasks(self, num_tasks, seed):
        """Goals `[num_tasks]` (velocities or ±1 directions), a pure function of `seed`."""
        if self.task == "velocity":
            return tf.random.stateless_uniform([num_tasks], seed, self.velocity_low,
                                               self.velocity_high, dtype=self.dtype)
        coin = tf.random.stateless_uniform([num_tasks], seed, dtype=self.dtype)
        return tf.where(coin < 0.5, tf.constant(-1.0, self.dtype), tf.constant(1.0, self.dtype))

    def original_test_goals(self, num_tasks=40):
        """The held-out goals of the original code's test scripts, `[num_tasks]`.

        `maml_examples/test_maml_cheetah.py` and `test_maml_cheetah_direc.py`
        (cbfinn/maml_rl) evaluate on `np.random.seed(1)` then
        `np.random.uniform(0.0, 2.0, size=(40,))`; the direction environment
        runs backward for a goal below 1 and forward otherwise. NumPy's legacy
        `RandomState` stream is frozen, so these are the scripts' numbers.
        """
        goals = np.random.RandomState(1).uniform(0.0, 2.0, size=(num_tasks,))
        if self.task == "direction":
            goals = np.where(goals < 1.0, -1.0, 1.0)
        return tf.constant(goals, self.dtype)

    # -- the simulations ---------------------------------------------------------------------

    def _vector(self, size):
        """The vector environment of `size` simulations (created once per size)."""
        vector = self._vectors.get(size)
        if vector is None:
            gym = _import_simulator()
            self._check_model()  # (not done yet where built with simulate=False)

            _log_mujoco_warnings_once()
            # Episodes end when the sampler stops (any horizon): no time limit wrapper, and
            # the vector never resets a simulation behind its back.
            envs = [gym.make(self.env_id, frame_skip=self.frame_skip,
                             disable_env_checker=True).unwrapped for _ in range(size)]
            vector = gym.vector.SyncVectorEnv([lambda env=env: env for env in envs],
                                              autoreset_mode=gym.vector.AutoresetMode.DISABLED)
            self._vectors[size] = vector
        return vector

    def _check_model(self):
        """`_check_rllab_model` once, where it applies."""
        if self.rllab_halfcheetah and not self._model_checked:
            self._check_rllab_model()
        self._model_checked = True

    def _check_rllab_model(self):
        """Raises ValueError unless `env_id`'s model is the half cheetah rllab observes."""
        import gymnasium as gym  # noqa: PLC0415
        import mujoco  # noqa: PLC0415

        _log_mujoco_warnings_once()
        env = gym.make(self.env_id, disable_env_checker=True).unwrapped
        model = env.model
        env.close()
        torso = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "torso")
        if torso < 0 or model.nq != 9 or model.nv != 9:
            raise ValueError(
                f"rllab_halfcheetah needs the half cheetah model (a 'torso' body, 9 position "
                f"and 9 velocity coordinates); {self.env_id} has "
                f"{'a' if torso >= 0 else 'no'} 'torso' body, nq={model.nq}, nv={model.nv}")

    def _check(self, vector, observations, where):
        """Observations as `dtype`; raises if any simulation went unstable.

        MuJoCo resets an unstable simulation itself (and counts a warning), so
        finite observations alone do not prove a step was sound.
        """
        import mujoco  # noqa: PLC0415

        kinds = [int(kind) for kind in (mujoco.mjtWarning.mjWARN_BADQPOS,
                                        mujoco.mjtWarning.mjWARN_BADQVEL,
                                        mujoco.mjtWarning.mjWARN_BADQACC)]
        unstable = not np.all(np.isfinite(observations))
        for env in vector.envs:
            warning = env.unwrapped.data.warning
            if any(warning[kind].number for kind in kinds):
                unstable = True
                break
        if unstable:
            raise RuntimeError(
                f"the {self.env_id} simulation became unstable during {where} (MuJoCo's "
                "accelerations, velocities or positions blew up); the policy's actions or the "
                "model are at fault")
        return observations.astype(self.dtype.as_numpy_dtype)

    def _py_reset(self, size, seed):
        vector = self._vector(int(size))
        seeds = np.random.SeedSequence([int(s) % 2**63 for s in seed]).generate_state(int(size))
        try:
            observations, _ = vector.reset(seed=[int(s) for s in seeds])
            if self.rllab_halfcheetah:
                observations = self._rllab_reset(vector, seeds)
        except Exception as e:   # a crashed simulation: say which, never hang
            raise RuntimeError(f"{self.env_id} failed to reset: {e}") from e
        return self._check(vector, observations, "reset")

    def _rllab_reset(self, vector, seeds):
        """rllab's reset noise (qpos + 0.01·N(0, 1), qvel + 0.1·N(0, 1)); its observations."""
        for env, seed in zip(vector.envs, seeds):
            noise = np.random.default_rng(int(seed))
            env.set_state(env.init_qpos + 0.01 * noise.standard_normal(env.model.nq),
                          env.init_qvel + 0.1 * noise.standard_normal(env.model.nv))
        return self._rllab_observe(vector)[0]

    def _rllab_observe(self, vector):
        """rllab's observations `[n, 20]` and centre-of-mass forward velocities `[n]`.

        Recomputes each simulation's centre of mass and its velocity at the new
        state (as rllab's `model.forward()` after every step did): Gymnasium's
        step leaves them at the state before the last integration.
        """
        import mujoco  # noqa: PLC0415

        observations = np.empty([len(vector.envs), 20])
        velocity = np.empty([len(vector.envs)])
        torso = mujoco.mj_name2id(vector.envs[0].model, mujoco.mjtObj.mjOBJ_BODY, "torso")
        for i, env in enumerate(vector.envs):
            model, data = env.model, env.data
            # What rllab's mj_forward computed that these observations need, and no more.
            mujoco.mj_kinematics(model, data)
            mujoco.mj_comPos(model, data)
            mujoco.mj_comVel(model, data)
            mujoco.mj_subtreeVel(model, data)
            observations[i, :8] = data.qpos[1:]
            observations[i, 8:17] = data.qvel
            observations[i, 17:] = data.subtree_com[torso]
            velocity[i] = data.subtree_linvel[torso, 0]
        return observations, velocity

    def _py_step(self, actions):
        vector = self._vectors[actions.shape[0]]
        try:
            observations, _, _, _, info = vector.step(actions.astype(np.float64))
            if self.rllab_halfcheetah:
                observations, velocity = self._rllab_observe(vector)
            else:
                velocity = info["x_velocity"]
        except Exception as e:
            raise RuntimeError(f"{self.env_id} failed to step: {e}") from e
        velocity = np.asarray(velocity, self.dtype.as_numpy_dtype)
        return self._check(vector, observations, "a step"), velocity

    # -- the interface ------------------------------------------------------------------------

    def reset(self, tasks, num_trajectories, seed=None):
        """Resets `num_tasks × num_trajectories` simulations; returns their observations.

        Args:
            tasks: goals `[num_tasks]`.
            num_trajectories: episodes per task.
            seed: `[2]` integer tensor; each simulation's initial noise is a pure
                function of it (default: a fixed seed).

        Returns:
            Observations `[num_tasks, num_trajectories, observation_dim]`.
        """
        tasks = tf.convert_to_tensor(tasks)
        seed = tf.constant([0, 0], tf.int64) if seed is None else tf.cast(seed, tf.int64)
        shape = tf.stack([tf.shape(tasks)[0], num_trajectories])
        size = tf.reduce_prod(shape)
        observations = tf.numpy_function(self._py_reset, [size, seed], self.dtype,
                                         name="halfcheetah_reset")
        observations = tf.reshape(observations, tf.concat([shape, [self.observation_dim]], 0))
        trajectories = num_trajectories if isinstance(num_trajectories, int) else None
        observations.set_shape([tasks.shape[0], trajectories, self.observation_dim])
        return observations

    def observe(self, state):
        """The observation of a state (the state the sampler carries is the observation)."""
        return state

    def step(self, tasks, state, action):
        """One step of every simulation; the reward is each task's goal reward.

        Args:
            tasks: goals `[num_tasks]`.
            state: observations `[num_tasks, num_trajectories, observation_dim]`.
            action: `[num_tasks, num_trajectories, 6]`, clipped to [-1, 1] here.

        Returns:
            `(observations, reward, done)`; `reward` and `done` (never true:
            episodes last the horizon) are `[num_tasks, num_trajectories]`.
        """
        action = tf.clip_by_value(tf.cast(action, self.dtype), -1.0, 1.0)
        batch_shape = tf.shape(action)[:2]
        flat = tf.reshape(action, [-1, self.action_dim])
        observations, velocity = tf.numpy_function(self._py_step, [flat],
                                                   (self.dtype, self.dtype),
                                                   name="halfcheetah_step")
        observations = tf.reshape(observations,
                                  tf.concat([batch_shape, [self.observation_dim]], 0))
        observations.set_shape(action.shape[:2].concatenate([self.observation_dim]))
        velocity = tf.reshape(velocity, batch_shape)
        velocity.set_shape(action.shape[:2])
        goal = tf.cast(tasks, self.dtype)[:, None]
        forward = -tf.abs(velocity - goal) if self.task == "velocity" else goal * velocity
        reward = forward - self.control_cost * tf.reduce_sum(tf.square(action), -1)
        return observations, reward, tf.zeros(tf.shape(reward), tf.bool)

    def close(self):
        """Closes every simulation."""
        for vector in self._vectors.values():
            vector.close()
        self._vectors.clear()
