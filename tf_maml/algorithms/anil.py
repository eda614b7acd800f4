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
    head_layer = last.__class__.from_config(last.get_config())
    head = keras.Sequential([keras.Input(tuple(body.output.shape[1:]), dtype=last.dtype),
                             head_layer], name=f"{model.name}_head")
    shapes = [tuple(v.shape) for v in head.trainable_variables]
    if shapes != [tuple(v.shape) for v in last.trainable_variables]:
        return None
    if body.trainable_variables + last.trainable_variables != model.trainable_variables:
        return None
    return body, head, len(shapes)


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
