"""The one place where tf_maml touches private TensorFlow / Keras internals.

Some things tf_maml needs have no public API. Every such use goes through a
small function here, so that

- the rest of the package only calls documented APIs and these functions;
- a TensorFlow or Keras upgrade that renames an internal breaks one function,
  whose test (tests/test_faults.py, tests/test_distribute.py) says so directly,
  rather than failing somewhere deep in training;
- each function documents what it relies on and what it returns when the
  internal is missing.

Add a function here (with a test of what it returns) rather than reaching into
`_private` attributes elsewhere.
"""

import contextlib

__all__ = ["cluster_resolver", "keras_moments_replaced", "functional_model_class", "all_layers",
           "seed_generators", "first_call_input_shape", "inbound_node_count",
           "dropout_noise_shape", "dropout_seed", "eager_device_name", "model_supports_jit",
           "keras_trainer_hooks", "onednn_enabled"]


def cluster_resolver(strategy):
    """The cluster resolver of a multi-worker `tf.distribute` strategy, or `None`.

    Relies on `strategy.extended._cluster_resolver` (set by
    `MultiWorkerMirroredStrategy`, TF 2.x; there is no public accessor).

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        A `tf.distribute.cluster_resolver.ClusterResolver` with `task_type`,
        `task_id` and `cluster_spec()` for multi-worker strategies; `None` for
        strategies without one (the default strategy, `MirroredStrategy`) or if
        TensorFlow no longer has the attribute.
    """
    return getattr(strategy.extended, "_cluster_resolver", None)


@contextlib.contextmanager
def keras_moments_replaced(moments_fn):
    """Makes Keras' TF backend compute batch moments with `moments_fn` inside the context.

    Relies on `keras.src.backend.tensorflow.nn._compute_moments` (Keras 3), the function
    Keras' normalization layers call; `tf_maml.functional.exact_moments` swaps in a version
    whose second derivative is exact.

    Args:
        moments_fn: `moments_fn(x, axes, keepdims=False) -> (mean, variance)`.

    Raises:
        ImportError / AttributeError: Keras no longer has the function (a Keras upgrade;
            the test of this function names it).
    """
    from keras.src.backend.tensorflow import nn  # noqa: PLC0415

    original = nn._compute_moments
    nn._compute_moments = moments_fn
    try:
        yield
    finally:
        nn._compute_moments = original


def functional_model_class():
    """Keras' class of functional models (`keras.Model(inputs, outputs)`), to tell them apart.

    Relies on `keras.src.models.functional.Functional` (Keras 3; not exported publicly).
    """
    from keras.src.models.functional import Functional  # noqa: PLC0415
    return Functional


def all_layers(model):
    """Every layer of `model`, nested ones included, the model itself first.

    Relies on `Layer._flatten_layers(include_self=True, recursive=True)` (Keras 3).
    """
    return list(model._flatten_layers(include_self=True, recursive=True))


def first_call_input_shape(model):
    """The shape of the one input a built subclassed model was first called on, or `None`.

    Relies on `Layer._build_shapes_dict` (Keras 3 records the shapes its first
    `__call__` built the layer with; `{"input_shape": shape}` for one input).
    """
    shapes = getattr(model, "_build_shapes_dict", None)
    if not isinstance(shapes, dict) or len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)) or not all(
            d is None or isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def model_supports_jit(model):
    """Whether Keras would compile `model` with XLA: every layer's `supports_jit`.

    Relies on the `supports_jit` attribute of Keras 3 layers (public, but not
    documented); a layer without it counts as supporting XLA.
    """
    return all(getattr(layer, "supports_jit", True) for layer in all_layers(model))


# Keras hooks that `tf_maml.keras_face.MetaLearner` overrides (Keras 3 `Trainer` methods with
# no public equivalent): `_resolve_auto_jit_compile` decides `compile(jit_compile="auto")`.
# tests/test_compat.py checks they still exist.
keras_trainer_hooks = ("_resolve_auto_jit_compile",)


def seed_generators(layer):
    """The `keras.random.SeedGenerator`s a layer draws from (Dropout's, for example).

    Relies on `Layer._seed_generators` (Keras 3); an empty list if absent.
    """
    return list(getattr(layer, "_seed_generators", ()))


def inbound_node_count(layer):
    """How many times a layer is called in the functional graphs built so far (1: not shared).

    Relies on `Layer._inbound_nodes` (Keras 3).
    """
    return len(layer._inbound_nodes)


def dropout_noise_shape(x, noise_shape):
    """The concrete noise shape Keras' TF-backend dropout uses for `x`.

    Relies on `keras.src.backend.tensorflow.random._get_concrete_noise_shape` (Keras 3).
    """
    from keras.src.backend.tensorflow import random  # noqa: PLC0415
    return random._get_concrete_noise_shape(x, noise_shape)


def dropout_seed(state):
    """The int32 seed Keras' TF-backend dropout derives from a `SeedGenerator` state.

    Relies on `keras.src.backend.tensorflow.random._cast_seed` (Keras 3).
    """
    from keras.src.backend.tensorflow import random  # noqa: PLC0415
    return random._cast_seed(state)


def eager_device_name():
    """The device of the current eager context ("" when not executing eagerly).

    Relies on `tensorflow.python.eager.context.context().device_name` (TF 2.x).
    """
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow.python.eager import context  # noqa: PLC0415
    return context.context().device_name if tf.executing_eagerly() else ""


def onednn_enabled():
    """Whether TensorFlow's oneDNN CPU kernels are on in this process (None: unknown).

    TensorFlow decides once, when it is imported, from `TF_ENABLE_ONEDNN_OPTS`
    and, when that is unset, the CPU (on x86-64 only CPUs with AVX-512 VNNI,
    BF16 or AMX get them by default). Relies on
    `tensorflow.python.util._pywrap_util_port.IsMklEnabled` (TF 2.x).
    """
    try:
        from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None
