"""Benchmark: what answering a conv model's tasks one at a time costs `adapt_tasks`.

    python bench/serving_tasks.py
    python bench/serving_tasks.py --tasks=1,4,16 --requests=50

The export answers a conv model's task-major requests (`adapt_tasks`,
`adapt_tasks_custom`) one task at a time, because the gradients of grouped
convolutions (several tasks' convolutions as one) exist on CPU only with
oneDNN on, and a server may run without it. This exports the same untrained
model twice, the shipped way (`one at a time`) and with the tasks batched as
they were before (`batched`, which fails wherever oneDNN is off), loads both
and times `adapt_tasks` requests of each size side by side, alternating, in
this process (oneDNN as `import tf_maml` leaves it). Prints median
milliseconds per request and the ratio.
"""

import os
import tempfile
import time

from absl import app, flags, logging

flags.DEFINE_list("tasks", ["1", "4", "8"], "Tasks per request.")
flags.DEFINE_integer("requests", 20, "Timed requests per size and export.")
flags.DEFINE_integer("num_eval_steps", 10, "Inner steps of the signature.")
flags.DEFINE_integer("intra_op_threads", 1, "TensorFlow intra-op threads (0: all cores).")
FLAGS = flags.FLAGS

# name: (n_way, inner_lr)
WORKLOADS = {"Omniglot 5-way 1-shot": (5, 0.4), "Omniglot 20-way 1-shot": (20, 0.1)}


def main(argv):
    """Runs the benchmark (see the module docstring)."""
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    import tf_maml
    import tensorflow as tf

    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    from tf_maml import functional, serving
    from tf_maml.tasks import ImageClassTasks

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    sizes = [int(t) for t in FLAGS.tasks]
    print(f"oneDNN on: {tf_maml.compat.onednn_enabled()}; intra-op threads: "
          f"{FLAGS.intra_op_threads or 'all'}; {FLAGS.num_eval_steps} inner steps; median ms "
          f"per adapt_tasks request of {FLAGS.requests}")
    print(f"{'workload':<24} {'tasks':>5} {'one at a time':>14} {'batched':>9} {'ratio':>6}")
    for name, (n_way, inner_lr) in WORKLOADS.items():
        images = np.random.default_rng(0).integers(0, 255, (n_way + 1, 20, 28, 28, 1), np.uint8)
        tasks = ImageClassTasks({"train": images, "test": images}, n_way, 1, 1)
        config = config_lib.Config(dataset="omniglot", n_way=n_way, k_shot=1, k_query=1,
                                   inner_lr=inner_lr)
        experiment = experiment_lib.build_experiment(config, tasks)
        limits = serving.limits_from(serving.DEFAULT_LIMITS["omniglot"], {"max_tasks": max(sizes)})
        loaded = {}
        with tempfile.TemporaryDirectory() as export_dir:
            for way, one_at_a_time in (("one at a time", True), ("batched", False)):
                signatures = serving.AdaptationSignatures(
                    experiment.algorithm, experiment.spec, FLAGS.num_eval_steps, inner_lr,
                    limits=limits)
                assert signatures.one_task_at_a_time, "a conv model's tasks are one at a time"
                signatures.one_task_at_a_time = one_at_a_time
                path = os.path.join(export_dir, way.replace(" ", "_"))
                with functional.first_derivatives_only():  # as serving.export writes it
                    serving.build_export_archive(signatures).write_out(path, verbose=False)
                loaded[way] = tf.saved_model.load(path).signatures["adapt_tasks"]
            for size in sizes:
                episode = experiment.tasks.sample(tf.constant([0, size], tf.int64), size, "test")
                request = {"support_x": episode.support_x, "support_y": episode.support_y,
                           "query_x": episode.query_x}
                times = {way: [] for way in loaded}
                for way, adapt_tasks in loaded.items():  # warm-up; the same answers, up to
                    # float32 reordering grown over 10 steps of an untrained model (tests assert
                    # 1e-5 on the tests' models)
                    times[way] = adapt_tasks(**request)["predictions"].numpy()
                np.testing.assert_allclose(times["one at a time"], times["batched"], rtol=1e-2,
                                           atol=1e-2)
                times = {way: [] for way in loaded}
                for _ in range(FLAGS.requests):
                    for way, adapt_tasks in loaded.items():
                        start = time.perf_counter()
                        adapt_tasks(**request)["predictions"].numpy()
                        times[way].append(1000 * (time.perf_counter() - start))
                one, batched = (float(np.median(times[way])) for way in loaded)
                print(f"{name:<24} {size:>5} {one:>14.1f} {batched:>9.1f} {one / batched:>6.2f}")


if __name__ == "__main__":
    app.run(main)
