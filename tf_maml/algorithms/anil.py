"""ANIL (Raghu et al., 2019): adapt only the head; the body is shared by every task."""

import keras
import tensorflow as tf

from tf_maml import core, functional
from tf_maml.algorithms.maml import MAML

__all__ = ["ANIL", "split_head"]


def split_head(model):
    """Splits a single-chain model into a shared body and a head (its last weighted layer).

    The body is a Keras model over the original layers (no copy of any
    weight); the head is a fresh copy of the last layer that has weights, fed
    the original weights at call time, so the original model is unchanged.

    Args:
        model: a built Sequential or single-chain functional Keras model.

    Returns:
        `(body, head, num_head_weights)`, or `None` when the model is not a
        chain whose head can be cut off this way (ANIL then adapts the head
        weights inside the whole model's forward: same result, no speed-up).
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or not isinstance(model, (keras.Sequential, keras.Model)):
        return None
    try:
        inputs, outputs = model.inputs, model.outputs
        if len(inputs) != 1 or len(outputs) != 1 or layers[-1].output is not outputs[0]:
            return None
        for previous, layer in zip(layers, layers[1:]):
            if layer.input is not previous.output:
                return None
    except (AttributeError, ValueError):
        return None
    last = layers[-1]
    if not last.trainable_variables or last.non_trainable_variables or len(layers) < 2:
        return None
    body = keras.Model(inputs, layers[-2].output, name=f"{model.name}_body")
    if not body.trainable_variables:
        return None
    try:  # a layer whose config cannot rebuild it (a function argument, say) keeps the fallback
        head_layer = last.__class__.from_config(last.get_config())
        head = keras.Sequential([keras.Input(tuple(body.output.shape[1:]), dtype=last.dtype),
                                 head_layer], name=f"{model.name}_head")
    except Exception:  # noqa: BLE001 -- any failure means: no copy
        return None
    shapes = [tuple(v.shape) for v in head.trainable_variables]
    if shapes != [tuple(v.shape) for v in last.trainable_variables]:
        return None
    if body.trainable_variables + last.trainable_variables != model.trainable_variables:
        return None
    if not _computes_the_same(last, head_layer, body.output.shape[1:]):
        return None
    return body, head, len(shapes)


def _computes_the_same(layer, copy, input_shape):
    """Whether `copy` (rebuilt from `layer`'s config) computes `layer`'s function.

    A custom layer may hold state its config does not carry (an attribute set
    after construction): the copy would then compute something else, silently.
    Checked on a random probe with the layer's own weights.
    """
    try:
        copy.set_weights(layer.get_weights())
        # Unknown dimensions (sequence lengths) get a size of 2 in the probe.
        shape = [3] + [2 if size is None else size for size in input_shape]
        probe = tf.random.stateless_normal(shape, seed=[1, 2])
        probe = tf.cast(probe, layer.compute_dtype or "float32")
        expected = tf.convert_to_tensor(layer(probe, training=False))
        got = tf.convert_to_tensor(copy(probe, training=False))
        same = expected.shape == got.shape and bool(tf.reduce_all(
            tf.abs(tf.cast(expected - got, tf.float64)) <= 1e-5 * (1.0 + tf.abs(
                tf.cast(expected, tf.float64)))))
    except Exception:  # noqa: BLE001 -- a probe the layer refuses: no copy
        return False
    return same


class ANIL(MAML):
    """Almost No Inner Loop: MAML that adapts only the model's head.

    The head is the last layer with weights. For a chain of layers the body
    runs once per set for the whole meta-batch (its features are reused by
    every inner step) and the inner gradients touch only the head, which is
    where ANIL's speed comes from. For other models the head weights adapt
    inside the whole model's forward (same mathematics, no speed-up).

    Args: as `MAML`.
    """

    name = "anil"
    label = "ANIL"  # in evaluation tables and plots

    def __init__(self, model, forward, loss_fn, inner_lr, num_inner_steps, first_order=False,
                 recompute_inner_steps=False):
        super().__init__(model, forward, loss_fn, inner_lr, num_inner_steps, first_order,
                         recompute_inner_steps)
        split = split_head(model)
        if split is None:
            layers = [layer for layer in model.layers if layer.trainable_variables]
            if not layers:
                raise ValueError("ANIL needs a model with trainable weights")
            ids = {id(v) for v in layers[-1].trainable_variables}
            self.adapted_indices = [i for i, v in enumerate(model.trainable_variables)
                                    if id(v) in ids]
            self.body_forward = None
        else:
            body, head, num_head = split
            self.adapted_indices = list(range(self.num_model_weights - num_head,
                                              self.num_model_weights))
            self.body_forward = functional.make_forward(body)
            self.head_forward = functional.make_forward(head)

    @property
    def adapts_through_grouped_convolutions(self):
        if self.body_forward is None:
            return super().adapts_through_grouped_convolutions
        # The body only runs forward (grouped convolutions have forward kernels everywhere).
        return bool(getattr(self.head_forward, "uses_grouped_convolutions", False))

    def task_inputs(self, meta_params, x, training=True):
        if self.body_forward is None:
            return x
        params, _ = self.split(meta_params)
        body = params[:self.adapted_indices[0]]
        return self.body_forward(core.broadcast_to_tasks(body, tf.shape(x)[0]), x, training)

    def predict_from_inputs(self, meta_params, adapted, inputs, step, training=True):
        if self.body_forward is None:
            return super().predict_from_inputs(meta_params, adapted, inputs, step, training)
        return self.head_forward(adapted, inputs, training)
