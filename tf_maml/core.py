"""The MAML core: inner-loop adaptation and the meta-gradient.

Everything here is a pure function over lists of tensors; this is the only
module that opens `tf.GradientTape`s. Weights carry a leading **task axis**
(`[num_tasks, *shape]`) so that one call adapts a whole meta-batch: because
tasks never interact, the gradient of the *sum* of per-task losses with
respect to the task-batched weights is, row by row, each task's own gradient.

A `forward(weights, x, training)` function (see `tf_maml.functional`) and a
per-task loss `loss_fn(y_true, y_pred) -> [num_tasks]` (see `tf_maml.losses`)
are all the core needs to know about the model and the task.

Algorithms are options of these functions, not copies of them:

* second-order MAML (default): the outer tape differentiates through the
  inner gradient steps;
* first-order MAML (`first_order=True`): inner gradients are held constant,
  so the meta-gradient is the query-loss gradient at the adapted weights;
* `num_inner_steps=0`: plain joint training of the initialization on every
  task (the paper's "pretrained" baseline).
"""

import tensorflow as tf

__all__ = ["broadcast_to_tasks", "inner_step", "adapt", "meta_gradients"]


def broadcast_to_tasks(params, num_tasks):
    """Repeats shared parameters along a new leading task axis.

    Args:
        params: list of tensors or variables (the meta-initialization).
        num_tasks: int or scalar tensor.

    Returns:
        List of tensors of shape `[num_tasks, *param.shape]`. Gradients flow
        back to `params`, summed over tasks.

    Example:

    ```python
    weights = broadcast_to_tasks(model.trainable_variables, 25)
    ```
    """
    out = []
    for p in params:
        p = tf.convert_to_tensor(p)
        out.append(tf.broadcast_to(p[None], tf.concat([[num_tasks], tf.shape(p)], 0)))
    return out


def _learning_rates(inner_lr, num_weights):
    if isinstance(inner_lr, (list, tuple)):
        if len(inner_lr) != num_weights:
            raise ValueError(
                f"inner_lr has {len(inner_lr)} entries but there are {num_weights} weights")
        return list(inner_lr)
    return [inner_lr] * num_weights


