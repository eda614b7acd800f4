"""Benchmark: seconds per MAML-RL meta-iteration of a flagfile's recipe, and where the time goes.

    python bench/rl_meta_iteration.py --flagfile=flags/rl_navigation.flags
    python bench/rl_meta_iteration.py --flagfile=flags/rl_navigation.flags --outer_optimizer=adam
    python bench/rl_meta_iteration.py --flagfile=flags/rl_cheetah_vel.flags --repeats=2   # [rl]

The run is built from the flagfile exactly as `python -m tf_maml.train` builds
it (environment, its options, policy, algorithm); later flags override the
recipe, as on the training command line. A meta-iteration is what the trainer
runs: `MAMLRL.make_train_step()` (sampling with θ, baselines, the inner step,
sampling with the adapted policies, the outer step) in one `tf.function`. Two
parts are also timed alone, each compiled on its own:

* sampling: tasks, rollouts before and after adaptation (with the sampling
  pass's inner step), baselines and advantages (`MAMLRL.sample`);
* outer step: the TRPO step (or Adam meta-gradient) on a meta-batch sampled
  with the current θ, which the timed calls do not change, so every call
  solves the problem a fresh meta-iteration's outer step solves.

Shares are each part's median over the full iteration's median; compiled on
their own they need not add up to exactly 100%. Environment steps count every
step of every episode up to the horizon (navigation masks the steps after an
episode reaches its goal, but simulates them); with `--sample_by_steps` they
count the step budget, `fast_batch_size × horizon` per task, while 4× as many
episode slots are simulated.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_maml  # noqa: E402, F401 - first: its oneDNN default (tf_maml/__init__.py)
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tf_maml import cli, core  # noqa: E402
from tf_maml import experiment as experiment_lib  # noqa: E402
from tf_maml.rl import trpo  # noqa: E402

cli.define_config_flags()
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
    cli.no_positional_arguments(argv)
    if not FLAGS["dataset"].present:
        raise app.UsageError("give a recipe: --flagfile=flags/rl_navigation.flags (or "
                             "rl_cheetah_vel.flags, rl_cheetah_dir.flags)")
    config = cli.config_from_flags()
    if not config.is_rl:
        raise app.UsageError(f"--dataset={config.dataset} is not a meta-RL dataset")
    try:
        experiment = experiment_lib.build_experiment(config)
    except cli.USER_ERRORS as e:
        cli.fail(cli.describe(e))
    algorithm, env = experiment.algorithm, experiment.tasks
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

    try:
        start = time.perf_counter()
        train_step(iteration(0))
        trace_full = time.perf_counter() - start
        full = _median_seconds(lambda i: train_step(iteration(i)), FLAGS.repeats)
        sample(iteration(FLAGS.repeats))   # traced outside the timing
        sampling = _median_seconds(lambda i: sample(iteration(FLAGS.repeats + i)), FLAGS.repeats)
        fixed = sample(iteration(2 * FLAGS.repeats + 1))   # with the current θ
        outer_step(fixed)
        outer = _median_seconds(lambda i: outer_step(fixed), FLAGS.repeats)
    finally:
        if hasattr(env, "close"):
            env.close()

    horizon = config.horizon or env.horizon
    steps = config.meta_batch_size * config.fast_batch_size * horizon * (
        config.num_inner_steps + 1)
    order = "first" if config.first_order else "second"
    print(f"MAML-{config.outer_optimizer.upper()} {config.dataset} ({order} order): meta-batch "
          f"{config.meta_batch_size}, {config.fast_batch_size} episodes x {horizon} steps"
          f"{' (sampled by steps: 4x the episode slots)' if config.sample_by_steps else ''}, "
          f"{config.num_inner_steps} inner step(s), inner_lr {config.inner_lr}; "
          f"{os.cpu_count()} CPU cores visible; median of {FLAGS.repeats}")
    print(f"  first iteration (trace + run): {trace_full:.1f} s")
    print(f"  meta-iteration:  {full:7.3f} s  ->  {1 / full:.3f} meta-iterations/s, "
          f"{steps / full:,.0f} env steps/s ({steps:,} steps per iteration)")
    print(f"  sampling alone:  {sampling:7.3f} s  ({100 * sampling / full:.0f}% of an iteration; "
          f"{steps / sampling:,.0f} env steps/s)")
    name = f"{config.outer_optimizer} step alone:"
    print(f"  {name:<16} {outer:7.3f} s  ({100 * outer / full:.0f}% of an iteration)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)  # nested flagfiles beside their includer
