"""The Episode structure every task family yields, and the episode pipeline."""

import collections

import numpy as np
import tensorflow as tf

__all__ = ["Episode", "checked_seed", "episode_dataset", "step_seed"]


class Episode(collections.namedtuple("Episode", ["support_x", "support_y", "query_x", "query_y"])):
    """A meta-batch of tasks: support and query sets, each with a leading task axis.

    Attributes:
        support_x: `[num_tasks, support_size, ...]` inputs to adapt on.
        support_y: `[num_tasks, support_size, ...]` their targets.
        query_x: `[num_tasks, query_size, ...]` inputs to evaluate the adapted model on.
        query_y: `[num_tasks, query_size, ...]` their targets.
    """

    __slots__ = ()


def checked_seed(seed, meta_batch_size=None):
    """`seed` as the int64 `[2]` tensor every `sample` takes, or a one-line `ValueError`.

    Args:
        seed: two integers: a tensor, list, tuple or numpy array of shape [2]
            (e.g. `step_seed(seed, step)`, or `[seed, step]`).
        meta_batch_size: checked too, when given: a positive int (or an int tensor).

    Returns:
        An int64 tensor of shape [2].

    Raises:
        ValueError: a seed of another shape or a non-integer dtype (a plain
            int among them), or a meta-batch size below 1.
    """
    try:
        seed = tf.convert_to_tensor(seed)
    except (TypeError, ValueError):
        seed = None
    if (seed is None or not seed.dtype.is_integer or seed.shape.rank not in (None, 1)
            or (seed.shape.rank == 1 and seed.shape[0] not in (None, 2))):
        raise ValueError("seed must be two integers, the stateless seed of the meta-batch "
                         "(tf_maml.tasks.step_seed(seed, step), or [seed, step]); got "
                         f"{_describe(seed)}")
    if isinstance(meta_batch_size, (int, float)) and (
            isinstance(meta_batch_size, bool) or int(meta_batch_size) != meta_batch_size
            or meta_batch_size < 1):
        raise ValueError(f"meta_batch_size must be a positive integer, got {meta_batch_size!r}")
    return tf.cast(seed, tf.int64)


def check_positive_ints(name, **sizes):
    """Raises a one-line `ValueError` unless every value is an int >= 1 (not a bool).

    Args:
        name: the task family, for the message.
        **sizes: e.g. `n_way=5, k_shot=1`.
    """
    for what, value in sizes.items():
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                or value < 1):
            raise ValueError(f"{name}: {what} must be a positive integer, got {value!r}")


def _describe(seed):
    if seed is None:
        return "a value that is not a tensor"
    shape = seed.shape.as_list() if seed.shape.rank is not None else "unknown"
    return f"{seed.dtype.name} of shape {shape}"


def step_seed(seed, step, stream=0):
    """The stateless RNG seed of one meta-batch: a function of (seed, stream, step).

    Sampling is a pure function of this seed, so a resumed run sees exactly the
    episodes an uninterrupted run would, and streams (training, validation,
    evaluation) never overlap.

    Args:
        seed: the run's integer seed.
        step: int or int64 tensor, the meta-iteration.
        stream: int, 0 for training; other values for held-out sampling.

    Returns:
        An int64 tensor of shape [2] for `tf.random.stateless_*` ops.
    """
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))


def episode_dataset(sample_fn, seed, start_step, num_steps, stream=0):
    """A prefetching `tf.data.Dataset` of episodes for steps [start_step, num_steps).

    Args:
        sample_fn: `sample_fn(seed_tensor) -> Episode`, a pure function of its seed.
        seed: the run's integer seed.
        start_step: first step to produce (a resumed run starts where it stopped).
        num_steps: one past the last step.
        stream: sampling stream (see `step_seed`).

    Returns:
        A dataset of `(step, Episode)` pairs.
    """
    @tf.autograph.experimental.do_not_convert
    def sample(step):
        return step, sample_fn(step_seed(seed, step, stream))

    steps = tf.data.Dataset.range(start_step, num_steps)
    dataset = steps.map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
