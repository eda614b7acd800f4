"""Per-task losses and metrics: every function reduces all axes but the first.

Inputs are `[num_tasks, batch, ...]`; outputs are `[num_tasks]`, each task's
mean over its examples. This is the shape `tf_maml.core` expects of `loss_fn`.
"""

import tensorflow as tf

__all__ = ["mean_squared_error", "sparse_softmax_cross_entropy", "accuracy", "for_tasks"]


def _shape(tensor):
    return tensor.shape.as_list() if tensor.shape.rank is not None else "unknown"


def _mean_over_examples(values):
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def mean_squared_error(y_true, y_pred):
    """Each task's mean squared error.

    Args:
        y_true: `[num_tasks, batch, ...]` regression targets.
        y_pred: predictions of the same shape.

    Returns:
        `[num_tasks]` tensor.

    Raises:
        ValueError: shapes that differ where both are known (targets without
            the model's output axis would silently broadcast).
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    if not y_true.shape.is_compatible_with(y_pred.shape):
        hint = (" (regression targets need the model's output axis: y[..., None])"
                if y_true.shape.rank == (y_pred.shape.rank or 0) - 1 else "")
        raise ValueError(f"targets of shape {_shape(y_true)} do not match the predictions of "
                         f"shape {_shape(y_pred)}{hint}")
    return _mean_over_examples(tf.square(y_pred - y_true))


def sparse_softmax_cross_entropy(y_true, y_pred):
    """Each task's mean softmax cross-entropy.

    Args:
        y_true: `[num_tasks, batch]` integer class labels.
        y_pred: `[num_tasks, batch, num_classes]` logits.

    Returns:
        `[num_tasks]` tensor.

    Raises:
        ValueError: labels that are not `[num_tasks, batch]` (or
            `[num_tasks, batch, 1]`) beside the logits (one-hot labels, for
            example), where both shapes are known.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = _checked_labels(y_true, y_pred)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y_true, tf.int32), logits=y_pred)
    return _mean_over_examples(losses)


def _checked_labels(y_true, y_pred):
    """The labels, a trailing axis of 1 dropped (as Keras' sparse losses do), or a ValueError.

    `y_pred` must be a tensor (callers convert it).
    """
    y_true = tf.convert_to_tensor(y_true)
    if (y_true.shape.rank is not None and y_true.shape.rank == y_pred.shape.rank
            and y_true.shape[-1] == 1 and y_pred.shape[-1] != 1):
        y_true = tf.squeeze(y_true, -1)
    if not y_true.shape.is_compatible_with(y_pred.shape[:-1]):
        hint = (" (one-hot labels? pass class indices, e.g. argmax(y, -1))"
                if y_true.shape.rank == y_pred.shape.rank else "")
        raise ValueError(f"labels must be integer class indices of shape [num_tasks, batch] "
                         f"beside logits of shape {_shape(y_pred)}; got labels of shape "
                         f"{_shape(y_true)}{hint}")
    return y_true


def accuracy(y_true, y_pred):
    """Each task's classification accuracy.

    Args:
        y_true: `[num_tasks, batch]` integer class labels.
        y_pred: `[num_tasks, batch, num_classes]` logits.

    Returns:
        `[num_tasks]` tensor in [0, 1].
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = _checked_labels(y_true, y_pred)
    correct = tf.equal(tf.argmax(y_pred, axis=-1, output_type=tf.int32), tf.cast(y_true, tf.int32))
    return _mean_over_examples(tf.cast(correct, y_pred.dtype))


def for_tasks(tasks):
    """The loss, the reported metric and its name for a task family.

    Args:
        tasks: a task family (has `is_classification`).

    Returns:
        `(loss_fn, metric_fn, metric_name)`: cross-entropy and accuracy for
        classification, mean squared error for both in regression.
    """
    if tasks.is_classification:
        return sparse_softmax_cross_entropy, accuracy, "accuracy"
    return mean_squared_error, mean_squared_error, "mse"
