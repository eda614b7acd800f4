"""Functional, task-batched forward passes for built Keras 3 models.

MAML needs the model as a *function of its weights*: `forward(weights, x)`
where `weights` are plain tensors (the adapted, "fast" weights), so that
gradients flow through the inner loop. This module turns any built Keras 3
model into such a function, with a leading **task axis** on both the weights
and the inputs, so that a whole meta-batch is processed at once:

    weights[i]: [num_tasks, *variable_shape]
    x:          [num_tasks, batch, *input_shape]
    output:     [num_tasks, batch, *output_shape]

Two implementations, picked automatically:

* **Layer-batched** (fast): a model that is a chain of supported layers
  (`Dense`, `Conv2D`, `BatchNormalization`, pooling, `Flatten`, `Dropout`,
  elementwise activations) is run with every task at once. Convolutions use
  grouped convolution (tasks folded into channels), dense layers use batched
  matmul. One kernel launch per layer for the whole meta-batch.
* **Per-task** (general): anything else (subclassed models, branches, custom
  layers) runs `model.stateless_call` for each task under `tf.map_fn`.

Both compute batch-normalization statistics exactly (the mean is not cut out of
the variance's gradient, unlike `tf.nn.moments`), so second-order
meta-gradients of models with normalization layers are correct. Neither path
ever assigns to the model's variables: moving statistics of batch
normalization are neither used (with `training=True`) nor updated.
"""

import contextlib

import keras
import tensorflow as tf

from keras.src.backend.tensorflow import nn as _keras_tf_nn
from keras.src.models.functional import Functional as _Functional

__all__ = ["make_forward", "exact_moments"]


def _exact_moments_impl(x, axes, keepdims=False):
    """Mean and (biased) variance with the full gradient through the mean."""
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def exact_moments():
    """Makes Keras normalization layers compute exactly differentiable moments.

    Keras 3 (TF backend) computes batch moments with `tf.nn.moments`, which
    wraps the mean in `stop_gradient` inside the variance. The first
    derivative is unaffected (the dropped term is zero), but second
    derivatives, hence second-order MAML meta-gradients, come out wrong. Inside
    this context (while a function is traced), Keras uses a version with the
    full gradient. Nothing changes outside the context.

    Example:

    ```python
    with exact_moments():
        y = model.stateless_call(weights, non_trainable, x, training=True)[0]
    ```
    """
    original = _keras_tf_nn._compute_moments
    _keras_tf_nn._compute_moments = _exact_moments_impl
    try:
        yield
    finally:
        _keras_tf_nn._compute_moments = original


# ----------------------------------------------------------------------------
# Layer-batched implementation.
#
# Activations move through the chain in one of two layouts:
#   "tasks":   [T, B, ...features]            (dense-style layers)
#   "grouped": [B, H, W, T * C]               (conv-style layers; task-major
#                                              channel blocks, so a grouped
#                                              convolution with T groups runs
#                                              every task with its own kernel)
# ----------------------------------------------------------------------------

_ELEMENTWISE_ACTIVATIONS = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu",
    "silu", "swish", "softplus", "softsign", "leaky_relu", "exponential",
    "hard_sigmoid", "hard_silu", "hard_swish", "mish", "log_sigmoid",
}


class _Unsupported(Exception):
    """Raised while planning: this model needs the per-task path."""


def _activation_name(fn):
    name = getattr(fn, "__name__", None)
    if name not in _ELEMENTWISE_ACTIVATIONS:
        raise _Unsupported(f"activation {name!r}")
    return name


def _to_grouped(h, layout):
    if layout == "grouped":
        return h
    if h.shape.rank != 5:
        raise ValueError("expected [tasks, batch, height, width, channels]")
    # [T, B, H, W, C] -> [B, H, W, T, C] -> [B, H, W, T*C]
    g = tf.transpose(h, [1, 2, 3, 0, 4])
    s = tf.shape(g)
    return tf.reshape(g, tf.stack([s[0], s[1], s[2], s[3] * s[4]]))


