"""Meta-training end to end: MAML beats the pretrained baseline, resume, crash safety, CLI."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import evaluation, functional, reporting, trainer
from tf_maml import tasks as tasks_lib

QUICK = dict(log_every=100, checkpoint_every=100, validate_every=0, num_eval_tasks=200)


def _weights(experiment):
    return [v.numpy() for v in experiment.model.trainable_variables]


def test_short_meta_training_beats_pretrained_baseline(tmp_path):
    maml_dir, base_dir = str(tmp_path / "maml"), str(tmp_path / "pretrained")
    trainer.train(config_lib.Config(num_iterations=1500, **QUICK), maml_dir)
    trainer.train(config_lib.Config(num_iterations=1500, num_inner_steps=0, **QUICK), base_dir)
    results = reporting.evaluate_and_report(maml_dir, baseline_dir=base_dir, num_eval_steps=2)
    maml, pretrained = results["MAML"][0], results["pretrained"][0]
    # Adaptation helps MAML a lot, and MAML after one step beats the fine-tuned baseline.
    assert maml[1] < 0.5 * maml[0]
    assert maml[1] < 0.6 * pretrained[1]
    saved = json.load(open(os.path.join(maml_dir, reporting.RESULTS_FILENAME)))
    assert saved["results"]["MAML"]["mean"][1] == pytest.approx(maml[1])
    for name in (reporting.CURVE_FILENAME, reporting.SINE_FIT_FILENAME):
        assert os.path.getsize(os.path.join(maml_dir, name)) > 10_000


def test_resume_continues_the_same_run(tmp_path, start_steps):
    config = config_lib.Config(num_iterations=60, checkpoint_every=20, log_every=20,
                               validate_every=0, meta_batch_size=5)
    straight, _ = trainer.train(config, str(tmp_path / "straight"))
    trainer.train(config_lib.Config(**{**config.to_dict(), "num_iterations": 30}),
                  str(tmp_path / "resumed"))
    resumed, step = trainer.train(config, str(tmp_path / "resumed"))
    assert step == 60
    assert start_steps == [0, 0, 30]  # the third call resumed at 30, not from scratch
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_interrupted_training_keeps_its_progress(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_validate", interrupt)
    config = config_lib.Config(num_iterations=100, checkpoint_every=1000, log_every=50,
                               validate_every=37, meta_batch_size=5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, str(tmp_path))
    _, step = experiment_lib.restore(str(tmp_path))
    assert step == 37


class _Child:
    """A child process whose stderr a thread reads line by line: every wait is bounded.

    All waits share one deadline, so a child that hangs (or never prints what is
    expected) fails the test after `timeout` seconds instead of hanging CI.
    """

    def __init__(self, args, timeout, env=None):
        self.deadline = time.monotonic() + timeout
        self.lines = []
        self._queue = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def _remaining(self):
        return max(self.deadline - time.monotonic(), 0)

    def output(self):
        return "".join(self.lines)

    def wait_for(self, text):
        """Reads lines until one contains `text`; returns it."""
        while True:
            try:
                line = self._queue.get(timeout=self._remaining())
            except queue.Empty:
                raise AssertionError(f"no {text!r} in time:\n{self.output()[-3000:]}") from None
            if line is None:
                raise AssertionError(f"exited before {text!r}:\n{self.output()[-3000:]}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self):
        """Waits for the exit (and the rest of the output); returns the exit code."""
        try:
            self.process.wait(timeout=self._remaining())
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit in time:\n{self.output()[-3000:]}") from None
        self._reader.join(timeout=10)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _one_worker_cluster(port):
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]},
                                     "task": {"type": "worker", "index": 0}})}


@pytest.mark.parametrize("strategy", ["default", "multi_worker"])
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, strategy, start_steps,
                                                        free_ports):
    """multi_worker: TensorFlow's preemption notifier took SIGTERM over ("SIGTERM caught")
    and training went on until the SIGKILL that follows, losing the work since the last
    checkpoint."""
    model_dir = str(tmp_path / "run")
    child = _Child(["tf_maml.train", f"--model_dir={model_dir}", "--num_iterations=10000000",
                    "--log_every=200", "--checkpoint_every=10000000", "--validate_every=0",
                    "--noevaluate", f"--strategy={strategy}"], timeout=240,
                   env=_one_worker_cluster(*free_ports(1)) if strategy == "multi_worker" else None)
    try:
        child.wait_for("steps/s")  # step 200 is done: a checkpoint is due at SIGTERM
        child.process.send_signal(signal.SIGTERM)
        code = child.finish()
        assert code == 130, child.output()[-5000:]
    finally:
        child.kill()
    output = child.output()
    assert "Traceback" not in output
    _, step = experiment_lib.restore(model_dir)
    assert step >= 200
    assert f"Interrupted at step {step}; saved checkpoint" in output
    assert "Rerun the same command to resume" in output
    if strategy == "default":
        config = config_lib.load(model_dir)
        config.num_iterations = step + 5
        _, resumed = trainer.train(config, model_dir)
        assert resumed == step + 5
        assert start_steps == [step]  # resumed where the signal saved it, not from 0


def test_sigterm_before_the_first_step_says_nothing_was_saved(tmp_path):
    model_dir = str(tmp_path / "run")
    child = _Child(["tf_maml.train", f"--model_dir={model_dir}", "--num_iterations=10000000",
                    "--log_every=200", "--validate_every=0", "--noevaluate"], timeout=240)
    try:
        child.wait_for("Meta-training")  # logged before the loop is traced and compiled
        child.process.send_signal(signal.SIGTERM)
        code = child.finish()
        assert code == 130, child.output()[-5000:]
    finally:
        child.kill()
    output = child.output()
    assert "Traceback" not in output and "checkpointed" not in output
    checkpoints = experiment_lib.checkpoint_paths(os.path.join(model_dir, "checkpoints"))
    if checkpoints:  # the signal came late (a slow machine): then it must say which
        _, step = experiment_lib.restore(model_dir)
        assert f"saved checkpoint {checkpoints[0]}" in output and step > 0
    else:
        assert ("Interrupted; no checkpoint has been written in" in output
                or "Interrupted at step 0; no checkpoint has been written" in output), output


def test_an_interrupt_inside_a_finalizer_prints_nothing_and_still_stops(monkeypatch, capfd):
    """A signal that lands where Python prints tracebacks itself (a finalizer drops its
    exception: `Exception ignored in ...`) stays quiet and is delivered again."""
    from tf_maml import train as train_cli

    class Finalized:
        def __del__(self):
            try:
                raise KeyboardInterrupt("received signal 15")
            except KeyboardInterrupt:  # as TensorFlow's C++ reports an interrupted callback
                raise SystemError("<built-in function __import__> returned a result with an "
                                  "exception set")

    monkeypatch.setattr(train_cli, "_SIGNALS", [])
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, not pytest's
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    previous = signal.signal(signal.SIGTERM, train_cli._interrupt)
    try:
        train_cli._quiet_interrupts()
        capfd.readouterr()
        Finalized()  # no signal received: an ordinary error, reported as Python does
        assert "SystemError" in capfd.readouterr().err
        train_cli._SIGNALS.append(signal.SIGTERM)
        Finalized()
        with pytest.raises(KeyboardInterrupt, match="received signal 15"):
            for _ in range(200):
                time.sleep(0.05)
        assert capfd.readouterr().err == ""
        # Other errors still print after a signal.
        class Broken:
            def __del__(self):
                raise ValueError("unrelated")

        Broken()
        assert "ValueError: unrelated" in capfd.readouterr().err
        # ... also while the interrupt is being handled (a checkpoint being saved): the
        # finalizer's error has the interrupt as context, not as cause. Reported, and
        # no signal is sent again.
        try:
            raise KeyboardInterrupt("received signal 15")
        except KeyboardInterrupt:
            Broken()
            time.sleep(0.5)  # a signal sent again would interrupt this
        assert "ValueError: unrelated" in capfd.readouterr().err
        # An interrupt that escaped main's handling: one line, no traceback.
        sys.excepthook(KeyboardInterrupt, KeyboardInterrupt("received signal 15"), None)
        assert capfd.readouterr().err == "Interrupted (received signal 15).\n"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert train_cli._from_interrupt(SystemError("x")) is False


def test_interrupt_reports_what_is_saved(tmp_path, monkeypatch):
    config = config_lib.Config(num_iterations=20, checkpoint_every=10, log_every=10,
                               validate_every=0, meta_batch_size=5)
    real_loop = trainer.make_train_loop

    def interrupted_loop(train_step):
        def loop(iterator, num_steps):
            raise KeyboardInterrupt
        return loop

    monkeypatch.setattr(trainer, "make_train_loop", interrupted_loop)
    with pytest.raises(trainer.Interrupted) as info:
        trainer.train(config, str(tmp_path))
    assert (info.value.step, info.value.saved, info.value.latest) == (0, None, None)
    assert "no checkpoint has been written" in str(info.value)
    monkeypatch.setattr(trainer, "make_train_loop", real_loop)
    trainer.train(config_lib.Config(**{**config.to_dict(), "num_iterations": 10}), str(tmp_path))
    monkeypatch.setattr(trainer, "make_train_loop", interrupted_loop)
    with pytest.raises(trainer.Interrupted) as info:
        trainer.train(config, str(tmp_path))
    assert info.value.step == 10 and info.value.saved is None
    assert info.value.latest.endswith("ckpt-10")
    assert "no new checkpoint written, the latest is" in str(info.value)


def test_sigterm_during_the_evaluation_after_training_exits_cleanly(tmp_path):
    model_dir = str(tmp_path / "run")
    child = _Child(["tf_maml.train", f"--model_dir={model_dir}", "--num_iterations=20",
                    "--log_every=10", "--validate_every=0", "--num_eval_tasks=600"], timeout=240)
    try:
        child.wait_for("evaluating MAML")
        child.process.send_signal(signal.SIGTERM)
        code = child.finish()
        assert code == 130, child.output()[-5000:]
    finally:
        child.kill()
    output = child.output()
    assert "Traceback" not in output
    assert "Interrupted during the evaluation; training is complete (step 20" in output
    assert experiment_lib.restore(model_dir)[1] == 20


def test_training_loop_traces_once():
    import keras
    experiment = experiment_lib.build_experiment(config_lib.Config(meta_batch_size=4))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(experiment.algorithm.meta_variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_step = trainer.make_train_step(experiment, optimizer, step, jit_compile=True)
    train_loop = trainer.make_train_loop(train_step)
    dataset = tasks_lib.episode_dataset(lambda s: experiment.tasks.sample(s, 4), 0, 0, 100)
    iterator = iter(dataset)
    for num_steps in (1, 7, 3, 20, 1, 5):
        train_loop(iterator, tf.constant(num_steps, tf.int64))
    assert int(step) == 37
    assert train_loop.experimental_get_tracing_count() == 1
    assert train_step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("num_inner_steps", [0, 1])
def test_train_step_logs_are_finite(num_inner_steps):
    """The pretrained baseline (no inner steps) logs no support loss rather than NaN."""
    import keras
    experiment = experiment_lib.build_experiment(
        config_lib.Config(meta_batch_size=4, num_inner_steps=num_inner_steps))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(experiment.algorithm.meta_variables)
    train_step = trainer.make_train_step(experiment, optimizer, tf.Variable(0, dtype=tf.int64))
    logs = train_step(experiment.tasks.sample(tf.constant([0, 1], tf.int64), 4))
    assert all(np.isfinite(float(value)) for value in logs.values()), logs
    assert ("support_loss_before_adaptation" in logs) == bool(num_inner_steps)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_meta_gradient_clip_and_norm_are_those_of_the_meta_gradient(algorithm):
    """A step with SGD(1) subtracts the meta-gradient clipped elementwise, and logs the
    global norm of the unclipped one."""
    import keras
    clip = 0.01
    experiment = experiment_lib.build_experiment(config_lib.Config(
        meta_batch_size=4, algorithm=algorithm, meta_gradient_clip=clip, jit_compile="false"))
    variables = experiment.algorithm.meta_variables
    episode = experiment.tasks.sample(tf.constant([0, 1], tf.int64), 4)
    _, grads, _ = experiment.algorithm.meta_step(episode, 0.25, tf.constant(0, tf.int64))
    before = [v.numpy().copy() for v in variables]
    optimizer = keras.optimizers.SGD(1.0)
    optimizer.build(variables)
    train_step = trainer.make_train_step(experiment, optimizer, tf.Variable(0, dtype=tf.int64))
    logs = train_step(episode)
    assert float(logs["meta_gradient_norm"]) == pytest.approx(
        float(tf.linalg.global_norm(grads)), rel=1e-5)
    clipped = 0
    for b, v, g in zip(before, variables, grads):
        np.testing.assert_allclose(v.numpy(), b - np.clip(g.numpy(), -clip, clip), rtol=0,
                                   atol=1e-6)
        clipped += int(np.sum(np.abs(g.numpy()) > clip))
    assert clipped > 0  # the clip acted


def test_resume_refuses_other_data_and_follows_moved_data(tmp_path):
    """data_dir may change on resume (moved data), the classes may not (a redrawn split)."""
    import shutil

    from PIL import Image

    rng = np.random.default_rng(0)

    def add_classes(root, first, count):
        for c in range(first, first + count):
            (root / f"class_{c:02d}").mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels).save(root / f"class_{c:02d}" / f"{i}.png")

    original, moved = tmp_path / "data", tmp_path / "moved"
    add_classes(original, 0, 10)
    config = config_lib.Config(dataset="folder", data_dir=str(original), cache_dir="",
                               n_way=2, k_shot=1, k_query=1, meta_batch_size=2,
                               num_iterations=2, validate_every=0, checkpoint_every=2)
    model_dir = str(tmp_path / "run")
    trainer.train(config, model_dir)
    shutil.copytree(original, moved)
    _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "data_dir": str(moved),
                                                 "num_iterations": 3}), model_dir)
    assert step == 3
    add_classes(moved, 10, 5)
    with pytest.raises(ValueError, match=r"is not the data the run in .* was trained on \(test: "
                                         r"2 -> 3 classes, 8 -> 12 examples; train: 6 -> 10 "):
        trainer.train(config_lib.Config(**{**config.to_dict(), "data_dir": str(moved),
                                           "num_iterations": 4}), model_dir)
    # Same counts, other classes.
    shutil.rmtree(moved)
    shutil.copytree(original, moved)
    os.rename(moved / "class_03", moved / "class_99")
    with pytest.raises(ValueError, match=r": other class names"):
        trainer.train(config_lib.Config(**{**config.to_dict(), "data_dir": str(moved),
                                           "num_iterations": 4}), model_dir)
    # Evaluating on other data is refused alike; on the run's own (moved) data it works.
    with pytest.raises(ValueError, match=r": other class names"):
        reporting.evaluate_and_report(model_dir, output_dir=str(tmp_path / "eval"),
                                      data_dir=str(moved), num_eval_tasks=2)
    assert experiment_lib.restore(model_dir)[1] == 3
    os.rename(moved / "class_99", moved / "class_03")
    experiment_lib.restore(model_dir, {"data_dir": str(moved)}, load_tasks=True)
    # A damaged record is not trusted (a warning), rather than crashing the resume.
    with open(os.path.join(model_dir, experiment_lib.DATA_FILENAME), "w") as f:
        f.write("[1, 2]")
    experiment_lib.restore(model_dir, {"data_dir": str(moved)}, load_tasks=True)
    # A removed record is not silent either.
    os.remove(os.path.join(model_dir, experiment_lib.DATA_FILENAME))
    with mock.patch.object(experiment_lib.logging, "warning") as warning:
        experiment_lib.restore(model_dir, {"data_dir": str(moved)}, load_tasks=True)
    assert any("cannot be checked against the data the run was trained on" in c[0][0] % c[0][1:]
               for c in warning.call_args_list)
    # Resuming training without a readable record records the data found now, and says so.
    with open(os.path.join(model_dir, experiment_lib.DATA_FILENAME), "w") as f:
        f.write("{damaged")
    with mock.patch.object(experiment_lib.logging, "warning") as warning:
        _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "data_dir": str(moved),
                                                     "num_iterations": 3}), model_dir)
    assert step == 3 and any(
        "now records the data found at data_dir" in c[0][0] % c[0][1:]
        for c in warning.call_args_list), warning.call_args_list
    assert experiment_lib.read_data_fingerprint(
        os.path.join(model_dir, experiment_lib.DATA_FILENAME)) is not None
    # One colour image (same name, same counts) makes the folder RGB: the shape change is
    # named, where the checkpoints' "incompatible tensor" failure advised moving them away.
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        moved / "class_03" / "0.png")
    resumed = config_lib.Config(**{**config.to_dict(), "data_dir": str(moved),
                                   "num_iterations": 4})
    shape_changed = (r"gives inputs of shape \(8, 8, 3\) and 2 outputs, but the run in .* was "
                     r"trained on \(8, 8, 1\) and 2 .*--image_channels")
    with pytest.raises(ValueError, match=shape_changed):
        trainer.train(resumed, model_dir)
    with pytest.raises(ValueError, match=shape_changed):
        experiment_lib.restore(model_dir, {"data_dir": str(moved)}, load_tasks=True)


def test_changed_config_is_refused_and_extension_allowed(tmp_path):
    config = config_lib.Config(num_iterations=10, validate_every=0, meta_batch_size=2)
    trainer.train(config, str(tmp_path))
    with pytest.raises(ValueError, match="inner_lr: 0.01 -> 0.5"):
        trainer.train(config_lib.Config(**{**config.to_dict(), "inner_lr": 0.5}), str(tmp_path))
    _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "num_iterations": 15}),
                            str(tmp_path))
    assert step == 15
    # Asking for fewer iterations than the run has does nothing and keeps its num_iterations
    # (the evaluation settings of the rerun are taken).
    _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "num_iterations": 5,
                                                 "num_eval_tasks": 7}), str(tmp_path))
    saved = config_lib.load(str(tmp_path))
    assert step == 15 and saved.num_iterations == 15 and saved.num_eval_tasks == 7
    # Where the outer optimizer's schedule spans num_iterations, extending is refused.
    for options, schedule in ((dict(algorithm="mamlpp"), "MAML\\+\\+'s cosine schedule"),
                              (dict(algorithm="reptile"), "Reptile's annealing")):
        saved = config_lib.Config(**{**config.to_dict(), **options})
        with pytest.raises(ValueError, match=f"num_iterations: 10 -> 15, which would stretch "
                                             f"{schedule}"):
            config_lib.check_resumable(saved, config_lib.Config(**{**saved.to_dict(),
                                                                   "num_iterations": 15}))
    constant = config_lib.Config(**{**config.to_dict(), "algorithm": "reptile",
                                    "meta_step_size_final": 1.0})
    config_lib.check_resumable(constant, config_lib.Config(**{**constant.to_dict(),
                                                              "num_iterations": 15}))
    # RL: XLA draws other random numbers, so its episodes differ: no switch on resume.
    rl = config_lib.Config(dataset="navigation2d")
    with pytest.raises(ValueError, match="jit_compile: 'auto' -> 'true', which samples other "
                                         "episodes"):
        config_lib.check_resumable(rl, config_lib.Config(dataset="navigation2d",
                                                         jit_compile="true"))
    config_lib.check_resumable(rl, config_lib.Config(dataset="navigation2d",
                                                     jit_compile="false"))
    config_lib.check_resumable(config_lib.Config(jit_compile="true"), config_lib.Config())
    # "auto" is the model it resolves to (the quick start's run resumed with sine.flags),
    # but not another model.
    auto = config_lib.Config(model="auto")
    config_lib.check_resumable(auto, config_lib.Config(model="mlp"))
    config_lib.check_resumable(config_lib.Config(model="mlp"), auto)
    omniglot = config_lib.Config(dataset="omniglot", model="auto", n_way=5, k_shot=1)
    config_lib.check_resumable(omniglot, config_lib.Config(**{**omniglot.to_dict(),
                                                              "model": "conv4"}))
    with pytest.raises(ValueError, match="model: 'auto' -> 'conv4_maxpool'"):
        config_lib.check_resumable(omniglot, config_lib.Config(**{**omniglot.to_dict(),
                                                                  "model": "conv4_maxpool"}))


def test_evaluation_uses_the_same_tasks_for_every_model():
    tasks = tasks_lib.SineTasks()
    a = tasks.sample(tasks_lib.step_seed(0, 3, tasks_lib.TEST), 4)
    b = tasks.sample(tasks_lib.step_seed(0, 3, tasks_lib.TEST), 4)
    c = tasks.sample(tasks_lib.step_seed(0, 3, tasks_lib.TRAIN), 4)
    np.testing.assert_array_equal(a.support_x.numpy(), b.support_x.numpy())
    assert not np.allclose(a.support_x.numpy(), c.support_x.numpy())


def test_auto_xla_choices():
    from tf_maml import models
    config = config_lib.Config()
    assert experiment_lib.resolve_jit_compile(config, models.mlp())
    if not tf.config.list_physical_devices("GPU"):
        assert not experiment_lib.resolve_jit_compile(config, models.conv4(5))
    pooled = models.conv4(5, input_shape=(16, 16, 3), filters=4, pooling="max")
    assert not experiment_lib.resolve_jit_compile(config, pooled)
    assert not experiment_lib.resolve_jit_compile(
        config_lib.Config(jit_compile="false"), models.mlp())
    # Recurrent layers: XLA cannot compile their loops' second derivative.
    import keras
    class Encoder(keras.layers.Layer):  # a recurrent layer inside a custom one
        def __init__(self):
            super().__init__()
            self.rnn = keras.layers.SimpleRNN(4)

        def call(self, x):
            return self.rnn(x)

    for recurrent in (keras.layers.LSTM(4), keras.layers.Bidirectional(keras.layers.GRU(4)),
                      Encoder()):
        model = keras.Sequential([keras.Input((5, 3)), recurrent, keras.layers.Dense(2)])
        assert not experiment_lib.resolve_jit_compile(config, model)

    # Convolutions and max-pooling inside a custom layer count as well: with XLA, this
    # model's second-order meta-gradient was 4e-3 off (max-pooling), and slower (conv).
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3, padding="same")
            self.pool = keras.layers.MaxPooling2D(2)

        def call(self, x):
            return self.pool(self.conv(x))

    hidden = keras.Sequential([keras.Input((8, 8, 2)), Block(), keras.layers.Flatten(),
                               keras.layers.Dense(2)])
    assert not experiment_lib.resolve_jit_compile(config, hidden)
    # (That model runs task by task anyway; the layers are looked for inside custom layers
    # whichever forward a model takes.)
    assert not experiment_lib.resolve_jit_compile(config, hidden, vectorized=True)
    # Dense-only models run task by task (make_forward's fallback) get no XLA: it cannot
    # compile the second derivative of some of their ops (Permute's transpose, below).
    permuted = keras.Sequential([keras.Input((3, 4)), keras.layers.Permute((2, 1)),
                                 keras.layers.Flatten(), keras.layers.Dense(2)])
    assert not functional.make_forward(permuted).vectorized
    assert not experiment_lib.resolve_jit_compile(config, permuted)
    assert experiment_lib.resolve_jit_compile(config_lib.Config(jit_compile="true"), permuted)


def test_metalearner_default_trains_a_model_run_task_by_task():
    """`compile()`'s default used to turn XLA on for this dense-only model, and its second-order
    meta-step then failed to compile ("must be a compile-time constant")."""
    import keras

    import tf_maml
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.TimeDistributed(
        keras.layers.Dense(3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensors({
        name: rng.normal(size=(4, 5, 3, 4) if name.endswith("x") else (4, 5, 2)).astype("float32")
        for name in ("support_x", "support_y", "query_x", "query_y")})
    learner = tf_maml.MetaLearner(model, inner_lr=0.01, num_inner_steps=1)
    learner.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert learner.jit_compile is False
    before = [w.numpy() for w in model.trainable_weights]
    history = learner.fit(data, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.allclose(w, b) for w, b in zip(model.trainable_weights, before))


def test_confidence_interval():
    per_task = np.array([[1.0, 3.0] * 50])
    mean, ci = evaluation.summarize(per_task)
    assert mean[0] == 2.0
    assert ci[0] == pytest.approx(1.96 * np.sqrt(100 / 99) / 10.0)  # the sample std
    _, ci = evaluation.summarize(np.array([[0.5]]))
    assert np.isnan(ci[0])  # one task: no interval


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="meta_batch_size must be a positive integer"):
        config_lib.Config(meta_batch_size=0).validate()
    with pytest.raises(ValueError, match="dataset must be"):
        config_lib.Config(dataset="mnist").validate()
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        config_lib.Config.from_dict({"bogus": 1})
    # One problem, said once (a negative rate was also "below float32's smallest").
    with pytest.raises(ValueError) as e:
        config_lib.Config(inner_lr=-0.1).validate()
    assert "inner_lr must be a positive number, got -0.1" in str(e.value)
    assert str(e.value).count("inner_lr") == 1
    with pytest.raises(ValueError, match="inner_lr must be at least 1.18e-38"):
        config_lib.Config(inner_lr=1e-50).validate()


def _run(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("command,own", [
    ("tf_maml.train", ("--model_dir", "--inner_lr", "--meta_batch_size", "--dataset")),
    ("tf_maml.evaluate", ("--model_dir", "--num_eval_steps", "--original_test_goals")),
    ("tf_maml.export", ("--export_dir", "--inner_lr", "--checkpoint"))])
@pytest.mark.parametrize("started_as", ["module", "console_script"])
def test_help_lists_the_commands_flags(command, own, started_as):
    """`--help` lists the configuration's flags, which tf_maml.cli defines (before: only the
    two or three flags of the command's own module; the rest under --helpfull), whether the
    command starts as `python -m tf_maml.train` or as setup.py's `tf_maml_train` (which
    listed no flag and no description)."""
    if started_as == "module":
        result = _run(command, "--help")  # absl's --help exits with status 1
    else:
        script = os.path.join(os.path.dirname(sys.executable), command.replace(".", "_"))
        assert os.path.exists(script), f"{script}: installed by pip install -e ."
        result = subprocess.run([script, "--help"], capture_output=True, text=True,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=600)
    assert f"python -m {command}" in result.stdout  # the module's description
    listed = {line.split(":")[0].strip().split("--", 1)[-1]
              for line in result.stdout.splitlines() if line.startswith("  --")}
    for flag in own:
        assert flag[2:] in listed or f"[no]{flag[2:]}" in listed, (flag, sorted(listed))


def test_a_stray_word_is_one_line_not_the_whole_help(tmp_path):
    """A flagfile line without its -- (or a stray word) printed the 233 lines of --help
    above the error."""
    (tmp_path / "typo.flags").write_text("num_iterations=10\n--inner_lr=0.02\n")
    result = _run("tf_maml.train", f"--flagfile={tmp_path / 'typo.flags'}",
                  f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unexpected argument 'num_iterations=10': flags start with -- (--name=value, "
        "in a flagfile too; see --help)")
    assert "--inner_lr" not in result.stderr + result.stdout  # no help text
    assert not (tmp_path / "run").exists()


def test_cli_trains_evaluates_and_reports_errors(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = str(tmp_path / "run")
    result = _run("tf_maml.train", "--flagfile=flags/sine.flags", f"--model_dir={model_dir}",
                  "--num_iterations=30", "--log_every=10", "--num_eval_tasks=20",
                  "--num_eval_steps=3", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "mse on 20 held-out sine tasks" in result.stdout
    assert "steps/s" in result.stderr and "ETA" in result.stderr
    saved = config_lib.load(model_dir)
    assert saved.num_iterations == 30 and saved.inner_lr == 0.01
    assert os.path.exists(os.path.join(model_dir, "eval_curve.png"))

    result = _run("tf_maml.evaluate", f"--model_dir={model_dir}", "--num_eval_steps=2",
                  "--num_eval_tasks=10", f"--output_dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr
    assert json.load(open(tmp_path / "eval" / "eval_results.json"))["num_tasks"] == 10
    # Without --output_dir another protocol's results go beside the run's own, not over them
    # (named by the flags that change it: --transductive repeats the run's own value).
    result = _run("tf_maml.evaluate", f"--model_dir={model_dir}", "--num_eval_steps=1",
                  "--num_eval_tasks=5", "--transductive")
    assert result.returncode == 0, result.stderr
    beside = os.path.join(model_dir, "eval_num_eval_steps=1_num_eval_tasks=5")
    assert json.load(open(os.path.join(beside, "eval_results.json")))["num_tasks"] == 5
    assert json.load(open(os.path.join(model_dir, "eval_results.json")))["num_tasks"] == 20
    # --inner_lr always names another protocol, even at the run's own value: it replaces
    # learned rates (Meta-SGD, MAML++) and a baseline's own rate.
    result = _run("tf_maml.evaluate", f"--model_dir={model_dir}", "--num_eval_steps=1",
                  "--num_eval_tasks=5", "--inner_lr=0.01")
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(model_dir, "eval_inner_lr=0.01_num_eval_steps=1_"
                                                  "num_eval_tasks=5", "eval_results.json"))

    bad = _run("tf_maml.train", f"--model_dir={tmp_path / 'x'}", "--meta_batch_size=0")
    assert bad.returncode != 0 and "meta_batch_size must be a positive integer" in bad.stderr
    assert "Traceback" not in bad.stderr
    # A bad protocol value is refused before results are said to go anywhere.
    bad = _run("tf_maml.evaluate", f"--model_dir={model_dir}", "--num_eval_tasks=-4")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "error: num_eval_tasks must be a positive integer, got -4")
    assert "results go to" not in bad.stderr
    missing = _run("tf_maml.evaluate", f"--model_dir={tmp_path / 'nothing'}")
    assert missing.returncode == 1 and "must be a directory written by tf_maml.train" in missing.stderr
    assert "Traceback" not in missing.stderr
    changed = _run("tf_maml.train", f"--model_dir={model_dir}", "--num_iterations=30",
                   "--inner_lr=0.1", "--noevaluate")
    assert changed.returncode == 1 and "different configuration" in changed.stderr


def test_baseline_on_other_tasks_and_conv_on_vectors_are_refused_in_one_line(tmp_path):
    run, base = str(tmp_path / "run"), str(tmp_path / "base")
    config_lib.save(config_lib.Config(), run)  # sine
    config_lib.save(config_lib.Config(dataset="folder", data_dir="/x"), base)
    experiment_lib.save_spec(tasks_lib.TaskSpec((8, 8, 1), 5, True), base)
    with pytest.raises(ValueError, match=r"--baseline_dir .* holds a run on folder tasks, inputs "
                                         r"\(8, 8, 1\), 5 outputs, model conv4; --model_dir "
                                         r".*: sine tasks, inputs \(1,\), 1 outputs, model mlp"):
        reporting.evaluate_and_report(run, baseline_dir=base)
    config_lib.save(config_lib.Config(dataset="navigation2d"), base)
    with pytest.raises(ValueError, match=r"holds a navigation2d run; --model_dir .*: sine"):
        reporting.evaluate_and_report(run, baseline_dir=base)
    with pytest.raises(ValueError, match=r"model conv4 takes images \(height, width, channels\); "
                                         r"the sine inputs have shape \(1,\)"):
        experiment_lib.build_experiment(config_lib.Config(model="conv4"))


def test_a_relative_data_dir_is_saved_absolute_so_other_directories_find_the_data(
        tmp_path, monkeypatch):
    """`train --data_dir=data` then `evaluate --model_dir=...` from another directory: the
    saved config names the data, not a path that only meant something in the first cwd."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    run = str(tmp_path / "run")
    config_lib.save(config_lib.Config(dataset="folder", data_dir="data", cache_dir="cache"), run)
    monkeypatch.chdir(tmp_path)
    saved = config_lib.load(run)
    assert saved.data_dir == str(tmp_path / "work" / "data")
    assert saved.cache_dir == str(tmp_path / "work" / "cache")
    for kept in ("~/omniglot", "gs://bucket/omniglot", ""):  # not tied to the cwd
        config_lib.save(config_lib.Config(dataset="folder", data_dir=kept or "/x",
                                          cache_dir=kept), run)
        assert config_lib.load(run).cache_dir == kept


