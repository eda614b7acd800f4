"""XLA (`jit_compile=True`) computes the same second-order meta-gradients as plain TensorFlow.

XLA is the default for dense models on CPU (`experiment.resolve_jit_compile`), so a
meta-gradient it computes differently (a derivative it drops or approximates, a different
code path under compilation) would silently change training. Each test computes the same
quantity with `tf.function(jit_compile=True)` and with `tf.function` alone and compares.

Tolerances, each relative to the largest entry of the gradient (or update) tensor compared:
float64 1e-10 (measured on TF 2.21 CPU: ~1e-15); float32 1e-5 (measured: ~5e-7; XLA fuses
and reorders float32 arithmetic, and single small entries differ by up to ~1e-4 of their own
size). Both are far below the size of the second-order terms, which each test checks are
present (first- and second-order meta-gradients differ by more than 10%).

XLA compiles second-order graphs slowly on CPU (seconds each), hence small models, one
inner step and one dtype for the batch-normalization model.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import algorithms, functional, losses, models, trainer
from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml.tasks import Episode

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _dense(dtype):
    """Smooth (tanh) and piecewise-linear (relu) layers: non-zero second derivatives."""
    return keras.Sequential([
        keras.Input((3,), dtype=dtype),
        keras.layers.Dense(16, activation="tanh", dtype=dtype),
        keras.layers.Dense(12, activation="relu", dtype=dtype),
        keras.layers.Dense(2, dtype=dtype)])


def _batch_norm_dense(dtype):
    """The paper's fc classifier (Dense, BatchNormalization, ReLU), small."""
    return models.fc(4, input_shape=(3, 3, 1), hidden_sizes=(12, 8), dtype=dtype)


def _regression_episode(dtype, tasks=3, support=5, query=7):
    rng = np.random.default_rng(1)
    return Episode(*[tf.constant(rng.normal(size=(tasks, n, size)), dtype)
                     for n, size in ((support, 3), (support, 2), (query, 3), (query, 2))])


def _classification_episode(dtype, tasks=3, support=8, query=12):
    rng = np.random.default_rng(2)
    return Episode(tf.constant(rng.normal(size=(tasks, support, 3, 3, 1)), dtype),
                   tf.constant(rng.integers(0, 4, (tasks, support)), tf.int32),
                   tf.constant(rng.normal(size=(tasks, query, 3, 3, 1)), dtype),
                   tf.constant(rng.integers(0, 4, (tasks, query)), tf.int32))


CASES = {
    "dense": (_dense, losses.mean_squared_error, _regression_episode, 0.1),
    "batch_norm": (_batch_norm_dense, losses.sparse_softmax_cross_entropy,
                   _classification_episode, 0.4),
}


def _meta_gradients(algorithm, episode, jit_compile):
    step = tf.function(lambda e: algorithm.meta_step(e)[:2], jit_compile=jit_compile)
    loss, grads = step(episode)
    return loss.numpy(), [g.numpy() for g in grads]


def _assert_close(actual, expected, rtol, what="meta-gradient"):
    """Entries agree to `rtol` times the tensor's largest entry."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = max(np.abs(e).max(), 1e-30)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale, err_msg=f"{what} {i} {e.shape}")


@pytest.mark.parametrize("case, dtype", [("dense", "float64"), ("dense", "float32"),
                                         ("batch_norm", "float64")])
def test_xla_second_order_meta_gradients_match(case, dtype):
    build, loss_fn, make_episode, inner_lr = CASES[case]
    model = build(dtype)
    forward = functional.make_forward(model)
    assert forward.vectorized          # the layer-batched path training uses
    episode = make_episode(dtype)
    maml = algorithms.MAML(model, forward, loss_fn, inner_lr, num_inner_steps=1)
    loss, grads = _meta_gradients(maml, episode, jit_compile=False)
    xla_loss, xla_grads = _meta_gradients(maml, episode, jit_compile=True)

    rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(xla_loss, loss, rtol=rtol)
    assert all(g.dtype == np.dtype(dtype) for g in xla_grads)
    _assert_close(xla_grads, grads, rtol)

    # The second-order terms are present and large next to the tolerance: the comparison
    # would see XLA dropping or approximating them.
    first_order = algorithms.MAML(model, forward, loss_fn, inner_lr, num_inner_steps=1,
                                  first_order=True)
    _, fo_grads = _meta_gradients(first_order, episode, jit_compile=False)
    difference = max(np.abs(g - f).max() / np.abs(g).max() for g, f in zip(grads, fo_grads))
    assert difference > 0.1


def test_xla_train_step_updates_weights_alike():
    """One `trainer.make_train_step` step of the default (sine, MLP, XLA) run, with and without
    XLA: the same updated weights and logs."""
    config = config_lib.Config(meta_batch_size=4)
    results = {}
    for jit in (False, True):
        experiment = experiment_lib.build_experiment(config)
        if jit:
            assert experiment_lib.resolve_jit_compile(config, experiment.model)
        # Plain SGD: the update is the meta-gradient itself, not Adam's normalization of it,
        # so any gradient difference shows in the weights.
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(experiment.algorithm.meta_variables)
        step = tf.Variable(0, dtype=tf.int64)
        train_step = trainer.make_train_step(experiment, optimizer, step, jit_compile=jit)
        episode = experiment.tasks.sample(tf.constant([7, 1], tf.int64), config.meta_batch_size)
        initial = [v.numpy() for v in experiment.algorithm.meta_variables]
        logs = {k: float(v) for k, v in train_step(episode).items()}
        assert int(step) == 1
        updates = [v.numpy() - w for v, w in zip(experiment.algorithm.meta_variables, initial)]
        results[jit] = initial, updates, logs

    (initial, updates, logs), (xla_initial, xla_updates, xla_logs) = results[False], results[True]
    for a, b in zip(initial, xla_initial):
        np.testing.assert_array_equal(a, b)            # the same starting point
    assert all(np.abs(u).max() > 0 for u in updates)
    _assert_close(xla_updates, updates, TOLERANCE["float32"], what="update")
    assert xla_logs.keys() == logs.keys()
    for key in logs:
        np.testing.assert_allclose(xla_logs[key], logs[key], rtol=1e-5, err_msg=key)