def _to_tasks(h, layout, num_tasks):
    if layout == "tasks":
        return h
    # [B, H, W, T*C] -> [B, H, W, T, C] -> [T, B, H, W, C]
    s = tf.shape(h)
    g = tf.reshape(h, tf.stack([s[0], s[1], s[2], num_tasks, s[3] // num_tasks]))
    return tf.transpose(g, [3, 0, 1, 2, 4])


def _task_vector(w, layout, rank):
    """Reshapes a per-task vector [T, C] to broadcast against activations."""
    if layout == "grouped":
        return tf.reshape(w, [-1])
    return tf.reshape(w, tf.concat([tf.shape(w)[:1], tf.ones([rank - 2], tf.int32),
                                    tf.shape(w)[1:]], 0))


_FUSED_BN_DTYPES = (tf.float32, tf.bfloat16, tf.float16)
_GROUPED_CONV_SUPPORT = {}


def _grouped_conv_differentiable(dtype):
    """Whether grouped convolutions have gradients here (probed once per dtype).

    TensorFlow's plain CPU kernels lack grouped-convolution gradients; the
    oneDNN ones (float32, bfloat16) and GPU ones have them.
    """
    if dtype not in _GROUPED_CONV_SUPPORT:
        try:
            with tf.init_scope():
                x = tf.ones([1, 3, 3, 2], dtype)
                k = tf.ones([1, 1, 1, 2], dtype)
                with tf.GradientTape() as tape:
                    tape.watch([x, k])
                    y = tf.nn.conv2d(x, k, 1, "SAME")
                tape.gradient(y, [x, k])
            _GROUPED_CONV_SUPPORT[dtype] = True
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.NotFoundError):
            _GROUPED_CONV_SUPPORT[dtype] = False
    return _GROUPED_CONV_SUPPORT[dtype]


def _plan_layer(layer):
    """Returns a step function (h, layout, weights, T, training) -> (h, layout)."""
    if isinstance(layer, keras.layers.InputLayer):
        return None
    if type(layer) is keras.layers.Dense:
        # Dense always runs in the "tasks" layout (features last), so any
        # activation, softmax included, is applied as Keras would.
        act = getattr(layer.activation, "__name__", None)

        def dense(h, layout, get, num_tasks, training):
            h = _to_tasks(h, layout, num_tasks)
            kernel = get(layer.kernel)
            shape = tf.shape(h)
            flat = tf.reshape(h, tf.stack([shape[0], -1, shape[-1]]))
            y = tf.matmul(flat, kernel)
            if layer.use_bias:
                y = y + get(layer.bias)[:, None, :]
            y = tf.reshape(y, tf.concat([shape[:-1], tf.shape(kernel)[-1:]], 0))
            return layer.activation(y) if act != "linear" else y, "tasks"

        return dense
    if type(layer) is keras.layers.Conv2D:
        act = _activation_name(layer.activation)
        if not _grouped_conv_differentiable(layer.compute_dtype):
            raise _Unsupported(
                f"this device has no gradient kernel for grouped {layer.compute_dtype} "
                "convolutions (TensorFlow's CPU kernels need oneDNN and float32/bfloat16)")
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise _Unsupported("Conv2D with channels_first or groups")
        padding = layer.padding.upper()
        if padding not in ("SAME", "VALID"):
            raise _Unsupported(f"padding {layer.padding}")

        def conv(h, layout, get, num_tasks, training):
            h = _to_grouped(h, layout)
            kernel = get(layer.kernel)  # [T, kh, kw, C, O]
            ks = tf.shape(kernel)
            k = tf.transpose(kernel, [1, 2, 3, 0, 4])
            k = tf.reshape(k, tf.stack([ks[1], ks[2], ks[3], ks[0] * ks[4]]))
            y = tf.nn.conv2d(h, k, strides=layer.strides, padding=padding,
                             dilations=layer.dilation_rate)
            if layer.use_bias:
                y = y + tf.reshape(get(layer.bias), [-1])
            return layer.activation(y) if act != "linear" else y, "grouped"

        return conv
    if type(layer) is keras.layers.BatchNormalization:
        if layer.renorm or layer.synchronized:
            raise _Unsupported("BatchNormalization with renorm/synchronized")

        def batch_norm(h, layout, get, num_tasks, training):
            rank = h.shape.rank
            axis = layer.axis if layer.axis >= 0 else None
            expected = rank - 1 if layout == "grouped" else rank - 2
            if axis is not None and axis != expected:
                raise _Unsupported("BatchNormalization on a non-last axis")
            if training and layout == "grouped" and h.dtype in _FUSED_BN_DTYPES:
                # One fused kernel per layer for every task (tasks are channel
                # blocks). Its first and second derivatives are exact (the
                # gradient kernels keep the mean's term); ~30% faster
                # first-order steps on CPU than the composite form below.
                channels = tf.shape(h)[-1]
                scale = (tf.reshape(get(layer.gamma), [-1]) if layer.scale
                         else tf.ones([channels], h.dtype))
                offset = (tf.reshape(get(layer.beta), [-1]) if layer.center
                          else tf.zeros([channels], h.dtype))
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                    h, scale, offset, epsilon=layer.epsilon, is_training=True)
                return y, layout
            if training:
                axes = list(range(rank - 1)) if layout == "grouped" else list(range(1, rank - 1))
                mean, variance = _exact_moments_impl(h, axes, keepdims=True)
            else:
                mean = tf.cast(layer.moving_mean, h.dtype)
                variance = tf.cast(layer.moving_variance, h.dtype)
                if layout == "grouped":
                    mean = tf.tile(mean, [num_tasks])
                    variance = tf.tile(variance, [num_tasks])
            inv = tf.math.rsqrt(variance + layer.epsilon)
            if layer.scale:
                inv = inv * _task_vector(get(layer.gamma), layout, rank)
            y = (h - mean) * inv
            if layer.center:
                y = y + _task_vector(get(layer.beta), layout, rank)
            return y, layout

        return batch_norm
    if isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)):
        return lambda h, layout, get, num_tasks, training: (layer(h), layout)
    if isinstance(layer, keras.layers.Activation):
        _activation_name(layer.activation)
        return lambda h, layout, get, num_tasks, training: (layer.activation(h), layout)
    if type(layer) is keras.layers.Flatten:
        def flatten(h, layout, get, num_tasks, training):
            h = _to_tasks(h, layout, num_tasks)
            s = tf.shape(h)
            return tf.reshape(h, tf.stack([s[0], s[1], -1])), "tasks"
        return flatten
    if type(layer) in (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D):
        if layer.data_format != "channels_last":
            raise _Unsupported("pooling with channels_first")
        pool = tf.nn.max_pool2d if type(layer) is keras.layers.MaxPooling2D else tf.nn.avg_pool2d

        def pooling(h, layout, get, num_tasks, training):
            h = _to_grouped(h, layout)
            return pool(h, layer.pool_size, layer.strides, layer.padding.upper()), "grouped"
        return pooling
    if type(layer) is keras.layers.GlobalAveragePooling2D:
        if layer.data_format != "channels_last" or layer.keepdims:
            raise _Unsupported("GlobalAveragePooling2D variant")

        def global_pool(h, layout, get, num_tasks, training):
            h = _to_tasks(h, layout, num_tasks)
            return tf.reduce_mean(h, axis=[2, 3]), "tasks"
        return global_pool
    if type(layer) is keras.layers.Dropout:
        if layer.noise_shape is not None:
            raise _Unsupported("Dropout with noise_shape")

        def dropout(h, layout, get, num_tasks, training):
            if training and layer.rate > 0:
                h = tf.nn.dropout(h, rate=layer.rate)
            return h, layout
        return dropout
    raise _Unsupported(f"layer {type(layer).__name__}")


