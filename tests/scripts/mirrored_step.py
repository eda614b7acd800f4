"""Runs meta-steps on one device and under MirroredStrategy over N logical CPUs; prints the gap.

usage: mirrored_step.py NUM_REPLICAS first|second sine|conv|conv_clip|reptile

reptile: Reptile on sine with Adam's state carried across tasks (the replicas
each assign their share of the new state). conv_clip: conv with the meta-gradient
clipped to [-CLIP, CLIP] (the clip must act on the sum over replicas).
"""

import json
import sys

import tensorflow as tf

num_replicas, order, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_maml import config as config_lib  # noqa: E402
from tf_maml import experiment as experiment_lib  # noqa: E402
from tf_maml import trainer  # noqa: E402
from tf_maml.tasks import ImageClassTasks  # noqa: E402

META_BATCH = 5  # uneven over 2 and 4 replicas on purpose
CLIP = 0.004
if kind == "sine":
    tasks = None
    config = config_lib.Config(meta_batch_size=META_BATCH, first_order=order == "first",
                               jit_compile="false")
elif kind == "reptile":
    tasks = None
    config = config_lib.Config(meta_batch_size=META_BATCH, algorithm="reptile",
                               inner_optimizer="adam", inner_lr=0.01, num_inner_steps=3,
                               carry_inner_state=True, jit_compile="false")
else:
    images = np.random.default_rng(0).integers(0, 255, (6, 4, 12, 12, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, 3, 1, 2)
    config = config_lib.Config(dataset="omniglot", n_way=3, k_shot=1, k_query=2, inner_lr=0.4,
                               meta_batch_size=META_BATCH, first_order=order == "first",
                               jit_compile="false",
                               meta_gradient_clip=CLIP if kind == "conv_clip" else 0.0)

results = {}
for name in ("single", "mirrored"):
    strategy = (tf.distribute.get_strategy() if name == "single" else
                tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)]))
    with strategy.scope():
        experiment = experiment_lib.build_experiment(config, tasks)
        # SGD: the update is the meta-gradient itself. (Adam's first step is
        # lr * sign(g) for tiny |g|, which turns float noise into lr-sized gaps.)
        optimizer = keras.optimizers.SGD(0.5)
        optimizer.build(experiment.algorithm.meta_variables)
        step = tf.Variable(0, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    train_step = trainer.make_train_step(experiment, optimizer, step, strategy=strategy)
    logs = None
    for i in range(2):
        episode = experiment.tasks.sample(tf.constant([7, i], tf.int64), META_BATCH)
        logs = train_step(episode)
    results[name] = ([v.numpy() for v in experiment.model.trainable_variables],
                     {k: float(v) for k, v in logs.items()}, int(step.numpy()),
                     [v.numpy() for v in experiment.algorithm.state_variables])

single, mirrored = results["single"], results["mirrored"]
print(json.dumps({
    "max_weight_gap": max(float(np.max(np.abs(a - b))) for a, b in zip(single[0], mirrored[0])),
    "max_weight_change": max(float(np.max(np.abs(a - b))) for a, b in
                             zip(single[0], [v.numpy() for v in
                                             experiment_lib.build_experiment(config, tasks)
                                             .model.trainable_variables])),
    "log_gap": max(abs(single[1][k] - mirrored[1][k]) for k in single[1]
                   if k != "meta_gradient_norm"),
    "steps": [single[2], mirrored[2]],
    "norms": [single[1].get("meta_gradient_norm"), mirrored[1].get("meta_gradient_norm")],
    # The algorithm's state (Reptile's carried Adam moments and step count), relative.
    "state_gaps": [float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
                   for a, b in zip(single[3], mirrored[3])],
    "state_step_counts": [float(single[3][-1]), float(mirrored[3][-1])] if single[3] else [],
}))
