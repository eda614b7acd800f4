"""The core every algorithm is built on: inner steps over loss closures, and meta-gradients.

Everything here is a pure function of tensors; every algorithm's inner and outer
gradients are taken here (elsewhere tapes only probe whether the grouped convolution
kernels differentiate exactly, and compute TRPO's curvature products). Adapted weights
carry a leading **task axis** (`[num_tasks, *shape]`) so that one call adapts a
whole meta-batch: because tasks never interact, the gradient of the *sum* of
per-task losses with respect to task-batched weights is, row by row, each task's
own gradient.

The core knows nothing about models, data or reinforcement learning. What it
adapts against is a **task loss closure**

    task_loss(weights, step) -> [num_tasks]

a function of the task-batched adapted weights and of the inner-step index
(a Python int, or a scalar tensor inside a graph loop), returning each task's
loss. A supervised loss on a support set is one such closure
(`supervised_loss`); a policy-gradient surrogate on sampled trajectories is
another. How a step moves the weights is an **update rule** (`SGD`, with a
scalar, per-tensor, per-element and optionally per-step learning rate that may
itself be a tensor under a tape, which is how learned rates get their
meta-gradient; `Adam`, the inner optimizer of Reptile).

`meta_gradients(objective, meta_params)` differentiates any scalar objective of
a structure of meta-parameters (the initialization θ, learned rates, per-step
normalization weights, ...). Whether the inner steps are differentiated through
(second order) or held constant (first order) is the `first_order` option of
`inner_step`/`adapt`.
"""

import math
import numbers

import numpy as np
import tensorflow as tf
from absl import logging

__all__ = ["broadcast_to_tasks", "supervised_loss", "SGD", "Adam", "optimizer_state_dtype",
           "inner_step", "adapt",
           "meta_gradients", "check_task_batch", "check_episode"]


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


def _static_shape(value):
    shape = getattr(value, "shape", None)
    return tf.TensorShape(shape if shape is not None else np.shape(value))


def check_task_batch(x, y, what="the set"):
    """Raises a one-line `ValueError` where `x` and `y` disagree on tasks or examples.

    Both are `[num_tasks, examples, ...]`; only shapes known when the call is
    traced are compared (nothing runs in the graph).

    Args:
        x: inputs (tensor or array).
        y: targets or labels.
        what: the set's name for the message ("support set", "query set").

    Raises:
        ValueError: ranks below 2, or different task or example counts.
    """
    x_shape, y_shape = _static_shape(x), _static_shape(y)
    for name, shape in (("inputs", x_shape), ("targets", y_shape)):
        if shape.rank is not None and shape.rank < 2:
            raise ValueError(f"{what}: {name} must be [num_tasks, examples, ...], got shape "
                             f"{shape.as_list()} (a single task needs a leading axis of 1)")
    if (x_shape.rank is not None and y_shape.rank is not None
            and not x_shape[:2].is_compatible_with(y_shape[:2])):
        raise ValueError(f"{what}: inputs of shape {x_shape.as_list()} and targets of shape "
                         f"{y_shape.as_list()} differ in tasks or examples (the first two axes)")


def check_episode(episode):
    """`check_task_batch` on an `Episode`'s two sets, and the same task count in both.

    Args:
        episode: `(support_x, support_y, query_x, query_y)`.

    Raises:
        ValueError: see `check_task_batch`; support and query sets of
            different task counts.
    """
    support_x, support_y, query_x, query_y = episode
    check_task_batch(support_x, support_y, "support set")
    check_task_batch(query_x, query_y, "query set")
    support_tasks, query_tasks = _static_shape(support_x)[:1], _static_shape(query_x)[:1]
    if not support_tasks.is_compatible_with(query_tasks):
        raise ValueError(f"the support set has {support_tasks[0]} tasks and the query set "
                         f"{query_tasks[0]}: an episode's sets hold the same tasks")


