"""Meta-SGD (Li et al., 2017): a learned inner learning rate for every parameter."""

import tensorflow as tf

from tf_maml import core
from tf_maml.algorithms.maml import MAML

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    """MAML whose inner step size is a meta-learned tensor shaped like each weight.

    θ'ᵢ = θ − α ∘ ∇θ Lᵢ(θ), with α (one rate per parameter, initialised to
    `inner_lr`) meta-learned jointly with θ through the same meta-gradient.
    The learned rates are checkpointed and used by evaluation and the exported
    `adapt` signature.

    Args: as `MAML`.

    Example:

    ```python
    algorithm = MetaSGD(model, forward, losses.sparse_softmax_cross_entropy,
                        inner_lr=0.4, num_inner_steps=1)
    ```
    """

    name = "metasgd"
    label = "Meta-SGD"  # in evaluation tables and plots

    def __init__(self, model, forward, loss_fn, inner_lr, num_inner_steps, first_order=False,
                 recompute_inner_steps=False):
        super().__init__(model, forward, loss_fn, inner_lr, num_inner_steps, first_order,
                         recompute_inner_steps)
        self._add_extra([
            tf.Variable(tf.fill(v.shape, core._as_dtype(inner_lr, v.dtype)),
                        name=f"inner_lr_{i}")
            for i, v in enumerate(model.trainable_variables)])

    def inner_update(self, meta_params, inner_lr=None):
        if inner_lr is not None:
            return core.SGD(inner_lr)
        _, rates = self.split(meta_params)
        return core.SGD([rates[i] for i in self.adapted_indices])