@pytest.mark.parametrize("content", ['{"x": 1}', "{trunc", '{"input_shape": [0], '
                                     '"output_size": 5, "is_classification": true}'])
def test_an_unreadable_task_spec_is_named_not_a_key_error(tmp_path, content):
    """A damaged `task_spec.json`: runs whose config tells the spec (sine, Omniglot) go on
    from the config; a run on the user's data, whose input shape only the file records,
    is refused naming the file (it was `KeyError: 'input_shape'` from deep in evaluate)."""
    run = str(tmp_path / "run")
    config_lib.save(config_lib.Config(dataset="omniglot", n_way=20), run)
    with open(os.path.join(run, experiment_lib.SPEC_FILENAME), "w") as f:
        f.write(content)
    spec = experiment_lib.load_spec(run, config_lib.load(run))
    assert (spec.input_shape, spec.output_size) == ((28, 28, 1), 20)
    folder = config_lib.Config(dataset="folder", data_dir="/x")
    with pytest.raises(ValueError, match=r"task_spec.json is unreadable .*which its config "
                                         r"cannot tell for dataset folder; restore the file"):
        experiment_lib.load_spec(run, folder)
    experiment_lib.save_spec(tasks_lib.TaskSpec((8, 8, 3), 4, True), run)
    assert tuple(experiment_lib.load_spec(run, folder).input_shape) == (8, 8, 3)


