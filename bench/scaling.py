"""Benchmark: meta-steps/s with 1, 2 and 4 replicas (MirroredStrategy), and scaling efficiency.

    python bench/scaling.py                   # logical CPU devices (this machine)
    python bench/scaling.py --devices=gpu     # one replica per GPU, up to 1, 2, 4 GPUs

Workload: Omniglot-shaped conv4 (stride-2 convolutions, batch norm), 5-way
1-shot, 1 query per class, meta-batch 32, 1 inner step, second order, on
synthetic 28x28 images. Each replica count runs in its own process (logical
devices are fixed when TensorFlow starts). Efficiency = speed-up / replicas.
On logical CPU devices all replicas share the same cores: this measures the
overhead of distribution, not a speed-up.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("replicas", ["1", "2", "4"], "Replica counts.")
flags.DEFINE_enum("devices", "cpu", ["cpu", "gpu"], "Logical CPU devices or GPUs.")
flags.DEFINE_integer("steps", 20, "Timed meta-steps per replica count.")
flags.DEFINE_integer("meta_batch_size", 32, "Global meta-batch size.")
flags.DEFINE_string("_child", None, "Internal: replica count to run.")
FLAGS = flags.FLAGS


def child(num_replicas):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf
    if FLAGS.devices == "cpu":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)
        devices = [f"/cpu:{i}" for i in range(num_replicas)]
    else:
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) < num_replicas:
            return {"replicas": num_replicas, "skipped": f"only {len(gpus)} GPU(s)"}
        devices = [f"/gpu:{i}" for i in range(num_replicas)]
    import keras
    import numpy as np

    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    from tf_maml import trainer
    from tf_maml.tasks import ImageClassTasks

    images = np.random.default_rng(0).integers(0, 255, (20, 20, 28, 28, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, 5, 1, 1)
    config = config_lib.Config(dataset="omniglot", n_way=5, k_shot=1, k_query=1, inner_lr=0.4,
                               meta_batch_size=FLAGS.meta_batch_size, jit_compile="false")
    strategy = (tf.distribute.OneDeviceStrategy(devices[0]) if num_replicas == 1
                else tf.distribute.MirroredStrategy(devices))
    with strategy.scope():
        experiment = experiment_lib.build_experiment(config, tasks)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(experiment.algorithm.meta_variables)
        step = tf.Variable(0, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    train_step = trainer.make_train_step(experiment, optimizer, step, strategy=strategy)
    episode = tasks.sample(tf.constant([0, 0], tf.int64), FLAGS.meta_batch_size)
    for _ in range(3):
        float(train_step(episode)["meta_loss"])
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        logs = train_step(episode)
    float(logs["meta_loss"])
    return {"replicas": num_replicas, "steps_per_s": FLAGS.steps / (time.perf_counter() - start)}


def main(argv):
    del argv
    if FLAGS._child:
        print(json.dumps(child(int(FLAGS._child))))
        return
    print(f"{FLAGS.devices} replicas, Omniglot 5-way 1-shot conv4, meta-batch "
          f"{FLAGS.meta_batch_size}, second order, {os.cpu_count()} CPUs\n")
    print(f"{'replicas':>8} {'steps/s':>9} {'speed-up':>9} {'efficiency':>11}")
    base = None
    for count in FLAGS.replicas:
        result = subprocess.run([sys.executable, __file__, f"--_child={count}",
                                 f"--devices={FLAGS.devices}", f"--steps={FLAGS.steps}",
                                 f"--meta_batch_size={FLAGS.meta_batch_size}"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{count:>8} failed:\n{result.stderr[-2000:]}")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        if "skipped" in row:
            print(f"{count:>8} skipped: {row['skipped']}")
            continue
        base = base or row["steps_per_s"]
        speedup = row["steps_per_s"] / base
        print(f"{count:>8} {row['steps_per_s']:>9.2f} {speedup:>9.2f} "
              f"{speedup / int(count):>11.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
