"""tf_maml: Model-Agnostic Meta-Learning (Finn et al., 2017) and its family for any Keras 3 model."""

from tf_maml import algorithms, core, functional, losses, models, tasks
from tf_maml.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile
from tf_maml.core import (SGD, Adam, adapt, broadcast_to_tasks, inner_step, meta_gradients,
                          supervised_loss)
from tf_maml.functional import make_forward
from tf_maml.keras_face import Episodes, MetaLearner
from tf_maml.tasks import Episode

__version__ = "0.2.0"

__all__ = [
    "adapt", "broadcast_to_tasks", "inner_step", "meta_gradients", "supervised_loss", "SGD", "Adam",
    "make_forward", "Episode", "MetaLearner", "Episodes", "MAML", "ANIL", "MetaSGD",
    "MAMLPlusPlus", "Reptile",
    "algorithms", "core", "functional", "losses", "models", "tasks",
]
