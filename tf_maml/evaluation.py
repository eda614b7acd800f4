"""Evaluation: metrics after each inner step on held-out tasks, with 95% CIs, and plots."""

import math
import operator

import numpy as np
import tensorflow as tf

from tf_maml import core, files
from tf_maml.tasks import SPLIT_OF_STREAM, step_seed

__all__ = ["adaptation_curve", "make_curve_fn", "evaluate_model", "summarize", "format_table",
           "plot_curves", "plot_validation_history", "plot_sine_fits", "batch_size_for",
           "EVAL_BATCH_SIZE"]

# Tasks evaluated per call: bounds memory for large models; sine uses bigger batches.
EVAL_BATCH_SIZE = 100


def _predict_each_alone(algorithm, params, weights, support_x, query_x, step):
    """Predicts every query example in a batch of its own beside the support set.

    The non-transductive protocol: batch normalization sees the support set and
    that one query example, never the other query examples.
    """
    num_queries = query_x.shape[1]
    num_tasks = tf.shape(query_x)[0]
    repeated = [tf.repeat(w, num_queries, axis=0) for w in weights]
    support = tf.repeat(support_x, num_queries, axis=0)                    # [T*Q, S, ...]
    query = tf.reshape(query_x, tf.concat([[-1, 1], tf.shape(query_x)[2:]], 0))  # [T*Q, 1, ...]
    predictions = algorithm.predict(params, repeated, tf.concat([support, query], 1), step)
    last = predictions[:, -1]
    return tf.reshape(last, tf.concat([[num_tasks, num_queries], tf.shape(last)[1:]], 0))


def _curve(algorithm, params, episode, metric_fn, num_steps, inner_lr, transductive,
           keep_predictions, with_support=False):
    """The metrics (and optionally predictions) after 0..`num_steps` steps, in a graph loop.

    Step 0 is evaluated before the loop; steps 1..`num_steps` run in one
    `tf.while_loop` (the step index is a tensor there) whose per-step results
    go to `TensorArray`s, so the graph has the same size for 3 steps or 3000.
    Nothing differentiates through the steps (first order).
    """
    try:
        num_steps = operator.index(num_steps)
    except TypeError:
        raise ValueError(f"num_steps must be a Python int, got {num_steps!r}") from None
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    num_tasks = tf.shape(episode.support_x)[0]
    support = algorithm.task_inputs(params, episode.support_x)
    query = algorithm.task_inputs(params, episode.query_x) if transductive else None
    weights = algorithm.initial_weights(params, num_tasks)
    update = algorithm.inner_update(params, inner_lr)
    task_loss = algorithm.task_loss(params, support, episode.support_y)

    def predict(weights, step):
        if transductive and with_support:
            # One batch of the support and query sets.
            both = tf.concat([episode.support_x, episode.query_x], 1)
            support_size = tf.shape(episode.support_x)[1]
            return algorithm.predict(params, weights, both, step)[:, support_size:]
        if transductive:
            return algorithm.predict_from_inputs(params, weights, query, step)
        return _predict_each_alone(algorithm, params, weights, episode.support_x,
                                   episode.query_x, step)

    def record(arrays, index, prediction):
        """Writes the metrics (and the predictions, if kept) of one step at `index`."""
        values = (metric_fn(episode.query_y, prediction), prediction)
        return tuple(array.write(index, value) for array, value in zip(arrays, values))

    # Step 0, before the loop, also gives the TensorArrays their dtypes and shapes.
    prediction = predict(weights, 0)
    metric = metric_fn(episode.query_y, prediction)
    arrays = (tf.TensorArray(metric.dtype, size=num_steps + 1, element_shape=metric.shape),)
    if keep_predictions:
        arrays += (tf.TensorArray(prediction.dtype, size=num_steps + 1,
                                  element_shape=prediction.shape),)
    arrays = tuple(array.write(0, value) for array, value in zip(arrays, (metric, prediction)))
    if num_steps:
        state = update.init(weights)

        def body(step, weights, flat_state, arrays):
            # Inner step `step` (0-based) moves the weights, evaluated as after step + 1.
            weights, state_now, _ = core.inner_step(
                task_loss, list(weights), update, tf.nest.pack_sequence_as(state, flat_state),
                step, first_order=True)
            return (step + 1, weights, tf.nest.flatten(state_now),
                    record(arrays, step + 1, predict(weights, step + 1)))

        _, _, _, arrays = tf.while_loop(
            lambda step, *_: step < num_steps, body,
            (tf.constant(0), list(weights), tf.nest.flatten(state), arrays))
    metrics = arrays[0].stack()
    if not keep_predictions:
        return metrics, None
    return metrics, tf.unstack(arrays[1].stack(), num=num_steps + 1)


