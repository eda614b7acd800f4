"""Functional, task-batched forward passes for built Keras 3 models.

MAML needs the model as a *function of its weights*: `forward(weights, x)`
where `weights` are plain tensors (the adapted, "fast" weights), so that
gradients flow through the inner loop. This module turns any built Keras 3
model into such a function, with a leading **task axis** on both the weights
and the inputs, so that a whole meta-batch is processed at once:

    weights[i]: [num_tasks, *variable_shape]
    x:          [num_tasks, batch, *input_shape]
    output:     [num_tasks, batch, *output_shape]

Two implementations, picked once, when `make_forward` plans the model:

* **Layer-batched** (fast): a model that is a chain of layers this module
  reproduces exactly (`Dense`, `Conv2D`, `BatchNormalization`, 2D pooling,
  `GlobalAveragePooling2D`, `Flatten`, `Dropout`, elementwise activations;
  each only in the configurations listed in `_plan_layer`) is run with every
  task at once. Convolutions use grouped convolution (tasks folded into
  channels), dense layers use batched matmul. One kernel launch per layer for
  the whole meta-batch.
* **Per-task** (general): anything else (subclassed models, branches, custom
  layers, LoRA or quantized layers, mixed dtype policies, devices without
  grouped-convolution gradients) runs `model.stateless_call` for each task
  under `tf.map_fn`.

Both compute batch-normalization statistics exactly (the mean is not cut out of
the variance's gradient, unlike `tf.nn.moments`), so second-order
meta-gradients of models with normalization layers are correct. Neither path
ever assigns to the model's variables: moving statistics of batch
normalization are read (in inference mode, and always for a frozen layer) but
never updated, and dropout's seed state is never advanced (see `make_forward`
for how masks are drawn).
"""

import contextlib
import inspect
import threading

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml import compat

__all__ = ["make_forward", "exact_moments", "has_random_layers", "integer_input_dtype"]


def _exact_moments_impl(x, axes, keepdims=False):
    """Mean and (biased) variance with the full gradient through the mean."""
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


_FUSED_MIN_EPSILON = 1.001e-5  # what tf.nn.fused_batch_norm raises a smaller epsilon to


def _fused_batch_norm_training(x, scale, offset, epsilon):
    """Training-mode batch norm (NHWC): fused kernels, second derivative in closed form.

    The value and the first derivative are TensorFlow's fused kernels
    (`FusedBatchNormV3`, `FusedBatchNormGradV3`), as `tf.nn.fused_batch_norm`
    computes them. TensorFlow differentiates the gradient kernel by building
    the batch-norm gradient out of about forty elementwise ops and reductions
    and differentiating those, which took about a quarter of the kernel time
    of a second-order Omniglot 20-way meta-step; here its derivative is the
    closed form below (about twenty passes over the activations), equal up to
    round-off (a test compares it with autodiff of the textbook formula in
    float64).

    With x̂ = (x − μ)·r, r = (σ² + ε)^-½ per channel, mean(·) over the channel's
    N elements and P(z) = z − mean(z) − x̂·mean(z·x̂), the gradient kernel maps
    (x, γ, g) to dx = γ·r·P(g), dγ = Σ g·x̂, dβ = Σ g; for cotangents (a, c, e)
    of (dx, dγ, dβ) its vector-Jacobian product is

        ∂g = γ·r·P(a) + c·x̂ + e
        ∂γ = r·⟨a, P(g)⟩
        ∂x = r·P(u) − (r²·γ·⟨a, P(g)⟩ / N)·x̂,  u = c·g − γ·r·(mean(a·x̂)·g + mean(g·x̂)·a)

    (P is self-adjoint, and the Jacobian of x̂ with respect to x is r·P).

    Args:
        x: `[batch, height, width, channels]` float32.
        scale, offset: `[channels]`.
        epsilon: float (raised to 1.001e-5, as `tf.nn.fused_batch_norm` does).

    Returns:
        The normalized `x`, scaled and offset.
    """
    if x.dtype != tf.float32:
        raise ValueError(f"the fused batch norm path takes float32 inputs, got {x.dtype.name}")
    epsilon = max(float(epsilon), _FUSED_MIN_EPSILON)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        empty = tf.constant([], x.dtype)
        y, _, _, reserve_1, reserve_2, reserve_3 = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=epsilon,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=True)

        def grad(dy):
            return _fused_batch_norm_gradient(x, scale, dy, (reserve_1, reserve_2, reserve_3),
                                              epsilon)

        return y, grad

    return normalize(x, scale, offset)


class _Switch(threading.local):
    """A per-thread flag, off unless inside `with switch.turned_on():` (nestable)."""

    on = False

    @contextlib.contextmanager
    def turned_on(self):
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous


_FIRST_DERIVATIVES = _Switch()


@contextlib.contextmanager
def first_derivatives_only():
    """Within it (while functions are traced), the fused batch norm's gradient is
    TensorFlow's kernel alone, without the closed-form second derivative.

    For exports: their adaptation differentiates once, and a SavedModel cannot
    keep a custom gradient's own gradient (loading warns "Importing a function
    ... with ops with unsaved custom gradients" for each). The values are the
    same kernels' either way; the kernel stays differentiable (TensorFlow's
    registered gradient), only slower.
    """
    with _FIRST_DERIVATIVES.turned_on():
        yield


