"""Meta-reinforcement learning (paper §5.3): estimators, baseline, TRPO through the inner update,
navigation, and a short MAML-TRPO run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import core, rl
from tf_maml.rl import (MAMLRL, GaussianPolicy, GoalObserved, Navigation2D, Trajectories,
                        advantages, gaussian_mlp_policy, objectives, sample_trajectories, trpo)


class _Scripted:
    """A stand-in policy for the sampler: a fixed mean function and a tiny std."""

    action_dim = 2
    dtype = tf.float32

    def __init__(self, mean_fn, log_std=-30.0):
        self.mean_fn, self.log_std = mean_fn, log_std

    def distribution(self, weights, obs):
        del weights
        return self.mean_fn(obs), tf.fill([tf.shape(obs)[0], 1, 2], self.log_std)


def _rollout(env, policy, goals, num_trajectories=1, seed=(0, 0)):
    return tf.function(lambda g: sample_trajectories(
        env, policy, [tf.zeros([goals.shape[0], 1])], g, num_trajectories,
        tf.constant(seed, tf.int64)))(goals)


# -- navigation ----------------------------------------------------------------------------------


def test_navigation_standing_still_greedy_clipping_and_masks():
    env = Navigation2D()
    goals = env.sample_tasks(2000, tf.constant([3, 4], tf.int64))
    assert float(tf.reduce_min(goals)) >= -0.5 and float(tf.reduce_max(goals)) <= 0.5

    still = _rollout(env, _Scripted(tf.zeros_like), goals)
    returns = tf.reduce_sum(still.rewards * still.mask, -1)
    # E‖g‖ for g ~ U[-0.5, 0.5]² is (√2 + ln(1 + √2)) / 6 = 0.3826: -38.26 over 100 steps;
    # the standard error over 2000 goals is about 0.3.
    assert float(tf.reduce_mean(returns)) == pytest.approx(-38.26, abs=1.0)
    assert still.rewards.shape == (2000, 1, 100) and float(tf.reduce_min(still.mask)) == 1.0

    greedy = _rollout(env, _Scripted(lambda obs: goals[:, None, :] - obs), goals)
    # Straight to the goal at most 0.1 per axis; reward on the *new* position (rllab's
    # PointEnv): a numpy simulation of 100k goals gives -0.505.
    assert float(tf.reduce_mean(tf.reduce_sum(greedy.rewards, -1))) == pytest.approx(-0.5, abs=0.05)

    # Clipping: a huge action moves by exactly 0.1 per axis; the observation is the position.
    pushed = _rollout(env, _Scripted(lambda obs: tf.ones_like(obs) * tf.constant([5.0, -0.05])),
                      goals[:3])
    np.testing.assert_allclose(pushed.observations[:, 0, :4].numpy(),
                               np.tile([[0, 0], [0.1, -0.05], [0.2, -0.1], [0.3, -0.15]],
                                       (3, 1, 1)), atol=1e-6)
    expected = -np.linalg.norm(pushed.observations[:, 0, 1:2].numpy()
                               - goals[:3, None].numpy(), axis=-1)[:, 0]
    np.testing.assert_allclose(pushed.rewards[:, 0, 0].numpy(), expected, rtol=1e-5)

    # With the original's termination (|dx|, |dy| < 0.01), an episode stops at the goal: the
    # mask keeps the steps up to and including the one reaching it, and rewards after are 0.
    ending = _rollout(Navigation2D(goal_radius=0.01), _Scripted(lambda obs: goals[:50, None, :]
                                                                - obs), goals[:50])
    # The first step t with both |g_i - min(0.1 t, |g_i|)| < 0.01.
    steps_needed = np.maximum(1, np.ceil((np.max(np.abs(goals[:50].numpy()), -1) - 0.01) / 0.1))
    np.testing.assert_array_equal(ending.mask[:, 0].numpy().sum(-1), steps_needed)
    assert np.all(np.diff(ending.mask[:, 0].numpy(), axis=-1) <= 0)   # valid steps come first
    assert float(tf.reduce_sum(tf.abs(ending.rewards * (1 - ending.mask)))) == 0.0
    np.testing.assert_allclose(ending.rewards[:, 0, :2].numpy(), greedy.rewards[:50, 0, :2],
                               rtol=1e-6)


def test_goal_observed_navigation_shows_the_goal_and_keeps_the_dynamics():
    env = Navigation2D(goal_radius=0.01)
    observed = GoalObserved(env)
    assert observed.observation_dim == 4 and observed.action_dim == 2
    assert observed.horizon == 100 and observed.goal_radius == 0.01
    goals = env.sample_tasks(50, tf.constant([3, 4], tf.int64))
    # Greedy from what the policy sees: the goal is the observation's last two numbers.
    seen = _rollout(observed, _Scripted(lambda obs: obs[..., 2:] - obs[..., :2]), goals, 2)
    known = _rollout(env, _Scripted(lambda obs: goals[:, None, :] - obs), goals, 2)
    mask = seen.mask.numpy()[..., None]
    np.testing.assert_allclose(seen.observations[..., 2:].numpy() * mask,
                               np.broadcast_to(goals.numpy()[:, None, None], mask.shape[:3] + (2,))
                               * mask)
    np.testing.assert_array_equal(seen.observations[..., :2].numpy(), known.observations.numpy())
    np.testing.assert_array_equal(seen.rewards.numpy(), known.rewards.numpy())
    np.testing.assert_array_equal(seen.mask.numpy(), known.mask.numpy())
    with pytest.raises(ValueError, match="tasks of shape"):
        GoalObserved(type("Grid", (), {"observation_dim": 2, "sample_tasks":
                                       lambda self, n, seed: tf.zeros([n, 2, 2])})())


def test_a_policy_that_sees_the_goal_learns_what_a_blind_joint_policy_cannot():
    """The paper's oracle: trained on all goals jointly, no adaptation, far above the blind
    "pretrained" policy on held-out goals (a blind policy can only head for the goals' mean)."""
    returns = {}
    for observed in (False, True):
        keras.utils.set_random_seed(0)
        env = Navigation2D(horizon=20, normalized_actions=True)
        env = GoalObserved(env) if observed else env
        algorithm = MAMLRL(env, gaussian_mlp_policy(env.observation_dim, 2, (32, 32)),
                           meta_batch_size=10, fast_batch_size=10, num_inner_steps=0,
                           max_kl=0.05)
        train_step = algorithm.make_train_step()
        for iteration in range(25):
            train_step(tf.constant(iteration, tf.int64))
        returns[observed] = float(algorithm.evaluate(seed=3, num_tasks=20, num_steps=0,
                                                     num_trajectories=10)[0])
    # Measured: -8.4 blind, -0.9 seeing the goal (an untrained policy: about -10).
    assert returns[True] > -2.5 and returns[False] < -5.0, returns


def test_normalized_actions_scale_a_unit_policy_action_to_the_clip():
    """rllab's `normalize` (the original launch script): policy actions live in [-1, 1]²."""
    env = Navigation2D(normalized_actions=True)
    assert env.action_bound == 1.0 and Navigation2D().action_bound == 0.1
    goals = env.sample_tasks(500, tf.constant([5, 6], tf.int64))
    # Action 0.5 moves by 0.05, an action beyond 1 by exactly 0.1: scaled after clipping.
    pushed = _rollout(env, _Scripted(lambda obs: tf.ones_like(obs) * tf.constant([5.0, -0.5])),
                      goals[:3])
    np.testing.assert_allclose(pushed.observations[:, 0, :3].numpy(),
                               np.tile([[0, 0], [0.1, -0.05], [0.2, -0.1]], (3, 1, 1)),
                               atol=1e-6)
    # The same trajectory as the unnormalized environment given ten times smaller actions.
    plain = _rollout(Navigation2D(), _Scripted(lambda obs: tf.ones_like(obs)
                                                * tf.constant([0.5, -0.05])), goals[:3])
    np.testing.assert_allclose(pushed.rewards.numpy(), plain.rewards.numpy(), rtol=1e-6)
    # The oracle acts in policy units too: the same best return as without normalization.
    np.testing.assert_allclose(env.oracle_returns(goals).numpy(),
                               Navigation2D().oracle_returns(goals).numpy(), rtol=1e-5)
    assert float(tf.reduce_mean(env.oracle_returns(goals))) == pytest.approx(-0.5, abs=0.05)


def test_environments_whose_reset_takes_no_seed_still_work():
    class NoSeed(Navigation2D):
        def reset(self, tasks, num_trajectories):   # the interface before reset seeds
            return super().reset(tasks, num_trajectories)

    goals = Navigation2D().sample_tasks(3, tf.constant([1, 1], tf.int64))
    a = _rollout(NoSeed(horizon=4), _Scripted(tf.zeros_like), goals)
    b = _rollout(Navigation2D(horizon=4), _Scripted(tf.zeros_like), goals)
    np.testing.assert_array_equal(a.rewards.numpy(), b.rewards.numpy())


def test_sampler_is_a_pure_function_of_the_seed_and_follows_the_dynamics():
    env = Navigation2D(horizon=7)
    policy = GaussianPolicy(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
    weights = core.broadcast_to_tasks(policy.variables, 3)
    goals = env.sample_tasks(3, tf.constant([0, 1], tf.int64))
    sample = tf.function(lambda seed: sample_trajectories(env, policy, weights, goals, 4, seed))
    a = sample(tf.constant([5, 6], tf.int64))
    b = sample(tf.constant([5, 6], tf.int64))
    c = sample(tf.constant([5, 7], tf.int64))
    assert a.observations.shape == (3, 4, 7, 2) and a.actions.shape == (3, 4, 7, 2)
    np.testing.assert_array_equal(a.actions.numpy(), b.actions.numpy())
    assert not np.allclose(a.actions.numpy(), c.actions.numpy())
    moved = a.observations[:, :, 1:] - a.observations[:, :, :-1]
    np.testing.assert_allclose(moved.numpy(), np.clip(a.actions[:, :, :-1].numpy(), -0.1, 0.1),
                               atol=1e-6)
    # Actions are N(mean, 1) around the policy's mean (log-std 0).
    mean, _ = policy.distribution(weights, a.observations)
    noise = (a.actions - mean).numpy()
    assert abs(noise.mean()) < 0.2 and noise.std() == pytest.approx(1.0, abs=0.2)


# -- estimators ----------------------------------------------------------------------------------


def test_reinforce_gradient_matches_the_analytic_policy_gradient():
    # One-step bandit per task: a ~ N(w, σ²) (a linear "network" of a constant observation),
    # reward r(a) = -(a - c)² with a different c per task. J = -((w - c)² + σ²), so the loss
    # -mean(log π(a) · r) has expected gradient -∇J = [2(w - c), 2σ²] w.r.t. (w, log σ).
    model = keras.Sequential([keras.Input((1,), dtype="float64"),
                              keras.layers.Dense(1, use_bias=False, dtype="float64")])
    model.layers[0].kernel.assign([[0.3]])
    policy = GaussianPolicy(model, init_log_std=np.log(0.5))
    targets = np.array([1.0, -0.4])
    n = 200_000
    actions = 0.3 + 0.5 * tf.random.stateless_normal([2, n, 1, 1], [1, 2], dtype=tf.float64)
    rewards = -tf.square(actions[..., 0] - targets[:, None, None])
    batch = Trajectories(tf.ones([2, n, 1, 1], tf.float64), actions, rewards,
                         tf.ones([2, n, 1], tf.float64), advantages=rewards)
    weights = core.broadcast_to_tasks(policy.variables, 2)
    loss = objectives.reinforce_loss(policy, batch)
    _, grads, _ = core.meta_gradients(lambda ws: (tf.reduce_sum(loss(ws, 0)), ()), weights)
    estimate = np.stack([grads[0].numpy().reshape(2), grads[1].numpy().reshape(2)], 1)
    analytic = np.stack([2 * (0.3 - targets), 2 * 0.25 * np.ones(2)], 1)
    # Tolerance: 4 standard errors of the per-sample terms (each under 2% of the value).
    a, r = actions[..., 0, 0].numpy(), rewards[..., 0].numpy()
    per_sample = np.stack([-(a - 0.3) / 0.25 * r, -((a - 0.3) ** 2 / 0.25 - 1) * r], -1)
    stderr = per_sample.std(1) / np.sqrt(n)
    assert np.all(stderr < 0.02 * np.abs(analytic))
    np.testing.assert_array_less(np.abs(estimate - analytic), 4 * stderr)


def test_linear_baseline_equals_numpy_least_squares():
    rng = np.random.default_rng(0)
    num_tasks, trajectories, horizon = 3, 4, 6
    obs = rng.normal(scale=6.0, size=(num_tasks, trajectories, horizon, 2))   # some beyond ±10
    returns = rng.normal(size=(num_tasks, trajectories, horizon))
    lengths = rng.integers(2, horizon + 1, size=(num_tasks, trajectories))
    mask = (np.arange(horizon) < lengths[..., None]).astype(np.float64)
    mask[2] = 0.0                                                   # a task with no valid step
    coeffs = advantages.fit_linear_baseline(tf.constant(obs), tf.constant(returns),
                                            tf.constant(mask)).numpy()
    for task in range(num_tasks):
        rows, targets = [], []
        for i in range(trajectories):
            length = int(mask[task, i].sum())
            o = np.clip(obs[task, i, :length], -10, 10)
            al = np.arange(length).reshape(-1, 1) / 100.0
            rows.append(np.concatenate([o, o ** 2, al, al ** 2, al ** 3, np.ones((length, 1))], 1))
            targets.append(returns[task, i, :length])
        f = np.concatenate(rows) if rows else np.zeros((0, 8))
        expected = np.linalg.lstsq(f.T @ f + 1e-5 * np.eye(8), f.T @ np.concatenate(targets),
                                   rcond=-1)[0]
        np.testing.assert_allclose(coeffs[task], expected, rtol=1e-6, atol=1e-9)
    values = advantages.predict_linear_baseline(tf.constant(coeffs), tf.constant(obs)).numpy()
    assert values.shape == (num_tasks, trajectories, horizon)
    # The features of every step (valid or not) times the task's coefficients.
    o = np.clip(obs, -10, 10)
    al = np.broadcast_to(np.arange(horizon).reshape(1, 1, -1, 1) / 100.0, o.shape[:-1] + (1,))
    features = np.concatenate([o, o ** 2, al, al ** 2, al ** 3, np.ones_like(al)], -1)
    np.testing.assert_allclose(values, np.einsum("ijtf,if->ijt", features, coeffs), rtol=1e-6,
                               atol=1e-9)


def test_returns_gae_and_normalization_by_hand():
    rewards = tf.constant([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]])
    mask = tf.constant([[[1.0, 1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    returns = advantages.discounted_returns(rewards, mask, 0.5).numpy()
    # The first episode ends after 3 steps: its 4th reward does not count.
    np.testing.assert_allclose(returns[0, 0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 0])
    np.testing.assert_allclose(returns[1, 0], [1.875, 1.75, 1.5, 1.0])

    values = tf.constant([[[0.5, -1.0, 2.0, 9.0]], [[0.0, 1.0, 0.0, 1.0]]])
    gamma, lam = 0.9, 0.5
    adv = advantages.gae_advantages(rewards, values, mask, gamma, lam).numpy()
    for task in range(2):
        r, v, m = rewards[task, 0].numpy(), values[task, 0].numpy(), mask[task, 0].numpy()
        expected, running = np.zeros(4), 0.0
        for t in reversed(range(4)):
            if not m[t]:
                continue
            next_value = v[t + 1] if t + 1 < 4 and m[t + 1] else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            expected[t] = running
        np.testing.assert_allclose(adv[task, 0], expected, rtol=1e-6)
    # λ = 1: the return minus the baseline.
    np.testing.assert_allclose(advantages.gae_advantages(rewards, values, mask, 0.5, 1.0),
                               returns - values.numpy() * mask.numpy(), rtol=1e-6)

    normalized = advantages.normalize_advantages(tf.constant(adv), mask).numpy()
    valid = adv[0, 0, :3]
    np.testing.assert_allclose(normalized[0, 0, :3], (valid - valid.mean()) / valid.std(),
                               rtol=1e-5)
    assert normalized[0, 0, 3] == 0.0
    np.testing.assert_allclose(normalized[1, 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalized[1, 0].std(), 1.0, rtol=1e-5)


# -- TRPO through the inner update (float64) -----------------------------------------------------


@pytest.fixture(scope="module")
def small_problem():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((2,), dtype="float64"),
                              keras.layers.Dense(8, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    env = Navigation2D(horizon=10, dtype=tf.float64)
    algorithm = MAMLRL(env, model, meta_batch_size=3, fast_batch_size=4, inner_lr=0.5)
    params = [tf.convert_to_tensor(v) for v in algorithm.meta_variables]
    tasks = env.sample_tasks(3, tf.constant([1, 2], tf.int64))
    meta_batch = algorithm.sample(params, tasks, tf.constant([3, 4], tf.int64))
    return algorithm, params, meta_batch


def _kl_value(objective, params, direction, eps):
    return float(objective([p + eps * d for p, d in zip(params, direction)])[1])


def test_hessian_vector_product_through_the_inner_update(small_problem):
    algorithm, params, meta_batch = small_problem
    objective = algorithm.outer_objective(meta_batch)
    loss, kl, _, loss_grad, hvp = trpo.second_order(objective, params)
    assert abs(float(kl)) < 1e-12                  # the KL from the sampling policies is 0 at θ
    rng = np.random.default_rng(0)
    u, v = [[tf.constant(rng.normal(size=p.shape)) for p in params] for _ in range(2)]
    hv = hvp(trpo.flatten(v))

    # (1) The product equals the central difference of the KL's gradient along v.
    def kl_grad(shift):
        _, grads, _ = core.meta_gradients(
            lambda ps: (objective(ps)[1], ()), [p + shift * d for p, d in zip(params, v)])
        return trpo.flatten(grads)
    eps = 1e-5
    numeric = (kl_grad(eps) - kl_grad(-eps)) / (2 * eps)
    np.testing.assert_allclose(hv.numpy(), numeric.numpy(), rtol=1e-5,
                               atol=1e-6 * float(tf.reduce_max(tf.abs(numeric))))

    # (2) uᵀHv against second differences of KL *values*, which know nothing of derivatives:
    # this is what catches a product that drops the second-order term of the inner update.
    e = 1e-3
    plus_plus = _kl_value(objective, params, [e * a + e * b for a, b in zip(u, v)], 1.0)
    plus_minus = _kl_value(objective, params, [e * a - e * b for a, b in zip(u, v)], 1.0)
    minus_plus = _kl_value(objective, params, [-e * a + e * b for a, b in zip(u, v)], 1.0)
    minus_minus = _kl_value(objective, params, [-e * a - e * b for a, b in zip(u, v)], 1.0)
    uhv_numeric = (plus_plus - plus_minus - minus_plus + minus_minus) / (4 * e * e)
    uhv = float(tf.tensordot(trpo.flatten(u), hv, 1))
    assert uhv == pytest.approx(uhv_numeric, rel=1e-4)

    # The first-order product (inner gradients constant) is measurably different, so (2) can
    # tell them apart.
    first = algorithm.outer_objective(meta_batch, first_order=True)
    _, _, _, _, hvp_first = trpo.second_order(first, params)
    uhv_first = float(tf.tensordot(trpo.flatten(u), hvp_first(trpo.flatten(v)), 1))
    assert abs(uhv_first - uhv_numeric) > 1e-2 * abs(uhv_numeric)

    # The loss gradient is the meta-gradient of the surrogate (the Adam outer loop's).
    _, grads, _ = core.meta_gradients(lambda ps: (objective(ps)[0], ()), params)
    np.testing.assert_allclose(loss_grad.numpy(), trpo.flatten(grads).numpy(), rtol=1e-8,
                               atol=1e-12)
    assert abs(float(loss)) < 1e-12                # normalized advantages, ratio 1


def test_conjugate_gradient_solves_a_linear_system():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(8, 8))
    a = tf.constant(m @ m.T + 0.5 * np.eye(8))
    b = tf.constant(rng.normal(size=8))
    x = trpo.conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iterations=10,
                                residual_tol=1e-20)
    np.testing.assert_allclose(tf.linalg.matvec(a, x).numpy(), b.numpy(), atol=1e-8)
    # Fewer iterations than dimensions: an approximation that still reduces the residual.
    x3 = trpo.conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iterations=3)
    assert float(tf.norm(tf.linalg.matvec(a, x3) - b)) < 0.9 * float(tf.norm(b))


def test_line_search_takes_the_first_step_inside_the_trust_region():
    # loss(θ) = -θ, kl(θ) = θ²: from θ = 0 with full step +1 (θ - step, step = -1), the first
    # fraction 0.8^k with (0.8^k)² <= 0.1 is k = 6.
    def objective(params):
        return -params[0][0], tf.square(params[0][0]), {}
    params = [tf.constant([0.0], tf.float64)]
    new, loss, kl, accepted, k = trpo.line_search(objective, params,
                                                  [tf.constant([-1.0], tf.float64)],
                                                  tf.constant(0.0, tf.float64), 0.1)
    assert bool(accepted) and int(k) == 6
    assert float(new[0][0]) == pytest.approx(0.8 ** 6) and float(kl) <= 0.1
    # No improving step: parameters kept.
    new, _, _, accepted, k = trpo.line_search(objective, params, [tf.constant([1.0], tf.float64)],
                                              tf.constant(0.0, tf.float64), 0.1)
    assert not bool(accepted) and int(k) == 15 and float(new[0][0]) == 0.0


def test_trpo_step_through_the_inner_update_improves_within_the_trust_region(small_problem):
    algorithm, params, meta_batch = small_problem
    objective = algorithm.outer_objective(meta_batch)
    new_params, info = trpo.trpo_step(objective, params, max_kl=0.01)
    assert bool(info.accepted)
    loss, kl, _ = objective(new_params)            # re-evaluated independently
    assert float(loss) < float(info.loss_before) - 1e-4
    assert 0.0 < float(kl) <= 0.01
    assert float(kl) == pytest.approx(float(info.kl_after))
    assert any(not np.allclose(a, b) for a, b in zip(new_params, params))


def test_several_inner_steps_resample_and_the_meta_step_is_a_pure_function(small_problem):
    algorithm, params, _ = small_problem
    two = MAMLRL(algorithm.env, algorithm.policy, meta_batch_size=3, fast_batch_size=4,
                 inner_lr=0.5, num_inner_steps=2, outer="adam", seed=5)
    tasks = two.env.sample_tasks(3, tf.constant([1, 2], tf.int64))
    seed = tf.constant([3, 4], tf.int64)
    meta_batch = two.sample(params, tasks, seed)
    assert len(meta_batch.train) == 2
    # Step 1's episodes come from the policy after step 0 (adapted on step 0's episodes).
    after_one, _ = core.adapt(objectives.reinforce_loss(two.policy, meta_batch.train[:1]),
                              core.broadcast_to_tasks(params, 3), 1, core.SGD(0.5))
    resampled = two.sample_batch(after_one, tasks, tf.random.experimental.stateless_fold_in(
        seed, 1))
    np.testing.assert_allclose(meta_batch.train[1].actions, resampled.actions, rtol=1e-10)
    assert not np.allclose(meta_batch.train[0].actions, meta_batch.train[1].actions)
    loss, kl, _ = two.outer_objective(meta_batch)(params)
    assert abs(float(kl)) < 1e-12

    # The Adam outer loop: meta-gradients shaped as the meta-variables; same (seed, iteration),
    # same result.
    loss_a, grads_a, logs_a = two.meta_step(tf.constant(4, tf.int64))
    loss_b, grads_b, logs_b = two.meta_step(tf.constant(4, tf.int64))
    assert [g.shape for g in grads_a] == [v.shape for v in two.meta_variables]
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)
    assert float(logs_a["return_after"]) == float(logs_b["return_after"])
    assert int(logs_a["env_steps"]) == 3 * 3 * 4 * 10
    # The logged exploration noise is the meta-policy's std, averaged over the actions.
    saved_log_std = two.policy.log_std.numpy()
    two.policy.log_std.assign(np.log([0.5, 2.0]).astype(saved_log_std.dtype))
    try:
        assert float(two.meta_step(tf.constant(4, tf.int64))[2]["policy_std"]) == \
            pytest.approx(1.25)
    finally:
        two.policy.log_std.assign(saved_log_std)
    assert two.step_sizes(3) == [0.5, 0.25, 0.25]


# -- meta-training -------------------------------------------------------------------------------


def test_short_maml_trpo_run_on_navigation_improves_post_adaptation_returns():
    keras.utils.set_random_seed(0)
    env = Navigation2D()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)])
    algorithm = MAMLRL(env, model, meta_batch_size=20, fast_batch_size=10, inner_lr=0.1, seed=3)
    initial = algorithm.evaluate(seed=11, num_tasks=40, num_steps=1)   # [before, after] a step
    train_step = algorithm.make_train_step()
    history = [train_step(tf.constant(i, tf.int64)) for i in range(20)]
    final = algorithm.evaluate(seed=11, num_tasks=40, num_steps=1)
    assert sum(float(logs["accepted"]) for logs in history) >= 15
    assert int(history[0]["env_steps"]) == 2 * 20 * 10 * 100
    # Measured: initial [-84.4, -81.2], after 20 iterations about [-37, -19]. After
    # meta-training one step adapts: far better than the initial policy (before or after its
    # own step) and than the same run's policy before adaptation.
    assert final[1] > initial[0] + 20 and final[1] > initial[1] + 20, (initial, final)
    assert final[1] > final[0] + 8, final
    assert history[-1]["return_after"] > history[-1]["return_before"]


