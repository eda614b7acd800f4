"""The functional forward equals Keras' own forward, for every kind of model."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import functional, models
from tf_maml.tasks import SineTasks


def _per_task_reference(model, weights, x, training):
    non_trainable = [v.value for v in model.non_trainable_variables]
    return tf.stack([
        model.stateless_call([w[t] for w in weights], non_trainable, x[t], training=training)[0]
        for t in range(x.shape[0])])


def _distinct_task_weights(model, num_tasks, seed=0):
    rng = np.random.default_rng(seed)
    return [tf.constant(v.numpy()[None] + 0.1 * rng.normal(size=(num_tasks,) + tuple(v.shape)),
                        v.dtype) for v in model.trainable_variables]


def _distinct_moving_statistics(model):
    """Per-channel moving statistics that differ between channels (not one constant shift),
    so that training=False checks the channel order of the grouped layout."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.linspace(-0.5, 0.7, n))
            layer.moving_variance.assign(np.linspace(0.4, 1.9, n)[::-1])


def _functional_conv():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(5, 3, padding="valid", activation="relu")(inputs)
    h = keras.layers.BatchNormalization(center=False)(h)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def _sequential_frozen():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, strides=2),
                              keras.layers.LeakyReLU(0.2), keras.layers.Flatten(),
                              keras.layers.Dense(6), keras.layers.Dense(2)])
    model.layers[0].trainable = False
    return model


MODELS = {
    # name: (builder, tolerance)
    "conv4_stride": (lambda: models.conv4(3, input_shape=(12, 12, 1), filters=6),
                     dict(rtol=1e-5, atol=2e-6)),
    "conv4_maxpool": (lambda: models.conv4(3, input_shape=(16, 16, 3), filters=4, pooling="max"),
                      dict(rtol=1e-5, atol=2e-6)),
    "fc": (lambda: models.fc(3, input_shape=(6, 6, 1), hidden_sizes=(8, 6)),
           dict(rtol=1e-5, atol=2e-6)),
    "fc_float64": (lambda: models.fc(3, input_shape=(6, 6, 1), hidden_sizes=(8, 6),
                                     dtype="float64"), dict(rtol=1e-11, atol=1e-12)),
    "mlp_float64": (lambda: models.mlp(dtype="float64"), dict(rtol=1e-11, atol=1e-12)),
    "functional_conv": (_functional_conv, dict(rtol=1e-5, atol=2e-6)),
    "frozen_layer": (_sequential_frozen, dict(rtol=1e-5, atol=2e-6)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_layer_batched_forward_equals_keras(name, training):
    build, tolerance = MODELS[name]
    model = build()
    forward = functional.make_forward(model)
    assert forward.vectorized, forward.unsupported_reason
    _distinct_moving_statistics(model)
    x = tf.cast(tf.random.normal((3, 4) + tuple(model.input_shape[1:])), model.inputs[0].dtype)
    weights = _distinct_task_weights(model, 3)
    np.testing.assert_allclose(forward(weights, x, training).numpy(),
                               _per_task_reference(model, weights, x, training).numpy(),
                               **tolerance)


@pytest.mark.parametrize("epsilon", [1e-8, 0.0])
def test_batch_norm_with_an_epsilon_below_the_fused_kernels_equals_keras(epsilon):
    """The fused batch-norm kernel raises epsilon to 1.001e-5. With a smaller one and
    activations of tiny variance that changed the output by more than its own size (2.1
    against 2.9); such layers take the composite formula."""
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, padding="same"),
                              keras.layers.BatchNormalization(epsilon=epsilon),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    forward = functional.make_forward(model)
    assert forward.vectorized, forward.unsupported_reason
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 6, 6, 2)) * 1e-3, tf.float32)
    weights = _distinct_task_weights(model, 2)
    reference = _per_task_reference(model, weights, x, True).numpy()
    np.testing.assert_allclose(forward(weights, x, True).numpy(), reference, rtol=1e-4,
                               atol=1e-4 * np.abs(reference).max())


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.out(self.norm(self.hidden(x), training=training) + self.hidden(x))


