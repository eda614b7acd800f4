"""Benchmark: milliseconds per meta-step, tasks/s and peak memory, against the peers.

    python bench/meta_step.py                       # MAML: every workload, order and XLA setting
    python bench/meta_step.py --workloads=sine --xla=false
    python bench/meta_step.py --peers=jax           # only JAX as the peer; --peers= for none
    python bench/meta_step.py --algorithms=maml,anil,metasgd,mamlpp,reptile --xla=false

A meta-step is what `tf_maml.trainer` runs each iteration: the meta-gradient
of a meta-batch (inner loop included) and the Adam update, compiled as one
`tf.function`, on a fixed synthetic episode (input pipeline excluded). Each
configuration runs in its own process, so its peak RSS is its own.

The peers (learn2learn, higher and JAX: `bench/peers.py`, which says how each
one is written, how `--check` verifies that their meta-gradients equal ours,
and how to install them) run the same MAML workloads in the same invocation,
each in its own process, timed the same way (`peers.timed`). Their rows come
just before tf_maml's MAML rows of the same workload and order; `ratio` is
tf_maml's milliseconds over the fastest peer's in this run (goal, issue #14: at most 0.25)
and, for sine, `vs JAX` is the ratio to JAX (goal: at most 1.0). A peer that is
not installed is skipped with a line saying how to install it; with no peer
there is no ratio. torch runs with its default threads, one per core
(`--peer_torch_threads` sets them); the line after the table names the
peers' versions and torch's threads. On a machine busy with other work
torch's threads wait on each other and its figures inflate many times over
(see bench/peers.py): compare on an idle machine. Every algorithm runs the
same workloads; the last column is its speed-up over second-order MAML on that
workload measured in the same run (ANIL's and first-order MAML's speed-ups are
the figures to read there).
"""

import json
import os
import resource
import subprocess
import sys

from absl import app, flags

import peers  # bench/peers.py: the workloads, the timing and the peer processes

flags.DEFINE_list("workloads", ["sine", "omniglot_5way", "omniglot_20way"], "Workloads to run.")
flags.DEFINE_list("orders", ["second", "first"], "second and/or first.")
flags.DEFINE_list("algorithms", ["maml"], "Algorithms: maml, anil, metasgd, mamlpp, reptile "
                  "(reptile runs first order only).")
flags.DEFINE_list("xla", ["false", "true"], "XLA settings to run (false, true).")
flags.DEFINE_list("peers", None, "Peers to run next to MAML: learn2learn, higher, jax "
                  "(default: every installed one; --peers= runs none).")
flags.DEFINE_string("peer_python", None, "Python interpreter for the peer processes (default: "
                    "this one), for peers installed in another environment.")
flags.DEFINE_integer("peer_torch_threads", 0, "torch's intra-op threads in the learn2learn and "
                     "higher processes (0: torch's default, one per core).")
flags.DEFINE_integer("repeats", 7, "Timed repetitions (median reported).")
flags.DEFINE_float("min_seconds", 1.0, "Each repetition runs at least this long.")
flags.DEFINE_string("json", None, "Also write results (tf_maml's and the peers' rows) to this "
                    "JSON file.")
flags.DEFINE_string("_child", None, "Internal: run one configuration and print JSON.")
FLAGS = flags.FLAGS

WORKLOADS = peers.WORKLOADS


def run_one(workload, order, xla, repeats, min_seconds, algorithm="maml"):
    """Times one tf_maml configuration in this process.

    Args:
        workload: a key of `WORKLOADS`.
        order: "second" or "first".
        xla: compile the meta-step with XLA.
        repeats: timed repetitions (median reported).
        min_seconds: each repetition runs at least this long.
        algorithm: a `tf_maml.algorithms` name.

    Returns:
        A dict of figures: `ms`, `tasks_per_s`, `compile_s`, `peak_rss_mb`, ...
    """
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
    ms, compile_s = peers.timed(lambda: meta_step(episode), repeats, min_seconds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"workload": workload, "algorithm": algorithm, "impl": "tf_maml", "order": order,
            "xla": xla, "ms": ms,
            "tasks_per_s": meta_batch / (ms / 1e3), "compile_s": compile_s,
            "peak_rss_mb": rss / 1024, "step_rss_mb": (rss - rss_before) / 1024,
            "layer_batched": forward.vectorized}


def _choose_peers():
    """The peers to run and the lines to print about the others."""
    if FLAGS.peers is not None and not FLAGS.peers:
        return [], ["no peer run (--peers= given)"]
    try:
        return peers.available(FLAGS.peers, FLAGS.peer_python)
    except ValueError as e:
        raise app.UsageError(str(e))


