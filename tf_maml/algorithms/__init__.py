"""The MAML family, each a short layer over `tf_maml.core`.

| name      | what adapts, and how                      | outer update                  |
|-----------|-------------------------------------------|-------------------------------|
| `maml`    | every weight, SGD with α (1st/2nd order)  | Adam on the meta-gradient     |
| `anil`    | the head only; the body runs once per set | Adam on the meta-gradient     |
| `metasgd` | every weight, learned per-parameter α     | Adam on θ and α               |
| `mamlpp`  | all but BN weights, learned per-step α    | multi-step loss, cosine Adam  |
| `reptile` | every weight, SGD or Adam(β₁=0) on batches| θ ← θ + ε(φ̄ − θ)              |
"""

from tf_maml import config as config_lib
from tf_maml.algorithms.anil import ANIL
from tf_maml.algorithms.maml import MAML, MetaStepOutputs
from tf_maml.algorithms.mamlpp import MAMLPlusPlus
from tf_maml.algorithms.metasgd import MetaSGD
from tf_maml.algorithms.reptile import Reptile

__all__ = ["ALGORITHMS", "MAML", "ANIL", "MetaSGD", "MAMLPlusPlus", "Reptile", "MetaStepOutputs",
           "build"]

ALGORITHMS = {cls.name: cls for cls in (MAML, ANIL, MetaSGD, MAMLPlusPlus, Reptile)}
# `config.ALGORITHMS` (the names, for validating a Config without importing TensorFlow code)
# must list the same algorithms.
if tuple(ALGORITHMS) != config_lib.ALGORITHMS:
    raise ImportError(f"tf_maml.config.ALGORITHMS {config_lib.ALGORITHMS} does not list the "
                      f"algorithms of tf_maml.algorithms {tuple(ALGORITHMS)}")


def build(config, model, forward, loss_fn):
    """The algorithm a `Config` names, over a model, its forward and a per-task loss.

    Raises:
        ValueError: unknown `config.algorithm`.
    """
    common = dict(inner_lr=config.inner_lr, num_inner_steps=config.num_inner_steps,
                  first_order=config.first_order)
    if config.recompute_inner_steps:  # Config.validate refuses it for Reptile
        common["recompute_inner_steps"] = True
    name = config.algorithm
    if name == "mamlpp":
        return MAMLPlusPlus(model, forward, loss_fn, **common, msl_epochs=config.msl_epochs,
                            first_order_epochs=config.first_order_epochs,
                            iterations_per_epoch=config.iterations_per_epoch,
                            per_step_bn=config.per_step_bn, learn_inner_lr=config.learn_inner_lr,
                            min_meta_lr=config.min_meta_lr)
    if name == "reptile":
        return Reptile(model, forward, loss_fn, **common, inner_optimizer=config.inner_optimizer,
                       inner_batch_size=config.inner_batch_size,
                       eval_inner_batch_size=config.eval_inner_batch_size,
                       meta_step_size=config.meta_step_size,
                       meta_step_size_final=config.meta_step_size_final,
                       carry_inner_state=config.carry_inner_state)
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name](model, forward, loss_fn, **common)