def _subclassed():
    model = Subclassed()
    model(tf.zeros([1, 1]))
    return model


def _functional_mlp():
    inputs = keras.Input((1,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def _sequential_bn():
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(32), keras.layers.BatchNormalization(),
                             keras.layers.ReLU(), keras.layers.Dense(1)])


def test_subclassed_model_uses_per_task_path_and_matches_keras():
    model = _subclassed()
    forward = functional.make_forward(model)
    assert not forward.vectorized and "subclassed" in forward.unsupported_reason
    x = tf.random.normal((3, 5, 1))
    weights = _distinct_task_weights(model, 3)
    np.testing.assert_allclose(forward(weights, x).numpy(),
                               _per_task_reference(model, weights, x, True).numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------
# MAML through `forward`, written out with nested tapes (independent of core).
# ---------------------------------------------------------------------------

def _mse(y, prediction):
    return tf.reduce_mean(tf.square(prediction - tf.cast(y, prediction.dtype)),
                          axis=list(range(1, prediction.shape.rank)))


def _maml_meta_gradient(forward, params, episode, inner_lr, first_order=False, seeds=(None, None)):
    """Second-order MAML: one inner SGD step per task on the support loss, then the
    mean query loss, differentiated with respect to the shared initialization."""
    sx, sy, qx, qy = episode
    params = [tf.convert_to_tensor(p) for p in params]
    num_tasks = tf.shape(sx)[0]
    with tf.GradientTape() as outer:
        outer.watch(params)
        weights = [tf.broadcast_to(p[None], tf.concat([[num_tasks], tf.shape(p)], 0))
                   for p in params]
        with tf.GradientTape() as inner:
            inner.watch(weights)
            support = tf.reduce_sum(_mse(sy, forward(weights, sx, True, seed=seeds[0])))
        grads = inner.gradient(support, weights)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        adapted = [w - inner_lr * g for w, g in zip(weights, grads)]
        loss = tf.reduce_mean(_mse(qy, forward(adapted, qx, True, seed=seeds[1])))
    return loss, outer.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)


@pytest.mark.parametrize("build", [models.mlp, _functional_mlp, _subclassed, _sequential_bn],
                         ids=["sequential", "functional", "subclassed", "batch_norm"])
def test_same_engine_meta_trains_every_kind_of_model(build):
    model = build()
    forward = functional.make_forward(model)
    tasks = SineTasks(k_shot=10, k_query=10)
    optimizer = keras.optimizers.Adam(0.003)
    moving = [v.numpy().copy() for v in model.non_trainable_variables]

    @tf.function
    def step(seed):
        e = tasks.sample(seed, 8)
        episode = (e.support_x, e.support_y, e.query_x, e.query_y)
        loss, grads = _maml_meta_gradient(forward, model.trainable_variables, episode, 0.01)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    history = [float(step(tf.constant([0, i], tf.int64))) for i in range(150)]
    # The forward trains every kind of model. (What only meta-learning gives, a post-adaptation
    # loss well below the initialization's own, is asserted through the core for every
    # algorithm in test_algorithms.py and against the pretrained baseline in test_train.py.)
    assert np.mean(history[-20:]) < 0.8 * np.mean(history[:20])
    # Adaptation and meta-training never touch the moving statistics.
    for before, v in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())


# ---------------------------------------------------------------------------
# Second-order checks of the layer-batched convolution path. Grouped-convolution
# gradients exist for float32 only (oneDNN), so the float32 meta-gradient of
# both paths is compared with a float64 per-task reference of the same model.
# ---------------------------------------------------------------------------

