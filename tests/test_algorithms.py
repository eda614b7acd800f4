"""The MAML family on one core: each algorithm against an independent statement of its mathematics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import algorithms, core, evaluation, functional, losses
from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import tasks as tasks_lib
from tf_maml import trainer
from tf_maml.tasks import Episode, SineTasks


def _smooth_mlp(dtype="float64"):
    return keras.Sequential([
        keras.Input((1,), dtype=dtype),
        keras.layers.Dense(8, activation="tanh", dtype=dtype),
        keras.layers.Dense(8, activation="tanh", dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])


def _dense_bn(dtype="float64", classes=3):
    return keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(8, use_bias=False, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.Activation("tanh", dtype=dtype),
        keras.layers.Dense(classes, dtype=dtype),
    ])


def _sine_episode(num_tasks=4, k=5, dtype=tf.float64):
    e = SineTasks(k_shot=k, k_query=k).sample(tf.constant([3, 4], tf.int64), num_tasks)
    return Episode(*[tf.cast(t, dtype) for t in e])


def _class_episode(num_tasks=3, n=3, dtype=tf.float64):
    rng = np.random.default_rng(0)
    sx = tf.constant(rng.normal(size=(num_tasks, 2 * n, 6, 6, 2)), dtype)
    qx = tf.constant(rng.normal(size=(num_tasks, 2 * n, 6, 6, 2)), dtype)
    y = tf.constant(np.tile(np.arange(n), (num_tasks, 2)), tf.int32)
    return Episode(sx, y, qx, y)


def _values(variables):
    return [tf.convert_to_tensor(v) for v in variables]


def _directional_fd(loss_at, params, grads, seed=0, eps=1e-5, mask=None):
    """Analytic vs central-difference directional derivatives along random directions."""
    rng = np.random.default_rng(seed)
    analytic, numeric = [], []
    for _ in range(3):
        direction = [tf.constant(rng.normal(size=p.shape), p.dtype) for p in params]
        if mask is not None:
            direction = [d if keep else tf.zeros_like(d) for d, keep in zip(direction, mask)]
        analytic.append(sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction)))
        plus = loss_at([p + eps * d for p, d in zip(params, direction)])
        minus = loss_at([p - eps * d for p, d in zip(params, direction)])
        numeric.append(float(plus - minus) / (2 * eps))
    return np.array(analytic), np.array(numeric)


# -- Meta-SGD ------------------------------------------------------------------------------------

def test_metasgd_learned_rate_gradient_matches_finite_differences():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    algorithm = algorithms.MetaSGD(model, forward, losses.mean_squared_error, inner_lr=0.05,
                                   num_inner_steps=2)
    episode = _sine_episode()
    # Distinct rates per parameter, so a rate matched to the wrong weight shows.
    rng = np.random.default_rng(1)
    for rate in algorithm.extra_variables:
        rate.assign(rng.uniform(0.01, 0.1, size=rate.shape))
    params = _values(algorithm.meta_variables)
    loss_at = tf.function(lambda ps: algorithm.meta_loss(ps, episode)[0])
    _, grads, _ = core.meta_gradients(lambda ps: algorithm.meta_loss(ps, episode), params)
    num_model = len(model.trainable_variables)
    rate_only = [i >= num_model for i in range(len(params))]
    analytic, numeric = _directional_fd(loss_at, params, grads, mask=rate_only)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert np.all(np.abs(numeric) > 1e-6)  # the rates really move the meta-loss
    analytic, numeric = _directional_fd(loss_at, params, grads, seed=1)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_metasgd_with_uniform_rates_equals_maml():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode()
    metasgd = algorithms.MetaSGD(model, forward, losses.mean_squared_error, 0.05, 2)
    maml = algorithms.MAML(model, forward, losses.mean_squared_error, 0.05, 2)
    a, ga, _ = metasgd.meta_step(episode)
    b, gb, _ = maml.meta_step(episode)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-10, atol=1e-14)


# -- MAML++ --------------------------------------------------------------------------------------

def _mamlpp(model, forward, **kwargs):
    settings = dict(inner_lr=0.3, num_inner_steps=2, msl_epochs=0, per_step_bn=False,
                    iterations_per_epoch=10)
    settings.update(kwargs)
    return algorithms.MAMLPlusPlus(model, forward, losses.sparse_softmax_cross_entropy,
                                   **settings)


def test_mamlpp_reduces_to_maml():
    """Final-step importance, LSLR rates all α and per-step BN off: plain MAML's meta-gradient."""
    model = _dense_bn()
    forward = functional.make_forward(model)
    episode = _class_episode()
    plus = _mamlpp(model, forward)
    maml = algorithms.MAML(model, forward, losses.sparse_softmax_cross_entropy, 0.3, 2)
    a, ga, _ = plus.meta_step(episode, iteration=tf.constant(0, tf.int64))
    b, gb, _ = maml.meta_step(episode)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    num_model = len(model.trainable_variables)
    for x, y in zip(ga[:num_model], gb):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-10, atol=1e-14)
    # The learned per-step rates get a gradient of their own.
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in ga[num_model:])


def test_mamlpp_lslr_gradient_matches_finite_differences():
    model = _dense_bn()
    forward = functional.make_forward(model)
    episode = _class_episode()
    plus = _mamlpp(model, forward, per_step_bn=True, msl_epochs=3)
    params = _values(plus.meta_variables)
    iteration = tf.constant(5, tf.int64)
    loss_at = tf.function(lambda ps: plus.meta_loss(ps, episode, iteration=iteration)[0])
    _, grads, _ = core.meta_gradients(
        lambda ps: plus.meta_loss(ps, episode, iteration=iteration), params)
    analytic, numeric = _directional_fd(loss_at, params, grads)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_mamlpp_multi_step_loss_is_the_weighted_sum_of_step_losses():
    model = _dense_bn()
    forward = functional.make_forward(model)
    episode = _class_episode()
    plus = _mamlpp(model, forward, msl_epochs=4)
    params = _values(plus.meta_variables)
    # At epoch 0 the importance vector is uniform: the mean of the losses after 1 and 2 steps.
    loss, _ = plus.meta_loss(params, episode, iteration=tf.constant(0, tf.int64))
    one = algorithms.MAML(model, forward, losses.sparse_softmax_cross_entropy, 0.3, 1)
    two = algorithms.MAML(model, forward, losses.sparse_softmax_cross_entropy, 0.3, 2)
    theta = params[:len(model.trainable_variables)]
    expected = 0.5 * one.meta_loss(theta, episode)[0] + 0.5 * two.meta_loss(theta, episode)[0]
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-12)
    # From msl_epochs on only the last step counts.
    late, _ = plus.meta_loss(params, episode, iteration=tf.constant(40, tf.int64))
    np.testing.assert_allclose(late.numpy(), two.meta_loss(theta, episode)[0].numpy(), rtol=1e-12)


