"""MAML++ (Antoniou, Edwards and Storkey, 2019): "How to train your MAML"."""

import numbers

import keras
import tensorflow as tf

from tf_maml import core
from tf_maml.algorithms.maml import MAML, MetaStepOutputs, _scaled_sum, is_integer

__all__ = ["MAMLPlusPlus", "importance_vector", "batch_norm_weight_indices"]


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def importance_vector(num_steps, epoch, msl_epochs):
    """The multi-step loss weights of every inner step at `epoch` (MAML++'s annealing).

    Starts uniform (1/N each); over `msl_epochs` epochs the weights of the
    steps before the last decay linearly to 0.03/N and the last step's grows
    to take the rest; from `msl_epochs` on only the last step counts.

    Args:
        num_steps: inner steps N.
        epoch: float or scalar tensor, the current epoch.
        msl_epochs: epochs of multi-step loss (0: last step only).

    Returns:
        A `[num_steps]` float32 tensor summing to 1.
    """
    epoch = tf.cast(epoch, tf.float32)
    n = float(num_steps)
    if msl_epochs <= 0 or num_steps == 1:
        return tf.one_hot(num_steps - 1, num_steps)
    decay = 1.0 / n / msl_epochs
    floor = 0.03 / n
    early = tf.maximum(1.0 / n - epoch * decay, floor) * tf.ones([num_steps - 1])
    last = tf.minimum(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    weights = tf.concat([early, [last]], 0)
    return tf.where(epoch < msl_epochs, weights, tf.one_hot(num_steps - 1, num_steps))


def batch_norm_weight_indices(model):
    """Indices (into `model.trainable_variables`) of every BatchNormalization γ and β."""
    ids = set()
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
        elif isinstance(layer, keras.layers.BatchNormalization):
            ids.update(id(v) for v in layer.trainable_variables)
    return [i for i, v in enumerate(model.trainable_variables) if id(v) in ids]


class MAMLPlusPlus(MAML):
    """MAML++: multi-step loss, derivative-order annealing, LSLR and per-step batch norm.

    * **Multi-step loss**: the meta-loss is Σₛ vₛ·L_query(θₛ) over the inner
      steps s = 1..N with the importance vector v of `importance_vector`
      (annealed towards the last step over `msl_epochs` epochs).
    * **Derivative-order annealing**: first-order meta-gradients for the first
      `first_order_epochs` epochs, second order afterwards (unless
      `first_order`, which keeps first order throughout).
    * **LSLR**: a learned inner learning rate per weight tensor and per step,
      initialised to `inner_lr`.
    * **Per-step batch norm**: every batch-normalization γ and β has one copy
      per inner step (step s uses copy s; the query after N steps uses copy N),
      meta-learned and not adapted in the inner loop. Statistics are each
      task's batch statistics at that step (the library's batch norm never uses
      moving statistics in meta-training), so they are per step by construction.

    Args:
        model, forward, loss_fn, inner_lr, num_inner_steps, first_order,
            recompute_inner_steps: as `MAML`.
        msl_epochs: epochs over which the multi-step loss anneals (0: off).
        first_order_epochs: epochs of first-order meta-gradients at the start.
        iterations_per_epoch: meta-iterations per epoch (schedules' unit).
        per_step_bn: per-step batch-norm weights.
        learn_inner_lr: learned per-layer per-step rates (LSLR); off means the
            fixed `inner_lr`.
        min_meta_lr: the cosine schedule of the meta learning rate ends here.
    """

    name = "mamlpp"
    label = "MAML++"  # in evaluation tables and plots

    def __init__(self, model, forward, loss_fn, inner_lr, num_inner_steps, first_order=False,
                 msl_epochs=10, first_order_epochs=0, iterations_per_epoch=500,
                 per_step_bn=True, learn_inner_lr=True, min_meta_lr=1e-5,
                 recompute_inner_steps=False):
        super().__init__(model, forward, loss_fn, inner_lr, num_inner_steps, first_order,
                         recompute_inner_steps)
        if num_inner_steps < 1:
            raise ValueError("MAML++ needs num_inner_steps >= 1")
        for name, value, low in (("msl_epochs", msl_epochs, 0),
                                 ("first_order_epochs", first_order_epochs, 0),
                                 ("iterations_per_epoch", iterations_per_epoch, 1)):
            if not is_integer(value) or value < low:
                raise ValueError(f"MAML++'s {name} must be an integer >= {low}, got {value!r}")
        if not _is_real(min_meta_lr) or not 0 <= min_meta_lr < float("inf"):
            raise ValueError(f"MAML++'s min_meta_lr must be a finite number >= 0, got "
                             f"{min_meta_lr!r}")
        self.msl_epochs = msl_epochs
        self.first_order_epochs = first_order_epochs
        self.iterations_per_epoch = iterations_per_epoch
        self.min_meta_lr = min_meta_lr
        variables = model.trainable_variables
        self.bn_indices = batch_norm_weight_indices(model) if per_step_bn else []
        self.adapted_indices = [i for i in range(self.num_model_weights)
                                if i not in set(self.bn_indices)]
        self.learn_inner_lr = learn_inner_lr
        extra = []
        if learn_inner_lr:
            extra += [tf.Variable(tf.fill([num_inner_steps],
                                          core._as_dtype(inner_lr, variables[i].dtype)),
                                  name=f"inner_lr_{i}") for i in self.adapted_indices]
        # Copies 0..N of each BN weight: N+1 rows (support at steps 0..N-1, query after N).
        extra += [tf.Variable(tf.tile(variables[i][None], [num_inner_steps + 1, 1]),
                              name=f"per_step_bn_{i}") for i in self.bn_indices]
        self._add_extra(extra)

    def _rates_and_bn(self, meta_params):
        _, extra = self.split(meta_params)
        num_rates = len(self.adapted_indices) if self.learn_inner_lr else 0
        return extra[:num_rates], extra[num_rates:]

    def inner_update(self, meta_params, inner_lr=None):
        if inner_lr is not None or not self.learn_inner_lr:
            return core.SGD(self.inner_lr if inner_lr is None else inner_lr)
        rates, _ = self._rates_and_bn(meta_params)
        return core.SGD(rates, per_step=True)

    def full_weights(self, meta_params, adapted, step):
        weights = super().full_weights(meta_params, adapted, step)
        if self.bn_indices:
            num_tasks = tf.shape(adapted[0])[0]
            _, bn = self._rates_and_bn(meta_params)
            per_step = [core._at_step(table, step) for table in bn]
            for index, value in zip(self.bn_indices,
                                    core.broadcast_to_tasks(per_step, num_tasks)):
                weights[index] = value
        return weights

    def meta_loss(self, meta_params, episode, loss_scale=None, iteration=0, first_order=None):
        core.check_episode(episode)
        first_order = self.first_order if first_order is None else first_order
        steps = self.num_inner_steps
        epoch = tf.cast(iteration, tf.float32) / self.iterations_per_epoch
        importance = importance_vector(steps, epoch, self.msl_epochs)
        inputs = self.task_inputs(meta_params, episode.support_x)
        query = self.task_inputs(meta_params, episode.query_x)
        weights = self.initial_weights(meta_params, tf.shape(episode.support_x)[0])
        update = self.inner_update(meta_params)
        task_loss = self.task_loss(meta_params, inputs, episode.support_y, meta_training=True)
        state, total, support_losses = update.init(weights), 0.0, None
        differentiable = self.differentiable_inputs(meta_params, inputs, episode.support_x)
        for step in range(steps):
            weights, state, losses = core.inner_step(
                task_loss, weights, update, state, step, first_order, self.recompute_inner_steps,
                differentiable)
            support_losses = losses if support_losses is None else support_losses
            predictions = self.predict_from_inputs(meta_params, weights, query, step + 1)
            query_losses = self.loss_fn(episode.query_y, predictions)
            total = total + tf.cast(importance[step], query_losses.dtype) * query_losses
        return (_scaled_sum(total, loss_scale),
                MetaStepOutputs(support_losses, query_losses, predictions))

    @property
    def unused_meta_indices(self):
        """The model's own batch-norm weights: each step reads its copy instead."""
        return list(self.bn_indices)

    def meta_step(self, episode, loss_scale=None, iteration=None):
        iteration = tf.zeros([], tf.int64) if iteration is None else iteration
        if self.first_order or self.first_order_epochs <= 0:
            return super().meta_step(episode, loss_scale, iteration)

        def step(first_order):
            return lambda: core.meta_gradients(
                lambda params: self.meta_loss(params, episode, loss_scale, iteration,
                                              first_order),
                self.meta_variables, unused=self.unused_meta_indices)

        # Derivative-order annealing: only the branch taken runs.
        return tf.cond(iteration < self.first_order_epochs * self.iterations_per_epoch,
                       step(True), step(False))

    def make_optimizer(self, meta_lr, num_iterations):
        """Adam with the meta learning rate cosine-annealed from `meta_lr` to `min_meta_lr`."""
        if not _is_real(meta_lr) or not 0 < meta_lr < float("inf"):
            raise ValueError(f"meta_lr must be a finite number > 0, got {meta_lr!r}")
        schedule = keras.optimizers.schedules.CosineDecay(
            meta_lr, max(num_iterations, 1), alpha=self.min_meta_lr / meta_lr)
        return keras.optimizers.Adam(schedule)