def _fused_batch_norm_gradient(x, scale, dy, reserve, epsilon):
    """`(dx, dscale, doffset)` of `_fused_batch_norm_training`, with its closed-form derivative."""
    def kernel(x, scale, g):
        dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=g, x=x, scale=scale, reserve_space_1=reserve[0],
            reserve_space_2=reserve[1], reserve_space_3=reserve[2], epsilon=epsilon,
            data_format="NHWC", is_training=True)
        return dx, dscale, doffset

    if _FIRST_DERIVATIVES.on:
        return kernel(x, scale, dy)

    @tf.custom_gradient
    def gradient(x, scale, g):
        dx, dscale, doffset = kernel(x, scale, g)

        def grad(a, c, e):
            a = tf.zeros_like(x) if a is None else a
            c = tf.zeros_like(scale) if c is None else c
            e = tf.zeros_like(scale) if e is None else e
            channels = tf.shape(x)[-1]
            n_int = tf.reduce_prod(tf.shape(x)[:3])
            n = tf.cast(n_int, x.dtype)
            ones = tf.ones(tf.stack([1, n_int]), x.dtype) / n

            def mean(z):
                # A matrix product with a row of 1/N: several times faster on CPU
                # than reduce_mean over the leading axes (measured 0.33 vs 2.1 ms
                # on [20, 14, 14, 1024]).
                return tf.linalg.matmul(ones, tf.reshape(z, tf.stack([n_int, channels])))[0]

            # Per-channel coefficients are combined first, so that each term
            # costs one pass over the activations.
            centered = x - mean(x)
            r = tf.math.rsqrt(mean(tf.square(centered)) + epsilon)
            xhat = centered * r
            mean_a, mean_g = mean(a), mean(g)
            a_xhat, g_xhat = mean(a * xhat), mean(g * xhat)
            a_dot_pg = n * (mean(a * g) - mean_a * mean_g - a_xhat * g_xhat)
            scale_r = scale * r
            xhat_coefficient = c - scale_r * a_xhat
            # ∂g = γr·a + (c − γr·mean(a·x̂))·x̂ + (e − γr·mean(a))
            d_g = scale_r * a + xhat_coefficient * xhat + (e - scale_r * mean_a)
            d_scale = r * a_dot_pg
            # u = (c − γr·mean(a·x̂))·g − γr·mean(g·x̂)·a
            u = xhat_coefficient * g - (scale_r * g_xhat) * a
            # ∂x = r·(u − mean(u)) − (r·mean(u·x̂) + r·γr·⟨a, P(g)⟩ / N)·x̂
            d_x = (r * (u - mean(u))
                   - (r * mean(u * xhat) + r * scale_r * a_dot_pg / n) * xhat)
            return d_x, d_scale, d_g

        return (dx, dscale, doffset), grad

    return gradient(x, scale, dy)


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
    with compat.keras_moments_replaced(_exact_moments_impl):
        yield


# ----------------------------------------------------------------------------
# Dropout seeds, shared by both paths.
#
# Keras' dropout draws its mask with `tf.nn.experimental.stateless_dropout`
# seeded by the layer's `SeedGenerator` state. Under `stateless_call` that
# state is an input, so both paths feed every task and every seed generator
# its own state, derived from one base seed per `forward` call: the masks are
# then identical on both paths, differ between tasks and layers, and are a
# deterministic function of the caller's `seed` when one is given.
# ----------------------------------------------------------------------------

# Keras casts seed states to int32 with `floormod(state, int32.max - 1)`;
# states are kept in that range so the cast is the identity.
_SEED_MODULUS = 2**31 - 2


def _seed_state_variables(model):
    """The model's `SeedGenerator` state variables, in `non_trainable_variables` order."""
    states = set()
    for layer in compat.all_layers(model):
        for generator in compat.seed_generators(layer):
            states.add(id(generator.state))
    return [v for v in model.non_trainable_variables if id(v) in states]


def random_layers(model):
    """The model's layers that draw random numbers in training (dropout, noise, augmentation).

    A layer counts if it owns a Keras `SeedGenerator`, except a recurrent cell
    whose `dropout` and `recurrent_dropout` are both 0 (Keras gives every
    cell a generator; such a cell never draws from it).

    Args:
        model: a Keras model.

    Returns:
        A list of layers (a subclassed model itself among them if it draws), in
        `compat.all_layers` order.
    """
    found = []
    for layer in compat.all_layers(model):
        if not compat.seed_generators(layer):
            continue
        if is_recurrent_cell(layer) and not (layer.dropout > 0 or layer.recurrent_dropout > 0):
            continue
        found.append(layer)
    return found


def is_recurrent_cell(layer):
    """Whether `layer` is a Keras recurrent cell (SimpleRNN, GRU, LSTM, ConvLSTM cells:
    `state_size` and numeric `dropout` and `recurrent_dropout` rates)."""
    rates = [getattr(layer, name, None) for name in ("dropout", "recurrent_dropout")]
    return hasattr(layer, "state_size") and all(
        isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates)


def has_random_layers(model):
    """Whether the model draws random numbers in training (see `random_layers`).

    Args:
        model: a Keras model.

    Returns:
        True if any of its layers does.
    """
    return bool(random_layers(model))


def output_is_softmax(model):
    """Whether the model's output is a softmax (probabilities rather than logits).

    Read from the layer that makes the output of a functional or `Sequential`
    model (nested models followed): a `Softmax` layer or `keras.ops.softmax`,
    or a layer whose `activation` is Keras' softmax (a softmax inside a
    `Lambda` is not seen).

    Args:
        model: a Keras model.

    Returns:
        True or False, or None where the model does not say (a subclassed model).
    """
    layer = _output_layer(model)
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax) or type(layer).__name__ == "Softmax":
        return True  # (the layer, or `keras.ops.softmax` in a functional model)
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or (
        getattr(activation, "__name__", None) == "softmax")


def output_is_linear(model):
    """Whether the model's output is made by a layer with a linear activation (logits).

    Read as `output_is_softmax` reads it.

    Args:
        model: a Keras model.

    Returns:
        True or False: False also where the output is made by anything else
        (another activation, a `Lambda`, an op) or the model does not say.
    """
    layer = _output_layer(model)
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.linear or (
        getattr(activation, "__name__", None) == "linear")


