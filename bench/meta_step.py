"""Benchmark: milliseconds per meta-step, tasks/s and peak memory, for every algorithm.

    python bench/meta_step.py                       # MAML: every workload, order and XLA setting
    python bench/meta_step.py --workloads=sine --xla=false
    python bench/meta_step.py --algorithms=maml,anil,metasgd,mamlpp,reptile --xla=false

Every algorithm runs the same workload side by side; the last column is its
speed-up over second-order MAML on that workload measured in the same run
(ANIL's and first-order MAML's speed-ups are the figures to read there).

A meta-step is what `tf_maml.trainer` runs each iteration: the meta-gradient
of a meta-batch (inner loop included) and the Adam update, compiled as one
`tf.function`, on a fixed synthetic episode (input pipeline excluded). Each
configuration runs in its own process, so its peak RSS is its own. The peer
columns are the figures the project measured for learn2learn, higher and JAX
on the same workloads on a 2-core CPU machine (issue #2); goal: at most half
the best peer (sine: within 1.5x of JAX).
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("workloads", ["sine", "omniglot_5way", "omniglot_20way"], "Workloads to run.")
flags.DEFINE_list("orders", ["second", "first"], "second and/or first.")
flags.DEFINE_list("algorithms", ["maml"], "Algorithms: maml, anil, metasgd, mamlpp, reptile "
                  "(reptile runs first order only).")
flags.DEFINE_list("xla", ["false", "true"], "XLA settings to run (false, true).")
flags.DEFINE_integer("repeats", 7, "Timed repetitions (median reported).")
flags.DEFINE_float("min_seconds", 1.0, "Each repetition runs at least this long.")
flags.DEFINE_string("json", None, "Also write results to this JSON file.")
flags.DEFINE_string("_child", None, "Internal: run one configuration and print JSON.")
FLAGS = flags.FLAGS

WORKLOADS = {
    # name: (description, meta_batch, n_way, k_shot, k_query, steps, inner_lr)
    "sine": ("sine, mb 25, K=10, 1 step", 25, None, 10, 10, 1, 0.01),
    "omniglot_5way": ("Omniglot 5-way 1-shot, mb 32, 1 step", 32, 5, 1, 1, 1, 0.4),
    "omniglot_20way": ("Omniglot 20-way 1-shot, mb 16, 5 steps", 16, 20, 1, 1, 5, 0.1),
}
# ms per meta-step measured for the peers (learn2learn 0.2.0, higher 0.2.1, JAX 0.10.2 vmap+jit).
PEERS = {
    ("sine", "second"): {"learn2learn": 30.3, "higher": 57.8, "jax": 0.68},
    ("sine", "first"): {"learn2learn": 22.3, "higher": 43.4, "jax": 0.46},
    ("omniglot_5way", "second"): {"learn2learn": 464, "higher": 657, "jax": 5459},
    ("omniglot_5way", "first"): {"learn2learn": 217, "higher": 363, "jax": 2445},
    ("omniglot_20way", "second"): {"learn2learn": 2065, "higher": 2680, "jax": 29299},
    ("omniglot_20way", "first"): {"learn2learn": 649, "higher": 861, "jax": 3877},
}


def run_one(workload, order, xla, repeats, min_seconds, algorithm="maml"):
    """Times one configuration in this process; returns a dict of figures."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from tf_maml import algorithms, functional, losses, models
    from tf_maml.config import Config
    from tf_maml.tasks import Episode

    _, meta_batch, n_way, k_shot, k_query, steps, inner_lr = WORKLOADS[workload]
    keras.utils.set_random_seed(0)
    if n_way is None:
        model = models.mlp()
        loss_fn = losses.mean_squared_error
        sx = tf.random.uniform([meta_batch, k_shot, 1], -5, 5)
        qx = tf.random.uniform([meta_batch, k_query, 1], -5, 5)
        episode = Episode(sx, tf.sin(sx), qx, tf.sin(qx))
    else:
        model = models.conv4(n_way)
        loss_fn = losses.sparse_softmax_cross_entropy
        labels = tf.tile(tf.range(n_way)[None], [meta_batch, 1])
        episode = Episode(tf.random.uniform([meta_batch, n_way * k_shot, 28, 28, 1]),
                          tf.tile(labels, [1, k_shot]),
                          tf.random.uniform([meta_batch, n_way * k_query, 28, 28, 1]),
                          tf.tile(labels, [1, k_query]))
    forward = functional.make_forward(model)
    config = Config(algorithm=algorithm, inner_lr=inner_lr, num_inner_steps=steps,
                    first_order=(order == "first"), msl_epochs=10, iterations_per_epoch=500)
    if algorithm == "reptile":
        config.inner_optimizer = "adam"
        config.inner_lr = 0.001
    learner = algorithms.build(config, model, forward, loss_fn)
    variables = learner.meta_variables
    optimizer = learner.make_optimizer(1e-3, 1000)
    optimizer.build(variables)

    @tf.function(jit_compile=xla)
    def meta_step(episode):
        loss, grads, _ = learner.meta_step(episode, None, tf.constant(0, tf.int64))
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    float(meta_step(episode))
    compile_s = time.perf_counter() - start
    # Calibrate how many steps make one repetition.
    start = time.perf_counter()
    float(meta_step(episode))
    one = time.perf_counter() - start
    per_repeat = max(1, int(min_seconds / max(one, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_repeat):
            loss = meta_step(episode)
        float(loss)
        times.append((time.perf_counter() - start) / per_repeat)
    times.sort()
    ms = 1e3 * times[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"workload": workload, "algorithm": algorithm, "order": order, "xla": xla, "ms": ms,
            "tasks_per_s": meta_batch / (ms / 1e3), "compile_s": compile_s,
            "peak_rss_mb": rss / 1024, "step_rss_mb": (rss - rss_before) / 1024,
            "layer_batched": forward.vectorized}


def main(argv):
    del argv
    if FLAGS._child:
        workload, order, xla, algorithm = FLAGS._child.split(",")
        print(json.dumps(run_one(workload, order, xla == "true", FLAGS.repeats,
                                 FLAGS.min_seconds, algorithm)))
        return
    import platform
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {FLAGS.repeats} repetitions of >= {FLAGS.min_seconds}s each\n")
    header = (f"{'workload':<40} {'algorithm':<9} {'order':<6} {'XLA':<5} {'ms/step':>9} "
              f"{'tasks/s':>9} {'peak MB':>8} {'peer*':>10} {'ratio':>6} {'vs MAML2':>8}")
    print(header)
    print("-" * len(header))
    rows, maml_second = [], {}
    for workload in FLAGS.workloads:
        for algorithm in FLAGS.algorithms:
            orders = ["first"] if algorithm == "reptile" else FLAGS.orders
            for order in orders:
                for xla in FLAGS.xla:
                    child = subprocess.run(
                        [sys.executable, __file__, f"--_child={workload},{order},{xla},{algorithm}",
                         f"--repeats={FLAGS.repeats}", f"--min_seconds={FLAGS.min_seconds}"],
                        capture_output=True, text=True)
                    if child.returncode != 0:
                        print(f"{workload} {algorithm} {order} xla={xla} failed:\n"
                              f"{child.stderr[-2000:]}")
                        continue
                    row = json.loads(child.stdout.strip().splitlines()[-1])
                    if algorithm == "maml" and order == "second":
                        maml_second[(workload, xla)] = row["ms"]
                    reference_ms = maml_second.get((workload, xla))
                    row["speedup_over_second_order_maml"] = (
                        reference_ms / row["ms"] if reference_ms else None)
                    peers = PEERS[(workload, order)]
                    best_name, best = min(peers.items(), key=lambda kv: kv[1])
                    reference = peers["jax"] if workload == "sine" else best
                    row["ratio_to_reference"] = row["ms"] / reference
                    rows.append(row)
                    speedup = row["speedup_over_second_order_maml"]
                    print(f"{WORKLOADS[workload][0]:<40} {algorithm:<9} {order:<6} {xla:<5} "
                          f"{row['ms']:>9.2f} {row['tasks_per_s']:>9.0f} "
                          f"{row['peak_rss_mb']:>8.0f} {best:>7.2f} {best_name[:2]:<2} "
                          f"{row['ratio_to_reference']:>6.2f} "
                          f"{(f'{speedup:.2f}x' if speedup else '-'):>8}", flush=True)
    print("\n*peer: the best peer's ms typed in from an earlier measurement on another machine "
          "(MAML only; not comparable across machines). vs MAML2: speed-up over second-order "
          "MAML on the same workload in this run.")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
