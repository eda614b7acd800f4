"""FLOPs of a traced TensorFlow function, and the machine's measured matmul peak.

    python bench/flops.py            # the matmul peak of this machine, 1 thread and all cores

`bench/meta_step.py` uses `graph_flops` to count the floating-point work of
one meta-step and prints achieved GFLOP/s next to `matmul_peak`: the
"FLOP floor" of a meta-step is its FLOPs divided by that peak, the time it
would take if every FLOP ran at large-matmul speed.

What is counted: the multiply-adds of convolutions (forward and both
backward kernels, grouped ones included) and matrix products, as 2 FLOPs
each, from the static shapes of the traced graph, including the graphs of
the functions it calls, at every call site (of a `tf.cond`'s branches only
the costliest, since one runs). Elementwise work (activations, Adam, batch
norm, the fused batch-norm kernels included) is counted separately as one
FLOP per output element: it runs at memory speed, not at matmul speed, so it
is reported apart. A `tf.while_loop` body is counted once (its trip count is
not in the graph); the meta-steps of the benchmarks unroll their inner steps
in Python, so they have none (with `--steps_per_call` the loop's body is one
meta-step, which is what is reported).
"""

import time

import numpy as np

_DENSE = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "DepthwiseConv2dNative",
          "MatMul", "BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
_ELEMENTWISE = ("Relu", "ReluGrad", "AddV2", "Add", "Sub", "Mul", "RealDiv", "Neg", "Square",
                "SquaredDifference", "Rsqrt", "Sqrt", "Exp", "Log", "Maximum", "Minimum",
                "BiasAdd", "BiasAddGrad", "Sum", "Mean", "Select", "SelectV2", "Tanh",
                "TanhGrad", "Sigmoid", "SigmoidGrad", "Softmax", "LogSoftmax",
                "SparseSoftmaxCrossEntropyWithLogits", "FusedBatchNormV3",
                "FusedBatchNormGradV3", "MaxPool", "MaxPoolGrad", "AddN", "Pow",
                "ResourceApplyAdam", "AssignSubVariableOp", "AssignAddVariableOp")


def _shape(tensor):
    shape = tensor.shape
    if shape.rank is None or any(d is None for d in shape.as_list()):
        return None
    return shape.as_list()


# Convolution op -> (the tensor shaped like the convolution's output, the
# tensor shaped like its kernel), as (is_output, index) pairs.
_CONVOLUTION_SHAPES = {
    "Conv2D": ((True, 0), (False, 1)),
    "Conv2DBackpropInput": ((False, 2), (False, 1)),  # input_sizes, filter, out_backprop
    "Conv2DBackpropFilter": ((False, 2), (True, 0)),  # input, filter_sizes, out_backprop
}


def _dense_flops(op):
    """2 × multiply-adds of one convolution / matmul op, or None if shapes are unknown."""
    kind = op.type
    if kind in _CONVOLUTION_SHAPES:
        # All three kernels do one multiply-add per output element and kernel
        # tap of one group's input channels.
        out, kernel = (_shape(op.outputs[i] if is_output else op.inputs[i])
                       for is_output, i in _CONVOLUTION_SHAPES[kind])
        if out is None or kernel is None:
            return None
        return 2 * int(np.prod(out)) * kernel[0] * kernel[1] * kernel[2]
    if kind == "DepthwiseConv2dNative":
        out, kernel = _shape(op.outputs[0]), _shape(op.inputs[1])
        if out is None or kernel is None:
            return None
        return 2 * int(np.prod(out)) * kernel[0] * kernel[1]
    if kind in ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
        a, out = _shape(op.inputs[0]), _shape(op.outputs[0])
        if a is None or out is None:
            return None
        transpose = op.get_attr("transpose_a" if kind == "MatMul" else "adj_x")
        inner = a[-2] if transpose else a[-1]
        return 2 * int(np.prod(out)) * inner
    return None


_BRANCHING = ("If", "StatelessIf", "Case", "StatelessCase")


