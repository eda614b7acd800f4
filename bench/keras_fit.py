"""Benchmark: `MetaLearner.fit`'s meta-step against the CLI trainer's, side by side.

    python bench/keras_fit.py                      # Omniglot 5-way 1-shot workload, mb 32
    python bench/keras_fit.py --meta_batch_size=16 --steps=50 --rounds=5

Both train the same conv4 (5-way 1-shot, 1 inner step of 0.4, second order,
Adam, no XLA) on the same in-memory tasks (28x28 synthetic characters, sampled
in-graph as Omniglot's are). The trainer runs its own loop (`trainer.make_train_step`
in a graph loop over its prefetching episode pipeline); `fit` runs Keras' loop
(one `train_function` call per step, or per `steps_per_execution` steps) with
episodes sampled inside the step. The two alternate, round after round, in one
process; the ratio of medians is the figure to read (target: fit within 10%).
"""

import os
import sys
import time

from absl import app, flags

flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-batch.")
flags.DEFINE_integer("steps", 40, "Meta-steps per timed round.")
flags.DEFINE_integer("rounds", 5, "Timed rounds of each (median reported).")
flags.DEFINE_list("steps_per_execution", ["1", "10"], "fit's steps_per_execution settings.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_maml import experiment as experiment_lib
    from tf_maml import models, tasks, trainer
    from tf_maml.config import Config
    from tf_maml.keras_face import Episodes, MetaLearner

    rng = np.random.default_rng(0)
    images = (rng.random((200, 20, 28, 28, 1)) < 0.2).astype(np.uint8) * 255
    family = tasks.ImageClassTasks({"train": images[:150], "test": images[150:]}, 5, 1, 1)
    config = Config(dataset="omniglot", n_way=5, k_shot=1, k_query=1, inner_lr=0.4,
                    meta_batch_size=FLAGS.meta_batch_size, num_inner_steps=1,
                    jit_compile="false", num_iterations=10**9)

    # The CLI trainer's loop.
    experiment = experiment_lib.build_experiment(config, tasks=family)
    optimizer = keras.optimizers.Adam(config.meta_lr)
    optimizer.build(experiment.algorithm.meta_variables)
    counter = tf.Variable(0, dtype=tf.int64)
    train_loop = trainer.make_train_loop(
        trainer.make_train_step(experiment, optimizer, counter, jit_compile=False))
    iterator = iter(tasks.episode_dataset(
        lambda seed: family.sample(seed, config.meta_batch_size), config.seed, 0,
        config.num_iterations))

    def cli_round():
        start = time.perf_counter()
        float(train_loop(iterator, tf.constant(FLAGS.steps, tf.int64))["meta_loss"])
        return (time.perf_counter() - start) / FLAGS.steps

    # The Keras face.
    learners = {}
    for spe in FLAGS.steps_per_execution:
        keras.utils.set_random_seed(config.seed)
        learner = MetaLearner(models.build(config, (28, 28, 1), 5), inner_lr=0.4,
                              num_inner_steps=1)
        learner.compile(optimizer=keras.optimizers.Adam(config.meta_lr),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"], steps_per_execution=int(spe))
        learners[spe] = learner

    def fit_round(learner):
        start = time.perf_counter()
        learner.fit(Episodes(family, config.meta_batch_size), epochs=1,
                    steps_per_epoch=FLAGS.steps, verbose=0)
        return (time.perf_counter() - start) / FLAGS.steps

    # Warm up (tracing), then alternate.
    cli_round()
    for learner in learners.values():
        fit_round(learner)
    times = {"cli": []}
    times.update({spe: [] for spe in learners})
    for _ in range(FLAGS.rounds):
        times["cli"].append(cli_round())
        for spe, learner in learners.items():
            times[spe].append(fit_round(learner))
    median = {name: 1e3 * float(np.median(values)) for name, values in times.items()}
    import platform
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Omniglot-sized 5-way 1-shot, "
          f"mb {config.meta_batch_size}, 1 second-order step, no XLA; median of "
          f"{FLAGS.rounds} alternating rounds of {FLAGS.steps} steps\n")
    print(f"{'loop':<36} {'ms/step':>9} {'vs CLI':>8}")
    print(f"{'CLI trainer (graph loop)':<36} {median['cli']:>9.1f} {'1.00':>8}")
    for spe in learners:
        name = f"MetaLearner.fit, steps_per_execution={spe}"
        print(f"{name:<36} {median[spe]:>9.1f} {median[spe] / median['cli']:>8.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
