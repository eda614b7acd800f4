"""Benchmark: throughput of each conv4 convolution kernel, as one served `adapt` request runs them.

    python bench/conv_layers.py                 # 20-way 1-shot: batch 20, 1 thread
    python bench/conv_layers.py --batch=5       # 5-way 1-shot

For each of the four stride-2 3x3 convolutions of `tf_maml.models.conv4` on
28x28x1 inputs (28->14, 14->7, 7->4, 4->2; 64 channels), times the forward
kernel, the filter gradient and the input gradient on a batch of `--batch`
images (one task's support set), with the intra-op threads of a server (1) and one inter-op thread.
Each kernel runs `--repeats` times in one graph loop, so per-call cost is not
counted; the loop's own cost (an empty body) is subtracted. Prints
microseconds and GFLOP/s per kernel, and their sum for one inner step of
`adapt` (every forward and filter gradient, the input gradients of layers 2-4;
layer 1's input gradient is never needed), next to the time that step's
FLOPs would take at the float32 matmul peak (`bench/flops.py`).

It tells whether a served adaptation is bound by the convolution kernels'
efficiency (and which layer's) or by everything else.
"""

import os
import time

from absl import app, flags

flags.DEFINE_integer("batch", 20, "Images per convolution (one task's support set: n_way * "
                     "k_shot).")
flags.DEFINE_integer("threads", 1, "TensorFlow intra-op threads (1, as a server runs adapt).")
flags.DEFINE_integer("repeats", 50, "Kernel runs per timed graph call.")
flags.DEFINE_integer("calls", 20, "Timed graph calls per kernel (the median is kept).")
FLAGS = flags.FLAGS

LAYERS = ((28, 1), (14, 64), (7, 64), (4, 64))  # (input side, input channels)
FILTERS = 64


def _looped(tf, op, repeats):
    """A graph loop running `op(a + i * 1e-6, b)` `repeats` times (the shift defeats caching)."""

    @tf.function
    def run(a, b):
        total = tf.constant(0.0)
        for i in tf.range(repeats):
            total += tf.reduce_sum(op(a + tf.cast(i, a.dtype) * 1e-6, b)[:1])
        return total

    return run


def _median_us(fn, args, repeats, calls):
    import numpy as np

    fn(*args).numpy()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append((time.perf_counter() - start) / repeats * 1e6)
    return float(np.median(times))


def main(argv):
    """Runs the benchmark (see the module docstring)."""
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf

    import flops

    if FLAGS.batch < 1 or FLAGS.repeats < 1 or FLAGS.calls < 1:
        raise app.UsageError("--batch, --repeats and --calls must be positive.")
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    # One inter-op thread: the loop's iterations are independent and would
    # otherwise run side by side, overstating a kernel's speed.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    n, r = FLAGS.batch, FLAGS.repeats
    print(f"conv4 convolutions, batch {n}, {FLAGS.threads} intra-op thread(s), "
          f"{os.cpu_count()} CPUs; median of {FLAGS.calls} calls of {r} kernel runs")
    print(f"{'layer':<16}{'MFLOP':>7}  {'forward us (GF/s)':>18}  {'filter grad':>14}  "
          f"{'input grad':>14}")
    step_us, step_mflop = 0.0, 0.0
    for side, channels in LAYERS:
        x = tf.random.normal([n, side, side, channels])
        kernel = tf.random.normal([3, 3, channels, FILTERS])
        y = tf.nn.conv2d(x, kernel, 2, "SAME")
        dy = tf.random.normal(y.shape)
        kernels = {
            "forward": (lambda a, b: tf.nn.conv2d(a, b, 2, "SAME"), (x, kernel)),
            "filter": (lambda a, b, c=channels: tf.compat.v1.nn.conv2d_backprop_filter(
                a, [3, 3, c, FILTERS], b, [1, 2, 2, 1], "SAME"), (x, dy)),
            "input": (lambda a, b, s=x.shape: tf.compat.v1.nn.conv2d_backprop_input(
                s, b, a, [1, 2, 2, 1], "SAME"), (dy, kernel)),
        }
        empty = _median_us(_looped(tf, lambda a, b: a[:1], r), (x, kernel), r, FLAGS.calls)
        mflop = 2 * n * y.shape[1] * y.shape[2] * FILTERS * 9 * channels / 1e6
        cells = []
        for name, (op, args) in kernels.items():
            us = max(_median_us(_looped(tf, op, r), args, r, FLAGS.calls) - empty, 1e-3)
            cells.append(f"{us:8.0f} ({mflop / us * 1e3:4.0f})")
            if name != "input" or channels > 1:
                step_us += us
                step_mflop += mflop
        print(f"{side}x{side}x{channels:<3} -> {y.shape[1]}x{y.shape[2]}x{FILTERS:<3}"
              f"{mflop:6.1f}  {cells[0]:>18}  {cells[1]:>14}  {cells[2]:>14}")
    peak = flops.matmul_peak()  # with the thread setting above
    print(f"one inner step of adapt: {step_us / 1e3:.2f} ms of convolution kernels for "
          f"{step_mflop:.0f} MFLOP ({step_mflop / step_us * 1e3:.0f} GFLOP/s); "
          f"at the {peak:.0f} GFLOP/s matmul peak: {step_mflop / peak:.2f} ms")


if __name__ == "__main__":
    app.run(main)
