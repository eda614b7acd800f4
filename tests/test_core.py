"""Behaviour of the MAML core: exact meta-gradients, first-order identity, descent."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import algorithms, core, functional, losses
from tf_maml.tasks import Episode, SineTasks


def maml_meta_gradients(forward, params, episode, loss_fn, inner_lr, num_inner_steps,
                        first_order=False, *, model):
    """MAML's meta-loss and meta-gradient at `params` (through the algorithm over the core)."""
    algorithm = algorithms.MAML(model, forward, loss_fn, inner_lr, num_inner_steps, first_order)
    return core.meta_gradients(lambda ps: algorithm.meta_loss(ps, episode), list(params))


def _adapt(forward, weights, x, y, loss_fn, inner_lr, num_steps):
    adapted, _ = core.adapt(core.supervised_loss(forward, loss_fn, x, y), weights, num_steps,
                            core.SGD(inner_lr))
    return adapted


def _smooth_mlp(dtype="float64"):
    return keras.Sequential([
        keras.Input((1,), dtype=dtype),
        keras.layers.Dense(8, activation="tanh", dtype=dtype),
        keras.layers.Dense(8, activation="tanh", dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])


def _conv_bn(dtype="float64"):
    return keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.Activation("tanh", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
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


def _fd_check(forward, params, episode, loss_fn, inner_lr, steps, first_order=False, seed=0, *,
              model):
    """Returns (analytic, numeric) directional derivatives along random directions."""
    params = [tf.convert_to_tensor(p) for p in params]

    @tf.function
    def loss_at(ps):
        loss, _, _ = maml_meta_gradients(forward, ps, episode, loss_fn, inner_lr, steps,
                                         first_order=first_order, model=model)
        return loss

    _, grads, _ = maml_meta_gradients(forward, params, episode, loss_fn, inner_lr, steps,
                                      first_order=first_order, model=model)
    rng = np.random.default_rng(seed)
    analytic, numeric = [], []
    eps = 1e-5
    for _ in range(4):
        direction = [tf.constant(rng.normal(size=p.shape), p.dtype) for p in params]
        analytic.append(sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction)))
        plus = loss_at([p + eps * d for p, d in zip(params, direction)])
        minus = loss_at([p - eps * d for p, d in zip(params, direction)])
        numeric.append(float(plus - minus) / (2 * eps))
    return np.array(analytic), np.array(numeric)


def test_second_order_meta_gradient_matches_finite_differences():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    analytic, numeric = _fd_check(forward, model.trainable_variables, _sine_episode(),
                                  losses.mean_squared_error, inner_lr=0.05, steps=3, model=model)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    # The check has teeth: the first-order gradient is measurably different.
    fo, _ = _fd_check(forward, model.trainable_variables, _sine_episode(),
                      losses.mean_squared_error, inner_lr=0.05, steps=3, first_order=True,
                      model=model)
    assert np.max(np.abs(fo - numeric) / np.abs(numeric)) > 1e-3


def _dense_bn(dtype="float64"):
    return keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(8, use_bias=False, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.Activation("tanh", dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
    ])


@pytest.mark.parametrize("build,vectorize", [(_conv_bn, "map_fn"), (_dense_bn, "map_fn"),
                                             (_dense_bn, "layers")])
def test_second_order_exact_with_batch_norm(build, vectorize):
    model = build()
    forward = functional.make_forward(model, vectorize=vectorize)
    analytic, numeric = _fd_check(forward, model.trainable_variables, _class_episode(),
                                  losses.sparse_softmax_cross_entropy, inner_lr=0.5, steps=2,
                                  model=model)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_layer_batched_conv_bn_meta_gradient_equals_per_task_path():
    """float32 (grouped-convolution gradients have no float64 CPU kernel): the
    fast path's second-order meta-gradient equals the FD-verified per-task path."""
    model = _conv_bn(dtype="float32")
    episode = Episode(*[tf.cast(t, tf.float32) if t.dtype == tf.float64 else t
                        for t in _class_episode()])
    results = []
    for vectorize in ("layers", "map_fn"):
        forward = functional.make_forward(model, vectorize=vectorize)
        loss, grads, _ = maml_meta_gradients(forward, model.trainable_variables, episode,
                                             losses.sparse_softmax_cross_entropy, 0.5, 2,
                                             model=model)
        results.append((loss, grads))
    np.testing.assert_allclose(results[0][0].numpy(), results[1][0].numpy(), rtol=1e-5)
    # Observed: at most 5e-7 of each gradient's largest entry (float32 reordering).
    for a, b in zip(results[0][1], results[1][1]):
        scale = np.max(np.abs(b.numpy()))
        np.testing.assert_allclose(a.numpy() / scale, b.numpy() / scale, rtol=0, atol=5e-6)


