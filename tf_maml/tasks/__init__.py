"""Task families. Each yields `Episode`s from a stateless seed."""

from tf_maml.tasks.episodes import Episode, episode_dataset, step_seed
from tf_maml.tasks.sine import SineTasks

__all__ = ["Episode", "episode_dataset", "step_seed", "SineTasks"]