def test_a_task_function_failing_in_training_stops_the_trainer_in_one_line(tmp_path):
    def sample_task(seed):  # fine for seed 0 (checked when built), short afterwards
        rows = 15 if seed == 0 else 3
        x = np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
        return x, 2 * x

    tasks = tasks_lib.FunctionTasks(sample_task, k_shot=5, k_query=10)
    config = config_lib.Config(dataset="custom", num_iterations=5, meta_batch_size=2,
                               validate_every=0, jit_compile="false")
    with pytest.raises(ValueError, match=r"^sample_task\(\d+\) returned 3 rows, fewer than "
                                         r"k_shot \+ k_query = 15$"):
        trainer.train(config, str(tmp_path / "run"), tasks=tasks)


def test_configs_saved_with_options_their_algorithm_ignored_still_load(tmp_path):
    """Saved before such options were refused: they had no effect, so they are reset."""
    values = config_lib.Config(algorithm="maml").to_dict()
    values.update(inner_batch_size=5, per_step_bn=False)
    with open(tmp_path / config_lib.CONFIG_FILENAME, "w") as f:
        json.dump(values, f)
    with mock.patch.object(config_lib.logging, "warning") as warning:
        loaded = config_lib.load(str(tmp_path))
        config_lib.load(str(tmp_path))  # evaluate and export read it more than once
    assert loaded.inner_batch_size == 0 and loaded.per_step_bn
    assert warning.call_count == 1 and "reset to the default" in warning.call_args[0][0]
    reptile = {**config_lib.Config(algorithm="reptile").to_dict(), "first_order": True}
    assert config_lib.drop_ignored_options(reptile)[1] == ["first_order"]
    baseline = {**config_lib.Config(num_inner_steps=0).to_dict(), "first_order": True}
    assert config_lib.drop_ignored_options(baseline)[1] == ["first_order"]
    with pytest.raises(ValueError, match="first_order does not apply to num_inner_steps=0"):
        config_lib.Config(**baseline).validate()
    rl = {**config_lib.Config(dataset="navigation2d").to_dict(), "n_way": 20, "meta_lr": 0.5}
    assert sorted(config_lib.drop_ignored_options(rl)[1]) == ["meta_lr", "n_way"]
    with open(tmp_path / config_lib.CONFIG_FILENAME, "w") as f:
        json.dump([], f)
    with pytest.raises(ValueError, match="not a valid tf_maml config: expected a JSON object"):
        config_lib.load(str(tmp_path))
    # An emptied file loaded as the default sine run (then its checkpoints were blamed).
    with open(tmp_path / config_lib.CONFIG_FILENAME, "w") as f:
        json.dump({}, f)
    with pytest.raises(ValueError, match="not a valid tf_maml config: it names no dataset"):
        config_lib.load(str(tmp_path))
    # A new config with them is still refused.
    with pytest.raises(ValueError, match="inner_batch_size is for algorithm=reptile"):
        config_lib.Config(**values).validate()