def adaptation_curve(algorithm, params, episode, metric_fn, num_steps, inner_lr=None,
                     transductive=True, transductive_support=False):
    """Query metrics of every task after 0, 1, ..., `num_steps` inner steps.

    The steps run in a graph loop (`tf.while_loop`, the per-step results in
    `TensorArray`s): building the graph costs the same for 3 steps or 3000.
    The results equal those of unrolling the steps one by one.

    Args:
        algorithm: a `tf_maml.algorithms` algorithm (how weights adapt and predict).
        params: its meta-parameters (`algorithm.meta_variables` or tensors).
        episode: an `Episode` of held-out tasks.
        metric_fn: per-task metric reported on the query set.
        num_steps: Python int.
        inner_lr: a scalar step size replacing the algorithm's own rates
            (`None`: the algorithm's, learned ones included).
        transductive: predict each task's query set as one batch; false
            predicts every query example alone beside the support set.
        transductive_support: with `transductive`, the batch also holds the
            support set (batch normalization sees the support and query sets
            together).

    Returns:
        `(metrics, predictions)`: `metrics` is `[num_steps + 1, num_tasks]`;
        `predictions` is a list of the query predictions after each step.
    """
    return _curve(algorithm, params, episode, metric_fn, num_steps, inner_lr, transductive,
                  keep_predictions=True, with_support=transductive_support)


def make_curve_fn(algorithm, metric_fn, num_steps, inner_lr=None, transductive=True,
                  jit_compile=False, transductive_support=False):
    """A compiled `fn(params, episode) -> [num_steps + 1, num_tasks]` metrics.

    The steps are a graph loop (see `adaptation_curve`); predictions are not kept.
    """

    @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
    def curve(params, episode):
        metrics, _ = _curve(algorithm, params, episode, metric_fn, num_steps, inner_lr,
                            transductive, keep_predictions=False,
                            with_support=transductive_support)
        return metrics

    return curve


def batch_size_for(config):
    """Tasks per evaluation call for a run: memory grows with the task size."""
    return min(EVAL_BATCH_SIZE, 4 * config.meta_batch_size)


def evaluate_model(curve_fn, params, tasks, seed, num_tasks, stream, batch_size=None):
    """Per-task metrics over `num_tasks` held-out tasks.

    Args:
        curve_fn: from `make_curve_fn`.
        params: the initialization θ.
        tasks: task family with `sample(seed, n, split)`.
        seed: the run's seed; tasks come from `stream`, so every model evaluated
            with the same seed sees the same tasks.
        num_tasks: how many tasks.
        stream: sampling stream (validation or test); also picks the split.
        batch_size: tasks per call (default `EVAL_BATCH_SIZE`).

    Returns:
        numpy array `[num_steps + 1, num_tasks]`.
    """
    batch_size = batch_size or EVAL_BATCH_SIZE
    params = [tf.convert_to_tensor(p) for p in params]
    chunks = []
    for index, start in enumerate(range(0, num_tasks, batch_size)):
        episode = tasks.sample(step_seed(seed, index, stream),
                               min(batch_size, num_tasks - start), SPLIT_OF_STREAM[stream])
        chunks.append(curve_fn(params, episode).numpy())
    return np.concatenate(chunks, axis=1)


def summarize(per_task):
    """Mean and 95% confidence half-width (1.96·s/√n, s the sample std) of each row.

    Args:
        per_task: `[num_steps + 1, num_tasks]` metrics.

    Returns:
        `(mean, ci95)`, numpy arrays `[num_steps + 1]`; the half-width is NaN
        for a single task (no spread to estimate).
    """
    per_task = np.asarray(per_task, dtype=np.float64)
    n = per_task.shape[1]
    if n < 2:
        return per_task.mean(axis=1), np.full(per_task.shape[0], np.nan)
    with np.errstate(invalid="ignore", over="ignore"):  # a diverged model: NaN, not a warning
        return per_task.mean(axis=1), 1.96 * per_task.std(axis=1, ddof=1) / math.sqrt(n)


