"""Exports a meta-RL policy (`MAMLRL`) as a SavedModel that adapts to a request's episodes.

Signatures, one task per request (no task axis in the inputs):

* `serving_default`: `observations` `[n, obs_dim]` -> `action_mean`
  `[n, action_dim]` and `log_std` `[action_dim]` of the meta-initialization.
* `adapt`: one task's episodes, `observations` `[num_episodes, horizon,
  obs_dim]`, `actions` `[num_episodes, horizon, action_dim]`, `rewards`
  `[num_episodes, horizon]` and `lengths` `[num_episodes]` (int32, the valid
  steps of each episode, in [1, horizon]), and `query_observations`
  `[n, obs_dim]` -> `action_mean` `[n, action_dim]` and `log_std`
  `[action_dim]` of the policy after ONE policy-gradient (REINFORCE) step of
  the run's `inner_lr` on the episodes.
* `adapt_custom`: the same plus a scalar `inner_lr` (float32, >= 0).

Why one step: the evaluation protocol (`MAMLRL.evaluate`, the paper's Fig. 5)
adapts with α for the first step and samples new episodes with the adapted
policy before each later step, which a stateless request cannot do (and
further steps on the same episodes are not what the run was trained or
evaluated with). The export takes the protocol's first step; `adapt_custom`
chooses its size.

The step is the training inner loop's own code: the episodes become
`Trajectories` (mask from `lengths`), `MAMLRL.process` adds advantages
(`process_trajectories`: discounted returns, each task's linear feature
baseline fitted on its episodes, GAE with the run's γ and λ, per-task
normalization), and `MAMLRL.adapt` takes the step through `core.adapt` on
`objectives.reinforce_loss` with `core.SGD(inner_lr)`.

A policy trained with `goal_observed` (the oracle) reads the task's goal in
the last `export_goal_dim` columns of every observation (metadata: 2 for
navigation's goal position, 1 for the cheetah's goal velocity or
direction); it was trained without adaptation, so only `serving_default` is
meaningful for it.

Steps after an episode's length are ignored (zeroed before anything reads
them); send them padded with any finite value. Validation and limits follow
`tf_maml.serving`: malformed, oversized or non-finite requests, and
adaptations that diverge, fail with INVALID_ARGUMENT and a message naming the
input, and the next request is served.
"""

import dataclasses

import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import serving
from tf_maml.rl.sampler import Trajectories
from tf_maml.serving import _check, _dim, _gated, _shape_is, _validated_examples

__all__ = ["DEFAULT_POLICY_LIMITS", "POLICY_SIGNATURES", "PolicyServingLimits",
           "PolicySignatures", "build_policy_archive", "export_policy"]

POLICY_SIGNATURES = ("serving_default", "adapt", "adapt_custom")


@dataclasses.dataclass(frozen=True)
class PolicyServingLimits:
    """What one request may ask of a policy export; larger requests fail with INVALID_ARGUMENT.

    Attributes:
        max_episodes: episodes in one `adapt` request (`observations`' first axis).
        max_horizon: steps per episode (`observations`' second axis).
        max_query_observations: rows of `query_observations` (and of
            `serving_default`'s `observations`).
    """
    max_episodes: int
    max_horizon: int
    max_query_observations: int

    def validate(self):
        serving.validate_limits(self)
        problem = config_lib.horizon_problem("max_horizon", int(self.max_horizon))
        if problem:
            raise ValueError(problem)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


# One request at all the limits (100 episodes of 1000 steps: 100,000 steps, 50 times a
# navigation task's 20 x 100; 10,000 query rows) took 0.2-0.3 s and about 200 MB on one
# CPU core of a busy 2-core machine (100-100 policy; see export/README.md).
DEFAULT_POLICY_LIMITS = PolicyServingLimits(max_episodes=100, max_horizon=1000,
                                            max_query_observations=10000)