def test_evaluation_with_no_steps_and_one_task(tmp_path):
    """Edge protocols a user may ask for: the sine figure with 0 steps; one task, no interval."""
    model_dir = str(tmp_path / "run")
    trainer.train(config_lib.Config(num_iterations=2, meta_batch_size=2, validate_every=0),
                  model_dir)
    reporting.evaluate_and_report(model_dir, num_eval_steps=0, num_eval_tasks=1)
    with open(os.path.join(model_dir, reporting.RESULTS_FILENAME)) as f:
        saved = json.load(f)
    assert saved["results"]["MAML"]["ci95"] == [None] and "non_finite" not in saved
    assert os.path.exists(os.path.join(model_dir, reporting.SINE_FIT_FILENAME))
    # The table says the one task has no interval, rather than "± nan"; a NaN mean still reads nan.
    table = evaluation.format_table("mse", {"MAML": (np.array([0.5, np.nan]),
                                                     np.array([np.nan, np.nan]))})
    assert "0.5000 ± n/a" in table and "nan ± nan" in table


def test_progress_rates_exclude_the_first_call_which_compiles():
    progress = trainer._Progress(0, 10, units=("env_steps", "env steps"))
    time.sleep(0.05)  # the first call: tracing and compilation
    progress.compiled(1)
    first = progress.line(1, {"env_steps": 60.0})
    assert "first call" in first and "compilation included" in first and "ETA ?" in first
    assert "steps/s" not in first
    later = progress.line(3, {"env_steps": 60.0})
    assert "steps/s" in later and "env steps/s" in later and "ETA ?" not in later


