"""Reptile (Nichol, Achiam and Schulman, 2018): move θ towards the adapted weights."""

import keras
import tensorflow as tf

from tf_maml import core
from tf_maml.algorithms.maml import MAML, MetaStepOutputs, is_integer

__all__ = ["Reptile"]


class Reptile(MAML):
    """Reptile: k inner steps on mini-batches of the support set, then θ ← θ + ε(φ̄ − θ).

    The outer update is not a gradient: `meta_step` returns θ − φ̄ (the mean
    over the meta-batch of each task's θ − φ) in place of a gradient, and the
    outer optimizer is plain SGD with learning rate ε, annealed linearly from
    `meta_step_size` to `meta_step_size_final` over training; one optimizer
    step is then exactly θ ← θ + ε(φ̄ − θ).

    Each inner step uses a mini-batch of `inner_batch_size` support examples
    (0: the whole support set), read from passes over the support set in a
    new shuffled order each, as the original code's sampler does (per task in
    meta-training; alike for every task outside it, so that a task adapts the
    same alone or in a batch). Evaluation, `adapt` and the
    exported signatures use `eval_inner_batch_size` (the original's
    `--eval-batch`: 10 for 20-way 1-shot, trained with 20). The inner optimizer is SGD with
    `inner_lr`, or Adam with β₁ = 0 (`inner_optimizer="adam"`, the original
    recipe).

    Adam's state: by default each task starts from fresh (zero) moments. The
    original code never resets them: it runs the meta-batch's tasks one after
    another on one TensorFlow Adam optimizer, whose moments and step count
    carry from task to task and from one meta-iteration to the next, and
    evaluation adapts from the state training left. With
    `carry_inner_state=True` the state `(m, v, t)` is kept in
    `state_variables` (checkpointed and exported with the model): every task
    of a meta-batch starts from it (tasks run side by side here, not one after
    another), and after the meta-step it becomes what running the tasks in
    sequence would have made of it, each task contributing its own
    accumulation: `v ← β₂^{nk}·v + (1 − β₂^{nk}) / (1 − β₂^k) · mean_i(v_i −
    β₂^k·v)` for n tasks of k steps (the same for `m` with β₁), `t ← t + nk`.
    With one task per meta-batch this is exactly the original's update.
    Evaluation and the exported `adapt` start every task from the carried
    state, as the original's evaluation does.

    Args:
        model, forward, loss_fn, inner_lr, num_inner_steps: as `MAML`.
        first_order: ignored: Reptile never differentiates through its inner
            steps (accepted so that every algorithm takes `MAML`'s arguments).
        inner_optimizer: "sgd" or "adam".
        inner_batch_size: support examples per inner step in meta-training
            (0: all).
        eval_inner_batch_size: support examples per inner step when adapting
            outside meta-training (evaluation, `adapt`, the export); None or
            -1: `inner_batch_size`; 0: all.
        meta_step_size: ε at the start.
        meta_step_size_final: ε at the end.
        carry_inner_state: carry Adam's state across tasks and meta-iterations
            (the original code's behaviour); needs `inner_optimizer="adam"`.

    Raises:
        ValueError: `num_inner_steps < 1`, an unknown `inner_optimizer`, or
            `carry_inner_state` without Adam, a bad batch size, a meta step
            size that is negative or not finite.
    """

    name = "reptile"
    label = "Reptile"  # in evaluation tables and plots

    def __init__(self, model, forward, loss_fn, inner_lr, num_inner_steps, first_order=True,
                 inner_optimizer="adam", inner_batch_size=0, meta_step_size=1.0,
                 meta_step_size_final=0.0, carry_inner_state=False, eval_inner_batch_size=None):
        super().__init__(model, forward, loss_fn, inner_lr, num_inner_steps, first_order=True)
        if num_inner_steps < 1:
            raise ValueError("Reptile needs num_inner_steps >= 1")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if carry_inner_state and inner_optimizer != "adam":
            raise ValueError("carry_inner_state needs inner_optimizer='adam' (SGD has no state)")
        if not is_integer(inner_batch_size) or inner_batch_size < 0:
            raise ValueError(f"inner_batch_size must be a non-negative integer, got "
                             f"{inner_batch_size!r}")
        if eval_inner_batch_size is not None and (not is_integer(eval_inner_batch_size)
                                                  or eval_inner_batch_size < -1):
            raise ValueError(f"eval_inner_batch_size must be None, -1 or a non-negative "
                             f"integer, got {eval_inner_batch_size!r}")
        for name, value in (("meta_step_size", meta_step_size),
                            ("meta_step_size_final", meta_step_size_final)):
            # Numbers are range-checked; tensors and variables (fed or scheduled by the user)
            # are taken as they are.
            if isinstance(value, (str, bytes)) or value is None:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
            core.check_non_negative(name, value)
        inner_batch_size = int(inner_batch_size)
        self.inner_optimizer = inner_optimizer
        self.inner_batch_size = inner_batch_size
        self.eval_inner_batch_size = (inner_batch_size if eval_inner_batch_size in (None, -1)
                                      else int(eval_inner_batch_size))
        self.meta_step_size = meta_step_size
        self.meta_step_size_final = meta_step_size_final
        self.carry_inner_state = carry_inner_state
        self.beta_1, self.beta_2 = 0.0, 0.999
        self.shuffle_seed = None  # set per meta-step (a pure function of the iteration)
        if carry_inner_state:
            # The moments are summed over replicas when assigned (each replica assigns
            # its share); the step count, the same on every replica, is taken from the
            # first, and kept in at least float32 (exact integers up to 2^24).
            sum_over_replicas = dict(trainable=False, aggregation=tf.VariableAggregation.SUM)
            adapted = [model.trainable_variables[i] for i in self.adapted_indices]
            names = [getattr(v, "path", v.name).split(":")[0].replace("/", "_")
                     for v in adapted]
            count_dtype = tf.float64 if adapted[0].dtype == tf.float64 else tf.float32
            self.state.carried = (
                [tf.Variable(tf.zeros(v.shape, core.optimizer_state_dtype(v.dtype)),
                             name=f"inner_adam_m_{name}", **sum_over_replicas)
                 for v, name in zip(adapted, names)]
                + [tf.Variable(tf.zeros(v.shape, core.optimizer_state_dtype(v.dtype)),
                               name=f"inner_adam_v_{name}",
                               **sum_over_replicas) for v, name in zip(adapted, names)]
                + [tf.Variable(tf.zeros([], count_dtype), name="inner_adam_t", trainable=False,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)])

    def carried_state(self):
        """The carried Adam state `(m, v, t)` as tensors (`carry_inner_state` only)."""
        carried = [tf.convert_to_tensor(v) for v in self.state_variables]
        n = len(self.adapted_indices)
        return carried[:n], carried[n:2 * n], carried[2 * n]

    def inner_update(self, meta_params, inner_lr=None):
        lr = self.inner_lr if inner_lr is None else inner_lr
        if self.inner_optimizer == "adam":
            initial = self.carried_state() if self.carry_inner_state else None
            return core.Adam(lr, beta_1=self.beta_1, beta_2=self.beta_2, initial_state=initial)
        return core.SGD(lr)

    def _carried_update(self, final_state, num_tasks, scale):
        """This replica's share of the carried state after a meta-step (see the class doc)."""
        m0, v0, t0 = self.carried_state()
        m, v, _ = final_state
        dtype = v0[0].dtype
        scale = tf.cast(scale, dtype)
        steps = float(self.num_inner_steps)
        global_tasks = tf.round(1.0 / scale)  # an integer: 1 / fl(1/n) may miss n
        share = tf.cast(num_tasks, dtype) * scale  # this replica's fraction of the tasks

        def carry(beta, initial, final):
            per_task = beta ** steps
            per_batch = tf.pow(tf.constant(beta, dtype), global_tasks * steps)
            factor = (1.0 - per_batch) / (1.0 - per_task)
            return [share * per_batch * x0
                    + factor * scale * tf.reduce_sum(x - per_task * x0[None], axis=0)
                    for x0, x in zip(initial, final)]

        # The step count is the whole meta-batch's on every replica (the first one's is kept).
        count = t0 + tf.cast(global_tasks, t0.dtype) * tf.cast(steps, t0.dtype)
        return carry(self.beta_1, m0, m) + carry(self.beta_2, v0, v) + [count]

    def task_loss(self, meta_params, inputs, y, training=True, meta_training=False):
        static_size = inputs.shape[1]
        batch = self.inner_batch_size if meta_training else self.eval_inner_batch_size
        if not batch or (static_size is not None and batch >= static_size):
            return super().task_loss(meta_params, inputs, y, training, meta_training)
        # The support size may be known only at run time (a serving request): the
        # same mini-batches then, and a set no larger than a batch is taken whole
        # (in shuffled order: the same mean loss).
        size = static_size if static_size is not None else tf.shape(inputs)[1]
        batch = batch if static_size is not None else tf.minimum(batch, size)
        num_tasks = tf.shape(inputs)[0]
        seed = self.shuffle_seed if self.shuffle_seed is not None else tf.constant([0, 0],
                                                                                      tf.int64)
        # In meta-training each task has its own shuffles; outside it every task is
        # shuffled alike, so that a task's adaptation does not depend on its position in a
        # batch (evaluation's chunks of tasks, a serving request of one task).
        rows = num_tasks if meta_training else 1

        def shuffle(epoch):
            """The order of the support set in pass `epoch` over it (pass 0: `seed` itself)."""
            epoch = tf.cast(epoch, tf.int64)
            pass_seed = tf.where(tf.equal(epoch, 0), seed,
                                 tf.random.experimental.stateless_fold_in(seed, epoch))
            order = tf.argsort(tf.random.stateless_uniform([rows, size], pass_seed), axis=1)
            return tf.broadcast_to(order, [num_tasks, size])

        def loss(weights, step):
            # Consecutive mini-batches of a stream of passes over the support set, each pass
            # in a new shuffled order, a batch running on into the next pass where one ends:
            # the original code's mini-batch sampler. A batch spans at most two passes.
            start = tf.cast(step, tf.int32) * batch
            position = start + tf.range(batch)
            first = start // size
            index = position % size
            picked = tf.where((position // size > first)[None],
                              tf.gather(shuffle(first + 1), index, axis=1),
                              tf.gather(shuffle(first), index, axis=1))
            batch_x = tf.gather(inputs, picked, batch_dims=1)
            batch_y = tf.gather(y, picked, batch_dims=1)
            return self.loss_fn(batch_y, self.predict_from_inputs(meta_params, weights, batch_x,
                                                                 step, training))
        return loss

    def meta_step(self, episode, loss_scale=None, iteration=None):
        """Returns `(support_loss, θ − φ̄ scaled like a gradient, outputs)`.

        With `carry_inner_state`, `outputs.state_updates` holds the new carried
        Adam state as this replica assigns it (its share of the moments, the
        step count whole).
        """
        core.check_episode(episode)
        iteration = tf.zeros([], tf.int64) if iteration is None else iteration
        self.shuffle_seed = tf.stack([tf.constant(7, tf.int64), tf.cast(iteration, tf.int64)])
        try:
            params = [tf.convert_to_tensor(v) for v in self.meta_variables]
            num_tasks = tf.shape(episode.support_x)[0]
            adapted, support_losses, final_state = self.adapt(
                params, episode.support_x, episode.support_y, self.num_inner_steps,
                first_order=True, return_state=True, meta_training=True)
        finally:
            self.shuffle_seed = None
        scale = (1.0 / tf.cast(num_tasks, params[0].dtype) if loss_scale is None
                 else tf.cast(loss_scale, params[0].dtype))
        state_updates = (self._carried_update(final_state, num_tasks, scale)
                         if self.carry_inner_state else None)
        differences = [tf.reduce_sum(p[None] - w, axis=0) * scale
                       for p, w in zip(params, adapted)]
        predictions = self.predict(params, adapted, episode.query_x, self.num_inner_steps)
        query_losses = self.loss_fn(episode.query_y, predictions)
        # (a mixed-precision model's losses are float16, its variables float32)
        support_loss = tf.reduce_sum(tf.cast(support_losses[0], scale.dtype)) * scale
        return support_loss, differences, MetaStepOutputs(support_losses[0], query_losses,
                                                          predictions, state_updates)

    def make_optimizer(self, meta_lr, num_iterations):
        """SGD with ε annealed linearly from `meta_step_size` to `meta_step_size_final`."""
        del meta_lr
        schedule = keras.optimizers.schedules.PolynomialDecay(
            self.meta_step_size, max(num_iterations, 1),
            end_learning_rate=self.meta_step_size_final, power=1.0)
        return keras.optimizers.SGD(schedule)
