"""Meta-reinforcement learning (MAML paper §5.3): MAML with policy gradients, in TensorFlow.

| module          | what it holds                                                        |
|-----------------|----------------------------------------------------------------------|
| `navigation`    | `Navigation2D`: batched 2D point navigation (goal per task)          |
| `locomotion`    | `HalfCheetahGoals`: goal velocity/direction on Gymnasium + MuJoCo    |
| `goal_observed` | `GoalObserved`: the oracle's view, observations ending with the goal |
| `policy`        | `gaussian_mlp_policy`, `GaussianPolicy`, Gaussian log-prob and KL    |
| `sampler`       | `sample_trajectories`: every task's rollouts in one graph loop       |
| `advantages`    | returns, the linear feature baseline, GAE, per-task normalization    |
| `objectives`    | `reinforce_loss` (a `core` task loss closure), TRPO surrogate and KL |
| `trpo`          | generic TRPO: one-forward Hessian-vector products, CG, line search   |
| `maml_rl`       | `MAMLRL`: a whole meta-iteration in one `tf.function`, evaluation    |
| `serving`       | the policy export (`tf_maml.rl.serving`, imported on its own)        |

The inner loop is `tf_maml.core.adapt` on the REINFORCE loss closure; nothing
here re-implements it.
"""

from tf_maml.rl import (advantages, goal_observed, locomotion, navigation, objectives, policy,
                        sampler, trpo)
from tf_maml.rl.advantages import (discount_cumsum, discounted_returns, fit_linear_baseline,
                                   gae_advantages, normalize_advantages,
                                   predict_linear_baseline, process_trajectories)
from tf_maml.rl.goal_observed import GoalObserved
from tf_maml.rl.locomotion import HalfCheetahGoals
from tf_maml.rl.maml_rl import MAMLRL, MetaBatch
from tf_maml.rl.navigation import Navigation2D
from tf_maml.rl.objectives import reinforce_loss, surrogate_and_kl
from tf_maml.rl.policy import GaussianPolicy, gaussian_mlp_policy, kl_divergence, log_prob
from tf_maml.rl.sampler import (Trajectories, average_return, keep_within_budget,
                                 sample_trajectories)
from tf_maml.rl.trpo import conjugate_gradient, line_search, second_order, trpo_step

__all__ = [
    "MAMLRL", "MetaBatch", "Navigation2D", "HalfCheetahGoals", "GoalObserved", "GaussianPolicy",
    "gaussian_mlp_policy", "log_prob",
    "kl_divergence", "Trajectories", "sample_trajectories", "keep_within_budget", "average_return",
    "discount_cumsum",
    "discounted_returns", "gae_advantages", "fit_linear_baseline", "predict_linear_baseline",
    "normalize_advantages", "process_trajectories", "reinforce_loss", "surrogate_and_kl",
    "conjugate_gradient", "line_search", "second_order", "trpo_step",
    "advantages", "goal_observed", "locomotion", "navigation", "objectives", "policy", "sampler", "trpo",
]