def test_progress_eta_reads_through_one_paused_interval(monkeypatch):
    """A suspended run's next interval is slow; its ETA stays the typical one."""
    clock = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])
    progress = trainer._Progress(0, 1000)
    progress.compiled(0)
    for step in range(100, 500, 100):   # 100 steps/s
        clock[0] += 1.0
        line = progress.line(step, {})
    assert "100.0 steps/s" in line and "ETA 0h00m06s" in line
    clock[0] += 1000.0   # SIGSTOP ... SIGCONT
    paused = progress.line(500, {})
    assert "| 0.1 steps/s" in paused and "ETA 0h00m05s" in paused


def test_a_step_that_failed_part_way_is_not_counted_by_the_optimizer(tmp_path, monkeypatch):
    """A multi-worker step whose all-reduce lost its peer had counted the optimizer's update
    though none was applied: the checkpoint saved on the way out held Adam's step count one
    ahead, and the resumed run drifted from the uninterrupted one (by 1.7e-3 in 700 steps)."""
    real_make_step, real_make_loop = trainer.make_train_step, trainer.make_train_loop
    optimizers, calls = [], []

    def spy_step(experiment, optimizer, *args, **kwargs):
        optimizers.append(optimizer)
        return real_make_step(experiment, optimizer, *args, **kwargs)

    def failing_loop(train_step):
        loop = real_make_loop(train_step)

        def run(iterator, num_steps):
            calls.append(num_steps)
            if len(calls) == 3:  # counted, then the step's all-reduce fails
                optimizers[0].iterations.assign_add(1)
                raise tf.errors.UnavailableError(None, None,
                                                 "Collective ops is aborted by: Socket closed")
            return loop(iterator, num_steps)
        return run

    monkeypatch.setattr(trainer, "make_train_step", spy_step)
    monkeypatch.setattr(trainer, "make_train_loop", failing_loop)
    config = config_lib.Config(num_iterations=100, log_every=1, checkpoint_every=100,
                               validate_every=0, jit_compile="false")
    with pytest.raises(tf.errors.UnavailableError):
        trainer.train(config, str(tmp_path / "run"))
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 2


def test_too_small_a_meta_batch_for_the_replicas_writes_nothing(tmp_path, monkeypatch):
    """It was refused after the run's config.json and train.log were written."""
    from types import SimpleNamespace

    from tf_maml import distribute
    monkeypatch.setattr(distribute, "make_strategy",
                        lambda name: SimpleNamespace(num_replicas_in_sync=2))
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy: False)
    with pytest.raises(ValueError, match=r"meta_batch_size=1 is smaller than the number of "
                                         r"replicas \(2\)"):
        trainer.train(config_lib.Config(meta_batch_size=1, strategy="mirrored"),
                      str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
