"""Sine-wave regression (MAML paper, section 5.1).

Each task is y = A·sin(x − φ) with amplitude A ~ U[0.1, 5.0], phase
φ ~ U[0, π], and inputs x ~ U[−5, 5]; a task's support and query sets are
K and Q points drawn independently from the same wave.
"""

import math

import tensorflow as tf

from tf_maml.tasks.episodes import Episode, check_positive_ints, checked_seed

__all__ = ["SineTasks"]


class SineTasks:
    """The sine-regression task distribution.

    Args:
        k_shot: support points per task (K).
        k_query: query points per task.
        amplitude_range: (low, high) of the uniform amplitude distribution.
        phase_range: (low, high) of the uniform phase distribution.
        input_range: (low, high) of the uniform input distribution.

    Example:

    ```python
    tasks = SineTasks(k_shot=10, k_query=10)
    episode = tasks.sample(tf.constant([0, 1], tf.int64), meta_batch_size=25)
    episode.support_x.shape  # [25, 10, 1]
    ```
    """

    is_classification = False
    input_shape = (1,)
    output_size = 1

    def __init__(self, k_shot=10, k_query=10, amplitude_range=(0.1, 5.0),
                 phase_range=(0.0, math.pi), input_range=(-5.0, 5.0)):
        check_positive_ints("SineTasks", k_shot=k_shot, k_query=k_query)
        self.k_shot = k_shot
        self.k_query = k_query
        self.amplitude_range = amplitude_range
        self.phase_range = phase_range
        self.input_range = input_range

    def sample_parameters(self, seed, num_tasks):
        """Draws (amplitude, phase), each `[num_tasks]`, from a stateless seed."""
        seeds = tf.random.experimental.stateless_split(seed, 2)
        amplitude = tf.random.stateless_uniform([num_tasks], seeds[0], *self.amplitude_range)
        phase = tf.random.stateless_uniform([num_tasks], seeds[1], *self.phase_range)
        return amplitude, phase

    @staticmethod
    def function(x, amplitude, phase):
        """Evaluates each task's wave at `x` (`[num_tasks, n, 1]`)."""
        return amplitude[:, None, None] * tf.sin(x - phase[:, None, None])

    def sample(self, seed, meta_batch_size, split="train", k_shot=None):
        """Samples a meta-batch of tasks as an `Episode`.

        Args:
            seed: int64 tensor of shape [2] (see `tf_maml.tasks.step_seed`).
            meta_batch_size: number of tasks.
            split: ignored (every sine task comes from the same distribution;
                held-out tasks come from other seeds).
            k_shot: support points per task, if not the family's `k_shot`.

        Returns:
            An `Episode` of float32 tensors, x and y of shape `[tasks, points, 1]`.
        """
        seed = checked_seed(seed, meta_batch_size)
        param_seed, support_seed, query_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3))
        amplitude, phase = self.sample_parameters(param_seed, meta_batch_size)
        support_x = tf.random.stateless_uniform(
            [meta_batch_size, self.k_shot if k_shot is None else k_shot, 1], support_seed,
            *self.input_range)
        query_x = tf.random.stateless_uniform(
            [meta_batch_size, self.k_query, 1], query_seed, *self.input_range)
        return Episode(support_x, self.function(support_x, amplitude, phase),
                       query_x, self.function(query_x, amplitude, phase))