def _called_functions(op, graph):
    """The FuncGraphs an op calls (PartitionedCall, If, While, ...)."""
    graphs = []
    for attr in op.node_def.attr.values():
        names = []
        if attr.HasField("func"):
            names.append(attr.func.name)
        if attr.HasField("list"):
            names += [f.name for f in attr.list.func]
        for name in names:
            function = graph._get_function(name)  # pylint: disable=protected-access
            if function is not None and hasattr(function, "graph"):
                graphs.append(function.graph)
    return graphs


def _empty_totals():
    return {"dense": 0, "elementwise": 0, "by_op": {}, "unknown": 0, "while_loops": 0}


def _add(totals, other):
    for key in ("dense", "elementwise", "unknown", "while_loops"):
        totals[key] += other[key]
    for kind, value in other["by_op"].items():
        totals["by_op"][kind] = totals["by_op"].get(kind, 0) + value


def graph_flops(graph):
    """Counts the FLOPs of one run of a traced graph.

    A function the graph calls is counted at every call site; of the branches
    of a `tf.cond` (`If`, `Case`) only the costliest, since one runs; a
    `tf.while_loop` body once.

    Args:
        graph: a `tf.Graph`, e.g. `tf_function.get_concrete_function(...).graph`.

    Returns:
        A dict: `dense` (FLOPs of convolutions and matrix products),
        `elementwise` (output elements of elementwise and reduction ops),
        `by_op` (dense FLOPs per op type), `unknown` (dense ops whose shapes
        were not static; their FLOPs are missing from `dense`) and
        `while_loops` (loops whose bodies were counted once).
    """
    cache = {}

    def count(g, active):
        if id(g) in cache:
            return cache[id(g)]
        totals = _empty_totals()
        for op in g.get_operations():
            if op.type in _DENSE:
                flops = _dense_flops(op)
                if flops is None:
                    totals["unknown"] += 1
                else:
                    totals["dense"] += flops
                    totals["by_op"][op.type] = totals["by_op"].get(op.type, 0) + flops
            elif op.type in _ELEMENTWISE and op.outputs:
                shape = _shape(op.outputs[0])
                if shape is not None:
                    totals["elementwise"] += int(np.prod(shape))
            if op.type in ("While", "StatelessWhile"):
                totals["while_loops"] += 1
            called = [c for c in _called_functions(op, g) if id(c) not in active]
            counted = [count(c, active | {id(c)}) for c in called]
            if op.type in _BRANCHING and counted:
                _add(totals, max(counted, key=lambda t: (t["dense"], t["elementwise"])))
            else:
                for other in counted:
                    _add(totals, other)
        cache[id(g)] = totals
        return totals

    result = count(graph, {id(graph)})
    return {**result, "by_op": dict(result["by_op"])}


def matmul_peak(threads=0, size=1024, seconds=1.0):
    """GFLOP/s of a large float32 matrix product on this machine.

    Runs in a fresh process-wide thread setting only if TensorFlow has not
    started yet; call it from a process of its own (as `main` does) to set
    `threads`.

    Args:
        threads: TensorFlow intra-op threads (0: its default, all cores).
        size: the matrices are `size × size`.
        seconds: time to measure for.

    Returns:
        The best GFLOP/s over the repetitions.
    """
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    a = tf.random.uniform([size, size])
    b = tf.random.uniform([size, size])

    @tf.function
    def product(a, b):
        return tf.linalg.matmul(a, b)

    product(a, b).numpy()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        product(a, b).numpy()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def main():
    import json
    import os
    import subprocess
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print(json.dumps(matmul_peak(int(sys.argv[2]))))
        return
    for threads in (1, 0):
        out = subprocess.run([sys.executable, __file__, "--_child", str(threads)],
                             capture_output=True, text=True, check=True).stdout
        label = "1 thread" if threads == 1 else f"all {os.cpu_count()} cores"
        print(f"float32 matmul peak, {label}: {json.loads(out.splitlines()[-1]):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
