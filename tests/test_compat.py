"""Each private TensorFlow/Keras internal tf_maml relies on still does what compat.py says.

A Keras or TensorFlow upgrade that renames one of them fails here, by name, rather than deep
inside training.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_maml import compat


def test_keras_moments_are_replaced_only_inside_the_context():
    calls = []

    def moments(x, axes, keepdims=False, synchronized=False):
        calls.append(axes)
        mean = tf.reduce_mean(x, axis=axes, keepdims=keepdims)
        variance = tf.reduce_mean(tf.square(x - tf.reduce_mean(x, axis=axes, keepdims=True)),
                                  axis=axes, keepdims=keepdims)
        return mean, variance

    layer = keras.layers.BatchNormalization()
    x = tf.random.normal([4, 3])
    with compat.keras_moments_replaced(moments):
        inside = layer(x, training=True)
    assert calls, "Keras' batch normalization no longer calls _compute_moments"
    count = len(calls)
    outside = layer(x, training=True)
    assert len(calls) == count
    np.testing.assert_allclose(inside.numpy(), outside.numpy(), atol=1e-5)


def test_functional_model_class_tells_functional_models_apart():
    functional = compat.functional_model_class()
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert type(model) is functional
    assert type(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])) is not functional


def test_all_layers_seed_generators_and_inbound_nodes():
    dense, dropout = keras.layers.Dense(2), keras.layers.Dropout(0.5)
    inner = keras.Sequential([keras.Input((3,)), dense, dropout])
    outer = keras.Sequential([keras.Input((3,)), inner])
    layers = compat.all_layers(outer)
    assert layers[0] is outer and dense in layers and dropout in layers
    generators = compat.seed_generators(dropout)
    assert len(generators) == 1 and isinstance(generators[0], keras.random.SeedGenerator)
    assert compat.seed_generators(dense) == []
    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3)
    keras.Model(inputs, shared(shared(inputs)))
    assert compat.inbound_node_count(shared) == 2
    assert compat.inbound_node_count(dense) == 1


def test_first_call_input_shape_is_the_batch_a_subclassed_model_was_built_with():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    model = Sub()
    assert compat.first_call_input_shape(model) is None
    model(np.zeros((5, 7, 3), np.float32))
    assert compat.first_call_input_shape(model) == (5, 7, 3)


def test_dropout_helpers_reproduce_keras_dropout():
    layer = keras.layers.Dropout(0.4, seed=3)
    x = tf.ones([5, 6])
    state = compat.seed_generators(layer)[0].state
    expected = tf.nn.experimental.stateless_dropout(
        x, rate=0.4, noise_shape=compat.dropout_noise_shape(x, None),
        seed=compat.dropout_seed(state.value))
    np.testing.assert_array_equal(layer(x, training=True).numpy(), expected.numpy())


def test_eager_device_name():
    assert "CPU" in compat.eager_device_name() or compat.eager_device_name() == ""
    with tf.device("/cpu:0"):  # inside a device scope the name is that device's
        assert "CPU" in compat.eager_device_name()

    @tf.function
    def traced():
        return compat.eager_device_name()

    assert traced() == ""


def test_keras_jit_support_and_trainer_hooks():
    from keras.src.trainers.trainer import Trainer

    from tf_maml import models

    assert compat.model_supports_jit(models.mlp())

    class NoXLA(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_jit = False

        def call(self, x):
            return x

    assert not compat.model_supports_jit(keras.Sequential([keras.Input((2,)), NoXLA()]))
    for hook in compat.keras_trainer_hooks:
        assert callable(getattr(Trainer, hook, None)), hook
