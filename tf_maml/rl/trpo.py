"""Trust-region policy optimization of any objective of a list of parameters.

Generic functions: nothing here knows about policies or MAML. The objective is
`objective(params) -> (loss, kl, aux)`: a scalar loss to decrease and a scalar
mean KL divergence from the parameters the step starts at (zero there, with a
zero gradient). For MAML-RL both come from the *adapted* policies, so the
objective runs the inner loop (`tf_maml.core.adapt`) inside and the KL's
Hessian is taken **through the inner update**.

The Hessian-vector products reuse one forward: `second_order` evaluates the
objective once under a persistent tape, takes the KL's gradient g(θ) under a
nested tape (its computation recorded by the outer one), and each product
`H·v` is then the outer tape's vector-Jacobian product of g with v (H is
symmetric), a backward pass through the recorded graph; the inner loop is
not run again per conjugate-gradient iteration. This module opens its own tapes
(the one exception to `tf_maml.core` opening them all) because the first
backward pass must stay recorded while the conjugate-gradient loop runs.
"""

import collections

import tensorflow as tf

__all__ = ["flatten", "unflatten", "second_order", "conjugate_gradient", "line_search",
           "trpo_step", "TRPOInfo"]


TRPOInfo = collections.namedtuple(
    "TRPOInfo", ["loss_before", "loss_after", "kl_after", "accepted", "num_backtracks",
                 "step_size", "aux"])


