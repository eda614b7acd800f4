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

import flops  # bench/flops.py: FLOPs of the traced meta-step, the matmul peak
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
flags.DEFINE_integer("num_inner_steps", 0, "Inner steps of every workload (0: the workload's own "
                     "count; peers are not run with another count).")
flags.DEFINE_boolean("recompute_inner_steps", False, "Second order: recompute the inner steps' "
                     "activations in the backward pass (Config.recompute_inner_steps).")
flags.DEFINE_integer("steps_per_call", 1, "Meta-steps per call of the compiled function (a graph "
                     "loop, as the trainer runs its steps; JAX gets a fori_loop of as many). "
                     "Figures stay per meta-step.")
flags.DEFINE_integer("repeats", 7, "Timed repetitions (median reported).")
flags.DEFINE_float("min_seconds", 1.0, "Each repetition runs at least this long.")
flags.DEFINE_string("json", None, "Also write results (tf_maml's and the peers' rows) to this "
                    "JSON file.")
flags.DEFINE_string("_child", None, "Internal: run one configuration and print JSON.")
FLAGS = flags.FLAGS

WORKLOADS = peers.WORKLOADS


def build(workload, order, xla, algorithm="maml", num_inner_steps=0, steps_per_call=1,
          recompute_inner_steps=False):
    """The meta-step of one configuration, as `trainer` runs it, on a fixed synthetic episode.

    Args:
        workload: a key of `WORKLOADS`.
        order: "second" or "first".
        xla: compile the meta-step with XLA.
        algorithm: a `tf_maml.algorithms` name.
        num_inner_steps: inner steps (0: the workload's own count).
        steps_per_call: meta-steps per call, in a graph loop (the trainer's way).
        recompute_inner_steps: `Config.recompute_inner_steps` (second order).

    Returns:
        `(meta_step, episode, layer_batched)`: the `tf.function` (episode -> meta-loss;
        it applies the Adam update, `steps_per_call` times), its input, and whether
        the forward is the layer-batched one.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import keras
    import tensorflow as tf

    from tf_maml import algorithms, functional, losses, models
    from tf_maml.config import Config
    from tf_maml.tasks import Episode

    _, meta_batch, n_way, k_shot, k_query, steps, inner_lr = WORKLOADS[workload]
    steps = num_inner_steps or steps
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
                    first_order=(order == "first"), msl_epochs=10, iterations_per_epoch=500,
                    recompute_inner_steps=recompute_inner_steps and order == "second")
    if algorithm == "reptile":
        config.inner_optimizer = "adam"
        config.inner_lr = 0.001
    learner = algorithms.build(config, model, forward, loss_fn)
    variables = learner.meta_variables
    optimizer = learner.make_optimizer(1e-3, 1000)
    optimizer.build(variables)

    def one_step(episode):
        loss, grads, _ = learner.meta_step(episode, None, tf.constant(0, tf.int64))
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function(jit_compile=xla)
    def meta_step(episode):
        if steps_per_call == 1:
            return one_step(episode)
        return tf.while_loop(lambda i, _: i < steps_per_call,
                             lambda i, _: (i + 1, one_step(episode)),
                             (tf.constant(0), tf.zeros([], tf.float32)))[1]

    return meta_step, episode, forward.vectorized


def run_one(workload, order, xla, repeats, min_seconds, algorithm="maml", num_inner_steps=0,
            steps_per_call=1, recompute_inner_steps=False):
    """Times one tf_maml configuration in this process.

    Args:
        workload: a key of `WORKLOADS`.
        order: "second" or "first".
        xla: compile the meta-step with XLA.
        repeats: timed repetitions (median reported).
        min_seconds: each repetition runs at least this long.
        algorithm: a `tf_maml.algorithms` name.
        num_inner_steps: inner steps (0: the workload's own count).
        steps_per_call: meta-steps per call (figures stay per meta-step).
        recompute_inner_steps: `Config.recompute_inner_steps` (second order).

    Returns:
        A dict of figures: `ms`, `tasks_per_s`, `compile_s`, `peak_rss_mb`,
        `gflop` (convolution and matmul FLOPs of one meta-step, `bench/flops.py`),
        `gflop_per_s`, ...
    """
    meta_batch = WORKLOADS[workload][1]
    meta_step, episode, layer_batched = build(workload, order, xla, algorithm, num_inner_steps,
                                              steps_per_call, recompute_inner_steps)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms, compile_s = peers.timed(lambda: meta_step(episode), repeats, min_seconds)
    ms /= steps_per_call
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # With a graph loop, its body (one meta-step) is counted once: FLOPs per step.
    counted = flops.graph_flops(meta_step.get_concrete_function(episode).graph)
    return {"workload": workload, "algorithm": algorithm, "impl": "tf_maml", "order": order,
            "xla": xla, "ms": ms, "num_inner_steps": num_inner_steps or WORKLOADS[workload][5],
            "steps_per_call": steps_per_call,
            "recompute_inner_steps": recompute_inner_steps and order == "second",
            "tasks_per_s": meta_batch / (ms / 1e3), "compile_s": compile_s,
            "peak_rss_mb": rss / 1024, "step_rss_mb": (rss - rss_before) / 1024,
            "layer_batched": layer_batched, "gflop": counted["dense"] / 1e9,
            "gflop_per_s": counted["dense"] / 1e6 / ms,
            "elementwise_mflop": counted["elementwise"] / 1e6,
            # The graph loop of `steps_per_call` is counted as one step on purpose.
            "flops_uncounted_ops": counted["unknown"] + counted["while_loops"]
            - (steps_per_call > 1)}


def _label(workload):
    """The workload's name, with `--num_inner_steps` in place of its own count."""
    label, steps = WORKLOADS[workload][0], WORKLOADS[workload][5]
    if FLAGS.num_inner_steps:
        unit = "step" if steps == 1 else "steps"
        label = label.replace(f"{steps} {unit}", f"{FLAGS.num_inner_steps} steps"
                              if FLAGS.num_inner_steps > 1 else "1 step")
    return label


def _matmul_peak():
    """This machine's float32 matmul GFLOP/s on all cores, measured in a process of its own."""
    child = subprocess.run([sys.executable, flops.__file__, "--_child", "0"],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


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
                             FLAGS.peer_python, FLAGS.peer_torch_threads, FLAGS.steps_per_call)
        if "error" in row:
            print(f"{workload} {name} {order} failed:\n{row['error']}")
            continue
        rows.append(row)
        print(f"{_label(workload):<40} {name:<11} {order:<6} "
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
                                 FLAGS.min_seconds, algorithm, FLAGS.num_inner_steps,
                                 FLAGS.steps_per_call, FLAGS.recompute_inner_steps)))
        return
    import platform
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {FLAGS.repeats} repetitions of >= {FLAGS.min_seconds}s each; "
          f"{FLAGS.steps_per_call} meta-step(s) per call"
          + ("; inner steps recomputed in the backward pass (second order)"
             if FLAGS.recompute_inner_steps else ""))
    peak = _matmul_peak()
    print(f"float32 matmul peak of this machine (all cores, bench/flops.py): {peak:.0f} GFLOP/s")
    peer_names, notes = _choose_peers()
    if FLAGS.num_inner_steps and peer_names:
        peer_names, notes = [], notes + [f"peers not run: --num_inner_steps="
                                         f"{FLAGS.num_inner_steps} changes the workloads"]
    for note in notes:
        print(note)
    print()
    header = (f"{'workload':<40} {'algorithm':<11} {'order':<6} {'XLA':<5} {'ms/step':>9} "
              f"{'tasks/s':>9} {'peak MB':>8} {'best peer':>16} {'ratio':>6} {'vs JAX':>6} "
              f"{'vs MAML2':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'x floor':>7}")
    print(header)
    print("-" * len(header))
    rows, peer_rows, maml_second, failed = [], {}, {}, []
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
                         f"--repeats={FLAGS.repeats}", f"--min_seconds={FLAGS.min_seconds}",
                         f"--num_inner_steps={FLAGS.num_inner_steps}",
                         f"--steps_per_call={FLAGS.steps_per_call}",
                         f"--recompute_inner_steps={FLAGS.recompute_inner_steps}"],
                        capture_output=True, text=True)
                    if child.returncode != 0:
                        print(f"{workload} {algorithm} {order} xla={xla} failed:\n"
                              f"{child.stderr[-2000:]}")
                        failed.append(f"{workload} {algorithm} {order} xla={xla}")
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
                    print(f"{_label(workload):<40} {algorithm:<11} {order:<6} {xla:<5} "
                          f"{row['ms']:>9.2f} {row['tasks_per_s']:>9.0f} "
                          f"{row['peak_rss_mb']:>8.0f} {best_text:>16} "
                          f"{(f'{ratio:.2f}' if ratio else '-'):>6} "
                          f"{(f'{vs_jax:.2f}' if vs_jax else '-'):>6} "
                          f"{(f'{speedup:.2f}x' if speedup else '-'):>8} "
                          f"{row['gflop']:>7.3f} {row['gflop_per_s']:>8.1f} "
                          f"{peak / row['gflop_per_s']:>7.1f}", flush=True)
                    row["matmul_peak_gflop_per_s"] = peak
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
    print("GFLOP: convolution and matmul FLOPs of one meta-step, counted in its traced graph "
          "(bench/flops.py); GFLOP/s: achieved; x floor: ms / (GFLOP / matmul peak), the FLOP "
          "floor's multiple (goal for Omniglot 5-way second order: <= 2).")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=2)
    if failed:  # peers may fail (reported above); our own rows may not
        sys.exit(f"{len(failed)} tf_maml configuration(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
