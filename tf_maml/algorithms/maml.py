"""MAML (Finn et al., 2017): the base algorithm every other one refines.

An algorithm is a short layer over `tf_maml.core`: it says which weights adapt,
with which update rule, against which task loss, and what the meta-objective
is. The training loop (`tf_maml.trainer`), evaluation, export and the Keras
face call only the methods below, so a new algorithm overrides a few of them
and touches nothing else. They build algorithms by name, though
(`Config.algorithm`, `--algorithm`, `MetaLearner(algorithm=...)`, and a run's
restore from its `config.json`), from `tf_maml.algorithms.ALGORITHMS` and
`tf_maml.config.ALGORITHMS`: a subclass of your own is used through the library
API (its `meta_step` in your loop, `evaluation.adaptation_curve`,
`serving.export` of an `Experiment` holding it) until it is added to both.

Meta-parameters are a flat list: the model's trainable variables first (the
initialization θ), then the algorithm's own `extra_variables` (learned rates,
per-step normalization weights), which are checkpointed and exported with the
model.
"""

import collections
import numbers

import keras
import tensorflow as tf

from tf_maml import core, functional

__all__ = ["MAML", "MetaStepOutputs"]


MetaStepOutputs = collections.namedtuple(
    "MetaStepOutputs", ["support_losses", "query_losses", "query_predictions", "state_updates"],
    defaults=(None,))
MetaStepOutputs.__doc__ = """What a meta-step saw, and the algorithm's state updates.

`support_losses`: `[num_tasks]`, each task's support loss before adaptation
(NaN with 0 inner steps, the pretrained baseline, which computes none).
`query_losses`: `[num_tasks]`, each task's query loss after adaptation (the
meta-loss's terms; MAML++ with the multi-step loss: after the last step).
`query_predictions`: the adapted model's query predictions, `[num_tasks, ...]`.
`state_updates`: `None`, or the new value of every entry of
`state_variables` as this replica assigns it after the step: its share of a
variable aggregated by summation (the replicas' shares add up), or the whole
value of one that keeps the first replica's.
"""