def supervised_loss(forward, loss_fn, x, y, training=True):
    """The task loss closure of a supervised set (e.g. each task's support set).

    Args:
        forward: `forward(weights, x, training) -> predictions`, task-batched.
        loss_fn: `loss_fn(y_true, y_pred) -> [num_tasks]`.
        x: inputs `[num_tasks, batch, ...]`.
        y: targets `[num_tasks, batch, ...]`.
        training: passed to `forward`.

    Returns:
        `task_loss(weights, step) -> [num_tasks]` (the step index is unused).

    Example:

    ```python
    loss = supervised_loss(forward, losses.mean_squared_error, support_x, support_y)
    adapted, _ = adapt(loss, weights, num_steps=1, update=SGD(0.01))
    ```
    """
    check_task_batch(x, y)

    def task_loss(weights, step):
        del step
        return loss_fn(y, forward(weights, x, training))

    return task_loss


def _as_dtype(value, dtype):
    # tf.cast of a Python float would round it to float32 first; anything else
    # (tensors, tf.Variables, Keras variables, numpy values) is cast.
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def _at_step(value, step):
    """Row `min(step, len - 1)` of a per-step tensor (steps past the end reuse the last row)."""
    value = tf.convert_to_tensor(value)
    if value.shape.rank == 0:
        raise ValueError("per_step rates need a leading step axis (one row per inner step), "
                         "got a scalar rate; give e.g. tf.fill([num_inner_steps], 0.1)")
    if isinstance(step, int):
        return value[min(step, value.shape[0] - 1)]
    last = tf.cast(tf.shape(value)[0] - 1, step.dtype)
    return tf.gather(value, tf.minimum(step, last))


class SGD:
    """The inner update θ' = θ − α·g of MAML, with any shape of learning rate.

    Args:
        inner_lr: the step size α: a float or scalar tensor for every weight,
            or a list with one entry per adapted weight, each broadcastable to
            that weight's shape without the task axis (a scalar per tensor, or
            a tensor of the weight's shape for per-element rates). Tensors may
            be learned meta-parameters: the meta-gradient flows into them.
        per_step: each rate has a leading step axis; step `s` uses row
            `min(s, rows - 1)` (per-step rates, as MAML++'s LSLR).

    Example:

    ```python
    update = SGD(0.4)                                        # MAML
    # Meta-SGD: learned rates are meta-parameters. Inside `meta_gradients`' objective,
    # build the rule from the objective's argument, not from the variables themselves
    # (the objective receives tensors; variables read directly get no gradient).
    def objective(meta):
        update = SGD(meta["rates"])
        ...
    ```
    """

    def __init__(self, inner_lr, per_step=False):
        for rate in (inner_lr if isinstance(inner_lr, (list, tuple)) else [inner_lr]):
            check_non_negative("SGD's inner_lr", rate)
        self.inner_lr = inner_lr
        self.per_step = per_step

    def init(self, weights):
        """The rule's state for `weights` (none for SGD)."""
        del weights
        return ()

    def rates(self, num_weights, step):
        """The learning rate of every weight at `step`, a list."""
        if isinstance(self.inner_lr, (list, tuple)):
            if len(self.inner_lr) != num_weights:
                raise ValueError(f"inner_lr has {len(self.inner_lr)} entries but there are "
                                 f"{num_weights} adapted weights")
            rates = list(self.inner_lr)
        else:
            rates = [self.inner_lr] * num_weights
        if self.per_step:
            rates = [_at_step(rate, step) for rate in rates]
        return rates

    def apply(self, weights, grads, state, step):
        """Returns `(new_weights, new_state)` after one step with gradients `grads`."""
        rates = self.rates(len(weights), step)
        for index, (w, lr) in enumerate(zip(weights, rates)):
            _check_rate_shape(lr, w, index)
        return [w - _as_dtype(lr, w.dtype) * g for w, lr, g in zip(weights, rates, grads)], state