def test_importance_vector_anneals_to_the_last_step():
    first = algorithms.mamlpp.importance_vector(5, 0, 10).numpy()
    middle = algorithms.mamlpp.importance_vector(5, 5, 10).numpy()
    end = algorithms.mamlpp.importance_vector(5, 10, 10).numpy()
    np.testing.assert_allclose(first, np.full(5, 0.2), rtol=1e-6)
    np.testing.assert_allclose(middle.sum(), 1.0, rtol=1e-6)
    assert middle[-1] > first[-1] and np.all(middle[:-1] < first[:-1])
    np.testing.assert_allclose(end, [0, 0, 0, 0, 1])


def test_mamlpp_per_step_batch_norm_weights_are_separate_per_step():
    model = _dense_bn()
    forward = functional.make_forward(model)
    episode = _class_episode()
    plus = _mamlpp(model, forward, per_step_bn=True)
    params = _values(plus.meta_variables)
    adapted_1, _ = plus.adapt(params, episode.support_x, episode.support_y, 1)
    adapted_2, _ = plus.adapt(params, episode.support_x, episode.support_y, 2)
    before = [plus.predict(params, adapted_1, episode.query_x, 1),
              plus.predict(params, adapted_2, episode.query_x, 2)]
    # Change only the β copy of step 2 (the query after two steps).
    bn_tables = params[len(model.trainable_variables) + 2:]
    beta = len(bn_tables) - 1
    shifted = list(params)
    index = len(model.trainable_variables) + 2 + beta
    shifted[index] = tf.tensor_scatter_nd_update(bn_tables[beta], [[2]],
                                                 bn_tables[beta][2:3] + 1.5)
    after = [plus.predict(shifted, adapted_1, episode.query_x, 1),
             plus.predict(shifted, adapted_2, episode.query_x, 2)]
    np.testing.assert_array_equal(before[0].numpy(), after[0].numpy())
    assert not np.allclose(before[1].numpy(), after[1].numpy())
    # The BN weights do not adapt, and each step's copy gets its own gradient.
    assert len(plus.adapted_indices) == len(model.trainable_variables) - 2
    _, grads, _ = plus.meta_step(episode, iteration=tf.constant(0, tf.int64))
    table_grad = grads[index].numpy()
    assert not np.allclose(table_grad[0], table_grad[2])


# -- ANIL ----------------------------------------------------------------------------------------

class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(dtype="float64")
        self.hidden = keras.layers.Dense(8, activation="tanh", dtype="float64")
        self.out = keras.layers.Dense(1, dtype="float64")

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def _subclassed():
    model = _Subclassed()
    model(tf.zeros([1, 1], tf.float64))
    return model


