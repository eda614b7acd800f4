"""Conformance of `make_forward` with Keras on models not designed for the fast path.

For a zoo of models that exercise layer options the layer-batched path may or
may not reproduce, checks that

(a) the path (layer-batched or per-task) is chosen in `make_forward`, and is
    the expected one: the fast path only where it is exact;
(b) `forward` equals Keras' own per-task forward (`model.stateless_call` for
    each task, and `model(x)` with the model's own weights) for
    `training=True` and `False`, with distinct per-channel moving statistics;
(c) second-order MAML meta-gradients (computed here with nested tapes) match
    central finite differences in float64.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import functional

NUM_TASKS, BATCH = 3, 4


def _grouped_conv_gradients_work(dtype, dilation=1):
    """Independent of the library: do grouped-convolution gradients run here?"""
    x = tf.ones([1, 5, 5, 2], dtype)
    k = tf.ones([2, 2, 1, 2], dtype)
    try:
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = tf.nn.conv2d(x, k, 1, "SAME", dilations=dilation)
        return all(g is not None for g in tape.gradient(y, [x, k]))
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        return False


GROUPED_F32 = _grouped_conv_gradients_work(tf.float32)
GROUPED_F32_DILATED = _grouped_conv_gradients_work(tf.float32, dilation=2)
GROUPED_F64 = _grouped_conv_gradients_work(tf.float64)
L = keras.layers


# ---------------------------------------------------------------------------
# The zoo. Each entry: builder, expected path (True: layer-batched), and a
# fragment of `unsupported_reason` when the per-task path is expected.
# ---------------------------------------------------------------------------

def _seq(input_shape, layers, dtype="float64"):
    return keras.Sequential([keras.Input(input_shape, dtype=dtype)] + layers)


def _dense_softmax():
    return _seq((5,), [L.Dense(6, activation="gelu", dtype="float64"),
                       L.Dense(3, activation="softmax", dtype="float64")])


def _dense_bn_dropout0():
    d = "float64"
    return _seq((3, 2), [L.Flatten(dtype=d), L.Dense(6, use_bias=False, dtype=d),
                         L.BatchNormalization(dtype=d), L.Activation("tanh", dtype=d),
                         L.Dropout(0.0, dtype=d), L.Dense(3, dtype=d)])


def _dense_rank4_bn():
    """Dense on a rank-4 input, a batch norm over three axes, Keras activation layers."""
    d = "float64"
    return _seq((3, 2, 4), [L.Dense(5, dtype=d), L.BatchNormalization(dtype=d),
                            L.LeakyReLU(0.1, dtype=d),
                            L.ReLU(max_value=1.5, negative_slope=0.05, threshold=0.1, dtype=d),
                            L.ELU(0.7, dtype=d), L.Flatten(dtype=d), L.Dense(2, dtype=d)])


def _frozen_bn_dense():
    model = _seq((4,), [L.Dense(5, dtype="float64"), L.BatchNormalization(dtype="float64"),
                        L.Activation("sigmoid", dtype="float64"), L.Dense(2, dtype="float64")])
    model.layers[1].trainable = False
    return model


def _maxpool_dense():
    """Pooling without convolutions (float64 on the fast path): Dense over channels."""
    d = "float64"
    return _seq((6, 6, 2), [L.Dense(3, activation="tanh", dtype=d), L.MaxPooling2D(2, dtype=d),
                            L.Flatten(dtype=d), L.Dense(2, dtype=d)])


def _avgpool_bn_dense():
    d = "float64"
    return _seq((5, 5, 2), [L.Dense(3, dtype=d), L.BatchNormalization(dtype=d),
                            L.Activation("softplus", dtype=d),
                            L.AveragePooling2D(2, padding="same", dtype=d),
                            L.MaxPooling2D(3, strides=1, padding="same", dtype=d),
                            L.GlobalAveragePooling2D(dtype=d), L.Dense(2, dtype=d)])


def _flatten_channels_first():
    return _seq((3, 4, 2), [L.Flatten(data_format="channels_first", dtype="float64"),
                            L.Dense(2, dtype="float64")])


def _gap_channels_first_keepdims():
    d = "float64"
    return _seq((4, 3, 5), [L.Dense(4, dtype=d),
                            L.GlobalAveragePooling2D(data_format="channels_first", keepdims=True,
                                                     dtype=d),
                            L.Flatten(dtype=d), L.Dense(2, dtype=d)])


def _dropout_dense():
    d = "float64"
    return _seq((5,), [L.Dense(8, activation="tanh", dtype=d), L.Dropout(0.4, dtype=d),
                       L.Dense(6, dtype=d), L.Dropout(0.3, noise_shape=(None, 1), dtype=d),
                       L.Dense(2, dtype=d)])


def _input_f32_layers_f64():
    return keras.Sequential([keras.Input((4,), dtype="float32"), L.Dense(3, dtype="float64")])


def _conv_net(dtype):
    return _seq((7, 7, 2), [
        L.Conv2D(4, 3, padding="same", use_bias=False, dtype=dtype),
        L.BatchNormalization(dtype=dtype), L.ReLU(dtype=dtype),
        L.MaxPooling2D(2, padding="same", dtype=dtype),
        L.Conv2D(3, 2, strides=2, activation="elu", dtype=dtype),
        L.BatchNormalization(scale=False, dtype=dtype),
        L.AveragePooling2D(2, strides=1, dtype=dtype),
        L.Activation("softmax", dtype=dtype),  # over channels: needs the tasks layout
        L.Flatten(dtype=dtype), L.Dense(3, dtype=dtype)], dtype=dtype)


def _conv_frozen_bn_f32():
    d = "float32"
    model = _seq((6, 6, 2), [L.Conv2D(3, 3, dtype=d), L.BatchNormalization(dtype=d),
                             L.GlobalAveragePooling2D(dtype=d), L.Dense(2, dtype=d)], dtype=d)
    model.layers[1].trainable = False
    return model


def _conv_dilated_f32():
    d = "float32"
    return _seq((7, 7, 2), [L.Conv2D(3, 3, dilation_rate=2, padding="same", dtype=d),
                            L.Flatten(dtype=d), L.Dense(2, dtype=d)], dtype=d)


def _conv_softmax_activation_f32():
    d = "float32"
    return _seq((5, 5, 2), [L.Conv2D(3, 3, activation="softmax", dtype=d),
                            L.Flatten(dtype=d), L.Dense(2, dtype=d)], dtype=d)


def _bn_axis(axis):
    def build():
        d = "float64"
        return _seq((4, 5), [L.Dense(5, dtype=d), L.BatchNormalization(axis=axis, dtype=d),
                             L.Flatten(dtype=d), L.Dense(2, dtype=d)])
    return build


def _conv_bn_axis(axis):
    def build():
        return _seq((5, 5, 5), [L.Conv2D(5, 1, dtype="float32"),
                                L.BatchNormalization(axis=axis, dtype="float32"),
                                L.Flatten(dtype="float32"), L.Dense(2, dtype="float32")],
                    dtype="float32")
    return build


def _lora_dense(dtype="float64"):
    model = _seq((4,), [L.Dense(5, activation="tanh", dtype=dtype), L.Dense(2, dtype=dtype)],
                 dtype=dtype)
    model.layers[0].enable_lora(2)
    return model


def _quantized_dense():
    model = _seq((4,), [L.Dense(5, dtype="float32"), L.Dense(2, dtype="float32")], dtype="float32")
    model.layers[0].quantize("int8")
    return model


def _mixed_policy():
    return _seq((4,), [L.Dense(5, dtype="float32"), L.Dense(5, dtype="mixed_float16"),
                       L.Dense(2, dtype="float32")], dtype="float32")


def _callable_activation():
    return _seq((4,), [L.Dense(5, activation=lambda x: tf.nn.relu(x) - 0.5, dtype="float64"),
                       L.Dense(2, dtype="float64")])


ZOO = {
    # name: (builder, layer-batched expected, reason fragment if not)
    "dense_softmax": (_dense_softmax, True, None),
    "dense_bn_dropout0": (_dense_bn_dropout0, True, None),
    "dense_rank4_bn": (_dense_rank4_bn, True, None),
    "frozen_bn_dense": (_frozen_bn_dense, True, None),
    "maxpool_dense": (_maxpool_dense, True, None),
    "avgpool_bn_dense": (_avgpool_bn_dense, True, None),
    "flatten_channels_first": (_flatten_channels_first, True, None),
    "gap_channels_first_keepdims": (_gap_channels_first_keepdims, True, None),
    "dropout_dense": (_dropout_dense, True, None),
    "input_f32_layers_f64": (_input_f32_layers_f64, True, None),
    "conv_f32": (lambda: _conv_net("float32"), GROUPED_F32, "grouped"),
    "conv_f64": (lambda: _conv_net("float64"), GROUPED_F64, "grouped"),
    "conv_frozen_bn_f32": (_conv_frozen_bn_f32, GROUPED_F32, "grouped"),
    "conv_dilated_f32": (_conv_dilated_f32, GROUPED_F32_DILATED, "grouped"),
    "conv_softmax_activation_f32": (_conv_softmax_activation_f32, False, "activation"),
    "bn_axis_minus2": (_bn_axis(-2), False, "axis -2"),
    "bn_axis_1": (_bn_axis(1), False, "axis 1"),
    "bn_axis_2": (_bn_axis(2), True, None),
    "conv_bn_axis_minus3": (_conv_bn_axis(-3), False, "axis -3"),
    "conv_bn_axis_1": (_conv_bn_axis(1), False, "axis 1"),
    "lora_dense": (_lora_dense, False, "LoRA"),
    "lora_dense_f32": (lambda: _lora_dense("float32"), False, "LoRA"),
    "quantized_dense": (_quantized_dense, False, "int8"),
    "mixed_policy": (_mixed_policy, False, "mixed_float16"),
    "callable_activation": (_callable_activation, False, "activation"),
}


def _tolerance(model):
    if model.trainable_variables[0].dtype == "float64":
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=2e-5, atol=2e-6)


def _distinct_moving_statistics(model):
    """Moving statistics that differ per channel (catches channel-order bugs)."""
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.linspace(-1.0, 1.5, n))
            layer.moving_variance.assign(np.linspace(0.3, 2.5, n)[::-1])


def _task_weights(model, rng, scale=0.3):
    return [tf.constant(v.numpy()[None] + scale * rng.normal(size=(NUM_TASKS,) + tuple(v.shape)),
                        v.dtype) for v in model.trainable_variables]


def _inputs(model, rng, batch=BATCH):
    # float64 for any model with float64 weights, even with a float32 Input.
    dtype = ("float64" if any(v.dtype == "float64" for v in model.trainable_variables)
             else model.inputs[0].dtype)
    return tf.constant(rng.normal(size=(NUM_TASKS, batch) + tuple(model.input_shape[1:])), dtype)


def _keras_per_task(model, weights, x, training, seed=None):
    """Keras' own forward, one task at a time; dropout seeded as documented."""
    non_trainable = [v.value for v in model.non_trainable_variables]
    seed_variables = functional._seed_state_variables(model)
    states = (functional._task_seed_states(seed, NUM_TASKS, len(seed_variables))
              if training and seed_variables else None)
    position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    outputs = []
    for t in range(NUM_TASKS):
        values = list(non_trainable)
        if states is not None:
            for j, v in enumerate(seed_variables):
                values[position[id(v)]] = states[t, j]
        outputs.append(model.stateless_call([w[t] for w in weights], values, x[t],
                                            training=training)[0])
    return tf.stack(outputs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_path_is_chosen_at_make_forward(name):
    build, expected, reason = ZOO[name]
    model = build()
    forward = functional.make_forward(model)
    assert forward.vectorized == expected, forward.unsupported_reason
    if expected:
        assert forward.unsupported_reason is None
        assert functional.make_forward(model, vectorize="layers").vectorized
    else:
        assert reason in forward.unsupported_reason
        # Refused up front, not at the first call.
        with pytest.raises(ValueError, match="cannot use the layer-batched path"):
            functional.make_forward(model, vectorize="layers")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_forward_equals_keras(name):
    model = ZOO[name][0]()
    _distinct_moving_statistics(model)
    rng = np.random.default_rng(0)
    weights, x = _task_weights(model, rng), _inputs(model, rng)
    tolerance = _tolerance(model)
    forwards = [functional.make_forward(model), functional.make_forward(model, vectorize="map_fn")]
    for training in (True, False):
        expected = _keras_per_task(model, weights, x, training, seed=7).numpy()
        for forward in forwards:
            actual = forward(weights, x, training, seed=7).numpy()
            np.testing.assert_allclose(actual, expected, err_msg=f"training={training}",
                                       **tolerance)
    # With the model's own weights, the model itself (inference).
    own = [tf.broadcast_to(v.value[None], (NUM_TASKS,) + tuple(v.shape))
           for v in model.trainable_variables]
    expected = np.stack([model(x[t], training=False).numpy() for t in range(NUM_TASKS)])
    np.testing.assert_allclose(forwards[0](own, x, training=False).numpy(), expected, **tolerance)


def test_multiple_inputs_or_outputs_are_refused_up_front():
    a, b = keras.Input((3,)), keras.Input((3,))
    two_inputs = keras.Model([a, b], L.Dense(2)(L.Concatenate()([a, b])))
    c = keras.Input((3,))
    two_outputs = keras.Model(c, [L.Dense(2)(c), L.Dense(1)(c)])
    for model in (two_inputs, two_outputs):
        for vectorize in ("auto", "layers", "map_fn"):
            with pytest.raises(ValueError, match="one input and one output"):
                functional.make_forward(model, vectorize=vectorize)
    # A single output in a dict is still one output.
    d = keras.Input((3,))
    model = keras.Model(d, {"y": L.Dense(2)(d)})
    forward = functional.make_forward(model, vectorize="map_fn")
    assert forward([v.value[None] for v in model.trainable_variables], tf.ones([1, 2, 3])).shape \
        == (1, 2, 2)


def test_decision_is_not_fooled_by_an_enclosing_tape_or_function(monkeypatch):
    """The grouped-convolution probe runs for real even under a tape / init_scope / tf.function."""
    monkeypatch.setattr(functional, "_GROUPED_CONV_SUPPORT", {})
    model = _conv_net("float64")
    with tf.GradientTape():
        with tf.init_scope():
            assert functional.make_forward(model).vectorized == GROUPED_F64
    monkeypatch.setattr(functional, "_GROUPED_CONV_SUPPORT", {})

    @tf.function
    def plan():
        return functional.make_forward(model).vectorized

    assert plan() == GROUPED_F64


def test_float64_conv_meta_gradient_computes():
    """The reported crash: float64 convolutions must fall back, not fail in the gradient."""
    model = _conv_net("float64")
    forward = functional.make_forward(model)
    rng = np.random.default_rng(1)
    weights, x = _task_weights(model, rng), _inputs(model, rng)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = tf.reduce_sum(tf.square(forward(weights, x)))
    grads = tape.gradient(loss, weights)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)


