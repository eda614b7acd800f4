"""MAML for reinforcement learning (Finn et al., 2017, §5.3): policy gradients over the core.

A meta-iteration, all in one graph (no Python per environment step):

1. sample a meta-batch of tasks (goals) from `(seed, iteration)`;
2. roll out `fast_batch_size` episodes per task with θ, fit each task's linear
   baseline, compute advantages;
3. adapt: `tf_maml.core.adapt` on the REINFORCE task loss closure with
   `core.SGD(inner_lr)`; with several inner steps, the closure samples new
   episodes with the policy after each step, as the original code does;
4. roll out episodes with every task's adapted policy ("validation" episodes);
5. outer update of θ (and the log-std): TRPO on the adapted policies'
   surrogate with the KL's Hessian through the inner update, or the plain
   meta-gradient for Adam.

The inner loop is the core's: the policy-gradient loss is one more task loss
closure (`tf_maml.rl.objectives.reinforce_loss`).
"""

import collections
import math

import keras
import numpy as np
import tensorflow as tf

from tf_maml import core
from tf_maml.rl import objectives, trpo
from tf_maml.rl.advantages import process_trajectories
from tf_maml.rl.policy import GaussianPolicy
from tf_maml.rl.sampler import average_return, sample_trajectories
from tf_maml.tasks.episodes import check_positive_ints

__all__ = ["MAMLRL", "MetaBatch", "VALIDATION_SEED", "TEST_SEED"]

# `MAMLRL.evaluate` seed indices of the validation during training and of the final evaluation
# (disjoint streams, neither used in training); evaluation needs them without the trainer.
VALIDATION_SEED = 1
TEST_SEED = 0


class MetaBatch(collections.namedtuple("MetaBatch", ["tasks", "train", "valid", "adapted"])):
    """What a meta-iteration sampled.

    Fields:
        tasks: the tasks `[num_tasks, ...]`.
        train: list of processed `Trajectories`, one per inner step (entry s
            sampled with the policy after s inner steps).
        valid: processed `Trajectories` sampled with the adapted policies.
        adapted: the adapted weights the validation episodes were sampled
            with (constants).
    """


def _check_policy_fits(policy, env):
    """A one-line `ValueError` where the policy's sizes are not the environment's."""
    env_name = type(env).__name__
    action_dim = getattr(env, "action_dim", None)
    if action_dim is not None and policy.action_dim != action_dim:
        raise ValueError(f"the policy outputs {policy.action_dim} action values but {env_name} "
                         f"takes {action_dim}: build it for env.action_dim")
    observation_dim = getattr(env, "observation_dim", None)
    try:
        model_input = policy.model.inputs[0].shape[-1]
    except (AttributeError, IndexError, ValueError, TypeError):
        model_input = None  # a subclassed model: nothing to compare before it runs
    if observation_dim is not None and model_input is not None and model_input != observation_dim:
        raise ValueError(f"the policy takes observations of size {model_input} but {env_name}'s "
                         f"are {observation_dim}: build it for env.observation_dim")


def _check_sizes(**sizes):
    """Raises ValueError unless each `name=(value, minimum)` is an integer >= its minimum."""
    for name, (value, minimum) in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            kind = "a positive integer" if minimum == 1 else "an integer >= 0"
            raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_rates(**rates):
    """Raises ValueError unless each `name=(value, low, high)` is a number in (low, high]
    (`high` None: unbounded; inner_lr may also be 0)."""
    for name, (value, low, high) in rates.items():
        ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > low or (name == "inner_lr" and value == 0))
        ok = ok and (high is None or value <= high)
        ok = ok and (name != "backtrack_ratio" or value < 1)
        if not ok:
            bound = f"in ({low}, {high}]" if high is not None else "positive and finite"
            raise ValueError(f"{name} must be a number {bound}, got {value!r}")