class _TemperedHead(keras.layers.Layer):
    """A custom head whose temperature, set after construction, its config does not carry."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.temperature = units, 1.0

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))
        self.bias = self.add_weight(shape=(self.units,), initializer="ones")

    def call(self, x):
        return (tf.matmul(x, self.kernel) + self.bias) / self.temperature

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class _FunctionHead(_TemperedHead):
    """A custom head built with a function argument its config drops (the copy would
    compute something else)."""

    def __init__(self, units, fn=None, **kwargs):
        super().__init__(units, **kwargs)
        self.fn = fn or tf.identity

    def call(self, x):
        return self.fn(super().call(x))


class _UnrebuildableHead(_TemperedHead):
    """A custom head with a required argument its config lacks: `from_config` raises."""

    def __init__(self, units, scale, **kwargs):
        super().__init__(units, **kwargs)
        self.scale = scale

    def call(self, x):
        return self.scale * super().call(x)


def _with_head(head):
    return keras.Sequential([keras.Input((1,), dtype="float64"),
                             keras.layers.Dense(8, activation="tanh", dtype="float64"), head])


def _tempered_head():
    head = _TemperedHead(1, dtype="float64")
    head.temperature = 0.1
    return _with_head(head)


def _function_head():
    return _with_head(_FunctionHead(1, fn=lambda t: 3.0 * t, dtype="float64"))


def _unrebuildable_head():
    return _with_head(_UnrebuildableHead(1, 2.0, dtype="float64"))


# Heads whose copy would compute something else take the whole model's forward.
@pytest.mark.parametrize("build,split", [(_smooth_mlp, True), (_subclassed, False),
                                         (_tempered_head, False), (_function_head, False),
                                         (_unrebuildable_head, False)])
def test_anil_equals_maml_with_zero_body_rates(build, split):
    model = build()
    forward = functional.make_forward(model)
    episode = _sine_episode()
    anil = algorithms.ANIL(model, forward, losses.mean_squared_error, 0.05, 3)
    assert (anil.body_forward is not None) == split
    head = set(anil.adapted_indices)
    assert head == {len(model.trainable_variables) - 2, len(model.trainable_variables) - 1}
    rates = [0.05 if i in head else 0.0 for i in range(len(model.trainable_variables))]
    maml = algorithms.MAML(model, forward, losses.mean_squared_error, rates, 3)
    a, ga, _ = anil.meta_step(episode)
    b, gb, _ = maml.meta_step(episode)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-9, atol=1e-13)


def test_anil_splits_a_model_with_unknown_dimensions():
    """The head's probe gives unknown dimensions (sequence lengths) a size: such heads keep
    the fast path rather than falling back silently."""
    from tf_maml.algorithms import anil  # noqa: PLC0415
    model = keras.Sequential([keras.Input((None, 8)), keras.layers.Conv1D(4, 3),
                              keras.layers.Dense(2)])
    assert anil.split_head(model) is not None


def test_anil_runs_the_body_once_per_set_not_per_task_or_step():
    model = _dense_bn()
    forward = functional.make_forward(model)
    anil = algorithms.ANIL(model, forward, losses.sparse_softmax_cross_entropy, 0.3, 5)
    episode = _class_episode(num_tasks=4)
    # Count the body's runs when the graph executes (a counter the body's output depends
    # on), not when it is traced: a body inside the inner steps' graph loop would run once
    # per step however often it was traced.
    runs, seen_shapes, body = tf.Variable(0), [], anil.body_forward

    def counted_body(params, x, training):
        seen_shapes.append(tuple(x.shape))
        with tf.control_dependencies([runs.assign_add(1)]):
            return tf.identity(body(params, x, training))

    anil.body_forward = counted_body
    step = tf.function(lambda e: anil.meta_step(e)[0])
    step(episode)
    # The body ran for the support set and the query set of the whole meta-batch
    # (two runs, each on all 4 tasks at once), not once per task or per inner step.
    assert int(runs.numpy()) == 2
    assert [shape[0] for shape in seen_shapes] == [4, 4]
    # Evaluation adapts in a graph loop of 5 steps: still two runs.
    runs.assign(0)
    curve = tf.function(lambda e: evaluation.adaptation_curve(
        anil, _values(model.trainable_variables), e,
        lambda y, p: -losses.sparse_softmax_cross_entropy(y, p), 5)[0])
    curve(episode)
    assert int(runs.numpy()) == 2


# -- Reptile -------------------------------------------------------------------------------------

def test_reptile_one_step_with_unit_epsilon_is_a_gradient_step():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    reptile = algorithms.Reptile(model, forward, losses.mean_squared_error, 0.05, 1,
                                 inner_optimizer="sgd", meta_step_size=1.0)
    episode = _sine_episode(num_tasks=1)
    theta = _values(model.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = losses.mean_squared_error(
            episode.support_y, forward([t[None] for t in theta], episode.support_x))[0]
    expected = [t - 0.05 * g for t, g in zip(theta, tape.gradient(loss, theta))]
    optimizer = reptile.make_optimizer(1e-3, num_iterations=100)
    optimizer.build(reptile.meta_variables)
    _, direction, _ = reptile.meta_step(episode, iteration=tf.constant(0, tf.int64))
    optimizer.apply_gradients(zip(direction, reptile.meta_variables))
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e.numpy(), rtol=1e-12, atol=1e-14)


def test_reptile_direction_is_the_mean_adapted_difference():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    reptile = algorithms.Reptile(model, forward, losses.mean_squared_error, 0.01, 3,
                                 inner_optimizer="adam")
    episode = _sine_episode(num_tasks=3)
    theta = _values(model.trainable_variables)
    _, direction, _ = reptile.meta_step(episode, iteration=tf.constant(0, tf.int64))
    mean_diff = [tf.zeros_like(t) for t in theta]
    for t in range(3):
        # Each task alone, with a hand-written Adam(β1=0): φ_t.
        w = [x.numpy() for x in theta]
        v = [np.zeros_like(x) for x in w]
        for i in range(1, 4):
            with tf.GradientTape() as tape:
                ws = [tf.constant(x) for x in w]
                tape.watch(ws)
                loss = losses.mean_squared_error(episode.support_y[t:t + 1],
                                                 forward([x[None] for x in ws],
                                                         episode.support_x[t:t + 1]))[0]
            grads = [g.numpy() for g in tape.gradient(loss, ws)]
            v = [0.999 * a + 0.001 * g * g for a, g in zip(v, grads)]
            lr = 0.01 * np.sqrt(1 - 0.999 ** i)
            w = [x - lr * g / (np.sqrt(a) + 1e-8) for x, g, a in zip(w, grads, v)]
        mean_diff = [m + (th - x) / 3 for m, th, x in zip(mean_diff, theta, w)]
    for d, m in zip(direction, mean_diff):
        np.testing.assert_allclose(d.numpy(), m.numpy(), rtol=1e-8, atol=1e-12)


def test_reptile_mini_batches_cover_the_support_set():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2, k=6)
    params = _values(model.trainable_variables)
    seen = []
    reptile = algorithms.Reptile(model, forward, lambda y, p: (seen.append(y), tf.reduce_mean(
        tf.square(y - p), axis=[1, 2]))[1], 0.01, 3, inner_optimizer="sgd", inner_batch_size=2)
    reptile.adapt(params, episode.support_x, episode.support_y, 3)
    # Three mini-batches of 2 from 6 examples: every support target exactly once per task.
    batches = tf.concat(seen, axis=1).numpy()
    for t in range(2):
        np.testing.assert_allclose(np.sort(batches[t, :, 0]),
                                   np.sort(episode.support_y[t, :, 0].numpy()))


def test_reptile_adapts_outside_meta_training_with_eval_inner_batch_size():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2, k=6)
    params = _values(model.trainable_variables)

    def reptile(**batches):
        return algorithms.Reptile(model, forward, losses.mean_squared_error, 0.05, 3,
                                  inner_optimizer="sgd", **batches)

    def adapted(learner):
        weights, _ = learner.adapt(params, episode.support_x, episode.support_y, 3)
        return np.concatenate([w.numpy().ravel() for w in weights])

    def direction(learner):
        return np.concatenate([d.numpy().ravel() for d in learner.meta_step(episode)[1]])

    both = reptile(inner_batch_size=3, eval_inner_batch_size=2)
    # Evaluation, `adapt` and the export use mini-batches of 2 ...
    np.testing.assert_allclose(adapted(both), adapted(reptile(inner_batch_size=2)), rtol=1e-12)
    assert not np.allclose(adapted(both), adapted(reptile(inner_batch_size=3)))
    # ... the meta-step mini-batches of 3.
    np.testing.assert_allclose(direction(both), direction(reptile(inner_batch_size=3)),
                               rtol=1e-12)
    assert not np.allclose(direction(both), direction(reptile(inner_batch_size=2)))
    # Outside meta-training a task adapts the same alone as in a batch (every task is
    # shuffled alike), also across passes over its support set (5 steps of 2 from 6), and
    # evaluation's graph loop takes the same mini-batches as `adapt`.
    in_batch, _ = both.adapt(params, episode.support_x, episode.support_y, 5)
    alone, _ = both.adapt(params, episode.support_x[1:], episode.support_y[1:], 5)
    for a, b in zip(in_batch, alone):
        np.testing.assert_allclose(a[1].numpy(), b[0].numpy(), rtol=1e-12)
    _, predictions = evaluation.adaptation_curve(
        both, params, episode, lambda y, p: -losses.mean_squared_error(y, p), 5)
    np.testing.assert_allclose(predictions[-1].numpy(),
                               both.predict(params, in_batch, episode.query_x, 5).numpy(),
                               rtol=1e-12)
    # -1 (the flag's default) and None mean the training size.
    np.testing.assert_allclose(adapted(reptile(inner_batch_size=3, eval_inner_batch_size=-1)),
                               adapted(reptile(inner_batch_size=3)), rtol=1e-12)
    with pytest.raises(ValueError, match="eval_inner_batch_size"):
        reptile(inner_batch_size=3, eval_inner_batch_size=-2)
    with pytest.raises(ValueError, match="eval_inner_batch_size"):
        config_lib.Config(algorithm="reptile", eval_inner_batch_size=-2).validate()


@pytest.mark.parametrize("batch,steps", [(2, 6), (4, 3)])
def test_reptile_mini_batches_reshuffle_at_every_pass(batch, steps):
    # The original sampler: every pass over the support set in a new order, a mini-batch
    # running on into the next pass where one ends (batch 4 of 6: the second batch).
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2, k=6)
    seen = []
    reptile = algorithms.Reptile(model, forward, lambda y, p: (seen.append(y), tf.reduce_mean(
        tf.square(y - p), axis=[1, 2]))[1], 0.01, steps, inner_optimizer="sgd",
        inner_batch_size=batch)
    reptile.adapt(_values(model.trainable_variables), episode.support_x, episode.support_y,
                  steps, meta_training=True)
    stream = tf.concat(seen, axis=1).numpy()[..., 0]   # [tasks, 12]: two passes
    for t in range(2):
        support = np.sort(episode.support_y[t, :, 0].numpy())
        first, second = stream[t, :6], stream[t, 6:]
        np.testing.assert_allclose(np.sort(first), support)
        np.testing.assert_allclose(np.sort(second), support)
    assert any(not np.array_equal(stream[t, :6], stream[t, 6:]) for t in range(2))


def _sequential_reptile_reference(forward, theta, episodes, inner_lr, num_steps, epsilon):
    """The original code's Reptile, written out: one task at a time on one Adam(β₁=0) whose
    moments and step count carry from task to task and across meta-iterations."""
    theta = [x.numpy() for x in theta]
    v = [np.zeros_like(x) for x in theta]
    t = 0
    for episode in episodes:
        adapted = []
        for task in range(episode.support_x.shape[0]):
            w = list(theta)
            for _ in range(num_steps):
                t += 1
                ws = [tf.constant(x) for x in w]
                with tf.GradientTape() as tape:
                    tape.watch(ws)
                    loss = losses.mean_squared_error(
                        episode.support_y[task:task + 1],
                        forward([x[None] for x in ws], episode.support_x[task:task + 1]))[0]
                grads = [g.numpy() for g in tape.gradient(loss, ws)]
                v = [0.999 * a + 0.001 * g * g for a, g in zip(v, grads)]
                lr = inner_lr * np.sqrt(1 - 0.999 ** t)
                w = [x - lr * g / (np.sqrt(a) + 1e-8) for x, g, a in zip(w, grads, v)]
            adapted.append(w)
        mean = [np.mean(ws, axis=0) for ws in zip(*adapted)]
        theta = [x + epsilon * (m - x) for x, m in zip(theta, mean)]
    return theta, v, t


def _carried_reptile(model, num_steps, inner_lr=0.01, epsilon=0.5):
    reptile = algorithms.Reptile(model, functional.make_forward(model),
                                 losses.mean_squared_error, inner_lr, num_steps,
                                 inner_optimizer="adam", meta_step_size=epsilon,
                                 meta_step_size_final=epsilon, carry_inner_state=True)
    optimizer = reptile.make_optimizer(1e-3, num_iterations=100)
    optimizer.build(reptile.meta_variables)

    def step(episode, iteration):
        _, direction, outputs = reptile.meta_step(episode, iteration=tf.constant(iteration,
                                                                                 tf.int64))
        optimizer.apply_gradients(zip(direction, reptile.meta_variables))
        for variable, value in zip(reptile.state_variables, outputs.state_updates):
            variable.assign(value)
    return reptile, step


def test_reptile_carried_adam_state_is_the_original_sequential_algorithm():
    """One task per meta-batch: the carried state makes it exactly the original code's Reptile,
    whose Adam moments are never reset; fresh moments would not be."""
    model = _smooth_mlp()
    theta = _values(model.trainable_variables)
    reptile, step = _carried_reptile(model, num_steps=3)
    episodes = [Episode(*[t[i:i + 1] for t in _sine_episode(num_tasks=4)]) for i in range(4)]
    for i, episode in enumerate(episodes):
        step(episode, i)
    expected, v, t = _sequential_reptile_reference(reptile.forward, theta, episodes, 0.01, 3,
                                                   0.5)
    for a, b in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-12)
    _, carried_v, carried_t = reptile.carried_state()
    assert float(carried_t) == t == 12
    for a, b in zip(carried_v, v):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-15)
    # Fresh moments for every task (the default) is another algorithm: it differs.
    fresh_model = _smooth_mlp()
    fresh = algorithms.Reptile(fresh_model, reptile.forward, losses.mean_squared_error, 0.01, 3,
                               inner_optimizer="adam", meta_step_size=0.5,
                               meta_step_size_final=0.5)
    for variable, value in zip(fresh_model.trainable_variables, theta):
        variable.assign(value)
    optimizer = fresh.make_optimizer(1e-3, num_iterations=100)
    for i, episode in enumerate(episodes):
        _, direction, _ = fresh.meta_step(episode, iteration=tf.constant(i, tf.int64))
        optimizer.apply_gradients(zip(direction, fresh.meta_variables))
    gap = max(float(np.max(np.abs(a.numpy() - b)))
              for a, b in zip(fresh_model.trainable_variables, expected))
    assert gap > 1e-4, gap


@pytest.mark.parametrize("beta_2", [0.5, 0.999])
def test_reptile_carried_state_over_a_meta_batch_composes_the_tasks_in_sequence(beta_2):
    """n tasks side by side: the state becomes what the n tasks' accumulations, applied one after
    another, make of it: v ← β₂^{nk}·v + (1 − β₂^{nk}) / (1 − β₂^k) · mean_i(v_i − β₂^k·v),
    the mean accumulation standing for each task's (the tasks' order is arbitrary)."""
    num_tasks, k = 7, 2  # 7: 1 / fl(1/7) is not 7 in float arithmetic
    model = _smooth_mlp()
    reptile, step = _carried_reptile(model, num_steps=k)
    reptile.beta_2 = beta_2
    step(_sine_episode(num_tasks=num_tasks), 0)  # a non-zero state to start from
    _, v0, t0 = reptile.carried_state()
    v0 = [x.numpy() for x in v0]
    assert float(t0) == num_tasks * k
    episode = _sine_episode(num_tasks=num_tasks, k=6)
    _, _, (_, final_v, _) = reptile.adapt(_values(reptile.meta_variables), episode.support_x,
                                          episode.support_y, k, return_state=True)
    increments = [[x[i].numpy() - beta_2 ** k * x0 for x, x0 in zip(final_v, v0)]
                  for i in range(num_tasks)]
    mean = [np.mean(a, axis=0) for a in zip(*increments)]
    n_k = num_tasks * k
    closed_form = [beta_2 ** n_k * x0 + (1 - beta_2 ** n_k) / (1 - beta_2 ** k) * a
                   for x0, a in zip(v0, mean)]
    sequential = [beta_2 ** n_k * x0 for x0 in v0]
    for i in range(num_tasks):  # task i is followed by num_tasks - 1 - i others
        sequential = [e + beta_2 ** (k * (num_tasks - 1 - i)) * a
                      for e, a in zip(sequential, increments[i])]
    # Plausible mistakes the formula must not equal: the start state decayed by one task's
    # steps only; n times the mean accumulation.
    mistakes = [[beta_2 ** k * x0 + (1 - beta_2 ** n_k) / (1 - beta_2 ** k) * a
                 for x0, a in zip(v0, mean)],
                [beta_2 ** n_k * x0 + num_tasks * a for x0, a in zip(v0, mean)]]
    step(episode, 1)
    _, v, t = reptile.carried_state()
    assert float(t) == 2 * num_tasks * k
    for j, a in enumerate(v):
        np.testing.assert_allclose(a.numpy(), closed_form[j], rtol=1e-9, atol=1e-15)
        for mistake in mistakes:
            assert np.max(np.abs(a.numpy() - mistake[j]) / np.abs(mistake[j])) > 1e-3
    if beta_2 > 0.99:
        # Adam's β₂: within the order's effect of running the tasks in sequence.
        for a, b in zip(v, sequential):
            np.testing.assert_allclose(a.numpy(), b, rtol=2e-2)


def test_reptile_carried_state_is_checkpointed_resumed_and_adapted_from(tmp_path, start_steps):
    settings = dict(algorithm="reptile", inner_optimizer="adam", inner_lr=0.01,
                    num_inner_steps=3, carry_inner_state=True, meta_batch_size=4,
                    checkpoint_every=10, log_every=10, validate_every=0,
                    # ε constant: its annealing depends on num_iterations, which differs.
                    meta_step_size=0.5, meta_step_size_final=0.5)
    straight, _ = trainer.train(config_lib.Config(num_iterations=40, **settings),
                                str(tmp_path / "straight"))
    trainer.train(config_lib.Config(num_iterations=20, **settings), str(tmp_path / "resumed"))
    trainer.train(config_lib.Config(num_iterations=40, **settings), str(tmp_path / "resumed"))
    resumed, step = experiment_lib.restore(str(tmp_path / "resumed"), load_tasks=True)
    assert step == 40 and start_steps == [0, 0, 20]  # resumed at 20, not restarted
    carried = resumed.algorithm.state_variables
    assert float(carried[-1]) == 40 * 4 * 3  # t: every inner step of every task
    for a, b in zip(straight.algorithm.meta_variables + straight.algorithm.state_variables,
                    resumed.algorithm.meta_variables + carried):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    # Evaluation adapts from the carried state: zero it and the adapted predictions change.
    episode = resumed.tasks.sample(tf.constant([5, 5], tf.int64), 2, tasks_lib.TEST)
    params = resumed.algorithm.meta_variables

    def adapted_predictions():
        adapted, _ = resumed.algorithm.adapt(params, episode.support_x, episode.support_y, 3)
        return resumed.algorithm.predict(params, adapted, episode.query_x, 3).numpy()
    carried_predictions = adapted_predictions()
    for variable in carried:
        variable.assign(tf.zeros_like(variable))
    assert np.max(np.abs(carried_predictions - adapted_predictions())) > 1e-3


@pytest.mark.parametrize("options,message", [
    (dict(algorithm="reptile", inner_optimizer="sgd"),
     "carry_inner_state is for algorithm=reptile with inner_optimizer=adam"),
    (dict(algorithm="maml"), "carry_inner_state is for algorithm=reptile \\(got algorithm=maml"),
])
def test_carry_inner_state_needs_reptile_with_adam(options, message):
    with pytest.raises(ValueError, match=message):
        config_lib.Config(carry_inner_state=True, **options).validate()


@pytest.mark.parametrize("options,message", [
    (dict(algorithm="maml", inner_batch_size=5), "inner_batch_size is for algorithm=reptile"),
    (dict(algorithm="anil", meta_step_size=0.5), "meta_step_size is for algorithm=reptile"),
    (dict(algorithm="maml", inner_optimizer="adam"), "inner_optimizer is for algorithm=reptile"),
    (dict(algorithm="metasgd", eval_inner_batch_size=5),
     "eval_inner_batch_size is for algorithm=reptile"),
    (dict(algorithm="maml", per_step_bn=False), "per_step_bn is for algorithm=mamlpp"),
    (dict(algorithm="reptile", min_meta_lr=1e-4), "min_meta_lr is for algorithm=mamlpp"),
    (dict(algorithm="reptile", first_order=True), "first_order does not apply to algorithm=rep"),
    (dict(algorithm="metasgd", num_inner_steps=0), "pretrained baseline, is for algorithm=maml"),
    (dict(algorithm="anil", num_inner_steps=0), "pretrained baseline, is for algorithm=maml"),
    (dict(dataset="omniglot", n_way=1), "n_way must be at least 2 for classification"),
    (dict(algorithm="reptile", meta_gradient_clip=10.0),
     r"^meta_gradient_clip is for algorithm=maml, anil, metasgd or mamlpp \(got "
     r"algorithm=reptile, where it would be ignored\)$"),
    (dict(dataset="navigation2d", meta_gradient_clip=10.0),
     "meta_gradient_clip is for supervised datasets"),
    (dict(meta_gradient_clip=-1.0), "meta_gradient_clip must be a non-negative number"),
])
def test_options_of_another_algorithm_are_refused(options, message):
    """An option the chosen algorithm would ignore is an error, not silently dropped."""
    with pytest.raises(ValueError, match=message):
        config_lib.Config(**options).validate()
    # Each option is accepted by its own algorithm.
    name = next(iter(set(options) - {"algorithm"}), None)
    for algorithm, names in config_lib.ALGORITHM_OPTIONS.items():
        if name in names:
            own = dict(algorithm=algorithm, **{name: options[name]})
            if name == "eval_inner_batch_size" or name == "inner_batch_size":
                own["inner_optimizer"] = "sgd"
            config_lib.Config(**own).validate()


@pytest.mark.parametrize("options,message", [
    (dict(dataset="navigation2d", n_way=20), "n_way is for supervised datasets \\(got dataset "
                                              "navigation2d, where it would be ignored\\)"),
    (dict(dataset="navigation2d", k_shot=5), "k_shot is for supervised datasets"),
    (dict(dataset="halfcheetah_velocity", transductive=False),
     "transductive is for supervised datasets"),
    (dict(dataset="navigation2d", data_dir="/data"), "data_dir is for supervised datasets"),
    (dict(dataset="sine", data_dir="/data"),
     r"data_dir is for datasets read from files \(omniglot, miniimagenet, folder, tfds\) "
     r"\(got dataset sine, where it would be ignored\)"),
    (dict(dataset="navigation2d", meta_lr=0.5),
     "meta_lr is for outer_optimizer=adam \\(TRPO's step size is max_kl\\) \\(got "
     "outer_optimizer=trpo"),
    (dict(dataset="navigation2d", outer_optimizer="adam", max_kl=0.05),
     "max_kl is for outer_optimizer=trpo \\(got outer_optimizer=adam"),
    (dict(dataset="navigation2d", outer_optimizer="adam", cg_iterations=20),
     "cg_iterations is for outer_optimizer=trpo"),
    (dict(dataset="sine", horizon=50), "horizon is for reinforcement learning \\(got dataset "
                                       "sine"),
    (dict(dataset="omniglot", outer_optimizer="adam"),
     "outer_optimizer is for reinforcement learning"),
    (dict(dataset="custom", max_kl=0.05), "max_kl is for reinforcement learning"),
    (dict(dataset="miniimagenet", data_dir="/data", image_size=32),
     "image_size applies to dataset folder and tfds:NAME only, not to 'miniimagenet'"),
    (dict(dataset="omniglot", class_split="0.5,0.25,0.25"), "class_split applies to dataset"),
    (dict(dataset="tfds:mnist", image_channels=1),
     "image_channels applies to dataset folder only, not to 'tfds:mnist'"),
    (dict(dataset="sine", n_way=20),
     "n_way is for classification datasets \\(got dataset sine, where it would be ignored"),
    (dict(dataset="sine", omniglot_split="lake"), "omniglot_split is for dataset omniglot"),
    (dict(dataset="miniimagenet", data_dir="/data", augment_rotations=False),
     "augment_rotations is for dataset omniglot \\(got dataset miniimagenet"),
    (dict(dataset="sine", split_seed=3),
     "split_seed is for datasets omniglot, folder and tfds:NAME \\(got dataset sine"),
])
def test_options_of_the_other_kind_of_dataset_are_refused(options, message):
    """Supervised options for an environment, RL options for supervised tasks, and one
    dataset's options for another."""
    with pytest.raises(ValueError, match=message):
        config_lib.Config(**options).validate()
    # meta_lr is read by the Adam outer optimizer; each dataset takes its own options.
    config_lib.Config(dataset="navigation2d", outer_optimizer="adam", meta_lr=0.5).validate()
    config_lib.Config(dataset="omniglot", omniglot_split="lake", augment_rotations=False,
                      split_seed=3, n_way=20).validate()
    config_lib.Config(dataset="folder", data_dir="/data", split_seed=3).validate()


