"""The Episode structure every task family yields, and the episode pipeline."""

import collections

import tensorflow as tf

__all__ = ["Episode", "episode_dataset", "step_seed"]


class Episode(collections.namedtuple("Episode", ["support_x", "support_y", "query_x", "query_y"])):
    """A meta-batch of tasks: support and query sets, each with a leading task axis.

    Attributes:
        support_x: `[num_tasks, support_size, ...]` inputs to adapt on.
        support_y: `[num_tasks, support_size, ...]` their targets.
        query_x: `[num_tasks, query_size, ...]` inputs to evaluate the adapted model on.
        query_y: `[num_tasks, query_size, ...]` their targets.
    """

    __slots__ = ()


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