def test_stock_keras_moments_would_break_second_order():
    """Documents the trap the library fixes: tf.nn.moments' stop_gradient."""
    model = _conv_bn()
    non_trainable = [v.value for v in model.non_trainable_variables]

    def stock_forward(weights, x, training=True):
        return tf.map_fn(
            lambda a: model.stateless_call(list(a[0]), non_trainable, a[1], training=training)[0],
            (list(weights), x), fn_output_signature=weights[0].dtype)

    analytic, numeric = _fd_check(stock_forward, model.trainable_variables, _class_episode(),
                                  losses.sparse_softmax_cross_entropy, inner_lr=0.5, steps=2,
                                  model=model)
    assert np.max(np.abs(analytic - numeric) / np.abs(numeric)) > 1e-2


def test_first_order_gradient_is_query_gradient_at_adapted_weights():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=3)
    params = [v.value for v in model.trainable_variables]
    _, grads, _ = maml_meta_gradients(forward, params, episode, losses.mean_squared_error,
                                      inner_lr=0.05, num_inner_steps=2, first_order=True,
                                      model=model)
    # Independently: adapt each task with plain stateless_call, then take the
    # query-loss gradient at its adapted weights, and average over tasks.
    expected = [tf.zeros_like(p) for p in params]
    for t in range(3):
        w = list(params)
        for _ in range(2):
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = tf.reduce_mean(tf.square(
                    model.stateless_call(w, [], episode.support_x[t])[0] - episode.support_y[t]))
            w = [a - 0.05 * g for a, g in zip(w, tape.gradient(loss, w))]
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_mean(tf.square(
                model.stateless_call(w, [], episode.query_x[t])[0] - episode.query_y[t]))
        expected = [e + g / 3 for e, g in zip(expected, tape.gradient(loss, w))]
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-12)


def test_adaptation_lowers_support_loss_for_every_task():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=6)
    weights = core.broadcast_to_tasks(model.trainable_variables, 6)
    before = losses.mean_squared_error(episode.support_y, forward(weights, episode.support_x))
    adapted = _adapt(forward, weights, episode.support_x, episode.support_y,
                     losses.mean_squared_error, inner_lr=0.02, num_steps=3)
    after = losses.mean_squared_error(episode.support_y, forward(adapted, episode.support_x))
    assert np.all(after.numpy() < before.numpy())


def test_tasks_adapt_independently():
    """Adapting a meta-batch equals adapting each task alone."""
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=4)
    weights = core.broadcast_to_tasks(model.trainable_variables, 4)
    together = _adapt(forward, weights, episode.support_x, episode.support_y,
                      losses.mean_squared_error, inner_lr=0.05, num_steps=2)
    for t in range(4):
        alone = _adapt(forward, [w[t:t + 1] for w in weights], episode.support_x[t:t + 1],
                       episode.support_y[t:t + 1], losses.mean_squared_error,
                       inner_lr=0.05, num_steps=2)
        for a, b in zip(together, alone):
            np.testing.assert_allclose(a[t].numpy(), b[0].numpy(), rtol=1e-10, atol=1e-12)


def test_per_parameter_inner_lr_is_matched_to_its_weight():
    """Distinct per-tensor and per-element rates: each weight moves by its own rate."""
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2)
    weights = core.broadcast_to_tasks(model.trainable_variables, 2)
    rng = np.random.default_rng(5)
    rates = [tf.constant(0.01 * (i + 1), tf.float64) if i % 2 else
             tf.constant(rng.uniform(0.001, 0.05, size=w.shape[1:]), tf.float64)
             for i, w in enumerate(weights)]
    task_loss = core.supervised_loss(forward, losses.mean_squared_error, episode.support_x,
                                     episode.support_y)
    adapted, _ = core.adapt(task_loss, weights, 1, core.SGD(rates))
    with tf.GradientTape() as tape:
        tape.watch(weights)
        total = tf.reduce_sum(task_loss(weights, 0))
    grads = tape.gradient(total, weights)
    for a, w, g, r in zip(adapted, weights, grads, rates):
        np.testing.assert_allclose(a.numpy(), (w - r * g).numpy(), rtol=1e-12, atol=1e-14)
    # Rates in the wrong order give other weights: the check has teeth.
    swapped = list(rates)
    swapped[1], swapped[3] = rates[3], rates[1]
    moved, _ = core.adapt(task_loss, weights, 1, core.SGD(swapped))
    assert not np.allclose(moved[1].numpy(), adapted[1].numpy())


