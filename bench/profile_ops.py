"""Where the time of a meta-step or of a served `adapt` request goes, op type by op type.

    python bench/profile_ops.py --workload=omniglot_5way --order=second
    python bench/profile_ops.py --target=adapt --workload=omniglot_20way

Runs a few calls under TensorFlow's profiler (after warm-up) and reads its
trace: for each op type, the kernel time per call (summed over the threads
that ran it) and how many times it ran per call. The summary says how many
op executions one call makes (and per inner step), how much kernel time the
convolutions and matrix products take, and the mean kernel time of the other
ops: on these small graphs the op count times the per-op cost is the part of
the time that does no arithmetic. The time between kernels (the executor's
own work) is wall time minus kernel time, where the graph runs on one
thread.

`--target=meta_step` profiles `bench/meta_step.py`'s meta-step (gradient and
Adam update, `--algorithm`, `--order`, `--num_inner_steps`,
`--recompute_inner_steps`; one meta-step per call); `--target=adapt`
profiles the `adapt` signature of an exported untrained model loaded from
disk, as `bench/serving_latency.py` times it (one task per request, one
intra-op thread unless `--intra_op_threads` says otherwise).
"""

import collections
import contextlib
import glob
import os
import sys
import tempfile
import time

from absl import app, flags

import exported  # bench/exported.py
import flops  # bench/flops.py
import meta_step as meta_step_bench  # bench/meta_step.py

flags.DEFINE_enum("target", "meta_step", ["meta_step", "adapt"], "What to profile.")
flags.DEFINE_enum("workload", "omniglot_5way", list(meta_step_bench.WORKLOADS), "Workload.")
flags.DEFINE_enum("order", "second", ["second", "first"], "Meta-gradient order (meta_step).")
flags.DEFINE_string("algorithm", "maml", "Algorithm (meta_step).")
flags.DEFINE_integer("num_eval_steps", 10, "Inner steps of the adapt signature (adapt).")
flags.DEFINE_integer("intra_op_threads", None, "TensorFlow intra-op threads (default: 1 for "
                     "adapt, as a server should run, TensorFlow's default for meta_step).")
flags.DEFINE_integer("calls", 5, "Profiled calls.")
flags.DEFINE_integer("top", 20, "Op types to list.")
FLAGS = flags.FLAGS

_DENSE_KERNELS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "MatMul",
                  "BatchMatMul", "DepthwiseConv")


_BOOKKEEPING = ("Process", "Run", "FunctionRun")


