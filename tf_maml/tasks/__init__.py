"""Task families. Each yields `Episode`s from a stateless seed: `sample(seed, n, split)`."""

import os

from tf_maml.tasks.episodes import Episode, episode_dataset, step_seed
from tf_maml.tasks.classification import ImageClassTasks
from tf_maml.tasks.sine import SineTasks

__all__ = ["Episode", "episode_dataset", "step_seed", "SineTasks", "ImageClassTasks", "TaskSpec",
           "spec", "build", "TRAIN", "VALIDATION", "TEST"]

# Sampling streams: disjoint random sequences for training, validation and test,
# and the data split each samples from.
TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_OF_STREAM = {TRAIN: "train", VALIDATION: "val", TEST: "test"}


class TaskSpec:
    """What a model needs to know of a task family, without its data.

    Attributes:
        input_shape: shape of one input example.
        output_size: outputs (regression) or classes N (classification).
        is_classification: integer labels and accuracy, or regression targets.
    """

    def __init__(self, input_shape, output_size, is_classification):
        self.input_shape = tuple(input_shape)
        self.output_size = output_size
        self.is_classification = is_classification


def spec(config):
    """The `TaskSpec` of a `Config`'s task family, known without loading any data.

    Export and restoring a model use it, so they never need the data set.

    Raises:
        ValueError: unknown dataset.
    """
    if config.dataset == "sine":
        return TaskSpec(SineTasks.input_shape, SineTasks.output_size, False)
    if config.dataset == "omniglot":
        from tf_maml.tasks import omniglot
        return TaskSpec((omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE, 1), config.n_way, True)
    if config.dataset == "miniimagenet":
        from tf_maml.tasks import miniimagenet
        return TaskSpec((miniimagenet.IMAGE_SIZE, miniimagenet.IMAGE_SIZE, 3), config.n_way, True)
    raise ValueError(f"unknown dataset {config.dataset!r}")


def build(config):
    """The task family a `Config` names.

    Raises:
        ValueError: unknown dataset.
    """
    if config.dataset == "sine":
        return SineTasks(k_shot=config.k_shot, k_query=config.k_query)
    cache_dir = os.path.expanduser(config.cache_dir) if config.cache_dir else None
    if config.dataset == "omniglot":
        from tf_maml.tasks import omniglot
        return omniglot.omniglot_tasks(
            config.n_way, config.k_shot, config.k_query, data_dir=config.data_dir or None,
            cache_dir=cache_dir, split=config.omniglot_split, split_seed=config.split_seed,
            rotate_train=config.augment_rotations)
    if config.dataset == "miniimagenet":
        from tf_maml.tasks import miniimagenet
        return miniimagenet.miniimagenet_tasks(config.n_way, config.k_shot, config.k_query,
                                               config.data_dir, cache_dir=cache_dir)
    raise ValueError(f"unknown dataset {config.dataset!r}")
