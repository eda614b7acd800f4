"""Per-task losses and metrics: every function reduces all axes but the first.

Inputs are `[num_tasks, batch, ...]`; outputs are `[num_tasks]`, each task's
mean over its examples. This is the shape `tf_maml.core` expects of `loss_fn`.
"""

import tensorflow as tf

__all__ = ["mean_squared_error", "sparse_softmax_cross_entropy", "accuracy", "for_tasks"]


def _mean_over_examples(values):
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def mean_squared_error(y_true, y_pred):
    """Each task's mean squared error.

    Args:
        y_true: `[num_tasks, batch, ...]` regression targets.
        y_pred: predictions of the same shape.

    Returns:
        `[num_tasks]` tensor.
    """
    y_true = tf.cast(y_true, y_pred.dtype)
    return _mean_over_examples(tf.square(y_pred - y_true))


def sparse_softmax_cross_entropy(y_true, y_pred):
    """Each task's mean softmax cross-entropy.

    Args:
        y_true: `[num_tasks, batch]` integer class labels.
        y_pred: `[num_tasks, batch, num_classes]` logits.

    Returns:
        `[num_tasks]` tensor.
    """
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y_true, tf.int32), logits=y_pred)
    return _mean_over_examples(losses)


def accuracy(y_true, y_pred):
    """Each task's classification accuracy.

    Args:
        y_true: `[num_tasks, batch]` integer class labels.
        y_pred: `[num_tasks, batch, num_classes]` logits.

    Returns:
        `[num_tasks]` tensor in [0, 1].
    """
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