class MAMLRL:
    """MAML with policy gradients: REINFORCE inner loop, TRPO (or Adam) outer loop.

    Meta-parameters (`meta_variables`) are the policy model's trainable
    weights, then its log-std (`extra_variables`); all adapt in the inner loop.

    `meta_step(iteration)` follows the supervised algorithms' contract
    (`loss, grads_or_update, logs`), so one training loop drives both: with
    `outer="adam"`, `grads_or_update` are meta-gradients for `make_optimizer()`
    (Adam with `meta_lr`); with `outer="trpo"`, it is θ − θ_new, the TRPO step
    expressed as a gradient for `make_optimizer()`'s plain SGD with rate 1
    (θ ← θ − 1·(θ − θ_new) = θ_new; zero when the line search rejected every
    step), as Reptile returns its update.

    Args:
        env: a batched environment (e.g. `Navigation2D()`).
        policy: a `GaussianPolicy`, or a Keras mean model (wrapped in one,
            log-std initialized to 0).
        meta_batch_size: tasks per meta-iteration (paper: 20 for navigation).
        fast_batch_size: episodes per task and per sampling (paper: 20; with
            `sample_by_steps`, that many full-length episodes' steps).
        sample_by_steps: collect `fast_batch_size × horizon` environment steps
            per task and sampling instead of `fast_batch_size` episodes, as
            the original code's samplers: where episodes end early (at the
            goal), more of them fit, up to `max_episodes_factor ×
            fast_batch_size`. The same for evaluation's episodes per step.
            Environments whose episodes never end early (an `ends_early`
            attribute that is False) sample as without it.
        max_episodes_factor: with `sample_by_steps`, the most episodes per
            task and sampling in units of the budget's full-length episodes
            (the original had no cap; 4 binds once episodes average under a
            quarter of the horizon: then the budget is not filled). Sampling,
            baseline fit and returns run over every slot; the losses over
            the valid steps alone.
        inner_lr: the inner step size α (the MAML paper's text gives 0.1 for
            navigation; the original launch script uses 0.5).
        num_inner_steps: inner policy-gradient steps, each on episodes
            sampled with the policy after the previous steps; 0 trains the
            paper's "pretrained" baseline: one policy on all tasks jointly,
            with the same outer optimizer (its episodes are the "validation"
            ones).
        first_order: hold the inner gradients constant (first-order MAML).
        gamma: discount.
        gae_lambda: GAE's λ (1: return minus baseline, the original's).
        baseline_reg: ridge coefficient of the linear baseline (None: no baseline).
        normalize_advantages: normalize advantages per task.
        outer: "trpo" or "adam".
        max_kl: TRPO's trust region δ.
        cg_iterations, cg_damping: TRPO's conjugate gradient.
        backtrack_ratio, max_backtracks: TRPO's line search.
        meta_lr: Adam's learning rate (outer="adam").
        horizon: steps per episode (default `env.horizon`).
        seed: the run's seed; a meta-iteration is a pure function of
            `(seed, iteration)` and θ.

    Raises:
        ValueError: a bad `outer` or `num_inner_steps`, or a policy whose
            observation or action size is not the environment's.

    Example:

    ```python
    env = Navigation2D()
    algorithm = MAMLRL(env, gaussian_mlp_policy(2, 2), inner_lr=0.1)
    train_step = algorithm.make_train_step()
    for iteration in range(100):
        logs = train_step(tf.constant(iteration, tf.int64))
    print(algorithm.evaluate(seed=1, num_tasks=40))   # returns after 0..3 steps
    ```
    """

    name = "maml_rl"

    def __init__(self, env, policy, meta_batch_size=20, fast_batch_size=20, inner_lr=0.1,
                 num_inner_steps=1, first_order=False, gamma=0.99, gae_lambda=1.0,
                 baseline_reg=1e-5, normalize_advantages=True, outer="trpo", max_kl=0.01,
                 cg_iterations=10, cg_damping=1e-5, backtrack_ratio=0.8, max_backtracks=15,
                 meta_lr=1e-3, horizon=None, seed=0, sample_by_steps=False,
                 max_episodes_factor=4):
        if outer not in ("trpo", "adam"):
            raise ValueError(f"outer must be 'trpo' or 'adam', got {outer!r}")
        _check_sizes(meta_batch_size=(meta_batch_size, 1), fast_batch_size=(fast_batch_size, 1),
                     num_inner_steps=(num_inner_steps, 0), cg_iterations=(cg_iterations, 1),
                     max_backtracks=(max_backtracks, 1),
                     horizon=(env.horizon if horizon is None else horizon, 1))
        _check_rates(inner_lr=(inner_lr, 0, None), max_kl=(max_kl, 0, None),
                     meta_lr=(meta_lr, 0, None), gamma=(gamma, 0, 1),
                     gae_lambda=(gae_lambda, 0, 1), backtrack_ratio=(backtrack_ratio, 0, 1))
        if not isinstance(policy, GaussianPolicy):
            policy = GaussianPolicy(policy)
        _check_policy_fits(policy, env)
        self.env = env
        self.policy = policy
        self.meta_batch_size = int(meta_batch_size)
        self.fast_batch_size = int(fast_batch_size)
        self.inner_lr = inner_lr
        self.num_inner_steps = int(num_inner_steps)
        self.first_order = first_order
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.baseline_reg = baseline_reg
        self.normalize_advantages = normalize_advantages
        self.outer = outer
        self.max_kl = max_kl
        self.cg_iterations = int(cg_iterations)
        self.cg_damping = cg_damping
        self.backtrack_ratio = backtrack_ratio
        self.max_backtracks = int(max_backtracks)
        self.meta_lr = meta_lr
        self.horizon = int(env.horizon if horizon is None else horizon)
        self.seed = int(seed)
        self.sample_by_steps = bool(sample_by_steps)
        _check_sizes(max_episodes_factor=(max_episodes_factor, 1))
        self.max_episodes_factor = int(max_episodes_factor)
        self._evaluators = {}
        # Checkpointed beside the model (as the supervised algorithms' `state`).
        self.state = tf.Module(name=f"{self.name}_state")
        self.state.meta_parameters = [self.policy.log_std]

    # -- meta-parameters ------------------------------------------------------------------------

    @property
    def model(self):
        """The policy's mean model."""
        return self.policy.model

    @property
    def forward(self):
        """The mean model's task-batched forward (`tf_maml.functional.make_forward`)."""
        return self.policy.forward

    @property
    def extra_variables(self):
        """Meta-parameters beyond the model's weights: the log-std."""
        return [self.policy.log_std]

    @property
    def state_variables(self):
        """State that is not meta-learned: none (as `MAML.state_variables`)."""
        return []

    @property
    def saved_variables(self):
        """What is checkpointed and exported besides the model (as `MAML.saved_variables`)."""
        return self.extra_variables

    @property
    def meta_variables(self):
        """Everything the outer loop updates: the model's weights, then the log-std."""
        return self.policy.variables

    # -- seeds ----------------------------------------------------------------------------------

    def _seed(self, stream, index):
        base = tf.constant([self.seed, stream], tf.int64)
        return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))

    def iteration_seeds(self, iteration):
        """`(task_seed, rollout_seed)` of a meta-iteration (training stream)."""
        seed = self._seed(0, iteration)
        return (tf.random.experimental.stateless_fold_in(seed, 0),
                tf.random.experimental.stateless_fold_in(seed, 1))

    # -- sampling and adaptation ----------------------------------------------------------------

    def inner_update(self, inner_lr=None, per_step=False):
        """The inner update rule: `core.SGD(α)`."""
        return core.SGD(self.inner_lr if inner_lr is None else inner_lr, per_step=per_step)

    def process(self, trajectories):
        """Adds the run's advantages to `Trajectories` (returns, baseline, GAE, normalization).

        `process_trajectories` with the run's γ, GAE λ, baseline ridge
        coefficient and normalization: what training does to every sampled
        batch, and what the policy export does to a request's episodes.
        """
        return process_trajectories(trajectories, self.gamma, self.gae_lambda, self.baseline_reg,
                                    self.normalize_advantages)

    @property
    def by_steps(self):
        """Whether samplings count steps: `sample_by_steps` and episodes that can end early."""
        return self.sample_by_steps and getattr(self.env, "ends_early", True)

    def max_valid_steps(self, num_trajectories=None):
        """The most valid steps per task of a sampling (None: not `by_steps`).

        A step budget of n × H keeps episodes that begin before it is spent:
        at most n·H − 1 + H steps.
        """
        if not self.by_steps:
            return None
        num_trajectories = self.fast_batch_size if num_trajectories is None else num_trajectories
        return (num_trajectories + 1) * self.horizon - 1

    def sample_batch(self, weights, tasks, seed, num_trajectories=None):
        """Episodes of every task with task-batched `weights`, with advantages.

        `num_trajectories` (default `fast_batch_size`) episodes per task, or
        with `sample_by_steps` as many as `num_trajectories × horizon` steps
        hold (at most `max_episodes_factor` times as many).
        """
        num_trajectories = self.fast_batch_size if num_trajectories is None else num_trajectories
        factor, budget = ((self.max_episodes_factor, num_trajectories * self.horizon)
                          if self.by_steps else (1, None))
        return self.process(sample_trajectories(
            self.env, self.policy, weights, tasks, num_trajectories * factor, seed,
            self.horizon, max_steps=budget))

    def _for_losses(self, batch, num_trajectories=None):
        """`batch` packed to its valid steps when sampled by steps (see `pack_valid_steps`)."""
        size = self.max_valid_steps(num_trajectories)
        return batch if size is None else objectives.pack_valid_steps(batch, size)

    def sample_adapting(self, params, tasks, seed, num_steps, update, num_trajectories=None):
        """Samples, adapts and samples again, `num_steps` times, through `core.adapt`.

        The task loss closure given to `core.adapt` samples episodes with the
        weights it is called at (held constant), then returns their REINFORCE
        loss: step s's gradient is estimated from episodes of the policy after
        s steps, as the original code. No gradient flows to `params`.

        Returns:
            `(batches, adapted)`: `num_steps + 1` processed `Trajectories`
            (the last sampled with the adapted policies) and the adapted weights.
        """
        weights = core.broadcast_to_tasks([tf.stop_gradient(p) for p in params],
                                          tf.shape(tasks)[0])
        batches = []

        def sampling_loss(weights, step):
            batch = self.sample_batch(weights, tasks,
                                      tf.random.experimental.stateless_fold_in(seed, step),
                                      num_trajectories)
            batches.append(batch)
            return objectives.reinforce_loss(
                self.policy, self._for_losses(batch, num_trajectories))(weights, step)

        adapted, _ = core.adapt(sampling_loss, weights, num_steps, update, first_order=True)
        adapted = [tf.stop_gradient(w) for w in adapted]
        batches.append(self.sample_batch(
            adapted, tasks, tf.random.experimental.stateless_fold_in(seed, num_steps),
            num_trajectories))
        return batches, adapted

    def sample(self, params, tasks, seed):
        """The `MetaBatch` of a meta-iteration: training episodes per inner step, validation episodes."""
        batches, adapted = self.sample_adapting(params, tasks, seed, self.num_inner_steps,
                                                self.inner_update())
        return MetaBatch(tasks, batches[:-1], batches[-1], adapted)

    def adapt(self, params, train, first_order=None, num_tasks=None, inner_lr=None):
        """Adapts θ (`params`, differentiably) on fixed training episodes; returns adapted weights.

        One REINFORCE step per entry of `train` (processed `Trajectories`),
        through `core.adapt` with `inner_update(inner_lr)`. With no training
        episodes (`num_inner_steps=0`), returns θ broadcast to `num_tasks` tasks.

        Args:
            params: the meta-parameters (`meta_variables` or tensors in their order).
            train: list of processed `Trajectories`, one per inner step.
            first_order: hold the inner gradients constant (default: the run's).
            num_tasks: tasks (default: read from `train`).
            inner_lr: the step size (default: the run's α); a float or scalar tensor.
        """
        first_order = self.first_order if first_order is None else first_order
        if num_tasks is None:
            num_tasks = tf.shape(train[0].mask)[0]
        weights = core.broadcast_to_tasks(params, num_tasks)
        adapted, _ = core.adapt(objectives.reinforce_loss(self.policy, train), weights,
                                len(train), self.inner_update(inner_lr), first_order)
        return adapted

    # -- meta-objective -------------------------------------------------------------------------

    def outer_objective(self, meta_batch, first_order=None):
        """TRPO's objective of a meta-batch, a function of the meta-parameters.

        Returns:
            `objective(params) -> (loss, kl, aux)`: `loss` is the mean over
            tasks of the adapted policies' surrogate
            `−mean(exp(log π_θ'(a|s) − log π_old(a|s)) · A)` on the validation
            episodes, `kl` the mean over tasks of `mean KL(π_old ‖ π_θ')`, where
            θ' = adapt(θ) (second order unless `first_order`) and π_old the
            policies that sampled them; `aux` holds the per-task surrogate.
            With `sample_by_steps`, the meta-batch must come from `sample`
            (`fast_batch_size`'s step budget: the losses pack that many steps).
        """
        # Packed once here, not in every call of the objective (TRPO's line search).
        train = [self._for_losses(b) for b in meta_batch.train]
        valid = objectives.flatten_time(self._for_losses(meta_batch.valid))
        old_mean, old_log_std = self.policy.distribution(meta_batch.adapted, valid.observations)
        old_mean, old_log_std = tf.stop_gradient(old_mean), tf.stop_gradient(old_log_std)

        def objective(params):
            adapted = self.adapt(list(params), train, first_order,
                                 tf.shape(meta_batch.tasks)[0])
            surrogate, kl = objectives.surrogate_and_kl(self.policy, adapted, valid, old_mean,
                                                        old_log_std)
            return tf.reduce_mean(surrogate), tf.reduce_mean(kl), {"task_surrogate": surrogate}

        return objective

    def meta_step(self, iteration):
        """A whole meta-iteration: sampling, adaptation, outer step. Pure; call it in a `tf.function`.

        Args:
            iteration: the meta-iteration (integer scalar); with the seed, it
                determines the tasks and every action noise.

        Returns:
            `(loss, grads_or_update, logs)`: `loss` is the meta-objective (the
            surrogate) before the step; `grads_or_update` is a list matching
            `meta_variables` (meta-gradients for Adam, θ − θ_new for TRPO; see
            the class docstring); `logs` a dict of scalars: `return_before`,
            `return_after` (average undiscounted returns before and after
            adaptation), `policy_std` (the meta-policy's action std, averaged
            over the action's dimensions), `loss_after`, `kl`, `accepted`,
            `backtracks`, `step_size` (TRPO), `env_steps`.
        """
        iteration = tf.convert_to_tensor(iteration)
        task_seed, rollout_seed = self.iteration_seeds(iteration)
        tasks = self.env.sample_tasks(self.meta_batch_size, task_seed)
        params = [tf.convert_to_tensor(v) for v in self.meta_variables]
        meta_batch = self.sample(params, tasks, rollout_seed)
        objective = self.outer_objective(meta_batch)
        dtype = params[0].dtype
        steps = sum(tf.reduce_sum(b.mask) for b in meta_batch.train + [meta_batch.valid])
        before = meta_batch.train[0] if meta_batch.train else meta_batch.valid
        logs = {"return_before": average_return(before),
                "return_after": average_return(meta_batch.valid),
                # The exploration noise, which the control cost charges for (0.15 a step at std 1).
                "policy_std": tf.reduce_mean(tf.exp(tf.convert_to_tensor(self.policy.log_std))),
                "env_steps": tf.cast(steps, tf.int64)}
        if self.outer == "trpo":
            new_params, info = trpo.trpo_step(
                objective, params, self.max_kl, self.cg_iterations, self.cg_damping,
                self.backtrack_ratio, self.max_backtracks)
            update = [p - n for p, n in zip(params, new_params)]
            loss = info.loss_before
            logs.update(loss_after=info.loss_after, kl=info.kl_after,
                        accepted=tf.cast(info.accepted, dtype),
                        backtracks=tf.cast(info.num_backtracks, dtype),
                        step_size=info.step_size)
        else:
            loss, update, _ = core.meta_gradients(
                lambda ps: (objective(ps)[0], ()), params)
        logs["loss"] = loss
        return loss, update, logs

    def make_optimizer(self, meta_lr=None):
        """The optimizer `meta_step`'s second output is meant for (see the class docstring)."""
        if self.outer == "trpo":
            return keras.optimizers.SGD(1.0)
        return keras.optimizers.Adam(self.meta_lr if meta_lr is None else meta_lr)

    def make_train_step(self, optimizer=None, jit_compile=False):
        """A compiled `train_step(iteration) -> logs`: `meta_step` and the optimizer's update.

        Args:
            optimizer: default `make_optimizer()`.
            jit_compile: compile with XLA.

        Returns:
            A `tf.function` of an int64 scalar iteration.
        """
        optimizer = self.make_optimizer() if optimizer is None else optimizer
        variables = self.meta_variables
        optimizer.build(variables)

        @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
        def train_step(iteration):
            _, update, logs = self.meta_step(iteration)
            optimizer.apply_gradients(zip(update, variables))
            return logs

        train_step.optimizer = optimizer
        return train_step

    # -- evaluation -----------------------------------------------------------------------------

    def step_sizes(self, num_steps, step_sizes=None):
        """The evaluation schedule: α for the first step, α/2 for later ones (the original's)."""
        if step_sizes is not None:
            sizes = list(step_sizes)
            if len(sizes) < max(num_steps, 1):
                sizes += [sizes[-1]] * (max(num_steps, 1) - len(sizes))
            return sizes[:max(num_steps, 1)]
        return [self.inner_lr] + [self.inner_lr / 2] * (max(num_steps, 1) - 1)

    def evaluation_tasks(self, seed=0, num_tasks=40):
        """The tasks `evaluate(seed, num_tasks=num_tasks)` samples (never used in training)."""
        return self.env.sample_tasks(num_tasks, tf.random.experimental.stateless_fold_in(
            self._seed(1, seed), 0))

    def evaluate(self, seed=0, tasks=None, num_tasks=40, num_steps=3, step_sizes=None,
                 num_trajectories=None, per_task=False):
        """Average return after 0, 1, ..., `num_steps` policy-gradient steps on new tasks.

        Each step samples `num_trajectories` episodes per task (with
        `sample_by_steps`, that many episodes' worth of steps) with the current
        adapted policy (its return is recorded) and takes a REINFORCE step
        through `core.adapt`; the last policy is sampled once more.

        Args:
            seed: tasks (unless given) and action noise come from this seed,
                on a stream disjoint from training's.
            tasks: the tasks (e.g. goals `[num_tasks, 2]`); default sampled.
            num_tasks: tasks to sample when `tasks` is None.
            num_steps: gradient steps.
            step_sizes: the step size of each step (default α, then α/2).
            num_trajectories: episodes per task and step (default `fast_batch_size`;
                with `sample_by_steps`, that many full-length episodes' steps).
            per_task: return every task's average return rather than the mean.

        Returns:
            A numpy array `[num_steps + 1]` of average undiscounted returns
            (`[num_steps + 1, num_tasks]` with `per_task`).

        Example:

        ```python
        returns = algorithm.evaluate(seed=7, num_tasks=40)   # [4]: 0, 1, 2, 3 steps
        ```
        """
        num_trajectories = self.fast_batch_size if num_trajectories is None else num_trajectories
        check_positive_ints("MAMLRL.evaluate", num_trajectories=num_trajectories,
                            **({"num_tasks": num_tasks} if tasks is None else {}))
        sizes = tuple(float(s) for s in self.step_sizes(num_steps, step_sizes))
        key = (num_steps, sizes, int(num_trajectories), bool(per_task), self.by_steps,
               self.max_episodes_factor)
        if key not in self._evaluators:
            update = self.inner_update(tf.constant(sizes, self.policy.dtype), per_step=True)

            @tf.function(reduce_retracing=True, autograph=False)
            def run(tasks, seed):
                params = [tf.convert_to_tensor(v) for v in self.meta_variables]
                batches, _ = self.sample_adapting(params, tasks, seed, num_steps, update,
                                                  num_trajectories)
                return tf.stack([average_return(b, per_task) for b in batches])

            self._evaluators[key] = run
        if tasks is None:
            tasks = self.evaluation_tasks(seed, num_tasks)
        else:
            expected = self.env.sample_tasks(1, tf.constant([0, 0], tf.int64)).shape[1:]
            if (np.ndim(tasks) < 1 or len(tasks) < 1
                    or not tf.TensorShape(np.shape(tasks)[1:]).is_compatible_with(expected)):
                raise ValueError(f"tasks must be [num_tasks{''.join(f', {d}' for d in expected)}]"
                                 f" for {type(self.env).__name__} (num_tasks >= 1), got shape "
                                 f"{list(np.shape(tasks))}")
        seed = self._seed(1, seed)
        rollout_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        return np.asarray(self._evaluators[key](tf.convert_to_tensor(tasks, self.env.dtype),
                                                rollout_seed))