# -- every algorithm end to end -----------------------------------------------------------------

# name: (settings, the largest query-error ratio after/before adaptation we accept). Joint
# training (the inner loop removed) reaches about 0.75 in this setting; the meta-learned
# initializations reach 0.15-0.4 (ANIL, whose head alone adapts, about 0.6 with α = 0.1).
ALGORITHM_SETTINGS = {
    "maml": (dict(), 0.5),
    "anil": (dict(inner_lr=0.1), 0.7),
    "metasgd": (dict(), 0.5),
    "mamlpp": (dict(num_inner_steps=2, iterations_per_epoch=100, msl_epochs=2,
                    first_order_epochs=1), 0.5),
    "reptile": (dict(num_inner_steps=5, inner_optimizer="sgd", inner_lr=0.02), 0.5),
}


@pytest.mark.parametrize("name", sorted(ALGORITHM_SETTINGS))
def test_every_algorithm_meta_learns_and_checkpoints_its_meta_parameters(name, tmp_path):
    settings = dict(num_iterations=1000, log_every=500, checkpoint_every=1000, validate_every=0)
    overrides, largest_ratio = ALGORITHM_SETTINGS[name]
    config = config_lib.Config(algorithm=name, **settings, **overrides)
    trained, _ = trainer.train(config, str(tmp_path))
    restored, step = experiment_lib.restore(str(tmp_path), load_tasks=True)
    assert step == 1000 and restored.algorithm.name == name
    for a, b in zip(trained.algorithm.meta_variables, restored.algorithm.meta_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Evaluated with as many steps as it was trained for (learned rates are per step).
    curve = evaluation.make_curve_fn(restored.algorithm, restored.metric_fn,
                                     config.num_inner_steps)
    per_task = evaluation.evaluate_model(curve, restored.algorithm.meta_variables,
                                         restored.tasks, 0, 100, tasks_lib.TEST)
    mean, _ = evaluation.summarize(per_task)
    # What only meta-learning gives: adapting the learned initialization on K=10
    # points cuts the query error well below that of the initialization itself.
    assert mean[-1] < largest_ratio * mean[0], mean


def test_non_transductive_evaluation_hides_the_other_query_examples():
    """Without batch norm both protocols agree; with it, each query example is predicted
    with statistics of the support set and itself only, so the answer for one example does
    not change when the other query examples do."""
    episode = _class_episode(num_tasks=2)
    plain = _smooth_mlp()
    sine = _sine_episode(num_tasks=2)
    maml = algorithms.MAML(plain, functional.make_forward(plain), losses.mean_squared_error,
                           0.05, 1)
    _, alone = evaluation.adaptation_curve(maml, maml.meta_variables, sine,
                                           losses.mean_squared_error, 2, transductive=False)
    _, together = evaluation.adaptation_curve(maml, maml.meta_variables, sine,
                                              losses.mean_squared_error, 2)
    np.testing.assert_allclose(alone[2].numpy(), together[2].numpy(), rtol=1e-9, atol=1e-12)

    model = _dense_bn()
    bn = algorithms.MAML(model, functional.make_forward(model),
                         losses.sparse_softmax_cross_entropy, 0.3, 1)
    changed = episode._replace(query_x=tf.concat([episode.query_x[:, :1],
                                                  3.0 * episode.query_x[:, 1:]], axis=1))
    results = {}
    for name, e in (("original", episode), ("changed", changed)):
        for transductive in (True, False):
            _, predictions = evaluation.adaptation_curve(
                bn, bn.meta_variables, e, losses.accuracy, 1, transductive=transductive)
            results[name, transductive] = predictions[1][:, 0].numpy()
    np.testing.assert_allclose(results["original", False], results["changed", False],
                               rtol=1e-9, atol=1e-12)
    assert not np.allclose(results["original", True], results["changed", True])


def test_transductive_with_the_support_set_is_one_batch_of_support_and_query():
    """With the support set, batch norm sees the support and query sets together, so the
    query predictions are those of the model on their concatenation."""
    episode = _class_episode(num_tasks=2)
    model = _dense_bn()
    bn = algorithms.MAML(model, functional.make_forward(model),
                         losses.sparse_softmax_cross_entropy, 0.3, 1)
    _, with_support = evaluation.adaptation_curve(bn, bn.meta_variables, episode,
                                                  losses.accuracy, 0, transductive_support=True)
    _, query_alone = evaluation.adaptation_curve(bn, bn.meta_variables, episode,
                                                 losses.accuracy, 0)
    support_k = episode.support_x.shape[1]
    for task in range(2):   # Keras itself, on the concatenated batch, in training mode
        both = tf.concat([episode.support_x[task], episode.query_x[task]], 0)
        expected = model(both, training=True).numpy()[support_k:]
        np.testing.assert_allclose(with_support[0][task].numpy(), expected, rtol=1e-5,
                                   atol=1e-6)
    assert not np.allclose(with_support[0].numpy(), query_alone[0].numpy())
    # Without `transductive` it is ignored: the non-transductive protocol, unchanged.
    _, alone = evaluation.adaptation_curve(bn, bn.meta_variables, episode, losses.accuracy, 0,
                                           transductive=False)
    _, alone_too = evaluation.adaptation_curve(bn, bn.meta_variables, episode, losses.accuracy,
                                               0, transductive=False, transductive_support=True)
    np.testing.assert_array_equal(alone[0].numpy(), alone_too[0].numpy())


# -- recomputed inner steps (memory for many inner steps) ----------------------------------------

def _meta_gradient(name, model, episode, loss_fn, recompute, **options):
    config = config_lib.Config(algorithm=name, inner_lr=0.1, num_inner_steps=3,
                               recompute_inner_steps=recompute, msl_epochs=2,
                               iterations_per_epoch=10, **options)
    algorithm = algorithms.build(config, model, functional.make_forward(model), loss_fn)
    loss, grads, _ = tf.function(lambda: algorithm.meta_step(episode))()
    return float(loss), grads


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "mamlpp"])
def test_recomputed_inner_steps_give_the_same_meta_gradient(name, monkeypatch):
    # Three second-order steps through batch norm, in float64: recomputing each
    # step's activations in the backward pass must change nothing, for the
    # initialization and for every meta-parameter read inside the steps (the
    # learned rates of Meta-SGD and MAML++, MAML++'s per-step batch-norm
    # weights, ANIL's body through its features).
    keras.utils.set_random_seed(1)
    model = _dense_bn()
    episode = _class_episode()
    calls = []
    recomputed_step = core._recomputed_step
    monkeypatch.setattr(core, "_recomputed_step",
                        lambda *args: calls.append(1) or recomputed_step(*args))
    plain_loss, plain = _meta_gradient(name, model, episode,
                                       losses.sparse_softmax_cross_entropy, False)
    assert not calls
    loss, recomputed = _meta_gradient(name, model, episode,
                                      losses.sparse_softmax_cross_entropy, True)
    assert len(calls) == 3  # each of the 3 inner steps took the recomputing path
    assert loss == pytest.approx(plain_loss, rel=1e-12)
    assert len(recomputed) == len(plain)
    # Every meta-parameter but MAML++'s initial batch-norm weights (replaced by
    # its per-step copies) gets a gradient.
    assert sum(float(tf.reduce_max(tf.abs(g))) > 0 for g in plain) >= len(plain) - 2
    for a, b in zip(plain, recomputed):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-12)


