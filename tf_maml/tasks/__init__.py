"""Task families. Each yields `Episode`s from a stateless seed."""

from tf_maml.tasks.episodes import Episode, episode_dataset, step_seed
from tf_maml.tasks.sine import SineTasks

__all__ = ["Episode", "episode_dataset", "step_seed", "SineTasks", "build", "TRAIN", "VALIDATION",
           "TEST"]

# Sampling streams: disjoint random sequences for training, validation and test.
TRAIN, VALIDATION, TEST = 0, 1, 2


def build(config):
    """The task family a `Config` names.

    Raises:
        ValueError: unknown dataset.
    """
    if config.dataset == "sine":
        return SineTasks(k_shot=config.k_shot, k_query=config.k_query)
    raise ValueError(f"unknown dataset {config.dataset!r}")
