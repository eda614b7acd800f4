"""Benchmark: latency of the exported `adapt` signature, loaded from disk, per request.

    python bench/serving_latency.py

Exports untrained models of each workload (latency does not depend on the
weights), loads each SavedModel with `tf.saved_model.load` and times single
requests (one task: support and query set) through the `adapt` signature with
the paper's number of evaluation steps. Prints median and p90 milliseconds.
Target: Omniglot 5-way 1-shot under 20 ms.

By default TensorFlow runs with one intra-op thread, as a server should for
these small graphs (TF Serving: --tensorflow_intra_op_parallelism=1): fanning
tiny kernels out over all cores costs more than it saves (measured 2-3x slower
on 2 cores; --intra_op_threads=0 shows it).
"""

import os
import sys
import tempfile
import time

from absl import app, flags, logging

flags.DEFINE_integer("requests", 200, "Timed requests per workload.")
flags.DEFINE_integer("num_eval_steps", 10, "Inner steps of the adapt signature.")
flags.DEFINE_integer("intra_op_threads", 1, "TensorFlow intra-op threads (0: TF's default: all cores). 1 is what a server should use for these small per-request graphs.")
flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: TF's default).")
FLAGS = flags.FLAGS

# name: (dataset, n_way, k_shot, k_query, inner_lr, input shape)
WORKLOADS = {
    "sine K=10": ("sine", None, 10, 10, 0.01, (1,)),
    "Omniglot 5-way 1-shot": ("omniglot", 5, 1, 1, 0.4, (28, 28, 1)),
    "Omniglot 20-way 1-shot": ("omniglot", 20, 1, 1, 0.1, (28, 28, 1)),
}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    from tf_maml import serving
    from tf_maml.tasks import ImageClassTasks

    print(f"{FLAGS.requests} requests each, {FLAGS.num_eval_steps} inner steps, "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'workload':<26} {'median ms':>10} {'p90 ms':>8} {'first call s':>13}")
    for name, (dataset, n_way, k_shot, k_query, inner_lr, shape) in WORKLOADS.items():
        tasks = None
        if dataset != "sine":
            images = np.random.default_rng(0).integers(0, 255, (n_way + 1, 20) + shape, np.uint8)
            tasks = ImageClassTasks({"train": images, "test": images}, n_way, k_shot, k_query)
        config = config_lib.Config(dataset=dataset, n_way=n_way or 5, k_shot=k_shot,
                                   k_query=k_query, inner_lr=inner_lr)
        experiment = experiment_lib.build_experiment(config, tasks)
        with tempfile.TemporaryDirectory() as export_dir:
            path = serving.export(experiment, export_dir, 1, FLAGS.num_eval_steps, inner_lr)
            adapt = tf.saved_model.load(path).signatures["adapt"]
            episode = experiment.tasks.sample(tf.constant([0, 0], tf.int64), 1, "test")
            request = {"support_x": episode.support_x[0], "support_y": episode.support_y[0],
                       "query_x": episode.query_x[0]}
            start = time.perf_counter()
            adapt(**request)["predictions"].numpy()
            first = time.perf_counter() - start
            times = []
            for _ in range(FLAGS.requests):
                start = time.perf_counter()
                adapt(**request)["predictions"].numpy()
                times.append(1e3 * (time.perf_counter() - start))
        print(f"{name:<26} {np.median(times):>10.2f} {np.percentile(times, 90):>8.2f} "
              f"{first:>13.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
