"""Benchmark: one identical XLA program compiled by TensorFlow's XLA and by JAX's.

    python bench/xla_compiler.py                                   # TensorFlow only
    python bench/xla_compiler.py --peer_python=/path/to/jax/python  # and JAX beside it

Sine's meta-step has almost no arithmetic (0.01 GFLOP): its time is the
compiled kernels' fixed costs, so it measures the compiler and its CPU runtime
as much as our graph. This bench separates the two. Each program is a
task-batched MLP forward (x `[25, 10, width]`, one weight set per task, as
`tf_maml`'s layer-batched forward computes it: batched matrix products and
ReLUs), run `--iterations` times in a compiled loop whose every iteration
depends on the previous one, so that the compiler can hoist nothing out of it:

* `sine`: sine's own widths, 1-40-40-1;
* `square`: three 40 -> 40 layers: only products with 40 x 40 weights, as
  sine's second layer and its adapted copies are.

Each is written once with TensorFlow ops under `tf.function(jit_compile=True)`
and once with `jax.numpy` under `jax.jit`, both on the CPU; both compile to
the same mathematics (`--print_hlo` shows each compiler's `dot`s; their
layouts may differ, e.g. `[25, 10]` against `[25, 10, 1]`). A difference in
time is the compiler's and its runtime's, not the program's.

JAX runs in its own process (`--peer_python` names an interpreter that has
`jax` installed; default: this one); without JAX only TensorFlow's figure is
printed. Both run in one invocation, one after the other; the median of
`--repeats` repetitions of at least `--min_seconds` each is reported, in
microseconds per loop iteration.
"""

import json
import os
import subprocess
import sys
import time

# absl is imported under `__main__` only: the JAX process (`--peer_python`)
# may run in an interpreter that has jax and numpy and nothing else.
TASKS, POINTS, HIDDEN = 25, 10, 40
# Two programs: sine's own layer widths (1-40-40-1), and three 40 -> 40 layers
# (only square batched products, the kind most of a meta-step's products are).
PROGRAMS = {"sine": (1, HIDDEN, HIDDEN, 1), "square": (HIDDEN, HIDDEN, HIDDEN, HIDDEN)}


def _weights(program, seed=0):
    import numpy as np

    widths = PROGRAMS[program]
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, (TASKS, POINTS, widths[0])).astype("float32")
    return x, [(0.3 * rng.standard_normal((TASKS, a, b))).astype("float32")
               for a, b in zip(widths[:-1], widths[1:])]


def _time(call, repeats, min_seconds):
    import numpy as np

    call()  # compile
    start = time.perf_counter()
    call()
    per_call = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(min_seconds / per_call))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def _dots(hlo):
    return [line.strip()[:160] for line in hlo.splitlines() if " dot(" in line]


def run_tensorflow(program, iterations, repeats, min_seconds):
    """`{"us_per_iteration", "version", "dots"}` of the TensorFlow side."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    x_value, w_values = _weights(program)
    with tf.device("/CPU:0"):
        x = tf.constant(x_value)
        weights = [tf.constant(w) for w in w_values]

    @tf.function(jit_compile=True)
    def loop(x, weights):
        def body(i, total):
            h = x * (1.0 + 1e-9 * total)  # depends on the previous iteration
            h = tf.nn.relu(tf.linalg.matmul(h, weights[0]))
            h = tf.nn.relu(tf.linalg.matmul(h, weights[1]))
            h = tf.linalg.matmul(h, weights[2])
            return i + 1, total + tf.reduce_sum(h)

        return tf.while_loop(lambda i, _: i < iterations, body, (0, tf.constant(0.0)))[1]

    with tf.device("/CPU:0"):  # JAX's side runs on the CPU too (jax[cpu])
        seconds = _time(lambda: loop(x, weights).numpy(), repeats, min_seconds)
        hlo = loop.experimental_get_compiler_ir(x, weights)(stage="optimized_hlo")
    return {"us_per_iteration": 1e6 * seconds / iterations, "version": tf.__version__,
            "dots": _dots(hlo)}


def run_jax(program, iterations, repeats, min_seconds):
    """`{"us_per_iteration", "version", "dots"}` of the JAX side."""
    import jax
    import jax.numpy as jnp

    x_value, w_values = _weights(program)
    x = jnp.asarray(x_value)
    weights = [jnp.asarray(w) for w in w_values]

    @jax.jit
    def loop(x, weights):
        def body(_, total):
            h = x * (1.0 + 1e-9 * total)
            h = jax.nn.relu(jnp.matmul(h, weights[0]))
            h = jax.nn.relu(jnp.matmul(h, weights[1]))
            h = jnp.matmul(h, weights[2])
            return total + jnp.sum(h)

        return jax.lax.fori_loop(0, iterations, body, jnp.zeros([], jnp.float32))

    seconds = _time(lambda: loop(x, weights).block_until_ready(), repeats, min_seconds)
    hlo = loop.lower(x, weights).compile().as_text()
    return {"us_per_iteration": 1e6 * seconds / iterations, "version": jax.__version__,
            "dots": _dots(hlo)}


def _jax_in_child(python, program, iterations, repeats, min_seconds):
    python = python or sys.executable
    probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    child = subprocess.run(
        [python, os.path.abspath(__file__), "_jax_child", program, str(iterations),
         str(repeats), str(min_seconds)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the JAX process failed: {child.stderr.strip()[-500:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    args = (FLAGS.iterations, FLAGS.repeats, FLAGS.min_seconds)
    print(f"{TASKS} tasks x {POINTS} points, one weight set per task, "
          f"{FLAGS.iterations} dependent iterations per compiled call; median of "
          f"{FLAGS.repeats} repetitions; microseconds per iteration")
    for program in FLAGS.programs:
        widths = "-".join(map(str, PROGRAMS[program]))
        tf_row = run_tensorflow(program, *args)
        jax_row = _jax_in_child(FLAGS.peer_python, program, *args)
        line = (f"{program:7s} {widths:12s} TensorFlow {tf_row['version']} XLA "
                f"{tf_row['us_per_iteration']:7.2f}")
        if jax_row is not None:
            ratio = tf_row["us_per_iteration"] / jax_row["us_per_iteration"]
            line += (f"   JAX {jax_row['version']} XLA {jax_row['us_per_iteration']:7.2f}"
                     f"   TensorFlow / JAX {ratio:.2f}")
        print(line)
        if FLAGS.print_hlo:
            for name, row in (("TensorFlow", tf_row), ("JAX", jax_row)):
                if row is not None:
                    print(f"  {name}'s dots:")
                    print("\n".join("    " + dot for dot in row["dots"]))
    if jax_row is None:
        print("JAX is not installed in the peer interpreter: pip install 'jax[cpu]' "
              "(or pass --peer_python)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_jax_child"]:
        program, iterations, repeats, min_seconds = sys.argv[2:6]
        print(json.dumps(run_jax(program, int(iterations), int(repeats), float(min_seconds))))
        sys.exit(0)
    from absl import app, flags

    flags.DEFINE_string("peer_python", None, "Python interpreter with jax installed (default: "
                        "this one).")
    flags.DEFINE_multi_enum("programs", list(PROGRAMS), list(PROGRAMS), "Programs to time.")
    flags.DEFINE_integer("iterations", 100, "Loop iterations per compiled call.")
    flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
    flags.DEFINE_float("min_seconds", 1.0, "Each repetition runs at least this long.")
    flags.DEFINE_boolean("print_hlo", False, "Print each compiler's dot instructions.")
    app.run(main)