def check_non_negative(name, value):
    """Raises `ValueError` if `value` is a Python or numpy number, or a numpy array, with an
    entry that is negative or not finite; tensors and variables (learned, fed or scheduled
    at run time) are left alone."""
    if isinstance(value, numbers.Real) and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        bad = np.flatnonzero(~(np.isfinite(value) & (value >= 0)))
        if bad.size:
            where = np.unravel_index(bad[0], value.shape)
            raise ValueError(f"{name} must be finite and non-negative in every entry, got "
                             f"{value.flat[bad[0]].item()!r} at index {tuple(map(int, where))} "
                             f"(shape {value.shape})")


def _check_rate_shape(rate, weight, index):
    """Raises `ValueError` unless `rate` broadcasts to `weight` without enlarging it.

    (A rate may carry the task axis, as the serving signatures' per-task rates do.)
    """
    rate_shape, weight_shape = _static_shape(rate), _static_shape(weight)
    if rate_shape.rank is None or weight_shape.rank is None or rate_shape.rank == 0:
        return
    try:
        fits = tf.broadcast_static_shape(rate_shape, weight_shape).is_compatible_with(
            weight_shape) and rate_shape.rank <= weight_shape.rank
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"inner_lr entry {index} has shape {rate_shape.as_list()}, which does "
                         f"not broadcast to adapted weight {index}'s shape "
                         f"{weight_shape.as_list()[1:]} (or with the task axis, "
                         f"{weight_shape.as_list()})")


class Adam:
    """Adam as an inner optimizer (Reptile uses it with `beta_1=0`).

    Its moments carry the task axis like the weights. Each task starts from
    zero moments (a fresh optimizer per task), or from `initial_state`, one
    state shared by every task (Reptile's original code carries Adam's moments
    from task to task; see `Reptile`).

    Args:
        learning_rate: float or scalar tensor.
        beta_1, beta_2, epsilon: Adam's constants (note `beta_1=0.0` by
            default, Reptile's setting, not Keras' 0.9).
        initial_state: `(m, v, t)` without the task axis: the first and second
            moments (lists, one tensor per adapted weight, of its shape) and
            the step count `t` (a scalar) every task starts from; default
            zeros.

    Raises:
        ValueError: a Python-number `learning_rate` that is negative or not
            finite, `beta_1` or `beta_2` outside [0, 1), `epsilon` not > 0.

    Example:

    ```python
    update = Adam(0.001, beta_1=0.0)
    adapted, _ = adapt(loss, weights, num_steps=5, update=update)
    ```
    """

    def __init__(self, learning_rate, beta_1=0.0, beta_2=0.999, epsilon=1e-8,
                 initial_state=None):
        for name, value, low, high in (("learning_rate", learning_rate, 0.0, math.inf),
                                       ("beta_1", beta_1, 0.0, 1.0),
                                       ("beta_2", beta_2, 0.0, 1.0),
                                       ("epsilon", epsilon, 0.0, math.inf)):
            # Python numbers only: tensors may be learned or fed at run time.
            if isinstance(value, numbers.Real) and not (
                    math.isfinite(value) and low <= value and (value < high or high == math.inf)
                    and (name != "epsilon" or value > 0)):
                bounds = {"learning_rate": "finite and >= 0", "epsilon": "finite and > 0"}.get(
                    name, "in [0, 1)")
                raise ValueError(f"Adam's {name} must be {bounds}, got {value!r}")
        self.learning_rate = learning_rate
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.initial_state = initial_state

    def for_weights(self, indices):
        """The same rule over a subset of the weights (their entries of `initial_state`)."""
        if self.initial_state is None:
            return self
        m, v, t = self.initial_state
        return Adam(self.learning_rate, self.beta_1, self.beta_2, self.epsilon,
                    ([m[i] for i in indices], [v[i] for i in indices], t))

    def init(self, weights):
        """Every task's starting state: `(m, v, t)`, the moments task-batched.

        The moments and the step count are kept in `optimizer_state_dtype` of
        each weight: float32 for float16 and bfloat16 weights, whose precision
        turns the default `epsilon` into 0 and `beta_2` into 1.
        """
        dtypes = [optimizer_state_dtype(w.dtype) for w in weights]
        count_dtype = tf.float64 if tf.float64 in dtypes else tf.float32
        if self.initial_state is None:
            zeros = [tf.zeros(tf.shape(w), d) for w, d in zip(weights, dtypes)]
            return (zeros, list(zeros), tf.zeros([], count_dtype))
        m, v, t = self.initial_state
        if len(m) != len(weights) or len(v) != len(weights):
            raise ValueError(f"initial_state has moments for {len(m)} and {len(v)} weights but "
                             f"there are {len(weights)} adapted weights")
        num_tasks = tf.shape(weights[0])[0]
        m = [tf.cast(x, d) for x, d in zip(broadcast_to_tasks(m, num_tasks), dtypes)]
        v = [tf.cast(x, d) for x, d in zip(broadcast_to_tasks(v, num_tasks), dtypes)]
        return (m, v, tf.cast(t, count_dtype))

    def apply(self, weights, grads, state, step):
        del step
        m, v, t = state
        t = t + 1
        constants = {}  # per state dtype (mixed dtypes; float32 for 16-bit weights), built once
        for dtype in dict.fromkeys(mi.dtype for mi in m):
            b1, b2 = _as_dtype(self.beta_1, dtype), _as_dtype(self.beta_2, dtype)
            td = tf.cast(t, dtype)
            lr = _as_dtype(self.learning_rate, dtype) * tf.sqrt(1 - b2 ** td) / (1 - b1 ** td)
            constants[dtype] = (b1, b2, lr, _as_dtype(self.epsilon, dtype))
        new, new_m, new_v = [], [], []
        for w, g, mi, vi in zip(weights, grads, m, v):
            b1, b2, lr, eps = constants[mi.dtype]
            g = tf.cast(g, mi.dtype)
            mi = b1 * mi + (1 - b1) * g
            vi = b2 * vi + (1 - b2) * tf.square(g)
            step_value = lr * mi / (tf.sqrt(vi) + eps)
            new.append(w - tf.cast(step_value, w.dtype))
            new_m.append(mi)
            new_v.append(vi)
        return new, (new_m, new_v, t)


