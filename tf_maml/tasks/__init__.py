"""Task families. Each yields `Episode`s from a stateless seed: `sample(seed, n, split)`."""

import os

from tf_maml.tasks.episodes import Episode, episode_dataset, step_seed
from tf_maml.tasks.classification import ImageClassTasks
from tf_maml.tasks.sine import SineTasks

__all__ = ["Episode", "episode_dataset", "step_seed", "SineTasks", "ImageClassTasks", "build", "TRAIN", "VALIDATION",
           "TEST"]

# Sampling streams: disjoint random sequences for training, validation and test,
# and the data split each samples from.
TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_OF_STREAM = {TRAIN: "train", VALIDATION: "val", TEST: "test"}


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