def test_onednn_off_conv_falls_back_and_differentiates():
    script = textwrap.dedent("""
        import keras, tensorflow as tf
        from tf_maml import functional
        model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, padding="same"),
                                  keras.layers.BatchNormalization(), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
        forward = functional.make_forward(model)
        weights = [tf.stack([v.value] * 2) for v in model.trainable_variables]
        x = tf.random.normal([2, 3, 6, 6, 2])
        with tf.GradientTape() as outer:
            outer.watch(weights)
            with tf.GradientTape() as inner:
                inner.watch(weights)
                loss = tf.reduce_sum(tf.square(forward(weights, x)))
            first = inner.gradient(loss, weights)
            total = sum(tf.reduce_sum(tf.square(g)) for g in first)
        second = outer.gradient(total, weights)
        assert all(g is not None for g in first + second)
        print("VECTORIZED", forward.vectorized, forward.unsupported_reason)
        # Dilated convolutions have no gradient here at all (one task either): a warning
        # at planning time, naming the layer, rather than only TensorFlow's error later.
        dilated = keras.Sequential([keras.Input((6, 6, 2)),
                                    keras.layers.Conv2D(3, 2, dilation_rate=2, name="holes"),
                                    keras.layers.Flatten(), keras.layers.Dense(2)])
        functional.make_forward(dilated)
        functional.make_forward(model)  # no dilation: no such warning
    """)
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="-1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    # Plain CPU kernels have no grouped-convolution gradients: the per-task path, and the
    # reason says how to turn oneDNN on (the same text is logged as a warning).
    assert "VECTORIZED False" in result.stdout and "grouped" in result.stdout, result.stdout
    assert "set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported" in result.stdout
    assert "runs task by task, slower" in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("dilation rates above 1") == 1, result.stderr[-2000:]
    assert "layers holes have dilation rates above 1" in result.stderr, result.stderr[-2000:]


