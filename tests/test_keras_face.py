"""The Keras face: `MetaLearner` with compile / fit / evaluate / save / export.

Behaviour, not shapes: `fit` equals the CLI trainer step for step; a run killed
and resumed by `BackupAndRestore` equals an uninterrupted one; two replicas
equal one device; `.keras` round trips continue training identically; the
export answers as the learner does in process; meta-learning beats joint
training; Keras' standard callbacks do their jobs.
"""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_maml
from tf_maml import config as config_lib
from tf_maml import models, trainer
from tf_maml.keras_face import Episodes, MetaLearner, keras_task_loss
from tf_maml.tasks import ImageClassTasks, SineTasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "keras_face_run.py")


def _sine_learner(algorithm="maml", seed=0, **options):
    keras.utils.set_random_seed(seed)
    options = {"inner_lr": 0.01, "num_inner_steps": 1, **options}
    learner = MetaLearner(models.mlp(), algorithm=algorithm, **options)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mse"])
    return learner


def _image_tasks(n_way=3):
    rng = np.random.default_rng(0)
    # Class c's images are bright in a class-specific block: learnable, small.
    images = np.zeros((12, 6, 8, 8, 1), np.uint8)
    for c in range(12):
        images[c, :, (c % 4) * 2:(c % 4) * 2 + 2, (c // 4) * 2:(c // 4) * 2 + 3] = 200
    images = np.clip(images + rng.integers(0, 60, images.shape), 0, 255).astype(np.uint8)
    return ImageClassTasks({"train": images[:8], "val": images[8:], "test": images[8:]},
                           n_way, 1, 2)


def _conv_learner(algorithm="maml", **options):
    keras.utils.set_random_seed(0)
    model = models.conv4(3, input_shape=(8, 8, 1), filters=4)
    learner = MetaLearner(model, algorithm=algorithm, inner_lr=0.4, num_inner_steps=1,
                          **options)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    return learner


def _run(args, env=None):
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, **(env or {})})
    return result


@pytest.mark.parametrize("algorithm,options", [
    ("maml", {}), ("metasgd", {}),
    ("reptile", dict(inner_optimizer="adam", inner_lr=0.01, num_inner_steps=3,
                     carry_inner_state=True, meta_step_size=0.5, meta_step_size_final=0.5))])
def test_fit_equals_the_cli_trainer(tmp_path, algorithm, options):
    """N steps of `fit` give the CLI trainer's weights (and state) for the same config and seed."""
    steps = 20
    config = config_lib.Config(algorithm=algorithm, num_iterations=steps, meta_batch_size=5,
                               log_every=steps, checkpoint_every=steps, validate_every=0,
                               jit_compile="false", **options)
    experiment, _ = trainer.train(config, str(tmp_path / "cli"))
    expected = experiment.algorithm.meta_variables + experiment.algorithm.state_variables

    keras.utils.set_random_seed(config.seed)
    learner_options = {k: v for k, v in options.items() if k not in ("inner_lr",
                                                                       "num_inner_steps")}
    learner = MetaLearner(models.build(config, (1,), 1), algorithm=algorithm,
                          inner_lr=config.inner_lr, num_inner_steps=config.num_inner_steps,
                          num_iterations=steps, **learner_options)
    # The CLI's outer optimizer: Adam(meta_lr), Reptile's SGD(ε).
    learner.compile(optimizer=learner.default_optimizer(), loss="mse", jit_compile=False)
    before = [v.numpy().copy() for v in learner.algorithm.meta_variables]  # this learner's init
    learner.fit(Episodes(SineTasks(), config.meta_batch_size, seed=config.seed), epochs=2,
                steps_per_epoch=steps // 2, verbose=0)
    got = learner.algorithm.meta_variables + learner.algorithm.state_variables
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        # Keras' mean-squared error and the library's differ only in float32 rounding.
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=0, atol=2e-6)
    assert max(np.abs(g.numpy() - b).max() for g, b in zip(got, before)) > 1e-3  # it trained