def test_per_step_rates_use_their_step():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2)
    weights = core.broadcast_to_tasks(model.trainable_variables, 2)
    task_loss = core.supervised_loss(forward, losses.mean_squared_error, episode.support_x,
                                     episode.support_y)
    per_step = [tf.constant([0.01, 0.03], tf.float64)] * len(weights)
    two, _ = core.adapt(task_loss, weights, 2, core.SGD(per_step, per_step=True))
    one, _ = core.adapt(task_loss, weights, 1, core.SGD(0.01))
    expected, _ = core.adapt(task_loss, one, 1, core.SGD(0.03))
    for a, b in zip(two, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
    # A graph loop (a run-time step count) reads the same rows.
    looped, _ = core.adapt(task_loss, weights, tf.constant(2), core.SGD(per_step, per_step=True))
    for a, b in zip(looped, two):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)


def test_adam_inner_optimizer_matches_reference():
    """core.Adam on a task-batched weight equals a hand-written Adam on each task."""
    w0 = tf.constant([[1.0, -2.0], [0.5, 3.0]], tf.float64)     # 2 tasks, 2 parameters
    targets = tf.constant([[0.0, 1.0], [2.0, -1.0]], tf.float64)

    def task_loss(weights, step):
        return tf.reduce_sum(tf.square(weights[0] - targets) * [[1.0, 3.0]], axis=1)

    adapted, _ = core.adapt(task_loss, [w0], 3, core.Adam(0.1, beta_1=0.5, beta_2=0.9))
    for t in range(2):
        w, m, v = w0[t].numpy(), 0.0, 0.0
        for i in range(1, 4):
            g = 2 * (w - targets[t].numpy()) * np.array([1.0, 3.0])
            m = 0.5 * m + 0.5 * g
            v = 0.9 * v + 0.1 * g * g
            w = w - 0.1 * (m / (1 - 0.5 ** i)) / (np.sqrt(v / (1 - 0.9 ** i)) + 1e-8)
        np.testing.assert_allclose(adapted[0][t].numpy(), w, rtol=1e-7)


def test_meta_gradients_of_a_structure():
    params = {"theta": tf.constant([1.0, 2.0], tf.float64), "rate": tf.constant(0.1, tf.float64)}

    def objective(p):
        adapted, _ = core.adapt(lambda w, s: tf.reduce_sum(tf.square(w[0]), axis=1)[None],
                                [p["theta"][None]], 1, core.SGD(p["rate"]))
        return tf.reduce_sum(adapted[0] ** 2), {}

    loss, grads, _ = core.meta_gradients(objective, params)
    # adapted = theta (1 - 2 rate); loss = |theta|^2 (1 - 2 rate)^2.
    np.testing.assert_allclose(loss.numpy(), 5 * 0.8 ** 2)
    np.testing.assert_allclose(grads["theta"].numpy(), 2 * np.array([1.0, 2.0]) * 0.8 ** 2)
    np.testing.assert_allclose(grads["rate"].numpy(), 5 * 2 * 0.8 * -2)


def test_inner_lr_and_num_steps_errors():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2)
    weights = core.broadcast_to_tasks(model.trainable_variables, 2)
    with pytest.raises(ValueError, match="inner_lr has 1 entries"):
        _adapt(forward, weights, episode.support_x, episode.support_y,
               losses.mean_squared_error, inner_lr=[0.1], num_steps=1)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        _adapt(forward, weights, episode.support_x, episode.support_y,
               losses.mean_squared_error, inner_lr=0.1, num_steps=-1)