def _output_layer(model):
    """The operation that makes the output of a functional or `Sequential` model (nested
    models followed), or None (a subclassed model)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        try:
            layer = model.outputs[0]._keras_history.operation
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        if not isinstance(layer, keras.Model):
            return layer
        model = layer
    return None


def convolution_layers(model):
    """Names of the model's convolution layers of any kind (at any depth).

    A convolution here is a layer with a kernel size and a dilation rate: Keras'
    1-3D, depthwise, separable and transposed convolutions.

    Args:
        model: a Keras model.

    Returns:
        A list of layer names.
    """
    return [layer.name for layer in compat.all_layers(model)
            if hasattr(layer, "kernel_size") and hasattr(layer, "dilation_rate")]


def dilated_convolution_layers(model):
    """Names of the model's layers with a dilation rate above 1 (at any depth).

    TensorFlow's CPU kernels differentiate such convolutions only with oneDNN
    on ("Current CPU implementations do not yet support dilation rates larger
    than 1"), on every path: adapting the model needs oneDNN there (or a GPU).

    Args:
        model: a Keras model.

    Returns:
        A list of layer names (empty for most models).
    """
    names = []
    for layer in compat.all_layers(model):
        rate = getattr(layer, "dilation_rate", None)
        if rate is not None and any(int(r) > 1 for r in tf.nest.flatten(rate)):
            names.append(layer.name)
    return names


def integer_input_dtype(model):
    """The model's input dtype where it declares an integer one, else None.

    Such a model (`keras.Input(..., dtype="uint8")` with its own `Rescaling`, or
    token ids for an `Embedding`) takes its inputs as they are: the library
    does not scale uint8 images to [0, 1] for it.

    Args:
        model: a Keras model.

    Returns:
        A `tf.DType` or None (also for a subclassed model, which declares no input).
    """
    try:
        dtype = tf.as_dtype(model.inputs[0].dtype)
    except (AttributeError, ValueError, IndexError, TypeError):
        return None
    return dtype if dtype.is_integer else None


def _base_seed(seed):
    """A `[2]` int64 base seed: scrambled from `seed`, or fresh if it is None."""
    if seed is None:
        # A stateful op: a new value on every eager call and every execution
        # of a traced function; reproducible under `tf.random.set_seed`.
        return tf.random.uniform([2], 0, _SEED_MODULUS, dtype=tf.int64)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros([], tf.int64)])
    if seed.shape != (2,):
        raise ValueError(f"seed must be an integer or a [2] integer tensor, got shape {seed.shape}")
    # Scrambled, so that nearby seeds (0, 1, 2, ... per iteration) give
    # unrelated masks, not the same masks shifted by one task.
    return tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=_SEED_MODULUS,
                                       dtype=tf.int64)


def _task_seed_states(seed, num_tasks, num_states):
    """Seed-generator states for every task: `[num_tasks, num_states, 2]` int64.

    State `[a, b]` of task `t` and generator `l` has `a = base0 + t * num_states
    + l` and `b = base1` (mod 2**31 - 2): distinct for every (task, generator),
    and a generator that draws several times (Keras increments `b`) never
    meets another one's state. A task's states do not depend on `num_tasks`.
    """
    base = _base_seed(seed)
    index = (tf.range(tf.cast(num_tasks, tf.int64))[:, None] * num_states
             + tf.range(num_states, dtype=tf.int64)[None, :])
    a = tf.math.floormod(base[0] + index, _SEED_MODULUS)
    b = tf.broadcast_to(base[1], tf.shape(a))
    return tf.stack([a, b], axis=-1)


# ----------------------------------------------------------------------------
# Layer-batched implementation.
#
# Activations move through the chain in one of two layouts:
#   "tasks":   [T, B, ...features]            (dense-style layers)
#   "grouped": [B, H, W, T * C]               (conv-style layers; task-major
#                                              channel blocks, so a grouped
#                                              convolution with T groups runs
#                                              every task with its own kernel)
# The layout at every layer is known when the model is planned.
# ----------------------------------------------------------------------------

# Functions (compared by identity) that act elementwise: exact in any layout.
_ELEMENTWISE_ACTIVATIONS = frozenset(
    getattr(keras.activations, name) for name in (
        "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu",
        "silu", "softplus", "softsign", "leaky_relu", "exponential",
        "hard_sigmoid", "hard_silu", "mish", "log_sigmoid"))
# Functions that act along the last axis only: exact in the "tasks" layout.
_LAST_AXIS_ACTIVATIONS = frozenset([keras.activations.softmax, keras.activations.log_softmax])
_MODEL_DTYPES = ("float32", "float64")


class _Unsupported(Exception):
    """Raised while planning: this model needs the per-task path."""


class _Context:
    """What a planned step needs at call time."""

    def __init__(self, get, num_tasks, training, seed_states):
        self.get = get
        self.num_tasks = num_tasks
        self.training = training
        self.seed_states = seed_states


def _activation_kind(fn):
    """'elementwise', 'last_axis', or raises _Unsupported."""
    if fn in _ELEMENTWISE_ACTIVATIONS:
        return "elementwise"
    if fn in _LAST_AXIS_ACTIVATIONS:
        return "last_axis"
    raise _Unsupported(f"activation {getattr(fn, '__name__', fn)!r}")


def _to_grouped(h, layout):
    if layout == "grouped":
        return h
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
    """Reshapes a per-task vector [T, C] to broadcast against activations.

    In the grouped layout channel `c` of task `t` is channel `t * C + c`:
    the row-major flattening of `[T, C]`.
    """
    if layout == "grouped":
        return tf.reshape(w, [-1])
    return tf.reshape(w, tf.concat([tf.shape(w)[:1], tf.ones([rank - 2], tf.int32),
                                    tf.shape(w)[1:]], 0))


def _shared_vector(v, layout, num_tasks):
    """A per-channel vector [C] shared by every task, to broadcast against activations.

    `tf.tile` (not `tf.repeat`): the grouped layout is task-major.
    """
    if layout == "grouped":
        return tf.tile(v, [num_tasks])
    return v


_GROUPED_CONV_SUPPORT = {}
_GROUPED_CONV_LOCK = threading.Lock()


def _probe_grouped_conv(dtype, strided, dilated, padding):
    """Raises unless grouped convolutions have exact first and second derivatives."""
    rng = np.random.default_rng(0)
    stride, dilation = (2 if strided else 1), (2 if dilated else 1)
    x = tf.constant(rng.normal(size=(2, 7, 7, 4)), dtype)
    k = tf.constant(rng.normal(size=(2, 2, 2, 6)), dtype)  # 2 groups of 2 -> 3 channels

    def derivatives(conv):
        with tf.GradientTape() as outer:
            outer.watch([x, k])
            with tf.GradientTape() as inner:
                inner.watch([x, k])
                loss = tf.reduce_sum(tf.square(conv(x, k)))
            first = inner.gradient(loss, [x, k])
            if any(g is None for g in first):
                raise RuntimeError("no first derivative")
            total = sum(tf.reduce_sum(tf.square(g)) for g in first)
        second = outer.gradient(total, [x, k])
        if any(g is None for g in second):
            raise RuntimeError("no second derivative")
        return [g.numpy() for g in first + second]

    def grouped(x, k):
        return tf.nn.conv2d(x, k, stride, padding, dilations=dilation)

    def per_group(x, k):
        return tf.concat([tf.nn.conv2d(x[..., 2 * g:2 * g + 2], k[..., 3 * g:3 * g + 3], stride,
                                       padding, dilations=dilation) for g in range(2)], -1)

    for a, b in zip(derivatives(grouped), derivatives(per_group)):
        if not (np.all(np.isfinite(a)) and np.allclose(a, b, rtol=1e-3, atol=1e-3)):
            raise RuntimeError("wrong derivative")


def _grouped_conv_differentiable(dtype, strided=False, dilated=False, padding="SAME"):
    """Whether grouped convolutions here have exact gradients (probed once per configuration).

    TensorFlow's plain CPU kernels lack grouped-convolution gradients; the
    oneDNN ones (float32, bfloat16) and GPU ones have them. The probe runs in a
    fresh thread: eagerly, outside any enclosing `tf.function`, gradient tape or
    `tf.init_scope` (which would pause the tape and make every probe pass), on
    the device of the caller's eager device scope.

    Args:
        dtype: the computation's dtype.
        strided: whether the convolution has a stride above 1.
        dilated: whether it has a dilation rate above 1.
        padding: "SAME" or "VALID".

    Returns:
        True if the first and second derivatives of a grouped convolution
        exist and equal those of per-group convolutions.
    """
    device = compat.eager_device_name()
    key = (tf.as_dtype(dtype).name, bool(strided), bool(dilated), padding, device or "")
    with _GROUPED_CONV_LOCK:
        if key not in _GROUPED_CONV_SUPPORT:
            result = []

            def probe():
                try:
                    with tf.device(device) if device else contextlib.nullcontext():
                        _probe_grouped_conv(tf.as_dtype(dtype), strided, dilated, padding)
                    result.append(True)
                except Exception:  # noqa: BLE001 - any failure means "not here"
                    result.append(False)

            thread = threading.Thread(target=probe, name="tf_maml_grouped_conv_probe")
            thread.start()
            thread.join()
            _GROUPED_CONV_SUPPORT[key] = bool(result and result[0])
        return _GROUPED_CONV_SUPPORT[key]


def _variable(layer, name):
    """The layer's weight `name`, which must be a plain Keras variable."""
    value = getattr(layer, name)
    if not isinstance(value, keras.Variable):
        raise _Unsupported(f"{type(layer).__name__} {layer.name!r}: {name} is computed")
    return value


def _check_weights_plain(layer):
    if getattr(layer, "lora_enabled", False):
        raise _Unsupported(f"{type(layer).__name__} {layer.name!r} with LoRA")
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise _Unsupported(f"{type(layer).__name__} {layer.name!r} is quantized ({mode})")


def _plan_dense(layer, layout):
    _check_weights_plain(layer)
    kernel = _variable(layer, "kernel")
    bias = _variable(layer, "bias") if layer.use_bias else None
    activation = layer.activation
    _activation_kind(activation)  # Output is in the "tasks" layout: both kinds are exact.

    # One input feature (sine's first layer): the product is an outer product,
    # one multiplication per output and no sum, so a broadcast multiply gives
    # the same bits as the batched matmul without its per-call cost (about
    # 75 us per small batched matmul in oneDNN, and two per backward pass).
    outer_product = kernel.shape[0] == 1

    def dense(h, ctx):
        h = _to_tasks(h, layout, ctx.num_tasks)
        k = ctx.get(kernel)
        shape = tf.shape(h)
        flat = tf.reshape(h, tf.stack([shape[0], -1, shape[-1]]))
        y = flat * k if outer_product else tf.matmul(flat, k)
        if bias is not None:
            y = y + ctx.get(bias)[:, None, :]
        y = tf.reshape(y, tf.concat([shape[:-1], tf.shape(k)[-1:]], 0))
        return y if activation is keras.activations.linear else activation(y)

    return dense, "tasks"


def _plan_conv2d(layer, layout, dtype):
    _check_weights_plain(layer)
    if layer.data_format != "channels_last":
        raise _Unsupported("Conv2D with channels_first")
    if layer.groups != 1:
        raise _Unsupported("Conv2D with groups")
    padding = layer.padding.upper()
    if padding not in ("SAME", "VALID"):
        raise _Unsupported(f"Conv2D with padding {layer.padding!r}")
    strided = any(s > 1 for s in layer.strides)
    dilated = any(d > 1 for d in layer.dilation_rate)
    if strided and dilated:
        raise _Unsupported("Conv2D with both strides and dilation")
    if _activation_kind(layer.activation) != "elementwise":
        raise _Unsupported("Conv2D with a non-elementwise activation")
    if not _grouped_conv_differentiable(dtype, strided, dilated, padding):
        hint = "(TensorFlow's CPU kernels need oneDNN and float32/bfloat16)"
        if (tf.as_dtype(dtype) in (tf.float32, tf.bfloat16) and compat.onednn_enabled() is False
                and "GPU" not in compat.eager_device_name().upper()):
            hint = ("(TensorFlow's oneDNN CPU kernels, which have them, are off in this process: "
                    "set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported, or import "
                    "tf_maml before TensorFlow or Keras, which sets it unless it is set)")
        raise _Unsupported(
            f"this device has no exact gradient kernel for grouped {dtype} convolutions {hint}")
    kernel = _variable(layer, "kernel")
    bias = _variable(layer, "bias") if layer.use_bias else None
    activation = layer.activation

    def conv(h, ctx):
        h = _to_grouped(h, layout)
        k = ctx.get(kernel)  # [T, kh, kw, C, O]
        ks = tf.shape(k)
        k = tf.transpose(k, [1, 2, 3, 0, 4])
        k = tf.reshape(k, tf.stack([ks[1], ks[2], ks[3], ks[0] * ks[4]]))
        y = tf.nn.conv2d(h, k, strides=layer.strides, padding=padding,
                         dilations=layer.dilation_rate)
        if bias is not None:
            y = y + tf.reshape(ctx.get(bias), [-1])
        return y if activation is keras.activations.linear else activation(y)

    return conv, "grouped"


def _plan_batch_norm(layer, layout, dtype, rank):
    if layer.renorm or layer.synchronized:
        raise _Unsupported("BatchNormalization with renorm/synchronized")
    if layer.axis not in (-1, rank - 1):
        raise _Unsupported(f"BatchNormalization on axis {layer.axis} of a rank-{rank} input "
                           "(only the last axis is supported)")
    gamma = _variable(layer, "gamma") if layer.scale else None
    beta = _variable(layer, "beta") if layer.center else None
    moving_mean = _variable(layer, "moving_mean")
    moving_variance = _variable(layer, "moving_variance")
    # Keras: batch statistics only when `training and layer.trainable`; a
    # frozen layer always runs in inference mode.
    batch_statistics = bool(layer.trainable)
    work_rank = 4 if layout == "grouped" else rank + 1
    axes = list(range(work_rank - 1)) if layout == "grouped" else list(range(1, work_rank - 1))
    # The fused kernel raises epsilon to 1.001e-5; Keras does not, so a smaller epsilon
    # takes the composite formula (with activations of tiny variance the difference
    # would be large).
    fused = layout == "grouped" and dtype == "float32" and layer.epsilon >= _FUSED_MIN_EPSILON

    def batch_norm(h, ctx):
        if ctx.training and batch_statistics and fused:
            # One fused kernel per layer for every task (tasks are channel
            # blocks). Its first and second derivatives are exact (the
            # gradient kernels keep the mean's term; the second derivative is
            # in closed form); ~30% faster first-order steps on CPU than the
            # composite form below.
            channels = tf.shape(h)[-1]
            scale = (tf.reshape(ctx.get(gamma), [-1]) if gamma is not None
                     else tf.ones([channels], h.dtype))
            offset = (tf.reshape(ctx.get(beta), [-1]) if beta is not None
                      else tf.zeros([channels], h.dtype))
            return _fused_batch_norm_training(h, scale, offset, layer.epsilon)
        if ctx.training and batch_statistics:
            mean, variance = _exact_moments_impl(h, axes, keepdims=True)
        else:
            mean = _shared_vector(tf.cast(moving_mean, h.dtype), layout, ctx.num_tasks)
            variance = _shared_vector(tf.cast(moving_variance, h.dtype), layout, ctx.num_tasks)
        scale = _task_vector(ctx.get(gamma), layout, work_rank) if gamma is not None else None
        offset = _task_vector(ctx.get(beta), layout, work_rank) if beta is not None else None
        # The same formula as Keras (`tf.nn.batch_normalization`).
        return tf.nn.batch_normalization(h, mean, variance, offset, scale, layer.epsilon)

    return batch_norm, layout


def _plan_flatten(layer, layout, rank):
    # Keras moves channels last before flattening a channels_first input.
    channels_first = layer.data_format == "channels_first" and rank > 2
    permutation = [0, 1, *range(3, rank + 1), 2] if channels_first else None

    def flatten(h, ctx):
        h = _to_tasks(h, layout, ctx.num_tasks)
        if permutation is not None:
            h = tf.transpose(h, permutation)
        s = tf.shape(h)
        return tf.reshape(h, tf.stack([s[0], s[1], -1]))

    return flatten, "tasks"


def _plan_pooling(layer, layout):
    if layer.data_format != "channels_last":
        raise _Unsupported(f"{type(layer).__name__} with channels_first")
    padding = layer.padding.upper()
    if padding not in ("SAME", "VALID"):
        raise _Unsupported(f"pooling with padding {layer.padding!r}")
    pool = tf.nn.max_pool2d if type(layer) is keras.layers.MaxPooling2D else tf.nn.avg_pool2d
    pool_size, strides = tuple(layer.pool_size), tuple(layer.strides or layer.pool_size)

    def pooling(h, ctx):
        # Pooling acts on each channel alone: exact in the grouped layout.
        return pool(_to_grouped(h, layout), pool_size, strides, padding)

    return pooling, "grouped"


def _plan_global_average_pooling(layer, layout):
    axes = [2, 3] if layer.data_format == "channels_last" else [3, 4]
    keepdims = bool(layer.keepdims)

    def global_pool(h, ctx):
        return tf.reduce_mean(_to_tasks(h, layout, ctx.num_tasks), axis=axes, keepdims=keepdims)

    return global_pool, "tasks"


def _plan_dropout(layer, layout, seed_index):
    rate = layer.rate
    if rate == 0:  # Keras returns the input (and has no seed generator).
        return (lambda h, ctx: h), layout
    index = seed_index.get(id(layer.seed_generator.state))
    if index is None:
        raise _Unsupported(f"Dropout {layer.name!r}: seed generator not found")
    noise_shape = layer.noise_shape

    def one_task(args):
        h, state = args
        # Exactly `keras.src.backend.tensorflow.random.dropout` seeded by `state`.
        return tf.nn.experimental.stateless_dropout(
            h, rate=rate, noise_shape=compat.dropout_noise_shape(h, noise_shape),
            seed=compat.dropout_seed(state))

    def dropout(h, ctx):
        # Always to the tasks layout, so the layout after this step is static.
        h = _to_tasks(h, layout, ctx.num_tasks)
        if not ctx.training:
            return h
        if rate == 1:
            return tf.zeros_like(h)
        states = ctx.seed_states[:, index]
        if isinstance(ctx.num_tasks, int):
            return tf.stack([one_task((h[t], states[t])) for t in range(ctx.num_tasks)])
        return tf.map_fn(one_task, (h, states), fn_output_signature=h.dtype)

    return dropout, "tasks"


def _plan_layer(layer, layout, dtype, seed_index, input_shape):
    """Plans one layer.

    Args:
        layer: the Keras layer.
        layout: the activations' layout at its input ("tasks" or "grouped").
        dtype: the model's dtype name.
        seed_index: `id(seed state variable) -> index` (see `_seed_state_variables`).
        input_shape: the layer's input shape as Keras sees it (batch axis first).

    Returns:
        `(step, layout)`: `step(h, ctx) -> h` and the layout of its output.

    Raises:
        _Unsupported: the layer, in this configuration, is not reproduced exactly.
    """
    policy = layer.dtype_policy
    if (getattr(policy, "quantization_mode", None) is not None
            or policy.compute_dtype != dtype or policy.variable_dtype != dtype):
        raise _Unsupported(f"layer {layer.name!r} has dtype policy {policy.name!r} in a "
                           f"{dtype} model")
    kind = type(layer)
    rank = len(input_shape)
    if kind is keras.layers.Dense:
        return _plan_dense(layer, layout)
    if kind is keras.layers.Conv2D:
        if rank != 4:
            raise _Unsupported("Conv2D input of rank other than 4")
        return _plan_conv2d(layer, layout, dtype)
    if kind is keras.layers.BatchNormalization:
        return _plan_batch_norm(layer, layout, dtype, rank)
    if kind in (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU):
        return (lambda h, ctx: layer.call(h)), layout
    if kind is keras.layers.Activation:
        activation = layer.activation
        if _activation_kind(activation) == "elementwise":
            return (lambda h, ctx: activation(h)), layout
        return (lambda h, ctx: activation(_to_tasks(h, layout, ctx.num_tasks))), "tasks"
    if kind is keras.layers.Flatten:
        return _plan_flatten(layer, layout, rank)
    if kind in (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D):
        if rank != 4:
            raise _Unsupported("pooling input of rank other than 4")
        return _plan_pooling(layer, layout)
    if kind is keras.layers.GlobalAveragePooling2D:
        if rank != 4:
            raise _Unsupported("GlobalAveragePooling2D input of rank other than 4")
        return _plan_global_average_pooling(layer, layout)
    if kind is keras.layers.Dropout:
        return _plan_dropout(layer, layout, seed_index)
    raise _Unsupported(f"layer {kind.__name__}")


def _layer_chain(model):
    """The model's layers if they form a single chain, else raises _Unsupported."""
    if type(model) is keras.Sequential:
        layers = list(model.layers)
    elif type(model) is compat.functional_model_class():
        layers = list(model.layers)
        previous = None
        for layer in layers:
            if compat.inbound_node_count(layer) != 1:
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
    return [layer for layer in layers if not isinstance(layer, keras.layers.InputLayer)]


def _plan(model):
    """Plans the layer-batched path: `(steps, dtype, input_dtype)`, or raises _Unsupported."""
    layers = _layer_chain(model)
    for layer in layers:
        _check_weights_plain(layer)
    dtypes = {v.dtype for v in model.trainable_variables}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _MODEL_DTYPES:
        raise _Unsupported(f"weight dtypes {sorted(dtypes)} (needs one of {_MODEL_DTYPES})")
    dtype = next(iter(dtypes))
    try:
        input_dtype, shape = model.inputs[0].dtype, tuple(model.inputs[0].shape)
    except (AttributeError, ValueError, IndexError) as e:
        raise _Unsupported("unknown input") from e
    if not keras.backend.is_float_dtype(input_dtype):
        raise _Unsupported(f"input dtype {input_dtype}")
    seed_index = {id(v): i for i, v in enumerate(_seed_state_variables(model))}
    steps, layout = [], "tasks"
    for layer in layers:
        step, layout = _plan_layer(layer, layout, dtype, seed_index, shape)
        steps.append(step)
        try:
            shape = tuple(layer.compute_output_shape(shape))
        except Exception as e:  # noqa: BLE001 - any failure means "cannot plan"
            raise _Unsupported(f"output shape of layer {layer.name!r}: {e}") from e
    return steps, layout, dtype, input_dtype


def _check_single_input_output(model):
    """Raises ValueError for a model with several inputs or outputs (where it is known)."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return  # A subclassed model: checked when it is called.
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"make_forward supports models with one input and one output; model "
            f"{model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs. Wrap it in a "
            "model that takes and returns a single tensor.")


_LOSSES_IGNORED = _Switch()


@contextlib.contextmanager
def keras_losses_ignored():
    """Within it, `make_forward` takes a model with Keras regularization losses and
    leaves them out (what it did before it refused such models).

    For loading what was saved then (`MetaLearner.from_config` uses it, with a
    warning); a new model should have its regularizers removed instead.
    """
    with _LOSSES_IGNORED.turned_on():
        yield


def check_no_regularization(model):
    """Raises ValueError for a model whose Keras losses the forward would drop.

    Keras adds weight and activity regularizers (and a layer's `add_loss`) to
    the loss `model.fit` minimizes; a task-batched forward returns predictions
    only, so a meta-learner trained through it would silently minimise another
    objective. Weight (of trainable weights, as Keras counts them) and activity
    regularizers are found here; `add_loss` in a layer's `call` when the
    per-task path first runs the model.

    Args:
        model: a Keras model.

    Raises:
        ValueError: naming its weight or activity regularizers.
    """
    found = []
    for variable in model.trainable_weights:  # as Keras: a frozen weight's is not counted
        if getattr(variable, "regularizer", None) is not None:
            found.append(f"a weight regularizer on {getattr(variable, 'path', variable.name)}")
    for layer in compat.all_layers(model):
        if getattr(layer, "activity_regularizer", None) is not None:
            found.append(f"an activity regularizer on layer {layer.name!r}")
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(
            f"model {model.name!r} has regularization losses ({shown}), which tf_maml's "
            "task-batched forward does not compute, so meta-training would silently leave "
            "them out. Remove them (for weight decay of the meta-parameters, use an optimizer "
            "with weight_decay, e.g. keras.optimizers.AdamW)")


def _call_takes_training(model):
    """Whether `model.call` accepts a `training` argument (or any keyword)."""
    try:
        parameters = inspect.signature(model.call).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "training" or p.kind == p.VAR_KEYWORD for p in parameters)


def _argument_checker(model):
    """A function that raises a one-line ValueError where `forward`'s arguments cannot fit
    the model (static shapes only; unknown dimensions pass)."""
    variables = list(model.trainable_variables)
    try:
        input_shape = tf.TensorShape(model.input_shape[1:])
    except (AttributeError, ValueError, TypeError):
        input_shape = None  # a subclassed model: Keras checks its inputs when it runs

    def check(weights, x):
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(f"forward takes {len(variables)} task-batched weights (one per "
                             f"trainable variable of {model.name!r}), got {len(weights)}")
        for i, (w, v) in enumerate(zip(weights, variables)):
            shape = tf.TensorShape(getattr(w, "shape", None))
            if shape.rank is not None and (shape.rank != v.shape.rank + 1
                                           or not shape[1:].is_compatible_with(v.shape)):
                expected = ", ".join(["tasks"] + [str(d) for d in v.shape])
                raise ValueError(
                    f"weights must be the model's trainable variables with a leading task axis "
                    f"(tf_maml.broadcast_to_tasks): weight {i} ({v.path}) should be "
                    f"[{expected}], got shape {tuple(shape)}")
        shape = tf.TensorShape(getattr(x, "shape", None))
        if input_shape is not None and shape.rank is not None and (
                shape.rank != input_shape.rank + 2 or not shape[2:].is_compatible_with(
                    input_shape)):
            expected = ", ".join(["tasks", "examples"] + [str(d) for d in input_shape])
            raise ValueError(f"x must be [{expected}] for {model.name!r}, got shape "
                             f"{tuple(shape)}")
        tasks = tf.TensorShape(weights[0].shape)[:1] if weights else tf.TensorShape(None)
        if shape.rank and not shape[:1].is_compatible_with(tasks):
            raise ValueError(f"x holds {shape[0]} tasks but the weights {tasks[0]}")

    return check


def make_forward(model, vectorize="auto"):
    """Turns a built Keras model into a task-batched function of its weights.

    The path is chosen here, once: `"auto"` takes the layer-batched path only
    when every layer is reproduced exactly (same outputs as Keras, up to
    floating-point reordering), including on this device (grouped-convolution
    gradients are probed); anything else runs Keras itself per task.

    Args:
        model: a built Keras 3 model (Sequential, functional or subclassed) with
            one input and one output.
        vectorize: `"auto"` uses the layer-batched path when every layer is
            supported, else the per-task path; `"layers"` requires the
            layer-batched path (raises if the model is not supported);
            `"map_fn"` always uses the per-task path.

    Returns:
        `forward(weights, x, training=True, seed=None)`: `weights` is a list of
        tensors matching `model.trainable_variables`, each with a leading task
        axis; `x` is `[num_tasks, batch, ...]`. Returns `[num_tasks, batch,
        ...]`. `forward.vectorized` tells which path was chosen, and
        `forward.unsupported_reason` why the fast path was not taken (None
        when it was, or with `vectorize="map_fn"`).
        `forward.uses_grouped_convolutions` tells whether it runs grouped
        convolutions (the layer-batched path of a model with `Conv2D`
        layers): their gradients exist on CPU only with oneDNN on, so a graph
        that differentiates through them for several tasks at once fails
        where it is off (one task at a time, a plain convolution, works).

        `training=True` means what it means in Keras: batch normalization uses
        the statistics of each task's batch (the MAML paper's behaviour),
        except in a frozen (`trainable=False`) layer, which uses its moving
        statistics; dropout is active.

        Dropout (and, on the per-task path, any layer drawing from a Keras
        `SeedGenerator`) gets its own mask for every task and every layer,
        identical on both paths. `seed` (an integer or a `[2]` integer tensor)
        makes the masks a deterministic function of `seed`; differentiating
        through a call reuses that call's masks. With `seed=None`, every call
        (every eager call and every execution of a traced function) draws new
        masks, reproducibly under `tf.random.set_seed` /
        `keras.utils.set_random_seed` (not under XLA, which ignores those
        seeds). Pass distinct seeds to distinct calls (e.g. each inner step
        and the query) unless the same masks are wanted. The model's seed
        state is never advanced.

    Raises:
        ValueError: the model is not built, has no trainable weights, has
            several inputs or outputs, has weight or activity regularizers
            (Keras losses the forward does not return), or `vectorize="layers"`
            for a model the layer-batched path cannot run.
            (A subclassed model's outputs are known only when it runs, as is a
            layer's `add_loss`: `forward` raises ValueError then if it returns
            several tensors or adds losses.)

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
    if not model.built:
        raise ValueError(
            "make_forward needs a built Keras model; call the model on an input (or build it "
            "with keras.Input) first.")
    if not model.trainable_variables:
        raise ValueError(
            f"model {model.name!r} has no trainable weights, so there is nothing to adapt "
            "(are its layers frozen, trainable=False?)")
    _check_single_input_output(model)
    check_losses = not _LOSSES_IGNORED.on
    if check_losses:
        check_no_regularization(model)
    variable_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    num_seed_states = len(_seed_state_variables(model))
    check_arguments = _argument_checker(model)
    plan, reason = None, None
    if vectorize != "map_fn":
        try:
            plan = _plan(model)
        except _Unsupported as e:
            reason = str(e)
            if vectorize == "layers":
                raise ValueError(
                    f"model {model.name!r} cannot use the layer-batched path: {reason}") from None
            if "TF_ENABLE_ONEDNN_OPTS" in reason:
                logging.warning("model %r runs task by task, slower: %s", model.name, reason)
    dilated = dilated_convolution_layers(model)
    if (dilated and compat.onednn_enabled() is False
            and not tf.config.list_physical_devices("GPU")):
        logging.warning(
            "model %r: layers %s have dilation rates above 1, which TensorFlow's CPU kernels "
            "differentiate only with oneDNN on, so adapting or meta-training the model fails "
            "here; set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported (import tf_maml "
            "first does, unless the variable is set), or use a GPU",
            model.name, ", ".join(dilated))

    if plan is not None:
        steps, final_layout, dtype, input_dtype = plan

        def forward(weights, x, training=True, seed=None):
            check_arguments(weights, x)
            num_tasks = tf.shape(x)[0] if x.shape[0] is None else x.shape[0]

            def get(variable):
                index = variable_index.get(id(variable))
                if index is not None:
                    return weights[index]
                # A frozen (non-trainable) weight: shared by every task.
                value = tf.convert_to_tensor(variable)
                return tf.broadcast_to(value[None], tf.concat([[num_tasks], tf.shape(value)], 0))

            seed_states = (_task_seed_states(seed, num_tasks, num_seed_states)
                           if training and num_seed_states else None)
            ctx = _Context(get, num_tasks, training, seed_states)
            # As Keras: the input is converted to the Input's dtype, then each
            # layer casts it to its compute dtype.
            h = tf.cast(tf.cast(x, input_dtype), dtype)
            for step in steps:
                h = step(h, ctx)
            return _to_tasks(h, final_layout, num_tasks)
    else:
        non_trainable = list(model.non_trainable_variables)
        # As Keras: `training` is passed only to a `call` that takes it.
        takes_training = _call_takes_training(model)
        position_of = {id(v): i for i, v in enumerate(non_trainable)}
        seed_positions = [position_of[id(v)] for v in _seed_state_variables(model)]
        try:
            output_dtype = model.outputs[0].dtype
        except (AttributeError, ValueError, IndexError):
            output_dtype = None  # A subclassed model: the weights' dtype, at call time.

        def forward(weights, x, training=True, seed=None):
            check_arguments(weights, x)
            num_tasks = tf.shape(x)[0] if x.shape[0] is None else x.shape[0]
            use_seeds = bool(training) and bool(seed_positions)
            seed_states = (_task_seed_states(seed, num_tasks, len(seed_positions))
                           if use_seeds else tf.zeros([num_tasks, 0, 2], tf.int64))

            # What one task's call showed when map_fn traced it; the errors are raised
            # after map_fn, outside its autograph-converted function (whose errors
            # come wrapped in an "in user code" trace).
            seen = {}

            def one_task(args):
                task_weights, task_x, task_states = args
                values = [v.value for v in non_trainable]
                if use_seeds:
                    for j, position in enumerate(seed_positions):
                        values[position] = tf.cast(task_states[j], values[position].dtype)
                with exact_moments():
                    # Updated non-trainable values (moving statistics, seed
                    # states) are discarded: adaptation never changes the
                    # model's state.
                    kwargs = {"training": training} if takes_training else {}
                    y, _, added = model.stateless_call(list(task_weights), values, task_x,
                                                       return_losses=True, **kwargs)
                flat = tf.nest.flatten(y)
                seen.update(added_losses=bool(added), num_outputs=len(flat))
                return flat[0]

            y = tf.map_fn(one_task, (list(weights), x, seed_states),
                          fn_output_signature=output_dtype or weights[0].dtype)
            if seen.get("num_outputs", 1) != 1:
                raise ValueError(
                    f"make_forward supports models with one output; model {model.name!r} "
                    f"returned {seen['num_outputs']} tensors.")
            if check_losses and seen.get("added_losses"):
                raise ValueError(
                    f"model {model.name!r} adds losses while it runs (add_loss in a layer's "
                    "call), which tf_maml's task-batched forward does not include, so "
                    "meta-training would silently leave them out. Remove them, or put the "
                    "penalty in the loss")
            return y

    forward.vectorized = plan is not None
    forward.unsupported_reason = reason
    forward.uses_grouped_convolutions = plan is not None and any(
        type(layer) is keras.layers.Conv2D for layer in _layer_chain(model))
    return forward