def test_recomputed_inner_steps_on_the_layer_batched_conv_path():
    # float32 conv4 (grouped convolutions, fused batch norm): the same meta-gradient
    # up to round-off, and the recomputation really happens in the backward pass
    # (the forward convolutions of the inner steps run twice).
    keras.utils.set_random_seed(0)
    from tf_maml import models

    model = models.conv4(3, input_shape=(12, 12, 1), filters=4)
    rng = np.random.default_rng(0)
    y = tf.constant(np.tile(np.arange(3), (2, 1)), tf.int32)
    episode = Episode(tf.constant(rng.random((2, 3, 12, 12, 1)), tf.float32), y,
                      tf.constant(rng.random((2, 3, 12, 12, 1)), tf.float32), y)
    counts = {}
    grads = {}
    for recompute in (False, True):
        config = config_lib.Config(algorithm="maml", inner_lr=0.1, num_inner_steps=3,
                                   recompute_inner_steps=recompute)
        algorithm = algorithms.build(config, model, functional.make_forward(model),
                                     losses.sparse_softmax_cross_entropy)
        step = tf.function(lambda: algorithm.meta_step(episode)[1])
        grads[recompute] = step()
        graph = step.get_concrete_function().graph
        counts[recompute] = _count_ops(graph, "Conv2D")
    for a, b in zip(grads[False], grads[True]):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6)
    # 3 steps × 4 layers of support forward convolutions run again.
    assert counts[True] == counts[False] + 12, counts