def test_user_mistakes_that_silently_changed_the_step_are_refused():
    """A user trial: a per-example loss made every inner step batch-size times larger, a
    scalar one divided it by the task count, and a vector meta-objective summed the tasks'
    gradients, all silently."""
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=4, k=5)
    weights = core.broadcast_to_tasks(model.trainable_variables, 4)

    def per_example(y, p):
        return tf.reduce_mean(tf.square(y - p), axis=-1)  # [tasks, examples]

    def scalar(y, p):
        return tf.reduce_mean(tf.square(y - p))

    for loss_fn, pattern in ((per_example, r"returned shape \[4, 5\] \(per-example losses\?"),
                             (scalar, r"returned a scalar \(the mean over tasks\?\)")):
        with pytest.raises(ValueError, match=pattern):
            _adapt(forward, weights, episode.support_x, episode.support_y, loss_fn, 0.1, 1)
    with pytest.raises(ValueError, match="returned 3 losses for weights of 4 tasks"):
        core.inner_step(lambda w, s: tf.zeros([3], tf.float64), weights, core.SGD(0.1))
    # A loss reduced with keepdims ([num_tasks, 1]) is one per task: the same step.
    kept = _adapt(forward, weights, episode.support_x, episode.support_y,
                  lambda y, p: losses.mean_squared_error(y, p)[:, None], 0.1, 1)
    plain = _adapt(forward, weights, episode.support_x, episode.support_y,
                   losses.mean_squared_error, 0.1, 1)
    for a, b in zip(kept, plain):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    def vector_objective(params):
        adapted = _adapt(forward, core.broadcast_to_tasks(params, 4), episode.support_x,
                         episode.support_y, losses.mean_squared_error, 0.1, 1)
        return losses.mean_squared_error(episode.query_y, forward(adapted, episode.query_x)), {}

    with pytest.raises(ValueError, match=r"must return a scalar loss, got shape \[4\]"):
        core.meta_gradients(vector_objective, model.trainable_variables)
    # One value kept in its axes (keepdims=True) is a scalar: the same meta-gradient.
    scalar = core.meta_gradients(lambda p: (tf.reduce_mean(vector_objective(p)[0]), {}),
                                 model.trainable_variables)
    kept = core.meta_gradients(
        lambda p: (tf.reduce_mean(vector_objective(p)[0], keepdims=True), {}),
        model.trainable_variables)
    assert kept[0].shape == []
    for a, b in zip(scalar[1], kept[1]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Rates that cannot be a weight's, or per-step rates without their step axis.
    with pytest.raises(ValueError, match=r"inner_lr entry 0 has shape \[3, 3\], which does "
                                         r"not broadcast to adapted weight 0's shape \[1, 8\] "
                                         r"\(or with the task axis, \[4, 1, 8\]\)"):
        _adapt(forward, weights, episode.support_x, episode.support_y,
               losses.mean_squared_error, [tf.ones([3, 3], tf.float64)] * 6, 1)
    with pytest.raises(ValueError, match="per_step rates need a leading step axis"):
        core.adapt(core.supervised_loss(forward, losses.mean_squared_error, episode.support_x,
                                        episode.support_y), weights, 1,
                   core.SGD(0.1, per_step=True))


def test_meta_parameters_no_gradient_reaches_are_named():
    """A user trial: a non-differentiable op (round) froze the layers before it, silently."""
    inputs = keras.Input((1,), dtype="float64")
    hidden = keras.layers.Dense(8, dtype="float64")(inputs)
    rounded = keras.layers.Lambda(tf.round, dtype="float64")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float64")(rounded))
    algorithm = algorithms.MAML(model, functional.make_forward(model),
                                losses.mean_squared_error, 0.1, 1)
    with mock.patch.object(core.logging, "warning") as warning:
        _, grads, _ = algorithm.meta_step(_sine_episode())
    assert [float(tf.reduce_max(tf.abs(g))) == 0.0 for g in grads] == [True, True, False, False]
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert message.startswith("No gradient reaches the meta-parameter(s) ")
    assert all(v.path in message for v in model.layers[1].trainable_variables)
    # Every algorithm on a model whose every weight the loss reaches is not warned about
    # (MAML++'s per-step batch-norm copies replace the model's own by design).
    for name, cls in algorithms.ALGORITHMS.items():
        for first_order in ((False, True) if name != "reptile" else (True,)):
            model = _conv_bn()
            algorithm = cls(model, functional.make_forward(model),
                            losses.sparse_softmax_cross_entropy, 0.1, 2, first_order=first_order)
            with mock.patch.object(core.logging, "warning") as warning:
                algorithm.meta_step(_class_episode(), iteration=tf.constant(0, tf.int64))
            assert not warning.called, (name, first_order, warning.call_args)


def test_algorithm_adapt_defaults_to_the_algorithms_order_and_refuses_tensor_steps():
    """A user trial: a custom meta-objective calling `MAML.adapt` with its defaults got first
    order from a second-order MAML, and a tensor `num_inner_steps` made MAML first order."""
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode()

    def gradients(algorithm, **kwargs):
        def objective(params):
            adapted, _ = algorithm.adapt(params, episode.support_x, episode.support_y, 2,
                                         **kwargs)
            predictions = algorithm.predict(params, adapted, episode.query_x, 2)
            return tf.reduce_mean(losses.mean_squared_error(episode.query_y, predictions)), {}
        return core.meta_gradients(objective, algorithm.meta_variables)[1]

    second = algorithms.MAML(model, forward, losses.mean_squared_error, 0.1, 2)
    first = algorithms.MAML(model, forward, losses.mean_squared_error, 0.1, 2, first_order=True)
    for algorithm, order in ((second, False), (first, True)):
        for a, b in zip(gradients(algorithm), gradients(algorithm, first_order=order)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(gradients(second)[0].numpy(), gradients(first)[0].numpy())
    with pytest.raises(ValueError, match="num_inner_steps must be a non-negative Python "
                                         "integer .* got <tf.Tensor"):
        algorithms.MAML(model, forward, losses.mean_squared_error, 0.1, tf.constant(1))
    for rate in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="inner_lr must be a finite non-negative number"):
            algorithms.MAML(model, forward, losses.mean_squared_error, rate, 1)


def test_bad_sgd_and_adam_constants_and_reptile_step_sizes_are_refused():
    """Rates and constants given as numbers are checked where they are given, not found as NaN
    weights many steps later; tensors (learned or fed at run time) are left alone."""
    for kwargs, message in ((dict(learning_rate=-0.1), "learning_rate must be finite and >= 0"),
                            (dict(learning_rate=float("nan")), "learning_rate must be finite"),
                            (dict(learning_rate=0.1, beta_1=1.0), "beta_1 must be in \\[0, 1\\)"),
                            (dict(learning_rate=0.1, beta_2=-0.5), "beta_2 must be in \\[0, 1\\)"),
                            (dict(learning_rate=0.1, epsilon=0.0), "epsilon must be finite and > 0")):
        with pytest.raises(ValueError, match=message):
            core.Adam(**kwargs)
    core.Adam(np.float32(0.1), beta_1=0.9)
    core.Adam(tf.constant(0.1))
    # SGD: a negative rate would ascend the loss, a NaN one give NaN weights.
    for rate in (-1.0, float("nan"), np.float32("inf"), [0.1, -0.1]):
        with pytest.raises(ValueError, match="SGD's inner_lr must be a finite non-negative number"):
            core.SGD(rate)
    # numpy arrays too (a per-element rate of the user's), every entry checked
    for rate in (np.array(-0.1), np.array([0.1, np.nan]), [np.array([[0.1], [-1.0]])]):
        with pytest.raises(ValueError, match="SGD's inner_lr must be finite and non-negative "
                                             "in every entry, got ") as e:
            core.SGD(rate)
        assert "\n" not in str(e.value)  # one line, naming the entry, not numpy's repr
    weights = [tf.constant([1.0, 2.0])]
    for rate in (0.0, np.float32(0.5), np.array([0.0, 0.5]), tf.constant(-1.0),
                 [tf.Variable(0.1)]):
        core.SGD(rate).apply(weights, weights, (), 0)  # zero, numpy and tensor rates are taken
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    for name, value in (("meta_step_size", -1.0), ("meta_step_size_final", float("inf")),
                        ("meta_step_size", "0.1"), ("meta_step_size", np.float32(-0.5))):
        with pytest.raises(ValueError, match=f"{name} must be a finite non-negative number"):
            algorithms.Reptile(model, forward, losses.mean_squared_error, 0.1, 2, **{name: value})
    # Tensors and variables (a schedule of the user's) are taken as they are.
    reptile = algorithms.Reptile(model, forward, losses.mean_squared_error, 0.1, 2,
                                 meta_step_size=tf.Variable(0.5), meta_step_size_final=np.float32(0))
    assert float(reptile.meta_step_size) == 0.5
    with pytest.raises(ValueError, match="inner_lr must be a finite non-negative number"):
        algorithms.MAML(model, forward, losses.mean_squared_error, np.float32("nan"), 1)