ONEDNN_DEFAULT_SCRIPT = """
import os, sys
order = sys.argv[1]
if order == "tensorflow_first":
    import tensorflow
import tf_maml
from tf_maml import compat
print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), compat.onednn_enabled())
"""


@pytest.mark.parametrize("preset,order,expected", [
    (None, "tf_maml_first", "1 True"),
    ("0", "tf_maml_first", "0 False"),
    (None, "tensorflow_first", "None"),  # too late to choose: TensorFlow's own default stands
])
def test_importing_tf_maml_first_turns_onednn_on_unless_told_otherwise(preset, order, expected):
    """On x86-64 TensorFlow turns oneDNN on by default only on CPUs with AVX-512 VNNI, BF16 or
    AMX; without it conv models lose the layer-batched path. tf_maml sets
    TF_ENABLE_ONEDNN_OPTS=1 when imported before TensorFlow, unless the variable is set."""
    import platform  # noqa: PLC0415
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("tf_maml leaves TensorFlow's oneDNN default alone off x86-64")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **({"TF_ENABLE_ONEDNN_OPTS": preset} if preset else {}))
    result = subprocess.run([sys.executable, "-c", ONEDNN_DEFAULT_SCRIPT, order], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:len(expected.split())] == expected.split(), result.stdout


# ---------------------------------------------------------------------------
# Dropout: fresh, per-task masks, identical on both paths, seedable.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("vectorize", ["layers", "map_fn"])
def test_dropout_masks_per_task_per_call_and_seeded(vectorize):
    model = _dropout_dense()
    forward = functional.make_forward(model, vectorize=vectorize)
    same_weights = [tf.broadcast_to(v.value[None], (NUM_TASKS,) + tuple(v.shape))
                    for v in model.trainable_variables]
    x = tf.broadcast_to(tf.constant(np.random.default_rng(2).normal(size=(1, 16, 5))),
                        (NUM_TASKS, 16, 5))
    y = forward(same_weights, x).numpy()
    for t in range(1, NUM_TASKS):
        assert not np.allclose(y[0], y[t]), "tasks share a dropout mask"
    assert not np.allclose(y, forward(same_weights, x).numpy()), "calls share masks"
    step = tf.function(lambda: forward(same_weights, x))
    assert not np.allclose(step().numpy(), step().numpy()), "traced calls share masks"
    seeded = forward(same_weights, x, seed=5).numpy()
    np.testing.assert_array_equal(seeded, forward(same_weights, x, seed=5).numpy())
    np.testing.assert_array_equal(seeded, forward(same_weights, x, seed=[5, 0]).numpy())
    assert not np.allclose(seeded, forward(same_weights, x, seed=6).numpy())
    # A task's masks do not depend on how many tasks share the call.
    np.testing.assert_array_equal(seeded[:1], forward([w[:1] for w in same_weights], x[:1],
                                                      seed=5).numpy())
    # Inference: no dropout; the model's state is never advanced.
    states = [v.numpy().copy() for v in model.non_trainable_variables]
    expected = model(x[0], training=False).numpy()
    np.testing.assert_allclose(forward(same_weights, x, training=False).numpy()[0], expected,
                               rtol=1e-12)
    for before, v in zip(states, model.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_dropout_paths_agree_under_a_dynamic_task_count():
    model = _dropout_dense()
    rng = np.random.default_rng(3)
    weights, x = _task_weights(model, rng), _inputs(model, rng)
    specs = ([tf.TensorSpec([None] + list(v.shape), v.dtype) for v in model.trainable_variables],
             tf.TensorSpec([None, None, 5], tf.float64))
    results = []
    for vectorize in ("layers", "map_fn"):
        forward = functional.make_forward(model, vectorize=vectorize)
        traced = tf.function(lambda w, x: forward(w, x, True, seed=11), input_signature=specs)
        results.append(traced(weights, x).numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    np.testing.assert_allclose(results[0], _keras_per_task(model, weights, x, True, seed=11),
                               rtol=1e-12)


# ---------------------------------------------------------------------------
# Second-order MAML meta-gradients against finite differences (float64).
# ---------------------------------------------------------------------------

def _maml_loss(forward, params, episode, inner_lr, seeds):
    """One inner SGD step on the support loss, then the query loss (mean over tasks)."""
    sx, sy, qx, qy = episode
    weights = [tf.broadcast_to(p[None], tf.concat([[NUM_TASKS], tf.shape(p)], 0)) for p in params]
    with tf.GradientTape() as tape:
        tape.watch(weights)
        support = tf.reduce_sum(tf.square(forward(weights, sx, True, seed=seeds[0]) - sy))
    grads = tape.gradient(support, weights)
    adapted = [w - inner_lr * g for w, g in zip(weights, grads)]
    return tf.reduce_mean(tf.square(forward(adapted, qx, True, seed=seeds[1]) - qy))


def _meta_gradient(forward, params, episode, inner_lr, seeds, first_order=False):
    with tf.GradientTape() as tape:
        tape.watch(params)
        if first_order:
            sx, sy, qx, qy = episode
            weights = [tf.broadcast_to(p[None], tf.concat([[NUM_TASKS], tf.shape(p)], 0))
                       for p in params]
            with tf.GradientTape() as inner:
                inner.watch(weights)
                support = tf.reduce_sum(tf.square(forward(weights, sx, True, seed=seeds[0]) - sy))
            grads = [tf.stop_gradient(g) for g in inner.gradient(support, weights)]
            adapted = [w - inner_lr * g for w, g in zip(weights, grads)]
            loss = tf.reduce_mean(tf.square(forward(adapted, qx, True, seed=seeds[1]) - qy))
        else:
            loss = _maml_loss(forward, params, episode, inner_lr, seeds)
    return tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _episode(model, rng):
    out = model.output_shape[1:]
    sx, qx = _inputs(model, rng, 5), _inputs(model, rng, 5)
    return (sx, tf.constant(rng.normal(size=(NUM_TASKS, 5) + out), sx.dtype),
            qx, tf.constant(rng.normal(size=(NUM_TASKS, 5) + out), qx.dtype))


def fd_check(forward, model, inner_lr=0.3, seeds=(21, 22), num_directions=3):
    """(analytic, numeric, first-order) directional derivatives of the meta-loss."""
    rng = np.random.default_rng(4)
    params = [tf.constant(v.numpy()) for v in model.trainable_variables]
    episode = _episode(model, rng)
    grads = _meta_gradient(forward, params, episode, inner_lr, seeds)
    first = _meta_gradient(forward, params, episode, inner_lr, seeds, first_order=True)
    loss_at = tf.function(lambda ps: _maml_loss(forward, ps, episode, inner_lr, seeds))
    eps = 1e-5
    analytic, numeric, first_order = [], [], []
    for _ in range(num_directions):
        d = [tf.constant(rng.normal(size=p.shape), p.dtype) for p in params]
        analytic.append(sum(float(tf.reduce_sum(g * v)) for g, v in zip(grads, d)))
        first_order.append(sum(float(tf.reduce_sum(g * v)) for g, v in zip(first, d)))
        plus = loss_at([p + eps * v for p, v in zip(params, d)])
        minus = loss_at([p - eps * v for p, v in zip(params, d)])
        numeric.append(float(plus - minus) / (2 * eps))
    return np.array(analytic), np.array(numeric), np.array(first_order)


FD_MODELS = {
    "dense_bn": _dense_bn_dropout0,
    "maxpool": _maxpool_dense,
    "avgpool_bn": _avgpool_bn_dense,
    "dropout": _dropout_dense,
    "frozen_bn": _frozen_bn_dense,
}


@pytest.mark.parametrize("vectorize", ["auto", "map_fn"])
@pytest.mark.parametrize("name", sorted(FD_MODELS))
def test_second_order_meta_gradient_matches_finite_differences(name, vectorize):
    model = FD_MODELS[name]()
    _distinct_moving_statistics(model)
    forward = functional.make_forward(model, vectorize=vectorize)
    analytic, numeric, first_order = fd_check(forward, model)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    # The check has teeth: the first-order meta-gradient is measurably different.
    assert np.max(np.abs(first_order - numeric) / np.abs(numeric)) > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lora_meta_gradient_reaches_the_lora_weights(dtype):
    """LoRA weights are float32 even in a float64 model (Keras), so no finite
    differences here: the meta-gradient equals one through Keras' own forward,
    and is not zero on the LoRA weights."""
    model = _lora_dense(dtype)
    rng = np.random.default_rng(5)
    params = [tf.constant(v.numpy() + 0.1 * rng.normal(size=v.shape), v.dtype)
              for v in model.trainable_variables]
    episode = _episode(model, rng)

    def keras_forward(weights, x, training=True, seed=None):
        return _keras_per_task(model, weights, x, training)

    expected = _meta_gradient(keras_forward, params, episode, 0.3, (None, None))
    names = [v.path for v in model.trainable_variables]
    for vectorize in ("auto", "map_fn"):
        forward = functional.make_forward(model, vectorize=vectorize)
        grads = _meta_gradient(forward, params, episode, 0.3, (None, None))
        for name, g, e in zip(names, grads, expected):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
            if "lora" in name:
                assert np.max(np.abs(g.numpy())) > 1e-3, name