def test_a_policy_model_that_does_not_output_action_means_is_refused_in_one_line():
    """Found by trying custom policies: `action_dim` disagreeing with the model's outputs used
    to broadcast one mean over every action coordinate, silently; outputs `[batch, 2, 2]` and
    mixed-precision models failed deep inside the sampler's graph loop."""
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="^action_dim=2 but the model outputs 1 action means$"):
        rl.GaussianPolicy(keras.Model(inputs, keras.layers.Dense(1)(inputs)), action_dim=2)
    square = keras.Model(inputs, keras.layers.Reshape((2, 2))(keras.layers.Dense(4)(inputs)))
    with pytest.raises(ValueError, match=r"must output action means \[batch, action_dim\], got "
                                         r"outputs of shape \(None, 2, 2\)"):
        rl.GaussianPolicy(square)
    half = keras.layers.Dense(2, dtype="mixed_float16")
    with pytest.raises(ValueError, match="outputs float16 but its weights are float32"):
        rl.GaussianPolicy(keras.Model(inputs, half(inputs)))

    class Mean(keras.Model):  # subclassed: no outputs to read, checked when traced
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Mean()
    model(tf.zeros([1, 2]))
    policy = rl.GaussianPolicy(model, action_dim=2)
    weights = [tf.convert_to_tensor(v)[None] for v in policy.variables]
    with pytest.raises(ValueError, match="outputs 3 action means per observation, not "
                                         "action_dim=2"):
        policy.distribution(weights, tf.zeros([1, 4, 2]))