def _conv_model(dtype, pooling, dropout=0.0):
    layers = [keras.Input((8, 8, 2), dtype=dtype)]
    for _ in range(2):
        layers += [keras.layers.Conv2D(4, 3, padding="same", use_bias=False, dtype=dtype),
                   keras.layers.BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype)]
        pool = keras.layers.MaxPooling2D if pooling == "max" else keras.layers.AveragePooling2D
        layers.append(pool(2, dtype=dtype))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, dtype=dtype))
    layers += [keras.layers.Flatten(dtype=dtype), keras.layers.Dense(3, dtype=dtype)]
    return keras.Sequential(layers)


def _conv_episode(dtype, num_tasks=3):
    rng = np.random.default_rng(0)
    shapes = [(num_tasks, 5, 8, 8, 2), (num_tasks, 5, 3)] * 2
    return [tf.constant(rng.normal(size=s), dtype) for s in shapes]


def _normalized_errors(grads, reference):
    return [float(np.max(np.abs(g.numpy() - r.numpy())) / np.max(np.abs(r.numpy())))
            for g, r in zip(grads, reference)]


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_layer_batched_conv_second_order_matches_float64_reference(pooling):
    model = _conv_model("float32", pooling)
    forward = functional.make_forward(model)
    if not forward.vectorized:
        pytest.skip(forward.unsupported_reason)
    reference_model = _conv_model("float64", pooling)
    for v64, v32 in zip(reference_model.variables, model.variables):
        v64.assign(tf.cast(v32.value, v64.dtype))
    reference = functional.make_forward(reference_model, vectorize="map_fn")  # Keras per task
    _, expected = _maml_meta_gradient(reference, reference_model.trainable_variables,
                                      _conv_episode(tf.float64), 0.3)
    for vectorize in ("layers", "map_fn"):
        _, grads = _maml_meta_gradient(functional.make_forward(model, vectorize=vectorize),
                                       model.trainable_variables, _conv_episode(tf.float32), 0.3)
        # Observed: <= 1.5e-6 (layers), <= 4.3e-6 (map_fn), relative to each gradient's scale.
        assert max(_normalized_errors(grads, expected)) < 1e-5, vectorize
    # The check has teeth: first order is far off.
    _, first = _maml_meta_gradient(forward, model.trainable_variables, _conv_episode(tf.float32),
                                   0.3, first_order=True)
    assert max(_normalized_errors(first, expected)) > 1e-2


def test_layer_batched_conv_dropout_second_order_equals_per_task_path():
    """With the same seeds both paths draw the same masks; their second-order
    meta-gradients agree to float32 rounding."""
    model = _conv_model("float32", "max", dropout=0.3)
    forward = functional.make_forward(model)
    if not forward.vectorized:
        pytest.skip(forward.unsupported_reason)
    results = [_maml_meta_gradient(functional.make_forward(model, vectorize=v),
                                   model.trainable_variables, _conv_episode(tf.float32), 0.3,
                                   seeds=(3, 4))
               for v in ("layers", "map_fn")]
    np.testing.assert_allclose(results[0][0].numpy(), results[1][0].numpy(), rtol=1e-6)
    # Observed: <= 2e-6 relative to each gradient's scale.
    assert max(_normalized_errors(results[0][1], results[1][1])) < 1e-5
    # Different masks give a different meta-gradient: the seeds matter.
    _, other = _maml_meta_gradient(forward, model.trainable_variables, _conv_episode(tf.float32),
                                   0.3, seeds=(5, 6))
    assert max(_normalized_errors(other, results[1][1])) > 1e-2


def test_make_forward_errors_are_clear():
    with pytest.raises(ValueError, match="built Keras model"):
        functional.make_forward(keras.Sequential([keras.layers.Dense(1)]))
    frozen = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    frozen.trainable = False
    with pytest.raises(ValueError, match=r"^model '\w+' has no trainable weights, so there is "
                                         r"nothing to adapt \(are its layers frozen"):
        functional.make_forward(frozen)
    with pytest.raises(ValueError, match="cannot use the layer-batched path: subclassed"):
        functional.make_forward(_subclassed(), vectorize="layers")
    with pytest.raises(ValueError, match="vectorize must be"):
        functional.make_forward(models.mlp(), vectorize="pfor")