def format_table(metric_name, results):
    """A plain-text table: one row per inner step, one column per model.

    Args:
        metric_name: e.g. "mse" or "accuracy".
        results: dict model name -> (mean, ci95) arrays (a NaN interval beside a
            finite mean, from one task, reads "n/a").

    Returns:
        str.
    """
    names = list(results)
    header = f"{'steps':>5} | " + " | ".join(f"{name + ' ' + metric_name:>22}" for name in names)
    lines = [header, "-" * len(header)]
    for step in range(len(next(iter(results.values()))[0])):
        cells = []
        for name in names:
            mean, ci = results[name]
            # One task has no interval (its NaN is not a failure, as a NaN mean is).
            interval = ("n/a" if math.isfinite(mean[step]) and not math.isfinite(ci[step])
                        else f"{ci[step]:.4f}")
            cells.append(f"{mean[step]:>13.4f} ± {interval:<6}")
        lines.append(f"{step:>5} | " + " | ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def _json_safe(value):
    """`value` with every NaN or infinite float replaced by `None` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path, metric_name, results, extra=None):
    """Writes results (dict name -> (mean, ci95)) as JSON.

    The file is strict JSON: a NaN or infinite metric (a diverged model) is
    written as `null`, and the payload's "non_finite" says so; so is the
    interval of a single task (no spread to estimate).
    """
    payload = {"metric": metric_name, **(extra or {})}
    payload["results"] = {name: {"mean": [float(x) for x in mean], "ci95": [float(x) for x in ci]}
                          for name, (mean, ci) in results.items()}
    non_finite = sorted(name for name, (mean, _) in results.items()
                        if not np.all(np.isfinite(mean)))
    if non_finite:
        payload["non_finite"] = {
            "models": non_finite,
            "note": "null: the metric was not finite (NaN or infinite): the model or its "
                    "adaptation diverged"}
    files.write_json(path, _json_safe(payload), indent=2, allow_nan=False)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(plt, fig, ax, path, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, framealpha=0.6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.replaced_atomically(path, keep_extension=True) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def plot_curves(path, metric_name, results, title):
    """Plots metric vs. inner steps with 95% CI bands (the paper's Fig. 3)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, (mean, ci) in results.items():
        steps = np.arange(len(mean))
        ax.plot(steps, mean, marker="o", label=name)
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # whole steps only
    return _finish(plt, fig, ax, path, "number of gradient steps", metric_name, title)


def plot_validation_history(path, metric_name, history, title):
    """Plots validation metrics against meta-training iterations.

    Args:
        path: PNG path.
        metric_name: e.g. "accuracy".
        history: dict label -> list of (step, value).
        title: plot title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, points in sorted(history.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker=".", label=label.replace("_", " "))
    return _finish(plt, fig, ax, path, "meta-training iteration", metric_name, title)


def plot_sine_fits(path, panels, support_x, support_y, grid_x, truth, steps_shown):
    """Plots one sine task as in the paper's Fig. 2.

    Args:
        path: PNG path.
        panels: dict title -> list of predictions on `grid_x` after each step.
        support_x, support_y: the K points used for adaptation.
        grid_x, truth: the dense input grid and the true function on it.
        steps_shown: which step indices to draw (e.g. (0, 1, 10)).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, predictions) in zip(axes[0], panels.items()):
        ax.plot(grid_x, truth, color="tab:red", label="ground truth")
        for i, step in enumerate(steps_shown):
            label = "pre-update" if step == 0 else f"{step} grad step{'s' if step > 1 else ''}"
            ax.plot(grid_x, predictions[step], linestyle=":" if step == 0 else "--",
                    color=plt.cm.Greens(0.4 + 0.6 * i / max(1, len(steps_shown) - 1)), label=label)
        ax.scatter(support_x, support_y, marker="^", color="tab:purple", zorder=5,
                   label="used for grad")
        ax.set_title(title)
        ax.set_xlim(grid_x.min(), grid_x.max())
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with files.replaced_atomically(path, keep_extension=True) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