def _layer_chain(model):
    """The model's layers if they form a single chain, else raises _Unsupported."""
    if type(model) is keras.Sequential:
        layers = list(model.layers)
    elif type(model) is _Functional:
        layers = list(model.layers)
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise _Unsupported("multiple inputs or outputs")
        previous = None
        for layer in layers:
            if len(layer._inbound_nodes) != 1:
                raise _Unsupported("shared layer")
            if previous is not None and layer.input is not previous.output:
                raise _Unsupported("non-sequential topology")
            previous = layer
        if previous is None or previous.output is not model.outputs[0]:
            raise _Unsupported("non-sequential topology")
    else:
        raise _Unsupported(f"subclassed model {type(model).__name__}")
    for layer in layers:
        if isinstance(layer, keras.Model):
            raise _Unsupported("nested model")
    return layers


def _plan(model):
    return [step for step in map(_plan_layer, _layer_chain(model)) if step is not None]


def make_forward(model, vectorize="auto"):
    """Turns a built Keras model into a task-batched function of its weights.

    Args:
        model: a built Keras 3 model (Sequential, functional or subclassed) with
            one input and one output.
        vectorize: `"auto"` uses the layer-batched path when every layer is
            supported, else the per-task path; `"layers"` requires the
            layer-batched path (raises if the model is not supported);
            `"map_fn"` always uses the per-task path.

    Returns:
        `forward(weights, x, training=True)`: `weights` is a list of tensors
        matching `model.trainable_variables`, each with a leading task axis;
        `x` is `[num_tasks, batch, ...]`. Returns `[num_tasks, batch, ...]`.
        `forward.vectorized` tells which path was chosen, and
        `forward.unsupported_reason` why the fast path was not taken.

        `training=True` means normalization layers use the statistics of each
        task's batch (the MAML paper's behaviour) and dropout is active.

    Raises:
        ValueError: the model is not built, or `vectorize="layers"` for a model
            the layer-batched path cannot run.

    Example:

    ```python
    model = tf_maml.models.mlp()
    forward = make_forward(model)
    weights = tf_maml.core.broadcast_to_tasks(model.trainable_variables, 4)
    y = forward(weights, tf.zeros([4, 10, 1]))  # [4, 10, 1]
    ```
    """
    if vectorize not in ("auto", "layers", "map_fn"):
        raise ValueError(f"vectorize must be 'auto', 'layers' or 'map_fn', got {vectorize!r}")
    if not model.built or not model.trainable_variables:
        raise ValueError(
            "make_forward needs a built Keras model with trainable weights; call the model on "
            "an input (or build it with keras.Input) first.")
    variable_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    plan, reason = None, None
    if vectorize != "map_fn":
        try:
            plan = _plan(model)
        except _Unsupported as e:
            reason = str(e)
            if vectorize == "layers":
                raise ValueError(
                    f"model {model.name!r} cannot use the layer-batched path: {reason}") from None

    if plan is not None:
        def forward(weights, x, training=True):
            num_tasks = tf.shape(x)[0] if x.shape[0] is None else x.shape[0]

            def get(variable):
                index = variable_index.get(id(variable))
                if index is not None:
                    return weights[index]
                # A frozen (non-trainable) weight: shared by every task.
                value = tf.convert_to_tensor(variable)
                return tf.broadcast_to(value[None], tf.concat([[num_tasks], tf.shape(value)], 0))

            h, layout = tf.cast(x, weights[0].dtype), "tasks"
            for step in plan:
                h, layout = step(h, layout, get, num_tasks, training)
            return _to_tasks(h, layout, num_tasks)
    else:
        non_trainable = list(model.non_trainable_variables)

        def forward(weights, x, training=True):
            def one_task(args):
                task_weights, task_x = args
                with exact_moments():
                    # Updated non-trainable values (moving statistics) are discarded:
                    # adaptation never changes the model's state.
                    y, _ = model.stateless_call(
                        list(task_weights), [v.value for v in non_trainable], task_x,
                        training=training)
                return y

            return tf.map_fn(one_task, (list(weights), x),
                             fn_output_signature=weights[0].dtype)

    forward.vectorized = plan is not None
    forward.unsupported_reason = reason
    return forward