def test_meta_learning_beats_joint_training_and_adaptation_helps():
    learner = _sine_learner()
    pretrained = _sine_learner(num_inner_steps=0)
    for each in (learner, pretrained):
        each.fit(Episodes(SineTasks(), 25), epochs=1, steps_per_epoch=1500, verbose=0)
    curve = learner.evaluate_tasks(SineTasks(), num_tasks=200, num_steps=5)
    baseline = pretrained.evaluate_tasks(SineTasks(), num_tasks=200, num_steps=5)
    assert curve["metric"] == "mse" and curve["steps"] == [0, 1, 2, 3, 4, 5]
    assert curve["mean"][1] < 0.6 * curve["mean"][0]
    assert curve["mean"][1] < 0.7 * baseline["mean"][1]
    # Keras' evaluate reports the query loss after num_eval_steps steps.
    logs = learner.evaluate(Episodes(SineTasks(), 25, split="test"), return_dict=True,
                            verbose=0)
    assert logs["loss"] == pytest.approx(logs["mse"], rel=1e-5)
    assert logs["loss"] < 0.6 * curve["mean"][0]


def test_classification_metrics_are_post_adaptation_accuracy():
    learner = _conv_learner(num_eval_steps=3)
    tasks = _image_tasks()
    history = learner.fit(Episodes(tasks, 8), epochs=2, steps_per_epoch=40,
                          validation_data=Episodes(tasks, 8, split="val", num_batches=3),
                          verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    # The query accuracy the learner reports equals the CLI's evaluation of the same tasks.
    logs = learner.evaluate(Episodes(tasks, 10, split="test", num_batches=2), return_dict=True,
                            verbose=0)
    curve = learner.evaluate_tasks(tasks, num_tasks=20, batch_size=10)
    assert curve["steps"] == [0, 1, 2, 3]
    assert logs["accuracy"] == pytest.approx(curve["mean"][-1], abs=1e-6)
    assert curve["mean"][3] > curve["mean"][0] + 0.15
    assert logs["accuracy"] > 0.55  # 3-way: chance is 1/3


def test_episode_datasets_are_accepted_as_well():
    tasks = SineTasks()
    episodes = tf.data.Dataset.range(10).map(
        lambda i: tasks.sample(tf_maml.tasks.step_seed(0, i), 5))
    as_dicts = episodes.map(lambda e: e._asdict())
    learner = _sine_learner()
    initial = [w.copy() for w in learner.get_weights()]
    history = learner.fit(episodes.repeat(), epochs=1, steps_per_epoch=10, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    trained = learner.get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(trained, initial)) > 1e-3  # it trained
    # Dicts are the same episodes: the same training and the same evaluation.
    from_dicts = _sine_learner()
    from_dicts.fit(as_dicts.repeat(), epochs=1, steps_per_epoch=10, verbose=0)
    for a, b in zip(from_dicts.get_weights(), trained):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    on_dicts = learner.evaluate(as_dicts, return_dict=True, verbose=0)["loss"]
    on_episodes = learner.evaluate(episodes, return_dict=True, verbose=0)["loss"]
    assert np.isfinite(on_dicts) and on_dicts == pytest.approx(on_episodes, rel=1e-5)


def test_keras_save_and_load_round_trip_continues_identically(tmp_path):
    learner = _sine_learner(algorithm="metasgd")
    train = Episodes(SineTasks(), 5)
    learner.fit(train, epochs=1, steps_per_epoch=5, verbose=0)
    path = str(tmp_path / "learner.keras")
    learner.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, MetaLearner) and loaded.meta_config == learner.meta_config
    assert int(loaded.optimizer.iterations) == 5
    for a, b in zip(learner.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Learned rates are weights of the learner, and they moved.
    rates = loaded.algorithm.extra_variables
    assert rates and not np.allclose(rates[0].numpy(), 0.01)
    # Optimizer state came back: both continue to the same weights.
    for each in (learner, loaded):
        each.fit(train, epochs=2, initial_epoch=1, steps_per_epoch=5, verbose=0)
    for a, b in zip(learner.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_a_learner_saved_with_a_regularized_model_still_loads(tmp_path, caplog):
    """Saved before such models were refused (their losses were left out of training): it
    loads as it was trained, with a warning, instead of failing to load at all."""
    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(8, activation="relu",
                                kernel_regularizer=keras.regularizers.l2(1e-3))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    with pytest.raises(ValueError, match="has regularization losses"):
        MetaLearner(model, inner_lr=0.01)
    with tf_maml.functional.keras_losses_ignored():  # as an earlier version built it
        learner = MetaLearner(model, inner_lr=0.01)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=2, verbose=0)
    path = str(tmp_path / "old.keras")
    learner.save(path)
    loaded = keras.models.load_model(path)
    assert "has regularization losses" in caplog.text
    assert "Loading it as it was trained" in caplog.text
    for a, b in zip(learner.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # New models are still refused after a load.
    with pytest.raises(ValueError, match="has regularization losses"):
        MetaLearner(model, inner_lr=0.01)


def test_mixed_float16_steps_are_the_meta_gradients_not_2_to_the_15_smaller():
    """Keras' compile wraps the optimizer in a LossScaleOptimizer under mixed_float16, which
    divides the gradients by its loss scale; the meta-step used to pass them unscaled, so
    every update was 32768 times too small."""
    changes = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            learner = MetaLearner(models.mlp(), inner_lr=0.01)
            learner.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
            before = [w.copy() for w in learner.get_weights()]
            learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=1, verbose=0)
            changes[policy] = max(float(np.abs(a - b).max())
                                  for a, b in zip(before, learner.get_weights()))
            if policy == "mixed_float16":
                assert isinstance(learner.optimizer, keras.optimizers.LossScaleOptimizer)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    # float16 activations round differently; the step's size is the same.
    assert 0.5 < changes["mixed_float16"] / changes["float32"] < 2, changes


def test_meta_gradient_clip_bounds_every_element_of_the_update():
    """One SGD(1) step moves no weight by more than meta_gradient_clip, and some by exactly
    that much; without the clip the same step moves some weight further."""
    changes = {}
    for clip in (0.0, 0.01):
        keras.utils.set_random_seed(0)
        learner = MetaLearner(models.mlp(), inner_lr=0.01, meta_gradient_clip=clip)
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", jit_compile=False)
        before = [w.copy() for w in learner.get_weights()]
        learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=1, verbose=0)
        changes[clip] = max(float(np.abs(a - b).max())
                            for a, b in zip(before, learner.get_weights()))
    assert changes[0.01] == pytest.approx(0.01, rel=1e-6)
    assert changes[0.0] > 0.05, changes