def flatten(tensors):
    """Concatenates a list of tensors into one vector."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def unflatten(vector, like):
    """Splits a vector into tensors shaped as `like` (a list of tensors or variables)."""
    sizes = [t.shape.num_elements() for t in like]
    if any(size is None for size in sizes):
        raise ValueError("unflatten needs parameters of static shapes")
    parts = tf.split(vector, sizes)
    return [tf.reshape(p, t.shape) for p, t in zip(parts, like)]


def second_order(objective, params, damping=0.0):
    """The objective, its loss gradient and a Hessian-vector product of its KL, from one forward.

    Args:
        objective: `objective(params) -> (loss, kl, aux)` with scalar `loss`, `kl`.
        params: list of tensors.
        damping: added as `damping · v` to every product (TRPO's CG damping).

    Returns:
        `(loss, kl, aux, loss_grad, hvp)`: `loss_grad` is the flat gradient of
        the loss; `hvp(v)` maps a flat vector to `∇²kl · v + damping · v`
        (flat), differentiating the recorded gradient of the KL again; it can
        be called many times (also inside a graph loop).

    Example:

    ```python
    loss, kl, _, g, hvp = second_order(objective, params, damping=1e-5)
    step = conjugate_gradient(hvp, g)
    ```
    """
    params = [tf.convert_to_tensor(p) for p in params]
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            loss, kl, aux = objective(params)
        kl_grads = inner.gradient(kl, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    loss_grad = flatten(outer.gradient(loss, params,
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO))

    def hvp(vector):
        products = outer.gradient(kl_grads, params, output_gradients=unflatten(vector, params),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return flatten(products) + tf.cast(damping, vector.dtype) * vector

    return loss, kl, aux, loss_grad, hvp


def conjugate_gradient(matvec, b, iterations=10, residual_tol=1e-10):
    """Approximately solves `A x = b` for symmetric positive-definite A, in a graph loop.

    The conjugate-gradient iteration of rllab's `krylov.cg`, stopping after
    `iterations` products or once ‖r‖² < `residual_tol`.

    Args:
        matvec: `matvec(v) -> A v` for flat vectors.
        b: flat vector.
        iterations: the maximum number of products.
        residual_tol: squared residual norm to stop at.

    Returns:
        `x`, a flat vector.

    Example:

    ```python
    x = conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iterations=20)
    ```
    """
    b = tf.convert_to_tensor(b)

    def cond(i, x, r, p, rdotr):
        return (i < iterations) & (rdotr >= residual_tol)

    def body(i, x, r, p, rdotr):
        z = matvec(p)
        alpha = rdotr / tf.tensordot(p, z, 1)
        x = x + alpha * p
        r = r - alpha * z
        new_rdotr = tf.tensordot(r, r, 1)
        p = r + (new_rdotr / rdotr) * p
        return i + 1, x, r, p, new_rdotr

    _, x, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), tf.zeros_like(b), b, b, tf.tensordot(b, b, 1)),
        maximum_iterations=iterations)
    return x


def line_search(objective, params, full_step, loss_before, max_kl, backtrack_ratio=0.8,
                max_backtracks=15):
    """Backtracks `params − ratio^k · full_step` until the loss improves within the KL bound.

    The first k = 0, 1, ... (up to `max_backtracks` tries) whose loss is below
    `loss_before` and whose KL is at most `max_kl` (both finite) is accepted;
    if none is, the parameters are kept (rllab's `ConjugateGradientOptimizer`).
    Each try evaluates the objective afresh (for MAML-RL: re-adapts), in a
    graph loop.

    Args:
        objective: `objective(params) -> (loss, kl, aux)`.
        params: list of tensors, the current parameters.
        full_step: list of tensors shaped as `params` (the largest step).
        loss_before: the loss at `params`.
        max_kl: the trust region δ.
        backtrack_ratio: step shrink factor per try.
        max_backtracks: the number of tries.

    Returns:
        `(new_params, loss, kl, accepted, num_backtracks)`: `loss`/`kl` are
        those of the accepted step (of the last try when none was accepted),
        `num_backtracks` the k accepted (or `max_backtracks`).
    """
    params = [tf.convert_to_tensor(p) for p in params]
    dtype = loss_before.dtype

    def cond(k, accepted, loss, kl, new):
        return (k < max_backtracks) & tf.logical_not(accepted)

    def body(k, accepted, loss, kl, new):
        fraction = tf.pow(tf.cast(backtrack_ratio, dtype), tf.cast(k, dtype))
        candidate = [p - tf.cast(fraction, p.dtype) * s for p, s in zip(params, full_step)]
        loss, kl, _ = objective(candidate)
        ok = (tf.math.is_finite(loss) & tf.math.is_finite(kl) & (loss < loss_before)
              & (kl <= tf.cast(max_kl, kl.dtype)))
        return k + 1, ok, loss, kl, candidate

    k, accepted, loss, kl, candidate = tf.while_loop(
        cond, body,
        (tf.constant(0), tf.constant(False), loss_before, tf.zeros([], dtype), list(params)),
        maximum_iterations=max_backtracks)
    new_params = [tf.where(accepted, c, p) for c, p in zip(candidate, params)]
    num_backtracks = tf.where(accepted, k - 1, k)
    return new_params, loss, kl, accepted, num_backtracks


def trpo_step(objective, params, max_kl=0.01, cg_iterations=10, damping=1e-5,
              backtrack_ratio=0.8, max_backtracks=15, residual_tol=1e-10):
    """One TRPO step: natural-gradient direction by CG, scaled to the trust region, line search.

    The direction solves `(H + damping·I) d = ∇loss` with `cg_iterations` of
    conjugate gradient on Hessian-vector products of the KL (`second_order`:
    one forward, no recomputation per product); the full step is
    `sqrt(2 δ / (dᵀ(H + damping·I)d)) · d` with δ = `max_kl`, then
    `line_search`.

    Args:
        objective: `objective(params) -> (loss, kl, aux)`; `kl` must be the
            mean KL from the policy at `params` (zero there).
        params: list of tensors.
        max_kl: δ.
        cg_iterations: conjugate-gradient iterations.
        damping: CG damping.
        backtrack_ratio, max_backtracks: the line search.
        residual_tol: CG's stopping residual.

    Returns:
        `(new_params, TRPOInfo)`: `new_params` equal `params` when no step was
        accepted; `TRPOInfo.aux` is the objective's aux at `params`.

    Example:

    ```python
    new_params, info = trpo_step(objective, [tf.convert_to_tensor(v) for v in variables])
    for v, p in zip(variables, new_params):
        v.assign(p)
    ```
    """
    params = [tf.convert_to_tensor(p) for p in params]
    loss, _, aux, loss_grad, hvp = second_order(objective, params, damping)
    direction = conjugate_gradient(hvp, loss_grad, cg_iterations, residual_tol)
    curvature = tf.tensordot(direction, hvp(direction), 1)
    step_size = tf.sqrt(2.0 * tf.cast(max_kl, curvature.dtype) / (curvature + 1e-8))
    full_step = unflatten(step_size * direction, params)
    new_params, loss_after, kl_after, accepted, backtracks = line_search(
        objective, params, full_step, loss, max_kl, backtrack_ratio, max_backtracks)
    return new_params, TRPOInfo(loss, loss_after, kl_after, accepted, backtracks, step_size, aux)
