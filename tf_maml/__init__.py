"""tf_maml: Model-Agnostic Meta-Learning (Finn et al., 2017) for any Keras 3 model."""

from tf_maml import core, functional, losses, models, tasks
from tf_maml.core import adapt, broadcast_to_tasks, inner_step, meta_gradients
from tf_maml.functional import make_forward
from tf_maml.tasks import Episode

__version__ = "0.1.0"

__all__ = [
    "adapt", "broadcast_to_tasks", "inner_step", "meta_gradients", "make_forward", "Episode",
    "core", "functional", "losses", "models", "tasks",
]