class _AddsLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(1000.0 * keras.ops.sum(x))
        return x


@pytest.mark.parametrize("middle,pattern", [
    (lambda: keras.layers.Dense(4, kernel_regularizer=keras.regularizers.l2(100.0)),
     r"has regularization losses \(a weight regularizer on \S*kernel\)"),
    (lambda: keras.layers.Dense(4, bias_regularizer="l1"),
     r"has regularization losses \(a weight regularizer on \S*bias\)"),
    (lambda: keras.layers.Dense(4, activity_regularizer="l2"),
     r"has regularization losses \(an activity regularizer on layer '\w+'\)"),
    (_AddsLoss, r"adds losses while it runs \(add_loss in a layer's call\)"),
])
def test_models_with_keras_losses_the_forward_would_drop_are_refused(middle, pattern):
    """Keras' fit adds regularizers and add_loss to the loss; a meta-learner trained
    through the task-batched forward used to leave them out without a word."""
    model = keras.Sequential([keras.Input((3,)), middle(), keras.layers.Dense(2)])
    # Keras itself counts them in what fit minimises.
    model(tf.zeros([5, 3]), training=True)
    assert model.losses
    with pytest.raises(ValueError, match=pattern) as e:
        forward = functional.make_forward(model)
        weights = [tf.stack([v.value] * 2) for v in model.trainable_variables]
        forward(weights, tf.zeros([2, 5, 3]))
    assert "\n" not in str(e.value)
    # Without them, the same model runs; so does one whose regularized weights are frozen
    # (Keras counts only trainable weights' regularizers).
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    weights = [tf.stack([v.value] * 2) for v in plain.trainable_variables]
    assert functional.make_forward(plain)(weights, tf.zeros([2, 5, 3])).shape == (2, 5, 2)
    frozen = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.l2(100.0))
    frozen.trainable = False
    body_frozen = keras.Sequential([keras.Input((3,)), frozen, keras.layers.Dense(2)])
    assert not body_frozen.losses
    weights = [tf.stack([v.value] * 2) for v in body_frozen.trainable_variables]
    assert functional.make_forward(body_frozen)(weights, tf.zeros([2, 5, 3])).shape == (2, 5, 2)


