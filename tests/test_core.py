"""Behaviour of the MAML core: exact meta-gradients, first-order identity, descent."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import core, functional, losses
from tf_maml.tasks import Episode, SineTasks


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


def _fd_check(forward, params, episode, loss_fn, inner_lr, steps, first_order=False, seed=0):
    """Returns (analytic, numeric) directional derivatives along random directions."""
    params = [tf.convert_to_tensor(p) for p in params]

    @tf.function
    def loss_at(ps):
        loss, _, _ = core.meta_gradients(forward, ps, episode, loss_fn, inner_lr, steps,
                                         first_order=first_order)
        return loss

    _, grads, _ = core.meta_gradients(forward, params, episode, loss_fn, inner_lr, steps,
                                      first_order=first_order)
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
                                  losses.mean_squared_error, inner_lr=0.05, steps=3)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    # The check has teeth: the first-order gradient is measurably different.
    fo, _ = _fd_check(forward, model.trainable_variables, _sine_episode(),
                      losses.mean_squared_error, inner_lr=0.05, steps=3, first_order=True)
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
                                  losses.sparse_softmax_cross_entropy, inner_lr=0.5, steps=2)
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
        loss, grads, _ = core.meta_gradients(forward, model.trainable_variables, episode,
                                             losses.sparse_softmax_cross_entropy, 0.5, 2)
        results.append((loss, grads))
    np.testing.assert_allclose(results[0][0].numpy(), results[1][0].numpy(), rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-3, atol=2e-5)


def test_stock_keras_moments_would_break_second_order():
    """Documents the trap the library fixes: tf.nn.moments' stop_gradient."""
    model = _conv_bn()
    non_trainable = [v.value for v in model.non_trainable_variables]

    def stock_forward(weights, x, training=True):
        return tf.map_fn(
            lambda a: model.stateless_call(list(a[0]), non_trainable, a[1], training=training)[0],
            (list(weights), x), fn_output_signature=weights[0].dtype)

    analytic, numeric = _fd_check(stock_forward, model.trainable_variables, _class_episode(),
                                  losses.sparse_softmax_cross_entropy, inner_lr=0.5, steps=2)
    assert np.max(np.abs(analytic - numeric) / np.abs(numeric)) > 1e-2


def test_first_order_gradient_is_query_gradient_at_adapted_weights():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=3)
    params = [v.value for v in model.trainable_variables]
    _, grads, _ = core.meta_gradients(forward, params, episode, losses.mean_squared_error,
                                      inner_lr=0.05, num_inner_steps=2, first_order=True)
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
    adapted = core.adapt(forward, weights, episode.support_x, episode.support_y,
                         losses.mean_squared_error, inner_lr=0.02, num_steps=3)
    after = losses.mean_squared_error(episode.support_y, forward(adapted, episode.support_x))
    assert np.all(after.numpy() < before.numpy())


def test_tasks_adapt_independently():
    """Adapting a meta-batch equals adapting each task alone."""
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=4)
    weights = core.broadcast_to_tasks(model.trainable_variables, 4)
    together = core.adapt(forward, weights, episode.support_x, episode.support_y,
                          losses.mean_squared_error, inner_lr=0.05, num_steps=2)
    for t in range(4):
        alone = core.adapt(forward, [w[t:t + 1] for w in weights], episode.support_x[t:t + 1],
                           episode.support_y[t:t + 1], losses.mean_squared_error,
                           inner_lr=0.05, num_steps=2)
        for a, b in zip(together, alone):
            np.testing.assert_allclose(a[t].numpy(), b[0].numpy(), rtol=1e-10, atol=1e-12)


def test_per_parameter_inner_lr_and_errors():
    model = _smooth_mlp()
    forward = functional.make_forward(model)
    episode = _sine_episode(num_tasks=2)
    weights = core.broadcast_to_tasks(model.trainable_variables, 2)
    zero_lr = [tf.zeros([], tf.float64)] * len(weights)
    same = core.adapt(forward, weights, episode.support_x, episode.support_y,
                      losses.mean_squared_error, inner_lr=zero_lr, num_steps=1)
    for a, b in zip(same, weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="inner_lr has 1 entries"):
        core.adapt(forward, weights, episode.support_x, episode.support_y,
                   losses.mean_squared_error, inner_lr=[0.1], num_steps=1)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        core.adapt(forward, weights, episode.support_x, episode.support_y,
                   losses.mean_squared_error, inner_lr=0.1, num_steps=-1)