def _as_dtype(value, dtype):
    # tf.cast of a Python float would round it to float32 first.
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def inner_step(forward, weights, x, y, loss_fn, inner_lr, first_order=False, training=True):
    """Takes one gradient-descent step on every task's support set.

    Args:
        forward: `forward(weights, x, training) -> predictions`, task-batched.
        weights: list of task-batched weight tensors `[num_tasks, ...]`.
        x: support inputs, `[num_tasks, batch, ...]`.
        y: support targets, `[num_tasks, batch, ...]`.
        loss_fn: `loss_fn(y_true, y_pred) -> [num_tasks]`, each task's mean loss.
        inner_lr: the step size α: a float, a scalar tensor, or a list with one
            (broadcastable) tensor per weight (per-parameter step sizes).
        first_order: hold the inner gradient constant (`stop_gradient`), so an
            enclosing tape does not differentiate through it.
        training: passed to `forward` (batch statistics, dropout).

    Returns:
        `(new_weights, task_losses)`: the adapted weights and the loss of every
        task *before* the step, `[num_tasks]`.
    """
    with tf.GradientTape() as tape:
        tape.watch(weights)
        task_losses = loss_fn(y, forward(weights, x, training))
        total = tf.reduce_sum(task_losses)
    grads = tape.gradient(total, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if first_order:
        grads = [tf.stop_gradient(g) for g in grads]
    lrs = _learning_rates(inner_lr, len(weights))
    new_weights = [w - _as_dtype(lr, w.dtype) * g for w, lr, g in zip(weights, lrs, grads)]
    return new_weights, task_losses


def adapt(forward, weights, support_x, support_y, loss_fn, inner_lr, num_steps,
          first_order=False, training=True):
    """Adapts task-batched weights to each task's support set.

    θ'ᵢ = θ − α ∇θ L(support_i), repeated `num_steps` times, for all tasks at once.

    Args:
        forward: `forward(weights, x, training) -> predictions`, task-batched.
        weights: list of task-batched weight tensors (see `broadcast_to_tasks`).
        support_x: `[num_tasks, support_size, ...]`.
        support_y: `[num_tasks, support_size, ...]`.
        loss_fn: `loss_fn(y_true, y_pred) -> [num_tasks]`.
        inner_lr: step size α (float, scalar tensor or per-weight list).
        num_steps: number of gradient steps: a Python int (0 returns
            `weights`), or a scalar integer tensor (a graph loop, for step counts
            known only at run time; always first order).
        first_order: hold the inner gradients constant.
        training: passed to `forward`.

    Returns:
        The adapted weights, a list like `weights`.

    Raises:
        ValueError: `num_steps` is negative.

    Example:

    ```python
    weights = broadcast_to_tasks(model.trainable_variables, num_tasks)
    adapted = adapt(forward, weights, sx, sy, losses.mean_squared_error,
                    inner_lr=0.01, num_steps=1)
    predictions = forward(adapted, qx)
    ```
    """
    if isinstance(num_steps, (tf.Tensor, tf.Variable)):
        # A step count known only at run time (e.g. a serving request): a graph
        # loop. Only first-order use is supported (nothing differentiates
        # through it here).
        def body(step, *ws):
            new, _ = inner_step(forward, list(ws), support_x, support_y, loss_fn, inner_lr,
                                first_order=True, training=training)
            return (step + 1, *new)

        shapes = (tf.TensorShape([]), *[w.shape for w in weights])
        outputs = tf.while_loop(lambda step, *ws: step < num_steps, body,
                                (tf.zeros([], num_steps.dtype), *weights),
                                shape_invariants=shapes)
        return list(outputs[1:])
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    for _ in range(num_steps):
        weights, _ = inner_step(forward, weights, support_x, support_y, loss_fn, inner_lr,
                                first_order=first_order, training=training)
    return weights


def meta_gradients(forward, params, episode, loss_fn, inner_lr, num_inner_steps,
                   first_order=False, training=True, loss_scale=None):
    """Computes the MAML meta-loss of a meta-batch and its gradient.

    The meta-loss is the mean over tasks of the query loss after adapting to
    the support set; its gradient with respect to the shared initialization
    `params` differentiates through the inner loop (second order) unless
    `first_order=True`.

    Args:
        forward: `forward(weights, x, training) -> predictions`, task-batched.
        params: list of tensors or variables, the meta-initialization θ (no task axis).
        episode: an `Episode` (or any object with `support_x`, `support_y`,
            `query_x`, `query_y`), each `[num_tasks, batch, ...]`.
        loss_fn: `loss_fn(y_true, y_pred) -> [num_tasks]`.
        inner_lr: step size α (float, scalar tensor or per-weight list).
        num_inner_steps: inner gradient steps (Python int, ≥ 0).
        first_order: first-order MAML.
        training: passed to `forward`.
        loss_scale: the meta-loss is `sum(task query losses) * loss_scale`;
            default `1 / num_tasks` (the mean). A distributed step passes
            `1 / global_num_tasks`.

    Returns:
        `(meta_loss, grads, outputs)`: the scalar meta-loss, one gradient per
        entry of `params`, and a dict with `support_losses` (`[num_tasks]`,
        before adaptation), `query_losses` (`[num_tasks]`, after adaptation)
        and `query_predictions` (after adaptation).
    """
    params = [tf.convert_to_tensor(p) for p in params]
    num_tasks = tf.shape(episode.support_x)[0]
    with tf.GradientTape() as tape:
        tape.watch(params)
        weights = broadcast_to_tasks(params, num_tasks)
        support_losses = None
        for _ in range(num_inner_steps):
            weights, losses = inner_step(forward, weights, episode.support_x, episode.support_y,
                                         loss_fn, inner_lr, first_order, training)
            if support_losses is None:
                support_losses = losses
        query_predictions = forward(weights, episode.query_x, training)
        query_losses = loss_fn(episode.query_y, query_predictions)
        if loss_scale is None:
            meta_loss = tf.reduce_mean(query_losses)
        else:
            meta_loss = tf.reduce_sum(query_losses) * tf.cast(loss_scale, query_losses.dtype)
    grads = tape.gradient(meta_loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if support_losses is None:
        support_losses = tf.fill([num_tasks], tf.constant(float("nan"), query_losses.dtype))
    return meta_loss, grads, {
        "support_losses": support_losses,
        "query_losses": query_losses,
        "query_predictions": query_predictions,
    }