def _peer_rows(workload, order, names):
    """Runs every peer on one workload and order; returns the rows that succeeded."""
    rows = []
    for name in names:
        row = peers.run_peer(name, workload, order, FLAGS.repeats, FLAGS.min_seconds,
                             FLAGS.peer_python, FLAGS.peer_torch_threads)
        if "error" in row:
            print(f"{workload} {name} {order} failed:\n{row['error']}")
            continue
        rows.append(row)
        print(f"{WORKLOADS[workload][0]:<40} {name:<11} {order:<6} "
              f"{'jit' if name == 'jax' else '-':<5} {row['ms']:>9.2f} "
              f"{row['tasks_per_s']:>9.0f} {row['peak_rss_mb']:>8.0f}", flush=True)
    return rows


def _describe_peers(rows):
    """One line naming the peers' versions and torch's threads."""
    seen = {}
    for row in rows:
        seen.setdefault(row["impl"], row["versions"])
    parts = []
    for name, versions in seen.items():
        details = ", ".join(f"{k} {v}" for k, v in versions.items()
                            if k not in (name, "torch_threads"))
        if "torch_threads" in versions:
            details += f", torch threads: {versions['torch_threads']}"
        parts.append(f"{name} {versions.get(name, '')} ({details})")
    return "peers: " + "; ".join(parts)


def main(argv):
    """Runs the benchmark (see the module docstring), or one configuration with `--_child`."""
    del argv
    if FLAGS._child:
        workload, order, xla, algorithm = FLAGS._child.split(",")
        print(json.dumps(run_one(workload, order, xla == "true", FLAGS.repeats,
                                 FLAGS.min_seconds, algorithm)))
        return
    import platform
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {FLAGS.repeats} repetitions of >= {FLAGS.min_seconds}s each")
    peer_names, notes = _choose_peers()
    for note in notes:
        print(note)
    print()
    header = (f"{'workload':<40} {'algorithm':<11} {'order':<6} {'XLA':<5} {'ms/step':>9} "
              f"{'tasks/s':>9} {'peak MB':>8} {'best peer':>16} {'ratio':>6} {'vs JAX':>6} "
              f"{'vs MAML2':>8}")
    print(header)
    print("-" * len(header))
    rows, peer_rows, maml_second = [], {}, {}
    for workload in FLAGS.workloads:
        for algorithm in FLAGS.algorithms:
            orders = ["first"] if algorithm == "reptile" else FLAGS.orders
            for order in orders:
                if algorithm == "maml" and peer_names and (workload, order) not in peer_rows:
                    peer_rows[(workload, order)] = _peer_rows(workload, order, peer_names)
                    rows += peer_rows[(workload, order)]
                measured = peer_rows.get((workload, order), []) if algorithm == "maml" else []
                best = min(measured, key=lambda r: r["ms"]) if measured else None
                jax_ms = next((r["ms"] for r in measured if r["impl"] == "jax"), None)
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
                    row["best_peer"] = best["impl"] if best else None
                    row["best_peer_ms"] = best["ms"] if best else None
                    row["ratio_to_best_peer"] = row["ms"] / best["ms"] if best else None
                    row["ratio_to_jax"] = (row["ms"] / jax_ms
                                           if jax_ms and workload == "sine" else None)
                    rows.append(row)
                    speedup = row["speedup_over_second_order_maml"]
                    best_text = f"{best['impl']} {best['ms']:.2f}" if best else "-"
                    ratio, vs_jax = row["ratio_to_best_peer"], row["ratio_to_jax"]
                    print(f"{WORKLOADS[workload][0]:<40} {algorithm:<11} {order:<6} {xla:<5} "
                          f"{row['ms']:>9.2f} {row['tasks_per_s']:>9.0f} "
                          f"{row['peak_rss_mb']:>8.0f} {best_text:>16} "
                          f"{(f'{ratio:.2f}' if ratio else '-'):>6} "
                          f"{(f'{vs_jax:.2f}' if vs_jax else '-'):>6} "
                          f"{(f'{speedup:.2f}x' if speedup else '-'):>8}", flush=True)
    print()
    if any(peer_rows.values()):
        print(_describe_peers(r for measured in peer_rows.values() for r in measured))
        print("Peer rows (learn2learn, higher, jax) run MAML. best peer: the fastest peer's ms on "
              "the same workload and order in this run; ratio: ms / best peer's ms (MAML rows; "
              "goal <= 0.25); vs JAX: ms / JAX's ms (sine; goal <= 1.0).")
    elif "maml" in FLAGS.algorithms:
        print("No ratio: no peer was measured in this run ("
              + ("; ".join(notes) if notes else "every peer failed") + ").")
    print("vs MAML2: speed-up over second-order MAML on the same workload and XLA setting in "
          "this run.")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