@pytest.mark.parametrize("vectorize", ["layers", "map_fn"])
def test_forward_arguments_that_do_not_fit_the_model_fail_in_one_line(vectorize):
    """Before: TensorFlow's own messages from deep inside ("Matrix size-incompatible",
    "Index out of range using input dim 1", a 10-line "in user code" wrapper)."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.Dense(3)])
    forward = functional.make_forward(model, vectorize=vectorize)
    weights = [tf.stack([v.value] * 2) for v in model.trainable_variables]
    assert forward(weights, tf.zeros([2, 4, 5])).shape == (2, 4, 3)
    for args, pattern in (
            ((weights, tf.zeros([2, 4, 6])), r"^x must be \[tasks, examples, 5\] for "
                                            r"'\w+', got shape \(2, 4, 6\)$"),
            ((weights, tf.zeros([4, 5])), r"^x must be \[tasks, examples, 5\] for '\w+', "
                                          r"got shape \(4, 5\)$"),
            (([v.value for v in model.trainable_variables], tf.zeros([2, 4, 5])),
             r"^weights must be the model's trainable variables with a leading task axis "
             r"\(tf_maml.broadcast_to_tasks\): weight 0 \(\S+kernel\) should be "
             r"\[tasks, 5, 6\], got shape \(5, 6\)$"),
            ((weights[:2], tf.zeros([2, 4, 5])), r"^forward takes 4 task-batched weights"),
            ((weights, tf.zeros([3, 4, 5])), r"^x holds 3 tasks but the weights 2$")):
        with pytest.raises(ValueError, match=pattern) as e:
            forward(*args)
        assert "\n" not in str(e.value)


def test_exact_moments_context_restores_keras():
    from keras.src.backend.tensorflow import nn
    original = nn._compute_moments
    with functional.exact_moments():
        assert nn._compute_moments is not original
    assert nn._compute_moments is original


@pytest.mark.parametrize("used,inputs", [("all", "normal"), ("dx_only", "normal"),
                                         ("all", "strokes")])
def test_fused_batch_norm_second_derivative_equals_the_composite_formula(used, inputs):
    # The closed-form derivative of the fused gradient kernel against autodiff of
    # the textbook formula in float64, for a nonlinear use of every output of the
    # gradient (dx, dγ, dβ), or of dx alone (the other cotangents arrive as None).
    # "strokes": what Omniglot's first layer sees, a background of exact ties (90% zeros),
    # one channel constant (zero variance: x̂ = 0, r = ε^-½) and one far from zero (mean
    # 100 times its spread).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 5, 8)) * 2 + 1
    if inputs == "strokes":
        x = np.where(rng.uniform(size=x.shape) < 0.9, 0.0, rng.uniform(0.5, 1.0, x.shape))
        x[..., 3] = 0.7
        x[..., 5] = 100 + rng.normal(size=x.shape[:3])
    x = x.astype(np.float32).astype(np.float64)  # the reference sees the float32 inputs
    gamma, beta = rng.normal(size=8) + 1, rng.normal(size=8)
    weights = rng.normal(size=(6, 5, 5, 8))

    def composite(x, gamma, beta):
        mean = tf.reduce_mean(x, [0, 1, 2])
        variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
        return (x - mean) * tf.math.rsqrt(variance + 1e-3) * gamma + beta

    def derivatives(normalize, dtype):
        inputs = [tf.constant(v, dtype) for v in (x, gamma, beta)]
        w = tf.constant(weights, dtype)
        with tf.GradientTape() as outer:
            outer.watch(inputs)
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                loss = tf.reduce_sum(tf.sin(normalize(*inputs)) * w)
            dx, dgamma, dbeta = inner.gradient(loss, inputs)
            meta = tf.reduce_sum(tf.cos(dx) * w)
            if used == "all":
                meta += tf.reduce_sum(dgamma ** 2) + tf.reduce_sum(tf.sin(dbeta))
        return [dx, dgamma, dbeta] + outer.gradient(meta, inputs)

    expected = derivatives(composite, tf.float64)
    # What float32 allows: in a zero-variance channel the second derivative with respect
    # to x multiplies the float32 mean's round-off by r³ (observed: 2e-4 of the largest
    # entry for the composite formula itself, 6e-4 for the fused kernels either way).
    allowed = [max(1e-5, 5 * e) for e in _normalized_errors(derivatives(composite, tf.float32),
                                                            expected)]
    got = derivatives(lambda *a: functional._fused_batch_norm_training(*a, 1e-3), tf.float32)
    errors = _normalized_errors(got, expected)
    assert all(e < a for e, a in zip(errors, allowed)), (errors, allowed)
    # Exports trace without the closed form (TensorFlow's registered gradient of the kernel):
    # the same derivatives.
    with functional.first_derivatives_only():
        got = derivatives(lambda *a: functional._fused_batch_norm_training(*a, 1e-3),
                          tf.float32)
    errors = _normalized_errors(got, expected)
    assert all(e < a for e, a in zip(errors, allowed)), (errors, allowed)


def test_first_derivatives_only_is_per_thread_and_always_turned_off_again():
    """Training after an export in the same process (or beside one, in another thread)
    keeps the closed-form second derivative."""
    switch = functional._FIRST_DERIVATIVES
    seen_by_other_thread = []
    with pytest.raises(RuntimeError, match="trace failed"):
        with functional.first_derivatives_only():
            with functional.first_derivatives_only():
                assert switch.on
            assert switch.on  # still inside the outer one
            other = threading.Thread(target=lambda: seen_by_other_thread.append(switch.on))
            other.start()
            other.join()
            raise RuntimeError("trace failed")
    assert not switch.on and seen_by_other_thread == [False]