def _count_ops(graph, op_type):
    count, seen = 0, set()

    def walk(g):
        nonlocal count
        for op in g.get_operations():
            count += op.type == op_type
            for attr in op.node_def.attr.values():
                names = ([attr.func.name] if attr.HasField("func") else []) + (
                    [f.name for f in attr.list.func] if attr.HasField("list") else [])
                for name in names:
                    function = g._get_function(name)
                    if function is not None and name not in seen:
                        seen.add(name)
                        walk(function.graph)

    walk(graph)
    return count


@pytest.mark.parametrize("options, message", [
    (dict(first_order=True), "second-order meta-gradients only"),
    (dict(algorithm="reptile"), "second-order meta-gradients only"),
    (dict(dataset="navigation2d"), "not available for reinforcement learning"),
])
def test_recompute_inner_steps_refuses_what_it_cannot_apply_to(options, message):
    with pytest.raises(ValueError, match=message):
        config_lib.Config(recompute_inner_steps=True, **options).validate()


@pytest.mark.parametrize("in_graph", [False, True])
def test_recomputed_step_differentiates_variables_it_reads_directly(in_graph):
    # A task loss that reads a tf.Variable itself (not through the weights or
    # the listed inputs) still gets that variable's gradient right.
    scale = tf.Variable(1.5, dtype=tf.float64)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 3)), tf.float64)
    w0 = tf.constant(np.random.default_rng(1).normal(size=(2, 3)), tf.float64)

    def task_loss(weights, step):
        return tf.reduce_sum(tf.tanh(scale * tf.einsum("tbi,ti->tb", x, weights[0])) ** 2,
                             axis=1)

    def meta_loss(recompute):
        with tf.GradientTape() as tape:
            adapted, _ = core.adapt(task_loss, [w0], 2, core.SGD(0.3), recompute=recompute)
            loss = tf.reduce_sum(task_loss(adapted, 2))
        return tape.gradient(loss, scale)

    run = tf.function(meta_loss) if in_graph else meta_loss
    plain, recomputed = run(False), run(True)
    assert abs(float(plain)) > 1e-3
    np.testing.assert_allclose(float(recomputed), float(plain), rtol=1e-10)