def test_sizes_of_zero_are_refused_in_one_line():
    """Found by a user trial: a 0-input policy was built, and evaluating 0 tasks gave NaN."""
    for kwargs, message in ((dict(obs_dim=0, action_dim=2), "obs_dim must be a positive"),
                            (dict(obs_dim=2, action_dim=2, hidden=(100, 0)),
                             r"hidden\[1\] must be a positive integer, got 0")):
        with pytest.raises(ValueError, match=f"^gaussian_mlp_policy: {message}"):
            rl.gaussian_mlp_policy(**kwargs)
    env = rl.Navigation2D(horizon=5)
    algorithm = rl.MAMLRL(env, rl.gaussian_mlp_policy(2, 2, hidden=(4,)), meta_batch_size=2,
                          fast_batch_size=2, inner_lr=0.1)
    for kwargs, message in ((dict(num_tasks=0), "num_tasks must be a positive integer, got 0"),
                            (dict(num_trajectories=0), "num_trajectories must be a positive")):
        with pytest.raises(ValueError, match=f"^MAMLRL.evaluate: {message}"):
            algorithm.evaluate(num_steps=1, **kwargs)
    assert np.all(np.isfinite(algorithm.evaluate(num_tasks=2, num_steps=1)))


# -- sampling by steps (the original code's samplers) --------------------------------------------


