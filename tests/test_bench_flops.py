"""bench/flops.py counts the FLOPs behind the benchmarks' "GFLOP/s" and "x floor" columns."""

import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import flops  # noqa: E402


def test_convolution_and_matmul_flops_of_a_gradient_graph():
    x = tf.random.normal([2, 8, 8, 3])
    kernel = tf.random.normal([3, 3, 3, 5])
    dense = tf.random.normal([80, 4])

    @tf.function
    def step(x, kernel, dense):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, dense])
            h = tf.nn.conv2d(x, kernel, 2, "SAME")  # [2, 4, 4, 5]
            y = tf.linalg.matmul(tf.reshape(h, [2, 80]), dense)  # [2, 4]
            loss = tf.reduce_sum(tf.nn.relu(y))
        return tape.gradient(loss, [x, kernel, dense])

    counted = flops.graph_flops(step.get_concrete_function(x, kernel, dense).graph)
    conv = 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)  # 2 FLOPs per multiply-add of each output
    matmul = 2 * 2 * 80 * 4
    # Forward and both backward kernels of each: three times the forward.
    assert counted["by_op"] == {"Conv2D": conv, "Conv2DBackpropInput": conv,
                                "Conv2DBackpropFilter": conv, "MatMul": 3 * matmul}
    assert counted["dense"] == 3 * conv + 3 * matmul
    assert counted["unknown"] == 0 and counted["while_loops"] == 0


def test_grouped_convolutions_count_each_group_once():
    # 4 groups of 2 input channels: a quarter of a dense convolution's work.
    x = tf.random.normal([1, 6, 6, 8])
    kernel = tf.random.normal([3, 3, 2, 12])
    graph = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")).get_concrete_function(
        x, kernel).graph
    assert flops.graph_flops(graph)["dense"] == 2 * (6 * 6 * 12) * (3 * 3 * 2)


def test_functions_called_by_the_graph_are_counted():
    a = tf.random.normal([4, 6])
    b = tf.random.normal([6, 3])
    inner = tf.function(lambda a, b: tf.linalg.matmul(a, b))

    @tf.function
    def outer(a, b, flag):
        return tf.cond(flag, lambda: inner(a, b), lambda: tf.zeros([4, 3]))

    graph = outer.get_concrete_function(a, b, tf.constant(True)).graph
    assert flops.graph_flops(graph)["dense"] == 2 * 4 * 6 * 3


def test_a_function_called_twice_counts_twice_and_a_cond_counts_one_branch():
    a = tf.random.normal([4, 6])
    b = tf.random.normal([6, 3])
    inner = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    one = 2 * 4 * 6 * 3

    twice = tf.function(lambda a, b: inner(a, b) + inner(a, b))
    assert flops.graph_flops(twice.get_concrete_function(a, b).graph)["dense"] == 2 * one

    @tf.function
    def either(a, b, flag):
        return tf.cond(flag, lambda: tf.linalg.matmul(a, b), lambda: tf.linalg.matmul(a, b) * 2)

    graph = either.get_concrete_function(a, b, tf.constant(True)).graph
    assert flops.graph_flops(graph)["dense"] == one
