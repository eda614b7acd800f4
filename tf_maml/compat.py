"""The one place where tf_maml touches private TensorFlow / Keras internals.

Some things tf_maml needs have no public API. Every such use goes through a
small function here, so that

- the rest of the package only calls documented APIs and these functions;
- a TensorFlow or Keras upgrade that renames an internal breaks one function,
  whose test (tests/test_faults.py, tests/test_distribute.py) says so directly,
  rather than failing somewhere deep in training;
- each function documents what it relies on and what it returns when the
  internal is missing.

Add a function here (with a test of what it returns) rather than reaching into
`_private` attributes elsewhere.
"""

__all__ = ["cluster_resolver"]


def cluster_resolver(strategy):
    """The cluster resolver of a multi-worker `tf.distribute` strategy, or `None`.

    Relies on `strategy.extended._cluster_resolver` (set by
    `MultiWorkerMirroredStrategy`, TF 2.x; there is no public accessor).

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        A `tf.distribute.cluster_resolver.ClusterResolver` with `task_type`,
        `task_id` and `cluster_spec()` for multi-worker strategies; `None` for
        strategies without one (the default strategy, `MirroredStrategy`) or if
        TensorFlow no longer has the attribute.
    """
    return getattr(strategy.extended, "_cluster_resolver", None)