def optimizer_state_dtype(dtype):
    """The dtype an inner optimizer's state and arithmetic use for weights of `dtype`:
    float32 for float16 and bfloat16 (Adam's epsilon and beta_2 do not survive them)."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def inner_step(task_loss, weights, update, state=None, step=0, first_order=False,
               recompute=False, differentiable_inputs=()):
    """Takes one inner step on every task's loss.

    Args:
        task_loss: `task_loss(weights, step) -> [num_tasks]`.
        weights: list of task-batched weight tensors `[num_tasks, ...]`.
        update: an update rule (`SGD`, `Adam`, or any object with
            `init(weights)` and `apply(weights, grads, state, step)`).
        state: the update rule's state (default `update.init(weights)`).
        step: the inner-step index, passed to `task_loss` and `update`.
        first_order: hold the inner gradient constant (`stop_gradient`), so an
            enclosing tape does not differentiate through it.
        recompute: second order only (ignored for first order, which keeps no
            activations for an enclosing tape anyway): an enclosing tape keeps
            only the step's inputs and outputs, and the step runs again when
            it is differentiated. Memory then no longer grows with each step's
            activations, for about one more forward and backward pass of the
            step's loss. The step must be deterministic (no random ops), and
            under XLA nothing is saved (XLA merges the two copies).
        differentiable_inputs: with `recompute`, every tensor other than
            `weights` and `state` that `task_loss` or `update` reads and that
            an enclosing tape must differentiate (learned rates, shared
            meta-parameters, features computed from them). One left out would
            get no gradient through this step.

    Returns:
        `(new_weights, new_state, task_losses)`: the loss of every task is the
        one *before* the step, `[num_tasks]`.
    """
    if state is None:
        state = update.init(weights)
    if recompute and not first_order:
        return _recomputed_step(task_loss, weights, update, state, step, differentiable_inputs)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        task_losses = _check_task_losses(task_loss(weights, step), weights)
        total = tf.reduce_sum(task_losses)
    grads = tape.gradient(total, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if first_order:
        grads = [tf.stop_gradient(g) for g in grads]
    new_weights, state = update.apply(weights, grads, state, step)
    return new_weights, state, task_losses


def _check_task_losses(task_losses, weights):
    """`task_losses` as `[num_tasks]`; `ValueError` unless they are one per task.

    Shapes known when traced are checked; trailing axes of size 1 (a loss
    reduced with `keepdims`) are dropped.

    A per-example `[num_tasks, batch]` loss would scale every task's step by the
    batch size, and a scalar (the mean over tasks) divide it by the task count,
    both silently: the gradient of their sum is taken.
    """
    if task_losses is None or not (isinstance(task_losses, (tf.Tensor, tf.Variable, np.ndarray))
                                   or hasattr(task_losses, "shape")):
        raise ValueError(f"task_loss must return a tensor of one loss per task, shape "
                         f"[num_tasks]; it returned {type(task_losses).__name__}")
    shape = _static_shape(task_losses)
    num_tasks = _static_shape(weights[0])[:1] if weights else tf.TensorShape([None])
    if shape.rank is None:
        return task_losses
    if shape.rank > 1 and all(size == 1 for size in shape[1:]):  # kept dims: [num_tasks, 1]
        return tf.reshape(task_losses, tf.shape(task_losses)[:1])
    if shape.rank == 0:
        raise ValueError("task_loss must return one loss per task, shape [num_tasks]; it "
                         "returned a scalar (the mean over tasks?), which would divide every "
                         "task's inner step by the task count")
    if shape.rank != 1:
        raise ValueError(f"task_loss must return one loss per task, shape [num_tasks]; it "
                         f"returned shape {shape.as_list()} (per-example losses? reduce them "
                         f"over the examples, e.g. tf.reduce_mean(losses, axis=1))")
    if not shape.is_compatible_with(num_tasks):
        raise ValueError(f"task_loss returned {shape[0]} losses for weights of {num_tasks[0]} "
                         f"tasks: it must return one loss per task")
    return task_losses


def _recomputed_step(task_loss, weights, update, state, step, differentiable_inputs):
    """`inner_step` (second order) whose intermediate tensors are recomputed when differentiated.

    The forward pass keeps only the step's inputs and outputs; the backward
    pass runs the step again under a tape (after the incoming gradients exist,
    a control dependency that keeps TensorFlow's graph optimizations from
    merging the two copies; XLA ignores it and merges them, so no memory is
    saved under `jit_compile`) and differentiates that copy. The step must be
    deterministic: random ops in it would draw new numbers when recomputed.
    `differentiable_inputs` are the tensors other than `weights` and `state`
    that `task_loss` or `update` read and that an enclosing tape
    differentiates (learned rates, shared meta-parameters, features computed
    from them): they get their gradients through here too.
    """
    weights = [tf.convert_to_tensor(w) for w in weights]
    flat_state = [tf.convert_to_tensor(s) for s in tf.nest.flatten(state)]
    extra = [tf.convert_to_tensor(t) for t in differentiable_inputs]
    num_weights, num_state = len(weights), len(flat_state)

    def run(ws, st):
        new, new_state, losses = inner_step(task_loss, list(ws), update,
                                            tf.nest.pack_sequence_as(state, list(st)), step)
        return new + tf.nest.flatten(new_state) + [losses]

    @tf.custom_gradient
    def recomputed(*inputs):
        outputs = run(inputs[:num_weights], inputs[num_weights:num_weights + num_state])

        def grad(*output_grads, variables=None):
            # `variables`: any tf.Variable the step read directly (rather than
            # through its inputs); they get their gradients too.
            variables = list(variables or [])
            output_grads = [tf.zeros_like(o) if g is None else g
                            for o, g in zip(outputs, output_grads)]
            with tf.control_dependencies(output_grads):
                copies = [tf.identity(t) for t in inputs[:num_weights + num_state]]
            with tf.GradientTape() as tape:
                tape.watch(copies + extra)
                again = run(copies[:num_weights], copies[num_weights:])
            grads = tape.gradient(again, copies + extra + variables,
                                  output_gradients=output_grads,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if not variables:
                return grads
            return grads[:len(inputs)], grads[len(inputs):]

        return outputs, grad

    outputs = recomputed(*(weights + flat_state + extra))
    new_weights = list(outputs[:num_weights])
    new_state = tf.nest.pack_sequence_as(state, list(outputs[num_weights:-1]))
    return new_weights, new_state, outputs[-1]


def _check_not_variables(weights):
    if not isinstance(weights, (list, tuple)):
        raise ValueError(f"weights must be a list of task-batched tensors, got a "
                         f"{type(weights).__name__}: pass tf_maml.core.broadcast_to_tasks("
                         "model.trainable_variables, num_tasks), or [tensor] for one")
    for weight in weights:
        if isinstance(weight, tf.Variable) or hasattr(weight, "assign"):  # Keras variables too
            raise ValueError(
                f"weights must be task-batched tensors, got the variable {weight.name!r}: "
                "pass tf_maml.core.broadcast_to_tasks(model.trainable_variables, num_tasks)")
    counts = [_static_shape(w)[:1] for w in weights]
    known = [(i, c[0]) for i, c in enumerate(counts) if c.rank and c[0] is not None]
    if known and any(n != known[0][1] for _, n in known):
        index, n = next((i, n) for i, n in known if n != known[0][1])
        raise ValueError(f"weights must share their leading task axis: weight {known[0][0]} "
                         f"has {known[0][1]} tasks, weight {index} has {n} (a weight of 1 "
                         "task would be shared by all, stepped by their summed gradients)")


def adapt(task_loss, weights, num_steps, update, first_order=False, recompute=False,
          differentiable_inputs=(), return_state=False):
    """Adapts task-batched weights with `num_steps` inner steps.

    θ'ᵢ = θ − α ∇θ Lᵢ(θ), repeated, for all tasks at once.

    Args:
        task_loss: `task_loss(weights, step) -> [num_tasks]`.
        weights: list of task-batched weight tensors (see `broadcast_to_tasks`).
        num_steps: a Python int (unrolled; 0 returns `weights`), or a scalar
            integer tensor (a graph loop whose size is known only at run time,
            e.g. a serving request, or many evaluation steps; first order,
            since nothing may differentiate through it).
        update: the update rule (e.g. `SGD(0.01)`).
        first_order: hold the inner gradients constant.
        recompute, differentiable_inputs: see `inner_step` (each unrolled step
            is recomputed when differentiated; a tensor `num_steps` is first
            order and ignores them).
        return_state: also return the update rule's state after the last step.

    Returns:
        `(adapted_weights, support_losses)`: the weights after the last step
        and, for a Python `num_steps`, a list of each step's `[num_tasks]`
        losses before that step (empty for a tensor `num_steps`). With
        `return_state`, `(adapted_weights, support_losses, state)`.

    Raises:
        ValueError: `num_steps` is negative, or `weights` holds variables (the
            model's own, not task-batched tensors).

    Example:

    ```python
    weights = broadcast_to_tasks(model.trainable_variables, num_tasks)
    loss = supervised_loss(forward, losses.mean_squared_error, sx, sy)
    adapted, _ = adapt(loss, weights, num_steps=1, update=SGD(0.01))
    predictions = forward(adapted, qx)
    ```
    """
    _check_not_variables(weights)
    if isinstance(num_steps, (tf.Tensor, tf.Variable)):
        state = update.init(weights)
        flat_state = tf.nest.flatten(state)

        def body(step, ws, st):
            new, st, _ = inner_step(task_loss, list(ws), update,
                                    tf.nest.pack_sequence_as(state, list(st)), step,
                                    first_order=True)
            return step + 1, new, tf.nest.flatten(st)

        step0 = tf.zeros([], num_steps.dtype)
        _, weights, flat_state = tf.while_loop(
            lambda step, ws, st: step < num_steps, body, (step0, list(weights), flat_state),
            shape_invariants=(step0.shape, [w.shape for w in weights],
                              [s.shape for s in flat_state]))
        if return_state:
            return list(weights), [], tf.nest.pack_sequence_as(state, list(flat_state))
        return list(weights), []
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    state = update.init(weights) if num_steps or return_state else None
    losses = []
    for step in range(num_steps):
        weights, state, step_losses = inner_step(task_loss, weights, update, state, step,
                                                 first_order, recompute, differentiable_inputs)
        losses.append(step_losses)
    if return_state:
        return weights, losses, state
    return weights, losses


def meta_gradients(objective, meta_params, unused=()):
    """The value of a meta-objective and its gradient with respect to meta-parameters.

    Args:
        objective: `objective(meta_params) -> (scalar_loss, aux)`; typically
            adapts with `adapt` inside and evaluates the adapted weights.
        meta_params: a structure (list, dict, ...) of tensors or variables:
            the initialization θ and whatever else is meta-learned.
        unused: positions (in `tf.nest.flatten(meta_params)`) of parameters
            the objective does not read by design (MAML++'s model batch-norm
            weights, replaced by per-step copies): not warned about.

    Returns:
        `(loss, grads, aux)`: `grads` has the structure of `meta_params`
        (zeros for parameters the loss does not depend on; when traced, a
        warning names them, except through inner steps taken with
        `recompute`, whose recomputed gradients are zeros rather than none).

    Raises:
        ValueError: the objective's loss is not a scalar.

    Example:

    ```python
    def objective(params):
        weights = broadcast_to_tasks(params, num_tasks)
        adapted, _ = adapt(supervised_loss(forward, loss_fn, sx, sy), weights, 1, SGD(0.4))
        return tf.reduce_mean(loss_fn(qy, forward(adapted, qx))), {}

    loss, grads, _ = meta_gradients(objective, model.trainable_variables)
    ```
    """
    originals = tf.nest.flatten(meta_params)
    flat = [tf.convert_to_tensor(p) for p in originals]
    with tf.GradientTape() as tape:
        tape.watch(flat)
        result = objective(tf.nest.pack_sequence_as(meta_params, flat))
        if not isinstance(result, tuple) or len(result) != 2:
            raise ValueError(f"the meta-objective must return a pair (scalar_loss, aux), aux "
                             f"any structure ({{}} for none); it returned "
                             f"{type(result).__name__}")
        loss, aux = result
        shape = _static_shape(loss)
        if shape.rank and shape.num_elements() == 1:  # [1], [1, 1] (keepdims=True)
            loss = tf.reshape(loss, [])
    rank = _static_shape(loss).rank
    if rank is not None and rank != 0:
        raise ValueError(f"the meta-objective must return a scalar loss, got shape "
                         f"{_static_shape(loss).as_list()} (sum or average the tasks' losses)")
    grads = tape.gradient(loss, flat, unconnected_gradients=tf.UnconnectedGradients.NONE)
    unconnected = [_name(p, i) for i, (p, g) in enumerate(zip(originals, grads))
                   if g is None and i not in set(unused)]
    if unconnected:
        # Said when traced: a meta-parameter nothing differentiable connects to the loss (a
        # non-differentiable op such as round, argmax or a cast to an integer, or an unused
        # layer) is never meta-trained, and a weight behind it never adapts.
        logging.warning(
            "No gradient reaches the meta-parameter(s) %s from the meta-objective: they will "
            "not be meta-trained (the objective reads the variables themselves rather than "
            "its argument, e.g. an update rule built outside it? a non-differentiable op such "
            "as round, argmax or an integer cast between them and the loss? a weight the loss "
            "does not use?)",
            ", ".join(unconnected[:5]) + (" ..." if len(unconnected) > 5 else ""))
    grads = [tf.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
    return loss, tf.nest.pack_sequence_as(meta_params, grads), aux


def _name(param, index):
    name = getattr(param, "path", None) or getattr(param, "name", None)
    return f"{name!s}" if name else f"#{index}"
