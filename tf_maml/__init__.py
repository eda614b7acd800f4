"""tf_maml: Model-Agnostic Meta-Learning (Finn et al., 2017) and its family for any Keras 3 model."""

import os as _os
import platform as _platform
import sys as _sys


def _default_onednn():
    """Turns TensorFlow's oneDNN CPU kernels on for this process, where TensorFlow would not.

    The layer-batched path runs a meta-batch's convolutions as one grouped
    convolution, whose gradients TensorFlow's CPU has only in its oneDNN
    kernels. TensorFlow turns those on by default on x86-64 CPUs with AVX-512
    VNNI, BF16 or AMX only; elsewhere (AVX2 CPUs: most AMD EPYC and desktop
    parts) convolutional models would take the per-task path, slower. Sets
    `TF_ENABLE_ONEDNN_OPTS=1` on x86-64 when the variable is unset and
    TensorFlow is not imported yet (TensorFlow reads it once, at import);
    `TF_ENABLE_ONEDNN_OPTS=0` keeps them off.
    """
    if "tensorflow" in _sys.modules or "TF_ENABLE_ONEDNN_OPTS" in _os.environ:
        return
    if _platform.machine().lower() in ("x86_64", "amd64"):
        _os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"


_default_onednn()

# The imports below load TensorFlow: after _default_onednn.
from tf_maml import algorithms, core, functional, losses, models, tasks  # noqa: E402
from tf_maml.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile  # noqa: E402
from tf_maml.core import (SGD, Adam, adapt, broadcast_to_tasks, inner_step,  # noqa: E402
                          meta_gradients, supervised_loss)
from tf_maml.functional import make_forward  # noqa: E402
from tf_maml.keras_face import Episodes, MetaLearner  # noqa: E402
from tf_maml.tasks import Episode  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "adapt", "broadcast_to_tasks", "inner_step", "meta_gradients", "supervised_loss", "SGD", "Adam",
    "make_forward", "Episode", "MetaLearner", "Episodes", "MAML", "ANIL", "MetaSGD",
    "MAMLPlusPlus", "Reptile",
    "algorithms", "core", "functional", "losses", "models", "tasks",
]
