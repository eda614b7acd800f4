"""The functional forward equals Keras' own forward, for every kind of model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import core, functional, losses, models
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
    "conv4_stride": lambda: models.conv4(3, input_shape=(12, 12, 1), filters=6),
    "conv4_maxpool": lambda: models.conv4(3, input_shape=(16, 16, 3), filters=4, pooling="max"),
    "fc": lambda: models.fc(3, input_shape=(6, 6, 1), hidden_sizes=(8, 6)),
    "functional_conv": _functional_conv,
    "frozen_layer": _sequential_frozen,
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_layer_batched_forward_equals_keras(name, training):
    model = MODELS[name]()
    forward = functional.make_forward(model)
    assert forward.vectorized, forward.unsupported_reason
    # Non-default moving statistics, so training=False is a real check.
    for v in model.non_trainable_variables:
        v.assign(v.numpy() + 0.3)
    x = tf.random.normal((3, 4) + tuple(model.input_shape[1:]))
    weights = _distinct_task_weights(model, 3)
    np.testing.assert_allclose(forward(weights, x, training).numpy(),
                               _per_task_reference(model, weights, x, training).numpy(),
                               rtol=1e-4, atol=1e-5)


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
        episode = tasks.sample(seed, 8)
        loss, grads, _ = core.meta_gradients(forward, model.trainable_variables, episode,
                                             losses.mean_squared_error, 0.01, 1)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    history = [float(step(tf.constant([0, i], tf.int64))) for i in range(150)]
    assert np.mean(history[-20:]) < 0.8 * np.mean(history[:20])
    # Adaptation and meta-training never touch the moving statistics.
    for before, v in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_make_forward_errors_are_clear():
    with pytest.raises(ValueError, match="built Keras model"):
        functional.make_forward(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="cannot use the layer-batched path: subclassed"):
        functional.make_forward(_subclassed(), vectorize="layers")
    with pytest.raises(ValueError, match="vectorize must be"):
        functional.make_forward(models.mlp(), vectorize="pfor")


def test_exact_moments_context_restores_keras():
    from keras.src.backend.tensorflow import nn
    original = nn._compute_moments
    with functional.exact_moments():
        assert nn._compute_moments is not original
    assert nn._compute_moments is original