def _observation_dim(algorithm):
    try:
        return int(algorithm.model.inputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return int(algorithm.env.observation_dim)


class PolicySignatures:
    """The policy export's signatures as plain, testable methods over the requests' tensors.

    Args:
        algorithm: a `tf_maml.rl.MAMLRL` whose variables hold the meta-parameters.
        inner_lr: the step size of `adapt` (default: the run's α, `algorithm.inner_lr`).
        limits: `PolicyServingLimits` (default `DEFAULT_POLICY_LIMITS`).

    Raises:
        ValueError: bad limits or `inner_lr`.

    Example:

    ```python
    signatures = PolicySignatures(experiment.algorithm)
    out = signatures.adapt(observations, actions, rewards, lengths, query_observations)
    out["action_mean"], out["log_std"]
    ```
    """

    def __init__(self, algorithm, inner_lr=None, limits=None):
        self.algorithm = algorithm
        self.policy = algorithm.policy
        self.model = algorithm.model
        self.limits = (limits or DEFAULT_POLICY_LIMITS).validate()
        inner_lr = algorithm.inner_lr if inner_lr is None else inner_lr
        try:
            inner_lr = float(inner_lr)
        except (TypeError, ValueError):
            raise ValueError(f"inner_lr must be a number, got {inner_lr!r}") from None
        if not inner_lr >= 0 or inner_lr == float("inf"):
            raise ValueError(f"inner_lr must be finite and >= 0, got {inner_lr!r}")
        self.inner_lr = inner_lr
        self.obs_dim = _observation_dim(algorithm)
        self.action_dim = self.policy.action_dim
        self.dtype = self.policy.dtype
        # The adaptation, traced once, called by `adapt` and `adapt_custom` after validation.
        episodes = tf.TensorSpec([None, None], self.dtype)
        self._adapt_fn = tf.function(self._adapted_distribution, input_signature=[
            tf.TensorSpec([None, None, self.obs_dim], self.dtype),
            tf.TensorSpec([None, None, self.action_dim], self.dtype), episodes, episodes,
            tf.TensorSpec([None, self.obs_dim], self.dtype), tf.TensorSpec([], self.dtype)],
            autograph=False)

    @property
    def meta_params(self):
        return self.algorithm.meta_variables

    @property
    def signature_names(self):
        return POLICY_SIGNATURES

    # -- validation -----------------------------------------------------------------------------

    def _observations(self, name, x):
        return _validated_examples(name, x, [self.obs_dim], self.limits.max_query_observations,
                                   "max_query_observations", False, what="observations")

    def _episodes(self, observations, actions, rewards, lengths):
        """Validates one task's episodes; returns them and the mask `[num_episodes, horizon]`."""
        limits, obs_dim, action_dim = self.limits, self.obs_dim, self.action_dim
        shape_ok = _shape_is(observations, 2, [obs_dim]) & tf.equal(tf.rank(observations), 3)
        checks = [_check(shape_ok, f"observations must have shape [num_episodes, horizon, "
                                   f"{obs_dim}]; got shape", [tf.shape(observations)])]
        episodes, horizon = _dim(observations, 0), _dim(observations, 1)
        with tf.control_dependencies(checks):
            checks.append(_check(tf.size(observations) > 0,
                                 "observations must not be empty (at least one episode of at "
                                 "least one step)"))
            checks.append(_check(episodes <= limits.max_episodes,
                                 f"observations has too many episodes: this export accepts at "
                                 f"most {limits.max_episodes} (max_episodes); got", [episodes]))
            checks.append(_check(horizon <= limits.max_horizon,
                                 f"observations has too many steps per episode: this export "
                                 f"accepts at most {limits.max_horizon} (max_horizon); got",
                                 [horizon]))
        with tf.control_dependencies(checks):
            checks.append(_check(tf.reduce_all(tf.math.is_finite(observations)),
                                 "observations has NaN or infinite values"))
        observations = _gated(observations, shape_ok, checks, [None, None, obs_dim])
        rows = tf.shape(observations)[:2]

        def per_step(name, x, trailing):
            expected = "[num_episodes, horizon" + "".join(f", {d}" for d in trailing) + "]"
            shape_ok = _shape_is(x, 2, trailing) & tf.equal(tf.rank(x), 2 + len(trailing))
            checks = [_check(shape_ok, f"{name} must have shape {expected}; got shape",
                             [tf.shape(x)])]
            padded = tf.concat([tf.shape(x), tf.fill([2], -1)], 0)[:2]
            same = tf.reduce_all(tf.equal(padded, rows))
            with tf.control_dependencies(checks):
                checks.append(_check(same, f"{name} must have the episodes and steps of "
                                           "observations; got [num_episodes, horizon] of "
                                           f"{name} and of observations", [padded, rows]))
            with tf.control_dependencies(checks):
                checks.append(_check(tf.reduce_all(tf.math.is_finite(x)),
                                     f"{name} has NaN or infinite values"))
            return _gated(x, shape_ok & same, checks, [None, None, *trailing])

        actions = per_step("actions", actions, [action_dim])
        rewards = per_step("rewards", rewards, [])

        shape_ok = tf.equal(tf.rank(lengths), 1)
        checks = [_check(shape_ok, "lengths must have shape [num_episodes] (each episode's "
                                   "number of valid steps); got shape", [tf.shape(lengths)])]
        same = tf.equal(_dim(lengths, 0), rows[0])
        with tf.control_dependencies(checks):
            checks.append(_check(same, "lengths must have one entry per episode of "
                                       "observations; got entries and episodes",
                                 [_dim(lengths, 0), rows[0]]))
        with tf.control_dependencies(checks):
            checks.append(_check(tf.reduce_all((lengths >= 1) & (lengths <= rows[1])),
                                 "lengths must be in [1, horizon] (horizon: observations' "
                                 "second axis); got horizon and lengths", [rows[1], lengths]))
        lengths = _gated(lengths, shape_ok & same, checks, [None])
        mask = tf.sequence_mask(lengths, rows[1], dtype=self.dtype)
        # Finite rewards whose sums overflow (3e38 a step) would fail later as "the policy
        # diverged"; the returns are at most the summed magnitudes.
        summed = tf.reduce_sum(tf.abs(rewards) * mask, axis=1)
        with tf.control_dependencies([_check(
                tf.reduce_all(tf.math.is_finite(summed)),
                f"rewards are too large: their sum over an episode overflows "
                f"{self.dtype.name}")]):
            rewards = tf.identity(rewards)
        return observations, actions, rewards, mask

    def _inner_lr(self, inner_lr):
        shape_ok = tf.equal(tf.rank(inner_lr), 0)
        checks = [_check(shape_ok, "inner_lr must be a scalar; got shape", [tf.shape(inner_lr)])]
        with tf.control_dependencies(checks):
            checks.append(_check(tf.reduce_all(tf.math.is_finite(inner_lr) & (inner_lr >= 0)),
                                 "inner_lr must be finite and >= 0; got", [inner_lr]))
        inner_lr = _gated(tf.reshape(inner_lr, [-1])[:1], shape_ok, checks, [1])
        return tf.cast(inner_lr[0], self.dtype)

    def _finite(self, outputs, message, hint):
        """Asserts every output is finite: divergence is an error, never NaN with status OK."""
        checks = [_check(tf.reduce_all(tf.math.is_finite(value)),
                         f"{message}: {name} is not finite ({hint})")
                  for name, value in outputs.items()]
        if "log_std" in outputs:  # a finite log-std of 2e5 is an infinite std all the same
            with tf.control_dependencies(checks):
                checks.append(_check(
                    tf.reduce_all(tf.math.is_finite(tf.exp(outputs["log_std"]))),
                    f"{message}: log_std is too large, its std exp(log_std) is not finite "
                    f"({hint})"))
        with tf.control_dependencies(checks):
            return {name: tf.identity(value) for name, value in outputs.items()}

    # -- the computation --------------------------------------------------------------------------

    def _distribution(self, weights, observations):
        """`{action_mean [n, action_dim], log_std [action_dim]}` of one task's weights."""
        mean, log_std = self.policy.distribution(weights, observations[None])
        return {"action_mean": mean[0], "log_std": tf.reshape(log_std, [self.action_dim])}

    def _adapted_distribution(self, observations, actions, rewards, mask, query, inner_lr):
        """One REINFORCE step on one task's episodes, as the training inner loop takes it.

        `MAMLRL.process` (returns, linear baseline, GAE, normalization) and
        `MAMLRL.adapt` (`core.adapt` on `reinforce_loss`); steps past an
        episode's end are zeroed first, so their values never matter.
        """
        trajectories = Trajectories(observations[None] * mask[None, ..., None],
                                    actions[None] * mask[None, ..., None],
                                    rewards[None] * mask[None], mask[None])
        batch = self.algorithm.process(trajectories)
        adapted = self.algorithm.adapt(self.meta_params, [batch], first_order=True, num_tasks=1,
                                       inner_lr=inner_lr)
        return self._distribution(adapted, query)

    # -- signatures -----------------------------------------------------------------------------

    def serve(self, observations):
        """`observations` `[n, obs_dim]` -> the meta-initialization's `action_mean`, `log_std`."""
        observations = self._observations("observations", observations)
        weights = [tf.convert_to_tensor(w)[None] for w in self.meta_params]
        return self._finite(self._distribution(weights, observations),
                            "the meta-initialization's output", "are the inputs too large?")

    def adapt(self, observations, actions, rewards, lengths, query_observations):
        """One policy-gradient step of the run's `inner_lr`; the adapted policy at the queries."""
        return self._adapt(observations, actions, rewards, lengths, query_observations,
                           tf.constant(self.inner_lr, self.dtype))

    def adapt_custom(self, observations, actions, rewards, lengths, query_observations, inner_lr):
        """`adapt` with the request's scalar `inner_lr`."""
        return self._adapt(observations, actions, rewards, lengths, query_observations,
                           self._inner_lr(inner_lr))

    def _adapt(self, observations, actions, rewards, lengths, query_observations, inner_lr):
        observations, actions, rewards, mask = self._episodes(observations, actions, rewards,
                                                              lengths)
        query = self._observations("query_observations", query_observations)
        return self._finite(self._adapt_fn(observations, actions, rewards, mask, query, inner_lr),
                            "the adaptation diverged",
                            "episodes far from the scale of the training ones, or an inner_lr "
                            "too large for them?")


def build_policy_archive(signatures):
    """The `tf_maml.serving.SignatureArchive` of a `PolicySignatures`, ready for `write_out`."""
    archive = serving.SignatureArchive()
    archive.track(signatures.model)
    archive.track(signatures.algorithm.state)  # the log-std
    dtype = signatures.dtype
    episodes = [tf.TensorSpec(None, dtype, name="observations"),
                tf.TensorSpec(None, dtype, name="actions"),
                tf.TensorSpec(None, dtype, name="rewards"),
                tf.TensorSpec(None, tf.int32, name="lengths"),
                tf.TensorSpec(None, dtype, name="query_observations")]
    archive.add_endpoint("serving_default", signatures.serve,
                         [tf.TensorSpec(None, dtype, name="observations")])
    archive.add_endpoint("adapt", signatures.adapt, episodes)
    archive.add_endpoint("adapt_custom", signatures.adapt_custom,
                         episodes + [tf.TensorSpec(None, tf.float32, name="inner_lr")])
    return archive


def export_policy(experiment, export_dir, version, inner_lr=None, overwrite=False, limits=None):
    """Writes a meta-RL run's policy to `<export_dir>/<version>/` (TF Serving's layout).

    As `tf_maml.serving.export` (which calls this for RL runs): written beside
    its place and swapped in once complete; the run's config, the step size,
    the advantage settings, the limits and the signatures go to
    `<version>/assets.extra/tf_maml_config.json`.

    Args:
        experiment: the restored RL run (`Experiment` with a `MAMLRL`).
        export_dir: the model's base path for TF Serving.
        version: positive integer version.
        inner_lr: the step size of `adapt` (default: the run's `inner_lr`).
        overwrite: replace an existing version.
        limits: `PolicyServingLimits`, a dict of some of its fields replacing
            `DEFAULT_POLICY_LIMITS`', or `None`.

    Returns:
        The version's path.

    Raises:
        ValueError: bad version, limits (`max_horizon` below the run's
            horizon) or `inner_lr`, non-finite
            meta-parameters, or the version exists and `overwrite` is false.
    """
    version = serving.check_version(version)
    limits = serving.limits_from(DEFAULT_POLICY_LIMITS, limits)
    horizon = experiment.algorithm.horizon
    if limits.max_horizon < horizon:
        raise ValueError(f"max_horizon ({limits.max_horizon}) is below the run's horizon "
                         f"({horizon}): its own episodes would be refused; raise max_horizon "
                         f"(--max_horizon) to at least {horizon}")
    algorithm = experiment.algorithm
    signatures = PolicySignatures(algorithm, inner_lr, limits)
    path = serving.version_path(export_dir, version, overwrite)
    serving.check_finite_parameters(experiment)
    archive = build_policy_archive(signatures)
    return serving.write_version(archive, path, {
        **experiment.config.to_dict(), "export_kind": "policy",
        "export_inner_lr": signatures.inner_lr, "export_inner_steps": 1,
        "export_advantages": {"gamma": algorithm.gamma, "gae_lambda": algorithm.gae_lambda,
                              "baseline_reg": algorithm.baseline_reg,
                              "normalize_advantages": bool(algorithm.normalize_advantages)},
        "export_observation_dim": signatures.obs_dim,
        # A goal-observed policy (the oracle) reads each task's goal in the observations'
        # last `export_goal_dim` columns.
        "export_goal_dim": getattr(algorithm.env, "task_dim", 0) if getattr(
            experiment.config, "goal_observed", False) else 0,
        "export_action_dim": signatures.action_dim,
        "export_limits": limits.to_dict(),
        "export_signatures": list(signatures.signature_names)}, overwrite=overwrite)