class MAML:
    """Model-Agnostic Meta-Learning, second or first order; 0 inner steps is the pretrained baseline.

    Args:
        model: a built Keras model (its trainable variables are θ).
        forward: `tf_maml.functional.make_forward(model)`.
        loss_fn: per-task loss `loss_fn(y_true, y_pred) -> [num_tasks]`.
        inner_lr: inner step size α.
        num_inner_steps: inner steps during meta-training (0: train θ on every
            task jointly, the paper's "pretrained" baseline).
        first_order: hold inner gradients constant (first-order MAML).
        recompute_inner_steps: second order: recompute each inner step's
            activations when the meta-gradient needs them instead of keeping
            them (`core.inner_step`'s `recompute`): memory stops growing with
            each step's activations, at the cost of about one more forward and
            backward pass of the support set per step. Not for models with
            random layers (dropout).

    Raises:
        ValueError: `recompute_inner_steps` with a model that has random layers;
            `num_inner_steps` not a non-negative Python integer; a number
            `inner_lr` that is negative or not finite.

    Example:

    ```python
    algorithm = MAML(model, make_forward(model), losses.mean_squared_error,
                     inner_lr=0.01, num_inner_steps=1)
    loss, grads, _ = algorithm.meta_step(episode)
    optimizer.apply_gradients(zip(grads, algorithm.meta_variables))
    ```
    """

    name = "maml"
    label = "MAML"  # in evaluation tables and plots

    def __init__(self, model, forward, loss_fn, inner_lr, num_inner_steps, first_order=False,
                 recompute_inner_steps=False):
        if not is_integer(num_inner_steps) or num_inner_steps < 0:
            # A tensor would run the inner steps in a graph loop, which nothing may
            # differentiate through: the meta-gradient would silently be first order.
            raise ValueError(f"num_inner_steps must be a non-negative Python integer (the "
                             f"meta-step unrolls that many inner steps), got {num_inner_steps!r}")
        core.check_non_negative("inner_lr", inner_lr)
        self.model = model
        if recompute_inner_steps and functional.has_random_layers(model):
            raise ValueError(
                "recompute_inner_steps needs a model without random layers (dropout and the "
                "like): the recomputed inner step would draw new random numbers, and the "
                "meta-gradient would be that of masks the step never used")
        self.recompute_inner_steps = recompute_inner_steps
        self.forward = forward
        self.loss_fn = loss_fn
        self.inner_lr = inner_lr
        self.num_inner_steps = num_inner_steps
        self.first_order = first_order
        self.num_model_weights = len(model.trainable_variables)
        # Indices (into the model's trainable variables) of the weights that adapt.
        self.adapted_indices = list(range(self.num_model_weights))
        # Checkpointed and exported with the model (see `extra_variables`).
        self.state = tf.Module(name=f"{self.name}_state")

    # -- meta-parameters ------------------------------------------------------------------------

    @property
    def extra_variables(self):
        """The algorithm's own meta-parameters beyond the model's weights (a list)."""
        return list(getattr(self.state, "meta_parameters", []))

    @property
    def state_variables(self):
        """The algorithm's state that is not meta-learned (a list; Reptile's carried Adam state).

        Checkpointed and exported with the model, like `extra_variables`, but
        updated by assignment (`MetaStepOutputs.state_updates`), not by the
        outer optimizer.
        """
        return list(getattr(self.state, "carried", []))

    @property
    def saved_variables(self):
        """What is checkpointed and exported besides the model: extra and state variables."""
        return self.extra_variables + self.state_variables

    @property
    def meta_variables(self):
        """Everything the outer loop updates: θ, then `extra_variables`."""
        return list(self.model.trainable_variables) + self.extra_variables

    @property
    def unused_meta_indices(self):
        """Positions in `meta_variables` the meta-objective does not read by design (a list)."""
        return []

    def _add_extra(self, variables):
        self.state.meta_parameters = list(self.extra_variables) + list(variables)

    def split(self, meta_params):
        """`(model_params, extra_params)` of a flat meta-parameter list.

        Raises:
            ValueError: `meta_params` is not as long as `meta_variables` (the model's
                weights alone, for an algorithm with learned rates or per-step copies).
        """
        meta_params = list(meta_params)
        expected = self.num_model_weights + len(self.extra_variables)
        if len(meta_params) != expected:
            raise ValueError(
                f"meta_params must be {type(self).__name__}'s meta_variables, {expected} "
                f"tensors (the model's {self.num_model_weights} weights, then "
                f"{expected - self.num_model_weights} learned ones), got {len(meta_params)}: "
                "pass algorithm.meta_variables, not model.trainable_variables")
        return meta_params[:self.num_model_weights], meta_params[self.num_model_weights:]

    # -- adaptation -------------------------------------------------------------------------------

    @property
    def adapts_through_grouped_convolutions(self):
        """Whether adapting several tasks at once differentiates grouped convolutions.

        Their gradient kernels exist on CPU only with oneDNN on; the export
        answers a request's tasks one at a time when this is true.
        """
        flag = getattr(self.forward, "uses_grouped_convolutions", None)
        if flag is None:  # a forward not made by make_forward: any convolution may be grouped
            return bool(functional.convolution_layers(self.model))
        return bool(flag)

    def initial_weights(self, meta_params, num_tasks):
        """The task-batched starting point of the adapted weights (the adapted subset only)."""
        params, _ = self.split(meta_params)
        return core.broadcast_to_tasks([params[i] for i in self.adapted_indices], num_tasks)

    def full_weights(self, meta_params, adapted, step):
        """All model weights, task-batched: the adapted ones and the shared rest."""
        del step
        params, _ = self.split(meta_params)
        if len(adapted) == len(params):
            return list(adapted)
        num_tasks = tf.shape(adapted[0])[0]
        weights = core.broadcast_to_tasks(params, num_tasks)
        for index, weight in zip(self.adapted_indices, adapted):
            weights[index] = weight
        return weights

    def task_inputs(self, meta_params, x, training=True):
        """What the adapted part of the model reads (ANIL: the body's features)."""
        del meta_params, training
        return x

    def predict_from_inputs(self, meta_params, adapted, inputs, step, training=True):
        """Predictions of the adapted model after `step` inner steps, from `task_inputs`."""
        return self.forward(self.full_weights(meta_params, adapted, step), inputs, training)

    def predict(self, meta_params, adapted, x, step, training=True):
        """Predictions of the adapted model for raw inputs `x` `[num_tasks, batch, ...]`."""
        return self.predict_from_inputs(meta_params, adapted,
                                        self.task_inputs(meta_params, x, training), step, training)

    def task_loss(self, meta_params, inputs, y, training=True, meta_training=False):
        """The inner loop's task loss closure on a set (`inputs` from `task_inputs`).

        `meta_training` says whether the closure adapts inside a meta-step or
        outside one (evaluation, serving); Reptile's mini-batch size differs
        between the two, the other algorithms ignore it.
        """
        del meta_training
        def loss(weights, step):
            return self.loss_fn(y, self.predict_from_inputs(meta_params, weights, inputs, step,
                                                            training))
        return loss

    def inner_update(self, meta_params, inner_lr=None):
        """The inner update rule; `inner_lr` (a scalar) replaces the algorithm's own rates."""
        del meta_params
        return core.SGD(self.inner_lr if inner_lr is None else inner_lr)

    def adapt(self, meta_params, support_x, support_y, num_steps, first_order=None,
              inner_lr=None, training=True, return_state=False, meta_training=False):
        """Adapts to each task's support set; returns `(adapted, support_losses)`.

        `num_steps` may be a Python int or a scalar integer tensor (graph loop,
        always first order, as `core.adapt`). `first_order`: default the
        algorithm's own; it matters only under a tape that differentiates the
        adapted weights (a meta-objective). With `return_state`, also the inner
        update rule's final state (as `core.adapt`). `meta_training`: inside a
        meta-step (see `task_loss`).

        Raises:
            ValueError: support inputs and labels that disagree on tasks or
                examples, or labels/targets that do not fit the predictions
                (shapes known when traced).
        """
        core.check_task_batch(support_x, support_y, "support set")
        first_order = self.first_order if first_order is None else first_order
        inputs = self.task_inputs(meta_params, support_x, training)
        weights = self.initial_weights(meta_params, tf.shape(support_x)[0])
        return core.adapt(self.task_loss(meta_params, inputs, support_y, training, meta_training),
                          weights,
                          num_steps, self.inner_update(meta_params, inner_lr), first_order,
                          self.recompute_inner_steps,
                          self.differentiable_inputs(meta_params, inputs, support_x),
                          return_state=return_state)

    def differentiable_inputs(self, meta_params, inputs, x):
        """What an inner step reads besides the adapted weights, for `recompute_inner_steps`.

        Every meta-parameter (shared weights, learned rates, per-step
        normalization weights) and, when `task_inputs` computed them from
        meta-parameters (ANIL's features), the step's inputs; never the raw
        data `x`.
        """
        return list(meta_params) + ([] if inputs is x else [inputs])

    # -- meta-objective ---------------------------------------------------------------------------

    def meta_loss(self, meta_params, episode, loss_scale=None, iteration=0, first_order=None):
        """The meta-objective of a meta-batch and what it saw.

        Returns:
            `(loss, MetaStepOutputs)`: `loss` is the sum of the tasks' query
            losses after adaptation times `loss_scale` (default `1/num_tasks`).
        """
        del iteration
        core.check_episode(episode)
        first_order = self.first_order if first_order is None else first_order
        num_tasks = tf.shape(episode.support_x)[0]
        adapted, support_losses = self.adapt(meta_params, episode.support_x, episode.support_y,
                                             self.num_inner_steps, first_order,
                                             meta_training=True)
        predictions = self.predict(meta_params, adapted, episode.query_x, self.num_inner_steps)
        query_losses = self.loss_fn(episode.query_y, predictions)
        return (_scaled_sum(query_losses, loss_scale),
                MetaStepOutputs(_first_or_nan(support_losses, num_tasks, query_losses.dtype),
                                query_losses, predictions))

    def meta_step(self, episode, loss_scale=None, iteration=None):
        """The meta-loss and its gradient for every entry of `meta_variables`.

        Args:
            episode: an `Episode` (support and query sets, task-batched).
            loss_scale: see `meta_loss`; a distributed step passes
                `1 / global_num_tasks`.
            iteration: the meta-iteration (int64 scalar tensor, for schedules).

        Returns:
            `(loss, grads, MetaStepOutputs)`.
        """
        iteration = tf.zeros([], tf.int64) if iteration is None else iteration
        return core.meta_gradients(
            lambda params: self.meta_loss(params, episode, loss_scale, iteration),
            self.meta_variables, unused=self.unused_meta_indices)

    def make_optimizer(self, meta_lr, num_iterations):
        """The outer optimizer (Adam with learning rate β)."""
        del num_iterations
        return keras.optimizers.Adam(meta_lr)


def is_integer(value):
    """Whether `value` is a Python or numpy integer (not a bool, not a tensor)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _scaled_sum(task_values, loss_scale):
    if loss_scale is None:
        return tf.reduce_mean(task_values)
    return tf.reduce_sum(task_values) * tf.cast(loss_scale, task_values.dtype)


def _first_or_nan(losses, num_tasks, dtype):
    if losses:
        return losses[0]
    return tf.fill([num_tasks], tf.constant(float("nan"), dtype))