def _op_events(logdir):
    """`(op_type, duration_ms)` of every op execution in the profiler's trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name:  # executor bookkeeping
                    continue
                kind = name.rsplit(":", 1)[1]
                if kind in _BOOKKEEPING or kind.startswith(("__", " ")):
                    continue  # the executor's own spans, which contain the ops
                events.append((kind, event.duration_ps / 1e9))
    return events


def _profile(call, calls):
    """Wall ms per call (profiled and not) and the op events of `calls` profiled calls."""
    import tensorflow as tf

    for _ in range(3):
        call()
    with tempfile.TemporaryDirectory(prefix="tf_maml_profile_") as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
        tf.profiler.experimental.stop()
        events = _op_events(logdir)
    # Unprofiled wall time too: the profiler itself adds to every op.
    start = time.perf_counter()
    for _ in range(calls):
        call()
    plain_ms = (time.perf_counter() - start) * 1e3 / calls
    return wall_ms, plain_ms, events


def _meta_step_call(stack):
    del stack
    meta_step, episode, _ = meta_step_bench.build(
        FLAGS.workload, FLAGS.order, False, FLAGS.algorithm, FLAGS.num_inner_steps,
        recompute_inner_steps=FLAGS.recompute_inner_steps)
    counted = flops.graph_flops(meta_step.get_concrete_function(episode).graph)
    steps = FLAGS.num_inner_steps or meta_step_bench.WORKLOADS[FLAGS.workload][5]
    return (lambda: meta_step(episode).numpy()), counted["dense"], steps


def _adapt_call(stack):
    _, _, n_way, k_shot, k_query, _, inner_lr = meta_step_bench.WORKLOADS[FLAGS.workload]
    adapt, request = stack.enter_context(exported.exported_adapt(
        n_way, k_shot, k_query, inner_lr, FLAGS.num_eval_steps))
    # No FLOP count: the inner steps run in a graph loop whose trip count (and
    # which branch of the query-prediction `tf.cond` runs) is not in the graph.
    return (lambda: adapt(**request)["predictions"].numpy()), None, FLAGS.num_eval_steps


def main(argv):
    """Profiles the target and prints the table (see the module docstring)."""
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf

    if FLAGS.steps_per_call != 1:
        raise app.UsageError("--steps_per_call: the profile is of one meta-step per call")
    threads = FLAGS.intra_op_threads
    if threads is None:
        threads = 1 if FLAGS.target == "adapt" else 0
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    with contextlib.ExitStack() as stack:
        make = _adapt_call if FLAGS.target == "adapt" else _meta_step_call
        call, dense_flops, steps = make(stack)
        wall_ms, plain_ms, events = _profile(call, FLAGS.calls)

    by_type = collections.defaultdict(list)
    for kind, ms in events:
        by_type[kind].append(ms)
    total_kernel = sum(ms for _, ms in events)
    executions = len(events) / FLAGS.calls
    dense_ms = sum(ms for kind, ms in events if any(k in kind for k in _DENSE_KERNELS))
    other = [ms for kind, ms in events if not any(k in kind for k in _DENSE_KERNELS)]

    label = meta_step_bench._label(FLAGS.workload)
    if FLAGS.target == "adapt":
        label = label.split(",")[0] + ", one task"  # the training meta-batch does not apply
    print(f"{FLAGS.target} of {label}"
          + (f", {FLAGS.order} order, {FLAGS.algorithm}" if FLAGS.target == "meta_step"
             else f", {FLAGS.num_eval_steps} inner steps")
          + f"; intra-op threads: {threads or 'default'}; {os.cpu_count()} CPUs")
    print(f"wall ms per call: {plain_ms:.2f} unprofiled, {wall_ms:.2f} profiled")
    print(f"op executions per call: {executions:.0f}"
          + (f" ({executions / steps:.0f} per inner step)" if steps else ""))
    conv_ms = sum(ms for kind, ms in events if "Conv" in kind)
    print(f"kernel ms per call, summed over threads: {total_kernel / FLAGS.calls:.2f} "
          f"(convolutions and matrix products {dense_ms / FLAGS.calls:.2f}, of which "
          f"convolutions {conv_ms / FLAGS.calls:.2f} ({conv_ms / total_kernel:.0%} of all); "
          f"everything else {sum(other) / FLAGS.calls:.2f} in {len(other) / FLAGS.calls:.0f} ops, "
          f"{1e3 * float(np.mean(other)) if other else 0:.1f} us each on average)")
    if dense_flops:
        print(f"convolution and matmul GFLOP per call: {dense_flops / 1e9:.3f}; in their kernels "
              f"{dense_flops / 1e6 / (dense_ms / FLAGS.calls):.1f} GFLOP/s per thread-second")
    print()
    print(f"{'op type':<40} {'ms/call':>8} {'share':>6} {'runs/call':>9} {'us/run':>8}")
    ranked = sorted(by_type.items(), key=lambda item: -sum(item[1]))
    for kind, times in ranked[:FLAGS.top]:
        per_call = sum(times) / FLAGS.calls
        print(f"{kind[:40]:<40} {per_call:>8.2f} {sum(times) / total_kernel:>6.1%} "
              f"{len(times) / FLAGS.calls:>9.0f} {1e3 * sum(times) / len(times):>8.1f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
