"""Benchmark: MAML-TRPO meta-iterations per second on 2D navigation, and where the time goes.

    python bench/rl_navigation.py                          # the paper's recipe
    python bench/rl_navigation.py --outer=adam --repeats=3
    python bench/rl_navigation.py --first_order

The recipe: meta-batch 20 tasks, 20 episodes per task and per sampling,
horizon 100, a 100-100 ReLU Gaussian policy, one inner step, TRPO (max KL
0.01, 10 CG iterations, 15 line-search steps). A meta-iteration is what
`MAMLRL.make_train_step()` runs: sampling with θ, baselines, the inner step,
sampling with the adapted policies, the outer step, all in one
`tf.function`. Two parts are also timed alone, each compiled on its own:

* sampling: tasks, rollouts before and after adaptation (with the sampling
  pass's inner step), baselines and advantages (`MAMLRL.sample`);
* outer step: the TRPO step (or Adam meta-gradient) on a fixed sampled
  meta-batch (`trpo_step` on `MAMLRL.outer_objective`).

Shares are each part's median time over the full iteration's median time (they
need not add up to exactly 100%).
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tf_maml import core  # noqa: E402
from tf_maml.rl import MAMLRL, Navigation2D, gaussian_mlp_policy, trpo  # noqa: E402

flags.DEFINE_integer("meta_batch_size", 20, "Tasks per meta-iteration.")
flags.DEFINE_integer("fast_batch_size", 20, "Episodes per task and sampling.")
flags.DEFINE_integer("horizon", 100, "Steps per episode.")
flags.DEFINE_list("hidden", ["100", "100"], "Hidden layer widths of the policy.")
flags.DEFINE_float("inner_lr", 0.1, "Inner step size.")
flags.DEFINE_integer("num_inner_steps", 1, "Inner steps.")
flags.DEFINE_bool("first_order", False, "First-order MAML.")
flags.DEFINE_enum("outer", "trpo", ["trpo", "adam"], "Outer update.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of each part (median reported).")
FLAGS = flags.FLAGS


def _median_seconds(fn, repeats):
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn(i + 1))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    env = Navigation2D(horizon=FLAGS.horizon)
    policy = gaussian_mlp_policy(2, 2, tuple(int(h) for h in FLAGS.hidden))
    algorithm = MAMLRL(env, policy, meta_batch_size=FLAGS.meta_batch_size,
                       fast_batch_size=FLAGS.fast_batch_size, inner_lr=FLAGS.inner_lr,
                       num_inner_steps=FLAGS.num_inner_steps, first_order=FLAGS.first_order,
                       outer=FLAGS.outer)
    train_step = algorithm.make_train_step()

    @tf.function
    def sample(iteration):
        task_seed, rollout_seed = algorithm.iteration_seeds(iteration)
        tasks = env.sample_tasks(algorithm.meta_batch_size, task_seed)
        params = [tf.convert_to_tensor(v) for v in algorithm.meta_variables]
        return algorithm.sample(params, tasks, rollout_seed)

    @tf.function
    def outer_step(meta_batch):
        params = [tf.convert_to_tensor(v) for v in algorithm.meta_variables]
        objective = algorithm.outer_objective(meta_batch)
        if algorithm.outer == "trpo":
            new_params, info = trpo.trpo_step(
                objective, params, algorithm.max_kl, algorithm.cg_iterations,
                algorithm.cg_damping, algorithm.backtrack_ratio, algorithm.max_backtracks)
            return new_params, info.num_backtracks
        return core.meta_gradients(lambda ps: (objective(ps)[0], ()), params)[:2]

    def iteration(i):
        return tf.constant(i, tf.int64)

    start = time.perf_counter()
    train_step(iteration(0))
    trace_full = time.perf_counter() - start
    fixed = sample(iteration(0))
    outer_step(fixed)
    full = _median_seconds(lambda i: train_step(iteration(i)), FLAGS.repeats)
    sampling = _median_seconds(lambda i: sample(iteration(i)), FLAGS.repeats)
    outer = _median_seconds(lambda i: outer_step(fixed), FLAGS.repeats)

    steps = FLAGS.meta_batch_size * FLAGS.fast_batch_size * FLAGS.horizon * (
        FLAGS.num_inner_steps + 1)
    order = "first" if FLAGS.first_order else "second"
    print(f"MAML-{FLAGS.outer.upper()} 2D navigation ({order} order): meta-batch "
          f"{FLAGS.meta_batch_size}, {FLAGS.fast_batch_size} episodes x {FLAGS.horizon} steps, "
          f"policy {'-'.join(FLAGS.hidden)} ReLU, {FLAGS.num_inner_steps} inner step(s); "
          f"{os.cpu_count()} CPU cores visible")
    print(f"  first iteration (trace + run): {trace_full:.1f} s")
    print(f"  meta-iteration:  {full:7.3f} s  ->  {1 / full:.3f} meta-iterations/s, "
          f"{steps / full:,.0f} env steps/s")
    print(f"  sampling:        {sampling:7.3f} s  ({100 * sampling / full:.0f}% of an iteration)")
    print(f"  {FLAGS.outer} step:{' ' * (11 - len(FLAGS.outer))}{outer:7.3f} s  "
          f"({100 * outer / full:.0f}% of an iteration)")


if __name__ == "__main__":
    app.run(main)