def test_recompute_inner_steps_refuses_models_with_random_layers():
    # The recomputed step would draw new dropout masks: the meta-gradient would be
    # that of masks the forward pass never used. Refused when the model is planned.
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    config = config_lib.Config(recompute_inner_steps=True)
    with pytest.raises(ValueError, match="without random layers"):
        algorithms.build(config, model, functional.make_forward(model),
                         losses.mean_squared_error)
    # Without the option the same model builds.
    algorithms.build(config_lib.Config(), model, functional.make_forward(model),
                     losses.mean_squared_error)


def test_recompute_inner_steps_turns_xla_off_and_refuses_forcing_it():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    assert experiment_lib.resolve_jit_compile(config_lib.Config(), model)  # dense: XLA
    assert not experiment_lib.resolve_jit_compile(
        config_lib.Config(recompute_inner_steps=True), model)
    with pytest.raises(ValueError, match="jit_compile=true"):
        config_lib.Config(recompute_inner_steps=True, jit_compile="true").validate()


def test_metalearner_accepts_recompute_inner_steps():
    from tf_maml import keras_face

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    learner = keras_face.MetaLearner(model, inner_lr=0.1, num_inner_steps=2,
                                     recompute_inner_steps=True)
    assert learner.algorithm.recompute_inner_steps