def test_a_strategy_step_compiled_with_xla_trains_and_stops_on_divergence():
    """Under a strategy with jit_compile=True the in-graph check compiles (it once formatted
    its message in the graph, which XLA cannot) and a diverging run still stops in one line."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    for inner_lr in (0.01, 1e30):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            learner = MetaLearner(models.mlp(), inner_lr=inner_lr)
            learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=True)
        if inner_lr < 1:
            initial = [w.copy() for w in learner.get_weights()]
            history = learner.fit(Episodes(SineTasks(), 4), epochs=1, steps_per_epoch=2,
                                  verbose=0)
            assert np.isfinite(history.history["loss"][0])
            moved = max(np.abs(a - b).max() for a, b in zip(learner.get_weights(), initial))
            assert moved > 1e-4, moved  # two Adam steps of 1e-3 trained it
        else:
            with pytest.raises(ValueError, match=r"^meta-training diverged (at|by) step 1") as e:
                learner.fit(Episodes(SineTasks(), 4), epochs=1, steps_per_epoch=2, verbose=0)
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("algorithm,options", [
    ("metasgd", {}), ("reptile", {"inner_optimizer": "sgd", "inner_batch_size": 2}),
    ("reptile", {"inner_optimizer": "adam", "carry_inner_state": True})])
def test_export_answers_as_the_learner_does(tmp_path, algorithm, options):
    learner = _conv_learner(algorithm=algorithm, num_eval_steps=3, **options)
    tasks = _image_tasks()
    learner.fit(Episodes(tasks, 4), epochs=1, steps_per_epoch=5, verbose=0)
    path = learner.export(str(tmp_path / "export"))
    assert path.endswith(os.path.join("export", "1"))
    episode = tasks.sample(tf_maml.tasks.step_seed(3, 0), 1, "test")
    expected = learner.adapt_and_predict(episode.support_x[0], episode.support_y[0],
                                         episode.query_x[0])
    loaded = tf.saved_model.load(path)
    got = loaded.signatures["adapt"](support_x=episode.support_x[0],
                                     support_y=episode.support_y[0],
                                     query_x=episode.query_x[0])["predictions"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with open(os.path.join(path, "assets.extra", "tf_maml_config.json")) as f:
        saved = json.load(f)
    assert saved["algorithm"] == algorithm and saved["export_num_eval_steps"] == 3
    # Tasks given in code: no N-way K-shot shape is recorded (the config's would be its
    # defaults, 5-way 10-shot, not these 3-way 1-shot tasks').
    assert saved["dataset"] == "custom" and not {"n_way", "k_shot", "k_query"} & set(saved)
    # Adaptation moved the predictions (the learned rates are used).
    assert np.abs(expected - learner.predict(episode.query_x[0], verbose=0)).max() > 1e-4


def test_standard_callbacks_do_their_jobs(tmp_path):
    learner = _conv_learner()
    tasks = _image_tasks()
    best = str(tmp_path / "best.keras")
    log = str(tmp_path / "log.csv")
    stopped = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    snapshots = []  # the weights at each epoch's end
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.append([w.copy()
                                                           for w in learner.get_weights()]))
    history = learner.fit(
        Episodes(tasks, 4), epochs=6, steps_per_epoch=3,
        validation_data=Episodes(tasks, 4, split="val", num_batches=2),
        callbacks=[
            keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy", mode="max",
                                            save_best_only=True),
            keras.callbacks.CSVLogger(log),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                              min_delta=10.0),
            stopped,
            record,
        ], verbose=0)
    # EarlyStopping with an impossible min_delta stops after patience + 2 epochs.
    assert len(history.history["loss"]) == 2 and stopped.stopped_epoch == 1
    # ReduceLROnPlateau halved the meta-optimizer's learning rate after the second epoch.
    assert float(learner.optimizer.learning_rate) == pytest.approx(1e-3 / 2)
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"accuracy", "loss", "val_accuracy", "val_loss"} <= set(rows[0])
    best_epoch = int(np.argmax(history.history["val_accuracy"]))
    restored = keras.models.load_model(best)
    assert isinstance(restored, MetaLearner)
    # The file holds the best epoch's weights (the first of equals: saved on improvement only).
    assert len(snapshots) == len(rows)
    for a, b in zip(snapshots[best_epoch], restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(name.startswith("events") for _, _, files in os.walk(tmp_path / "tb")
               for name in files)


def test_learning_rate_schedules_drive_the_meta_optimizer():
    learner = _sine_learner()
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [1e-3, 0.0])
    learner.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    initial = [w.copy() for w in learner.get_weights()]
    learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=4, verbose=0)
    after_four = [w.copy() for w in learner.get_weights()]
    # 1e-3 for the first steps: the weights moved...
    assert max(np.abs(a - b).max() for a, b in zip(after_four, initial)) > 1e-5
    learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=3, verbose=0)
    for a, b in zip(after_four, learner.get_weights()):  # the rate is 0 from step 4 on
        np.testing.assert_array_equal(a, b)


def test_killed_fit_resumes_with_backup_and_restore_exactly(tmp_path):
    reference, resumed = str(tmp_path / "reference.json"), str(tmp_path / "resumed.json")
    backup = str(tmp_path / "backup")
    assert _run(["single", reference]).returncode == 0
    killed = _run(["backup", resumed, backup], env={"KILL_AT": "1,2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(resumed)
    assert os.listdir(backup), "no backup was written before the kill"
    again = _run(["backup", resumed, backup])
    assert again.returncode == 0, again.stderr[-2000:]
    with open(reference) as f, open(resumed) as g:
        ref, res = json.load(f), json.load(g)
    assert res["iterations"] == ref["iterations"] == 12
    # The rerun resumed at the killed epoch (1 of 0..2), not from scratch: it ran only
    # epochs 1 and 2, and they saw what the uninterrupted run's epochs 1 and 2 saw.
    assert len(res["loss"]) == 2, res["loss"]
    assert res["loss"] == pytest.approx(ref["loss"][1:], rel=1e-6)
    for a, b in zip(ref["weights"], res["weights"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("algorithm", ["maml", "reptile_carried", "maml_clip"])
def test_two_replicas_equal_one_device(tmp_path, algorithm):
    single, mirrored = str(tmp_path / "single.json"), str(tmp_path / "mirrored.json")
    for mode, out in (("single", single), ("mirrored:2", mirrored)):
        result = _run([mode, out], env={"ALGO": algorithm})
        assert result.returncode == 0, result.stderr[-3000:]
    with open(single) as f, open(mirrored) as g:
        one, two = json.load(f), json.load(g)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for name in ("loss", "mse"):  # the same 3 evaluation meta-batches, padding excluded
        assert two["evaluation"][name] == pytest.approx(one["evaluation"][name], rel=1e-5)
    assert one["auto_jit"] is True and two["auto_jit"] is False
    for a, b in zip(one["weights"], two["weights"]):  # Reptile's carried state included
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=1e-6)
    if algorithm == "maml":
        for run in (one, two):
            assert run["divergence"].startswith(
                "meta-training diverged at step 1: the meta-loss or its gradient is not finite; "
                "the update was not applied"), run["divergence"]
            assert "\n" not in run["divergence"]
            assert run["diverged_weights_kept"] and run["diverged_iterations"] == 0
    if algorithm == "reptile_carried":
        # The step count is every task's steps (12 iterations x 5 tasks x 3), not a sum of
        # the replicas' counts; the summed moment shares equal the single device's.
        assert one["state"][-1] == two["state"][-1] == 12 * 5 * 3
        np.testing.assert_allclose(two["state"], one["state"], rtol=1e-5)


def test_adapt_and_predict_takes_one_task_or_many():
    learner = _sine_learner()
    learner.fit(Episodes(SineTasks(), 25), epochs=1, steps_per_epoch=300, verbose=0)
    episode = SineTasks().sample(tf_maml.tasks.step_seed(5, 0), 3, "test")
    many = learner.adapt_and_predict(episode.support_x, episode.support_y, episode.query_x,
                                     num_steps=2)
    one = learner.adapt_and_predict(episode.support_x[1], episode.support_y[1],
                                    episode.query_x[1], num_steps=2)
    assert many.shape == (3, 10, 1) and one.shape == (10, 1)
    np.testing.assert_allclose(one, many[1], rtol=1e-5, atol=1e-6)
    before = learner.predict(episode.query_x[1], verbose=0)
    error = lambda p: float(np.mean((p - episode.query_y[1].numpy()) ** 2))  # noqa: E731
    assert error(one) < error(before)
    with pytest.raises(ValueError, match="support_x must be"):
        learner.adapt_and_predict(np.zeros((2, 3, 4, 1)), np.zeros((2, 3)), np.zeros((2, 3, 1)))
    # num_steps and inner_lr are taken: 0 steps or a zero rate predict as the initialization.
    task = (episode.support_x[1], episode.support_y[1], episode.query_x[1])
    np.testing.assert_allclose(learner.adapt_and_predict(*task, num_steps=0), before,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learner.adapt_and_predict(*task, inner_lr=0.0), before,
                               rtol=1e-5, atol=1e-6)
    assert error(learner.adapt_and_predict(*task, num_steps=1)) > error(one)
    # A step size as a tensor or a 0-d array is a number like any other.
    by_float = learner.adapt_and_predict(*task, inner_lr=0.05)
    assert np.abs(by_float - learner.adapt_and_predict(*task)).max() > 1e-3
    for rate in (tf.constant(0.05), np.array(0.05, np.float32)):
        np.testing.assert_allclose(learner.adapt_and_predict(*task, inner_lr=rate),
                                   by_float, rtol=1e-6)


def test_user_mistakes_get_clear_errors():
    with pytest.raises(ValueError, match="must be built"):
        MetaLearner(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        MetaLearner(models.mlp(), algorithm="mamll")
    with pytest.raises(ValueError, match="unknown MetaLearner options: inner_learning_rate"):
        MetaLearner(models.mlp(), inner_learning_rate=0.1)
    learner = MetaLearner(models.mlp())
    with pytest.raises(ValueError, match="compile the MetaLearner first"):
        learner.fit(Episodes(SineTasks(), 5), steps_per_epoch=1)
    learner.compile(optimizer="adam")
    with pytest.raises(ValueError, match="needs a loss"):
        learner.fit(Episodes(SineTasks(), 5), steps_per_epoch=1)
    learner.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="y must be None"):
        learner.fit(np.zeros((4, 1)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="expects meta-batches"):
        learner.fit(tf.data.Dataset.from_tensors(np.zeros((4, 1), np.float32)),
                    steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="split="):
        learner.fit(Episodes(SineTasks(), 5, split="val"), steps_per_epoch=1)
    with pytest.raises(ValueError, match="task family"):
        Episodes([1, 2, 3], 5)


def test_keras_losses_become_per_task_losses():
    y_true = tf.constant([[0, 1], [2, 2]])
    logits = tf.random.normal([2, 2, 3])
    got = keras_task_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))(
        y_true, logits)
    expected = tf_maml.losses.sparse_softmax_cross_entropy(y_true, logits)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    y = tf.random.normal([3, 4, 1])
    p = tf.random.normal([3, 4, 1])
    np.testing.assert_allclose(keras_task_loss("mse")(y, p),
                               tf_maml.losses.mean_squared_error(y, p), rtol=1e-6)


def test_adapt_and_predict_takes_what_users_pass():
    learner = _conv_learner()
    tasks = _image_tasks()
    learner.fit(Episodes(tasks, 4), epochs=1, steps_per_epoch=2, verbose=0)
    episode = tasks.sample(tf_maml.tasks.step_seed(1, 0), 1, "test")
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    expected = learner.adapt_and_predict(sx, sy, qx)
    # Raw uint8 images are scaled as the task families scale them; float64 is cast.
    as_uint8 = [np.round(t.numpy() * 255).astype(np.uint8) for t in (sx, qx)]
    np.testing.assert_allclose(learner.adapt_and_predict(as_uint8[0], sy, as_uint8[1]),
                               expected, atol=1e-5)
    np.testing.assert_allclose(
        learner.adapt_and_predict(tf.cast(sx, tf.float64), sy, tf.cast(qx, tf.float64)),
        expected, atol=1e-5)
    # Regression labels of either rank, one after the other.
    sine = _sine_learner()
    task = SineTasks().sample(tf_maml.tasks.step_seed(2, 0), 1, "test")
    with_axis = sine.adapt_and_predict(task.support_x[0], task.support_y[0], task.query_x[0])
    without = sine.adapt_and_predict(task.support_x[0], task.support_y[0][:, 0],
                                     task.query_x[0])
    np.testing.assert_allclose(with_axis, without, atol=1e-6)


def test_models_we_did_not_design_and_their_mistakes():
    class NoTraining(keras.Model):  # `call` without a `training` argument
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

    model = NoTraining()
    model(np.zeros((1, 1), np.float32))
    learner = MetaLearner(model, inner_lr=0.01)
    learner.compile(optimizer="adam", loss="mse")
    initial = [w.copy() for w in learner.get_weights()]
    history = learner.fit(Episodes(SineTasks(), 5), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert max(np.abs(a - b).max() for a, b in zip(learner.get_weights(), initial)) > 1e-4
    # ...and it adapts: the support loss after a step of a larger rate is below the initial one.
    task = SineTasks().sample(tf_maml.tasks.step_seed(3, 0), 1, "test")
    support_x, support_y = task.support_x[0], task.support_y[0]
    adapted = learner.adapt_and_predict(support_x, support_y, support_x, inner_lr=0.05)
    loss = lambda p: float(np.mean((p - support_y.numpy()) ** 2))  # noqa: E731
    assert loss(adapted) < loss(learner.predict(support_x, verbose=0)) - 1e-4
    # Evaluation episodes of the training split end (100 tasks by default).
    assert np.isfinite(learner.evaluate(Episodes(SineTasks(), 25), return_dict=True,
                                        verbose=0)["loss"])

    learner = _conv_learner()
    learner.model.layers[0].trainable = False
    with pytest.raises(ValueError, match="set `trainable` on layers before wrapping"):
        learner.fit(Episodes(_image_tasks(), 4), steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="the tasks are 4-way"):
        _conv_learner().fit(Episodes(_image_tasks(n_way=4), 4), steps_per_epoch=1, verbose=0)
    small = tf_maml.tasks.array_tasks(np.random.rand(60, 3), np.repeat(np.arange(12), 5),
                                      n_way=2, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="fewer than"):
        Episodes(small, 4, k_shot=10)
