"""Runs `MetaLearner.fit` on sine in a process of its own; prints the final weights' checksum.

usage: keras_face_run.py MODE OUT_JSON [BACKUP_DIR]
  MODE: single        one device
        mirrored:N    MirroredStrategy over N logical CPUs
        backup        BackupAndRestore in BACKUP_DIR; if KILL_AT=epoch,batch is set, the
                      process kills itself (SIGKILL) at that batch
  ALGO=reptile_carried: Reptile with Adam's state carried across tasks (default: maml);
  ALGO=maml_clip: MAML with the meta-gradient clipped (meta_gradient_clip), SGD outer steps
"""

import json
import os
import signal
import sys

import tensorflow as tf

mode, out = sys.argv[1], sys.argv[2]
replicas = int(mode.split(":")[1]) if mode.startswith("mirrored") else 1
if replicas > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)

import keras  # noqa: E402

import tf_maml  # noqa: E402

EPOCHS, STEPS, META_BATCH = 3, 4, 5  # 5 tasks: uneven over 2 replicas on purpose


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
            if replicas > 1 else tf.distribute.get_strategy())
with strategy.scope():
    keras.utils.set_random_seed(0)
    algorithm = os.environ.get("ALGO", "maml")
    options = {}
    if algorithm == "reptile_carried":
        algorithm, options = "reptile", dict(inner_optimizer="adam", carry_inner_state=True,
                                             num_inner_steps=3, meta_step_size=0.5,
                                             meta_step_size_final=0.5)
    if algorithm == "maml_clip":
        algorithm, options = "maml", dict(meta_gradient_clip=0.02)
    learner = tf_maml.MetaLearner(tf_maml.models.mlp(), algorithm=algorithm,
                                  inner_lr=0.01, **{"num_inner_steps": 1, **options})
    learner.compile(optimizer=(keras.optimizers.SGD(0.5) if "meta_gradient_clip" in options
                               else learner.default_optimizer() if options
                               else keras.optimizers.Adam(1e-3)),
                    loss="mse", metrics=["mse"], jit_compile=False)
callbacks = []
if mode == "backup":
    callbacks.append(keras.callbacks.BackupAndRestore(sys.argv[3]))
    if os.environ.get("KILL_AT"):
        callbacks.append(KillAt(*map(int, os.environ["KILL_AT"].split(","))))
history = learner.fit(tf_maml.Episodes(tf_maml.tasks.SineTasks(), META_BATCH), epochs=EPOCHS,
                      steps_per_epoch=STEPS, callbacks=callbacks, verbose=0)
result = {"weights": [w.tolist() for w in learner.get_weights()],
          "iterations": int(learner.optimizer.iterations.numpy()),
          "loss": history.history["loss"],
          "state": [float(v.numpy().sum()) for v in learner.algorithm.state_variables]}
if mode != "backup":
    # Evaluation: 3 meta-batches, whatever the number of replicas.
    result["evaluation"] = learner.evaluate(
        tf_maml.Episodes(tf_maml.tasks.SineTasks(), META_BATCH, split="test", num_batches=3),
        return_dict=True, verbose=0)
    # Keras' jit_compile="auto": XLA off under a strategy (it cannot place the optimizer's
    # replica variables), on for a dense model on one device (the CLI's rule).
    with strategy.scope():
        auto = tf_maml.MetaLearner(tf_maml.models.mlp(), inner_lr=0.01)
        auto.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    auto.fit(tf_maml.Episodes(tf_maml.tasks.SineTasks(), META_BATCH), epochs=1,
             steps_per_epoch=2, verbose=0)
    result["auto_jit"] = bool(auto.jit_compile)
    if algorithm == "maml":
        # A diverging step (inner_lr 1e30) stops fit with its one-line error and never
        # reaches the weights, on one device (maybe XLA) and on replicas alike.
        with strategy.scope():
            diverging = tf_maml.MetaLearner(tf_maml.models.mlp(), inner_lr=1e30)
            diverging.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        before = [w.tolist() for w in diverging.get_weights()]
        try:
            diverging.fit(tf_maml.Episodes(tf_maml.tasks.SineTasks(), META_BATCH), epochs=1,
                          steps_per_epoch=3, verbose=0)
            result["divergence"] = "no error"
        except ValueError as e:
            result["divergence"] = str(e)
        result["diverged_weights_kept"] = [w.tolist() for w in diverging.get_weights()] == before
        result["diverged_iterations"] = int(diverging.optimizer.iterations.numpy())
with open(out, "w") as f:
    json.dump(result, f)