def test_step_budget_keeps_the_episodes_a_sequential_sampler_collects():
    rng = np.random.default_rng(0)
    num_tasks, slots, horizon, budget = 6, 12, 9, 30
    lengths = rng.integers(1, horizon + 1, size=(num_tasks, slots))
    mask = (np.arange(horizon) < lengths[..., None]).astype(np.float32)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    obs = np.zeros(mask.shape + (2,), np.float32)
    kept = rl.keep_within_budget(Trajectories(obs, obs, rewards, mask), budget)
    kept_mask = kept.mask.numpy()
    # The reference: episodes one after another until the budget is spent, the last finished.
    for task in range(num_tasks):
        steps, expected = 0, []
        for j in range(slots):
            if steps >= budget:
                break
            expected.append(j)
            steps += lengths[task, j]
        np.testing.assert_array_equal(np.flatnonzero(kept_mask[task, :, 0]), expected)
        np.testing.assert_array_equal(kept_mask[task, expected], mask[task, expected])
        assert not kept_mask[task, len(expected):].any()
        np.testing.assert_allclose(
            rl.average_return(kept, per_task=True)[task],
            rewards[task, expected].sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(rl.average_return(kept),
                               np.mean(rl.average_return(kept, per_task=True)), rtol=1e-6)


def _one_step_policy(goal):
    """A policy whose mean moves straight onto `goal` (normalized actions) in one step."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.layers[0].set_weights([np.zeros((2, 2)), np.asarray(goal) / 0.1])
    policy = GaussianPolicy(model)
    policy.log_std.assign(tf.fill([2], -20.0))
    return policy


def test_sampling_by_steps_fills_the_budget_with_episodes_that_end_early():
    goals = tf.fill([3, 2], 0.05)
    policy = _one_step_policy([0.05, 0.05])
    weights = core.broadcast_to_tasks(policy.variables, 3)
    seed = tf.constant([1, 2], tf.int64)
    counts = {}
    for radius in (0.01, None):
        env = Navigation2D(horizon=20, goal_radius=radius, normalized_actions=True)
        for by_steps in (False, True):
            algorithm = MAMLRL(env, policy, meta_batch_size=3, fast_batch_size=2,
                               sample_by_steps=by_steps)
            batch = algorithm.sample_batch(weights, goals, seed)
            counts[radius, by_steps] = batch.mask[..., 0].numpy().sum(-1)
            steps = batch.mask.numpy().sum((1, 2))
            if radius is None:     # episodes never end early: the same 2 × 20 steps
                np.testing.assert_array_equal(steps, 40)
    # At the goal after one step: 2 one-step episodes, or by steps the most that fit, 4 × 2.
    np.testing.assert_array_equal(counts[0.01, False], 2)
    np.testing.assert_array_equal(counts[0.01, True], 8)
    np.testing.assert_array_equal(counts[None, True], 2)


def test_packed_losses_and_meta_gradients_equal_the_unpacked_ones():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((2,), dtype="float64"),
                              keras.layers.Dense(8, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    env = Navigation2D(horizon=12, goal_radius=0.08, normalized_actions=True, dtype=tf.float64)
    algorithm = MAMLRL(env, model, meta_batch_size=3, fast_batch_size=3, inner_lr=0.5,
                       sample_by_steps=True)
    algorithm.policy.log_std.assign(tf.fill([2], tf.constant(-1.5, tf.float64)))   # short episodes
    params = [tf.convert_to_tensor(v) for v in algorithm.meta_variables]
    tasks = tf.constant([[0.1, 0.1], [-0.1, 0.05], [0.4, -0.4]], tf.float64)
    meta_batch = algorithm.sample(params, tasks, tf.constant([3, 4], tf.int64))
    lengths = meta_batch.valid.mask.numpy().sum(-1)
    assert (lengths[lengths > 0] < 12).any(), lengths        # some episodes ended early
    assert meta_batch.valid.mask.shape[1] == 12               # 4 × 3 slots, ...
    assert algorithm.max_valid_steps() == 4 * 12 - 1          # ... packed to (3 + 1) · 12 − 1

    rng = np.random.default_rng(0)
    # Away from θ, where the surrogate (normalized advantages) would be about 0.
    moved = [p + 0.05 * rng.normal(size=p.shape) for p in params]

    def value_and_grads():
        objective = algorithm.outer_objective(meta_batch)
        with tf.GradientTape() as tape:
            tape.watch(moved)
            loss = objective(moved)[0]
        return loss, tape.gradient(loss, moved)

    packed_loss, packed = value_and_grads()
    algorithm.sample_by_steps = False      # the same episodes, every slot's steps
    loss, grads = value_and_grads()
    assert abs(float(loss)) > 1e-3
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-12)
    for a, b in zip(packed, grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_sampling_by_steps_fills_each_tasks_budget_as_the_original_samplers():
    keras.utils.set_random_seed(1)
    env = Navigation2D(horizon=10, goal_radius=0.05, normalized_actions=True)
    policy = _one_step_policy([0.1, 0.1])
    policy.log_std.assign(tf.fill([2], -0.7))    # near the goals, some episodes end there
    algorithm = MAMLRL(env, policy, meta_batch_size=4, fast_batch_size=5, sample_by_steps=True)
    goals = tf.constant([[0.1, 0.1], [0.12, 0.08], [0.2, 0.2], [0.4, -0.3]])
    weights = core.broadcast_to_tasks(policy.variables, 4)
    batch = algorithm.sample_batch(weights, goals, tf.constant([5, 6], tf.int64))
    mask = batch.mask.numpy()
    episodes, steps = mask[..., 0].sum(-1), mask.sum((1, 2))
    assert episodes.max() > 5 and episodes.max() < 20, episodes   # more episodes, cap not hit
    # Every task's budget of 5 x 10 steps is filled, and exceeded by less than an episode.
    assert np.all(steps >= 50) and np.all(steps <= algorithm.max_valid_steps()), steps
    # The kept episodes are the first ones (sampling order); the rest are empty slots.
    for task in range(4):
        np.testing.assert_array_equal(mask[task, :, 0], np.arange(20) < episodes[task])
