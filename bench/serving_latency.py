"""Benchmark: latency per request of the exported `adapt` signature, against the peers.

    python bench/serving_latency.py
    python bench/serving_latency.py --peers=       # tf_maml only

Exports untrained models of each workload (latency does not depend on the
weights), loads each SavedModel with `tf.saved_model.load` and times single
requests (one task: support and query set) through the `adapt` signature with
the paper's number of evaluation steps. Prints median and p90 milliseconds.
Goals (issue 14): Omniglot 5-way 1-shot at most 10 ms, 20-way at most 20 ms.

Next to it, in the same invocation and each in its own process, the same
adaptation in the peers (`bench/peers.py`): learn2learn (`clone()`, the inner
steps with `adapt()`, then the query forward; torch with 1 thread) and JAX
(the inner steps and the query forward in one `jax.jit`, XLA without its
multi-threaded Eigen pool). `ratio` is tf_maml's median over the fastest
peer's median. A peer that is not installed is skipped with a line saying so.

By default TensorFlow runs with one intra-op thread, as a server should for
these small graphs (TF Serving: --tensorflow_intra_op_parallelism=1): fanning
tiny kernels out over all cores costs more than it saves (measured 2-3x slower
on 2 cores; --intra_op_threads=0 shows it). The peers get one thread too.
"""

import os
import sys
import time

from absl import app, flags, logging

import exported  # bench/exported.py: the exported model and one request
import peers  # bench/peers.py: the peers' adaptation, each in its own process

flags.DEFINE_integer("requests", 200, "Timed requests per workload.")
flags.DEFINE_integer("num_eval_steps", 10, "Inner steps of the adapt signature.")
flags.DEFINE_integer("intra_op_threads", 1, "TensorFlow intra-op threads (0: TF's default: all "
                     "cores). 1 is what a server should use for these small per-request graphs.")
flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: TF's default).")
flags.DEFINE_list("peers", ["learn2learn", "jax"], "Peers to time next to tf_maml (learn2learn, "
                  "jax; --peers= for none).")
flags.DEFINE_string("peer_python", None, "Python interpreter for the peer processes (default: "
                    "this one).")
FLAGS = flags.FLAGS

# name: (dataset, n_way, k_shot, k_query, inner_lr, input shape)
WORKLOADS = {
    "sine K=10": ("sine", None, 10, 10, 0.01, (1,)),
    "Omniglot 5-way 1-shot": ("omniglot", 5, 1, 1, 0.4, (28, 28, 1)),
    "Omniglot 20-way 1-shot": ("omniglot", 20, 1, 1, 0.1, (28, 28, 1)),
}


def main(argv):
    """Runs the benchmark (see the module docstring)."""
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)

    print(f"{FLAGS.requests} requests each, {FLAGS.num_eval_steps} inner steps, "
          f"{os.cpu_count()} CPUs")
    if FLAGS.peers:
        try:
            peer_names, skipped = peers.available(FLAGS.peers, FLAGS.peer_python)
        except ValueError as e:
            raise app.UsageError(str(e))
    else:
        peer_names, skipped = [], ["no peer run (--peers= given)"]
    for line in skipped:
        print(line)
    print()
    header = (f"{'workload':<26} {'implementation':<14} {'median ms':>10} {'p90 ms':>8} "
              f"{'first call s':>13} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    versions = {}
    for name, (dataset, n_way, k_shot, k_query, inner_lr, shape) in WORKLOADS.items():
        del dataset, shape  # n_way None is sine
        with exported.exported_adapt(n_way, k_shot, k_query, inner_lr,
                                     FLAGS.num_eval_steps) as (adapt, request):
            start = time.perf_counter()
            adapt(**request)["predictions"].numpy()
            first = time.perf_counter() - start
            times = []
            for _ in range(FLAGS.requests):
                start = time.perf_counter()
                adapt(**request)["predictions"].numpy()
                times.append(1e3 * (time.perf_counter() - start))
        ours = float(np.median(times))
        rows = []
        for peer in peer_names:
            row = peers.serve_peer(peer, n_way, k_shot, k_query, inner_lr, FLAGS.num_eval_steps,
                                   FLAGS.requests, FLAGS.peer_python)
            if "error" in row:
                print(f"{name} {peer} failed:\n{row['error']}")
                continue
            versions[peer] = row["versions"]
            rows.append(row)
        best = min((row["median_ms"] for row in rows), default=None)
        ratio = f"{ours / best:.2f}" if best else "-"
        print(f"{name:<26} {'tf_maml':<14} {ours:>10.2f} {np.percentile(times, 90):>8.2f} "
              f"{first:>13.2f} {ratio:>6}", flush=True)
        for row in rows:
            print(f"{'':<26} {row['impl']:<14} {row['median_ms']:>10.2f} {row['p90_ms']:>8.2f} "
                  f"{row['first_s']:>13.2f}", flush=True)
    print()
    if versions:
        print("peers: " + "; ".join(f"{peer} ({', '.join(f'{k} {v}' for k, v in v.items())})"
                                    for peer, v in versions.items()))
        print("ratio: tf_maml's median / the fastest peer's median on the same workload, this run.")
    else:
        print("No ratio: no peer was measured in this run ("
              + ("; ".join(skipped) if skipped else "every peer failed") + ").")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
