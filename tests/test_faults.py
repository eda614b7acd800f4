"""What users hit when things go wrong: divergence, damaged checkpoints, failed first runs,
unwritable directories. Every failure must leave the run's good files alone and end in one line
(no traceback) from the command line.
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_maml import compat, evaluation, files, reporting, serving, trainer
from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import tasks as tasks_lib

TINY = dict(meta_batch_size=5, log_every=10, checkpoint_every=10, validate_every=0,
            num_eval_tasks=10, num_eval_steps=1)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _cli(*args, timeout=300, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, preexec_fn=preexec_fn)


def _checkpoints(model_dir):
    """Checkpoint names, newest first."""
    return [os.path.basename(p) for p in experiment_lib.checkpoint_paths(
        os.path.join(model_dir, "checkpoints"))]


def _stats(model_dir):
    """(name, mtime, inode) of every file under `model_dir`: any rewrite shows."""
    out = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, model_dir)] = (st.st_mtime_ns, st.st_ino, st.st_size)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 30-step sine run with checkpoints at 10, 20 and 30; copy it before damaging it."""
    model_dir = str(tmp_path_factory.mktemp("faults") / "run")
    trainer.train(config_lib.Config(num_iterations=30, **TINY), model_dir)
    assert _checkpoints(model_dir) == ["ckpt-30", "ckpt-20", "ckpt-10"]
    return model_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, model_dir)
    return model_dir


# B1: divergence.

def test_non_finite_meta_loss_stops_training_at_once(tmp_path):
    model_dir = str(tmp_path / "run")
    config = config_lib.Config(inner_lr=1e6, num_iterations=300, **TINY)
    with pytest.raises(trainer.TrainingDiverged,
                       match=r"diverged at step 1: the meta-loss is not finite.*no checkpoint "
                             r"was written.*Lower inner_lr \(now 1e\+06\) or meta_lr"):
        trainer.train(config, model_dir)
    assert _checkpoints(model_dir) == []
    log = os.path.join(model_dir, trainer.LOG_FILENAME)
    assert "ERROR stopped: training diverged at step 1" in open(log).read()
    # Nothing to resume, so the corrected command may reuse the directory.
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as the command line sets it
    try:
        _, step = trainer.train(config_lib.Config(num_iterations=10, **TINY), model_dir)
    finally:
        absl_logging.set_verbosity(verbosity)
    assert step == 10
    # train.log keeps both attempts' lines; a refused resume adds nothing to it.
    text = open(log).read()
    assert "step 10/10 (100.0%)" in text and text.index("diverged") < text.index("step 10/10")
    with pytest.raises(ValueError, match="different configuration"):
        trainer.train(config_lib.Config(num_iterations=10, inner_lr=0.5, **TINY), model_dir)
    assert open(log).read() == text
    # A resume says in train.log where it went on from (logged before the run started, it
    # reached only stderr); TensorFlow's per-checkpoint "Sharding callback" lines stay out.
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        trainer.train(config_lib.Config(num_iterations=12, **TINY), model_dir)
    finally:
        absl_logging.set_verbosity(verbosity)
    text = open(log).read()
    assert "Resumed from" in text and "at step 10" in text and "Sharding callback" not in text


def test_a_failed_meta_step_is_neither_applied_nor_counted(monkeypatch):
    """The step counter moves only with a completed meta-update (see `trainer._completed`)."""
    import keras

    config = config_lib.Config(**TINY)
    experiment = experiment_lib.build_experiment(config)
    algorithm = experiment.algorithm
    meta_step = algorithm.meta_step

    def fails_on_the_second_iteration(episode, loss_scale=None, iteration=None):
        loss, grads, outputs = meta_step(episode, loss_scale, iteration)
        x = tf.random.stateless_normal([300, 300], [1, 2])
        for _ in range(30):  # work, so that an unordered step increment would run first
            x = tf.linalg.matmul(x, x) / 300.0
        check = tf.debugging.assert_less(iteration, tf.constant(1, tf.int64),
                                         message="the task source failed")
        with tf.control_dependencies([check]):
            grads = [g + 0.0 * tf.reduce_sum(x) for g in grads]
        return loss, grads, outputs

    monkeypatch.setattr(algorithm, "meta_step", fails_on_the_second_iteration)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(algorithm.meta_variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_step = trainer.make_train_step(experiment, optimizer, step)
    episode = experiment.tasks.sample(tasks_lib.step_seed(0, 0), config.meta_batch_size)
    train_step(episode)
    after_one = [v.numpy() for v in algorithm.meta_variables]
    for _ in range(3):
        with pytest.raises(tf.errors.InvalidArgumentError, match="the task source failed"):
            train_step(episode)
        assert int(step.numpy()) == 1
        for variable, value in zip(algorithm.meta_variables, after_one):
            np.testing.assert_array_equal(variable.numpy(), value)


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """A step leaving NaN weights (finite logs: a non-finite gradient) stops training; the last
    good checkpoint survives the rotation."""
    captured = {}
    real_step, real_loop = trainer.make_train_step, trainer.make_train_loop

    def make_train_step(experiment, optimizer, step_counter, **kwargs):
        captured.update(variables=experiment.algorithm.meta_variables, step=step_counter)
        return real_step(experiment, optimizer, step_counter, **kwargs)

    def make_train_loop(train_step):
        loop = real_loop(train_step)

        def poisoned(iterator, num_steps):
            logs = loop(iterator, num_steps)
            if int(captured["step"].numpy()) > 25:
                weights = captured["variables"][0]
                weights.assign(tf.fill(weights.shape, float("nan")))
            return logs

        return poisoned

    monkeypatch.setattr(trainer, "make_train_step", make_train_step)
    monkeypatch.setattr(trainer, "make_train_loop", make_train_loop)
    model_dir = str(tmp_path / "run")
    config = config_lib.Config(num_iterations=60, **dict(TINY, checkpoint_every=5))
    with pytest.raises(trainer.TrainingDiverged,
                       match=r"(at step|between steps 2\d and) 30: the meta-gradient is not "
                             r"finite.*the last checkpoint, "
                             r".*ckpt-25, is kept.*Lower inner_lr"):
        trainer.train(config, model_dir)
    assert _checkpoints(model_dir) == ["ckpt-25", "ckpt-20", "ckpt-15"]
    experiment, step = experiment_lib.restore(model_dir)
    assert step == 25
    assert all(np.isfinite(v.numpy()).all() for v in experiment.model.trainable_variables)


def test_results_json_is_strict_json_when_metrics_are_nan(tmp_path):
    path = str(tmp_path / "eval_results.json")
    results = {"MAML": (np.array([1.0, np.nan, np.inf]), np.array([0.1, np.nan, np.nan])),
               "pretrained": (np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3]))}
    evaluation.write_json(path, "mse", results, {"num_tasks": 3})

    def no_constants(name):
        raise AssertionError(f"bare {name} in the JSON")

    with open(path) as f:
        saved = json.loads(f.read(), parse_constant=no_constants)
    assert saved["results"]["MAML"]["mean"] == [1.0, None, None]
    assert saved["results"]["pretrained"]["mean"] == [1.0, 2.0, 3.0]
    assert saved["non_finite"]["models"] == ["MAML"]


def test_results_and_plots_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A process killed while writing eval_results.json left it empty (the previous results
    lost): it is now written beside and renamed into place, like the plots."""
    path = str(tmp_path / "eval_results.json")
    results = {"MAML": (np.array([1.0, 2.0]), np.array([0.1, 0.2]))}
    evaluation.write_json(path, "mse", results, {"num_tasks": 3})
    before = open(path).read()

    def dies_midway(payload, f, **kwargs):  # as a kill between two buffered writes would
        f.write('{"metric": "ms')
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(files.json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        evaluation.write_json(path, "mse", results, {"num_tasks": 4})
    assert open(path).read() == before and os.listdir(tmp_path) == ["eval_results.json"]
    monkeypatch.undo()
    plot = evaluation.plot_curves(str(tmp_path / "eval_curve.png"), "mse", results, "sine")
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["eval_curve.png", "eval_results.json"]


def test_evaluation_that_diverges_says_so(run_copy, capsys):
    results = reporting.evaluate_and_report(run_copy, inner_lr=1e9, num_eval_steps=2,
                                            num_eval_tasks=10)
    assert not np.isfinite(results["MAML"][0][-1])
    out = capsys.readouterr().out
    assert "note: MAML mse is not finite" in out and "as null" in out
    with open(os.path.join(run_copy, reporting.RESULTS_FILENAME)) as f:
        json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"bare {name}"))


def test_cli_divergence_is_one_line_and_exits_non_zero(tmp_path):
    model_dir = str(tmp_path / "run")
    result = _cli("tf_maml.train", f"--model_dir={model_dir}", "--inner_lr=1e6",
                  "--num_iterations=300", "--log_every=50", "--checkpoint_every=100",
                  "--num_eval_tasks=10")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: training diverged at step 1" in result.stderr
    assert "Traceback" not in result.stderr and "mse on" not in result.stdout
    assert _checkpoints(model_dir) == []
    assert not os.path.exists(os.path.join(model_dir, reporting.RESULTS_FILENAME))


# B2, B3: missing or garbled index file, damaged checkpoints.

def _damage(model_dir, how):
    checkpoints = os.path.join(model_dir, "checkpoints")
    if how == "missing index":
        os.remove(os.path.join(checkpoints, "checkpoint"))
    elif how == "garbled index":
        with open(os.path.join(checkpoints, "checkpoint"), "w") as f:
            f.write("model_checkpoint_path: {{{ \x00 garbage\n")


@pytest.mark.parametrize("how", ["missing index", "garbled index"])
def test_a_lost_index_file_does_not_restart_the_run(run_copy, how, start_steps):
    _damage(run_copy, how)
    before = _stats(run_copy)
    assert experiment_lib.restore(run_copy)[1] == 30
    _, step = trainer.train(config_lib.Config(num_iterations=30, **TINY), run_copy)
    assert step == 30 and start_steps == []      # found finished: nothing retrained
    _, step = trainer.train(config_lib.Config(num_iterations=40, **TINY), run_copy)
    assert step == 40 and start_steps == [30]    # resumed, not restarted
    after = _stats(run_copy)
    for name in ("checkpoints/ckpt-10.index", "checkpoints/ckpt-20.index",
                 "checkpoints/ckpt-30.index", "checkpoints/ckpt-30.data-00000-of-00001"):
        assert after[name] == before[name], f"{name} was rewritten"


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(run_copy, start_steps,
                                                                     caplog):
    data = os.path.join(run_copy, "checkpoints", "ckpt-30.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(1000)
    experiment, step = experiment_lib.restore(run_copy)
    assert step == 20
    assert "skipping checkpoint" in caplog.text and "ckpt-30" in caplog.text
    _, step = trainer.train(config_lib.Config(num_iterations=40, **TINY), run_copy)
    assert step == 40 and start_steps == [20]
    assert experiment_lib.check_readable(os.path.join(run_copy, "checkpoints", "ckpt-30")) is None


def test_a_corrupt_checkpoint_is_detected_by_its_checksum(run_copy):
    data = os.path.join(run_copy, "checkpoints", "ckpt-30.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "Checksum does not match" in experiment_lib.check_readable(data[:-len(
        ".data-00000-of-00001")])
    assert experiment_lib.restore(run_copy)[1] == 20


def test_unreadable_checkpoints_are_refused_not_overwritten(run_copy, start_steps):
    for path in experiment_lib.checkpoint_paths(os.path.join(run_copy, "checkpoints")):
        with open(path + ".index", "r+b") as f:
            f.truncate(50)
    before = _stats(run_copy)
    with pytest.raises(experiment_lib.CheckpointError,
                       match=r"none of the 3 checkpoint\(s\) .* can be restored \(ckpt-30: .*"
                             r"does not start over"):
        trainer.train(config_lib.Config(num_iterations=40, **TINY), run_copy)
    assert start_steps == [] and _stats(run_copy) == before
    with pytest.raises(experiment_lib.CheckpointError, match="can be restored"):
        experiment_lib.restore(run_copy)
    explicit = os.path.join(run_copy, "checkpoints", "ckpt-20")
    with pytest.raises(experiment_lib.CheckpointError, match="ckpt-20 cannot be read"):
        experiment_lib.restore(run_copy, checkpoint_path=explicit)


def test_checkpoints_without_their_config_are_refused(run_copy, start_steps):
    os.remove(os.path.join(run_copy, config_lib.CONFIG_FILENAME))
    with pytest.raises(ValueError, match="holds checkpoints but .* has no config.json"):
        trainer.train(config_lib.Config(num_iterations=40, **TINY), run_copy)
    assert start_steps == []


def test_cli_evaluate_skips_a_truncated_checkpoint_without_a_traceback(run_copy, tmp_path):
    os.remove(os.path.join(run_copy, "checkpoints", "checkpoint"))
    with open(os.path.join(run_copy, "checkpoints", "ckpt-30.data-00000-of-00001"), "r+b") as f:
        f.truncate(100)
    result = _cli("tf_maml.evaluate", f"--model_dir={run_copy}", "--num_eval_tasks=5",
                  "--num_eval_steps=1", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stderr and "ckpt-30" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())[
        "steps_trained"] == {"MAML": 20}


# B4: a first run that fails writes nothing.

def _tiny_miniimagenet(root, classes=3, per_class=3):
    os.makedirs(os.path.join(root, "images"))
    for split in ("train", "val", "test"):
        lines = ["filename,label"]
        for c in range(classes):
            for i in range(per_class):
                name = f"n{split}{c}_{i}.jpg"
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(
                    os.path.join(root, "images", name))
                lines.append(f"{name},n{split}{c}")
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")


def test_a_failed_first_run_writes_nothing_and_the_corrected_one_runs(tmp_path):
    data_dir, model_dir = str(tmp_path / "data"), str(tmp_path / "run")
    _tiny_miniimagenet(data_dir)
    config = config_lib.Config(
        dataset="miniimagenet", data_dir=data_dir, cache_dir="", n_way=5, k_shot=1, k_query=1,
        meta_batch_size=1, num_inner_steps=1, first_order=True, num_iterations=1,
        validate_every=0, jit_compile="false")
    with pytest.raises(ValueError, match="fewer than n_way=5"):
        trainer.train(config, model_dir)
    assert not os.path.exists(model_dir)
    with pytest.raises(FileNotFoundError, match=r"MiniImagenet data_dir '.*x' does not exist"):
        trainer.train(config_lib.Config(**{**config.to_dict(), "data_dir": str(tmp_path / "x")}),
                      model_dir)
    assert not os.path.exists(model_dir)
    _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "n_way": 2}), model_dir)
    assert step == 1 and config_lib.load(model_dir).n_way == 2


def test_a_config_left_by_a_run_without_checkpoints_is_replaced(tmp_path):
    model_dir = str(tmp_path / "run")
    config_lib.save(config_lib.Config(num_iterations=10, inner_lr=0.5, **TINY), model_dir)
    _, step = trainer.train(config_lib.Config(num_iterations=10, **TINY), model_dir)
    assert step == 10 and config_lib.load(model_dir).inner_lr == 0.01


# B5 and E: directories.

def test_evaluate_never_creates_a_missing_directory_and_names_the_flag(trained_run, tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="nothing does not exist: --model_dir"):
        reporting.evaluate_and_report(missing)
    assert not os.path.exists(missing)
    with pytest.raises(FileNotFoundError, match="nothing does not exist: --baseline_dir"):
        reporting.evaluate_and_report(trained_run, baseline_dir=missing,
                                      output_dir=str(tmp_path / "out"))
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out")


def test_paths_under_a_file_are_reported(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is not a directory"):
        trainer.train(config_lib.Config(num_iterations=1, **TINY), str(tmp_path / "file" / "run"))
    # An export's base path: refused before any signature is built.
    with pytest.raises(NotADirectoryError, match=r"^export_dir \S+file: \S+file is not a "):
        serving.version_path(str(tmp_path / "file"), 1, overwrite=False)


def _without_root_privileges():
    """A `preexec_fn` under which permission bits apply (root ignores them), or None."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2

    def drop():
        for cap in (cap_dac_override, cap_dac_read_search):
            if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def _skip_unless_permissions_apply(path, preexec_fn):
    """Skips if a child process could still write into the read-only `path`."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"import os; print(os.access({str(path)!r}, os.W_OK))"],
            capture_output=True, text=True, preexec_fn=preexec_fn, timeout=60)
    except subprocess.SubprocessError:
        pytest.skip("cannot drop root's file-permission override here")
    if probe.stdout.strip() != "False":
        pytest.skip("permission bits do not apply to this user")


def test_a_model_dir_that_cannot_be_created_is_one_line_without_a_lock_warning(caplog):
    """Under /sys or /proc `os.access` lets root through, and creating the directory fails:
    the trainer warned it could not lock it, then failed with a bare errno."""
    path = "/sys/tf_maml_cannot_be_here" if os.path.isdir("/sys") else "/proc/tf_maml_here"
    with pytest.raises(OSError, match=rf"^model_dir {path} cannot be created \(.+\)$"):
        trainer._lock_run_dir(path)
    assert "Could not lock" not in caplog.text and not os.path.exists(path)


def test_unwritable_directories_are_reported_up_front_in_one_line(trained_run, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    os.chmod(os.path.join(run, "checkpoints"), 0o555)
    os.chmod(readonly, 0o555)
    unprivileged = _without_root_privileges()
    try:
        _skip_unless_permissions_apply(readonly, unprivileged)
        cases = [
            (("tf_maml.train", f"--model_dir={readonly}", "--num_iterations=5"),
             f"error: model_dir {readonly} is not writable"),
            (("tf_maml.train", f"--model_dir={readonly / 'new'}", "--num_iterations=5"),
             f"is not writable (it would be created in {readonly})"),
            # The checkpoint directory would only fail at the first checkpoint.
            (("tf_maml.train", f"--model_dir={run}", "--num_iterations=50",
              "--meta_batch_size=5", "--checkpoint_every=10", "--validate_every=0",
              "--noevaluate"),
             f"error: checkpoint directory {run}/checkpoints is not writable"),
            (("tf_maml.evaluate", f"--model_dir={run}", f"--output_dir={readonly / 'out'}"),
             f"error: --output_dir {readonly / 'out'} is not writable"),
            # Before any signature is traced.
            (("tf_maml.export", f"--model_dir={run}", f"--export_dir={readonly / 'export'}"),
             f"error: export_dir {readonly / 'export'} is not writable"),
        ]
        before = _stats(run)
        for args, message in cases:
            result = _cli(*args, preexec_fn=unprivileged, timeout=120)
            assert result.returncode == 1, (args, result.stderr[-3000:])
            assert message in result.stderr, (args, result.stderr[-3000:])
            assert "Traceback" not in result.stderr
        assert _stats(run) == before
        os.chmod(os.path.join(run, "checkpoints"), 0o755)
        os.chmod(run, 0o555)
        result = _cli("tf_maml.evaluate", f"--model_dir={run}", preexec_fn=unprivileged,
                      timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"error: --model_dir {run} is not writable: give --output_dir" in result.stderr
    finally:
        os.chmod(readonly, 0o755)
        os.chmod(run, 0o755)
        os.chmod(os.path.join(run, "checkpoints"), 0o755)


# compat: what the private-API shims return.

def test_cluster_resolver_of_single_worker_strategies_is_none():
    # (A multi-worker strategy's resolver is checked in tests/scripts/multi_worker.py.)
    assert compat.cluster_resolver(tf.distribute.get_strategy()) is None
    assert compat.cluster_resolver(tf.distribute.MirroredStrategy(["/cpu:0"])) is None


def test_an_op_error_inside_a_compiled_step_is_reported_by_its_own_message():
    """Not "Graph execution error:", which says nothing (an OOM, a failed decomposition)."""

    @tf.function
    def too_large(n):
        return tf.zeros([n, n, n, n])

    with pytest.raises(tf.errors.OpError) as e:
        too_large(tf.constant(100000))
    assert e.value.message.startswith("Graph execution error")
    assert experiment_lib.error_text(e.value) == (
        "Shape [100000,100000,100000,100000] would have more than 2**63 - 1 elements")


def test_several_root_errors_are_reported_by_the_first_ones_message():
    """tf.distribute: one replica fails, the others are cancelled."""
    message = ('Graph execution error:\n\nDetected at node assert defined at (most recent call '
               'last):\n  File "train.py", line 3, in <module>\n\n2 root error(s) found.\n'
               '  (0) INVALID_ARGUMENT:  assertion failed: [the task source failed]\n'
               '\t [[{{node assert}}]]\n  (1) CANCELLED:  Function was cancelled\n'
               '0 successful operations.\n0 derived errors ignored.')
    error = tf.errors.InvalidArgumentError(None, None, message)
    assert experiment_lib.error_text(error) == "assertion failed: [the task source failed]"


def test_a_keras_layer_error_is_reported_by_the_layers_own_message():
    """Keras' wrapper line ("Exception encountered when calling ...") says nothing alone."""
    import keras
    with pytest.raises(ValueError) as e:  # building the model calls each layer
        keras.Sequential([keras.Input((4, 4, 1)), keras.layers.MaxPooling2D(2),
                          keras.layers.MaxPooling2D(2), keras.layers.MaxPooling2D(2)])
    text = experiment_lib.error_text(e.value)
    assert text.startswith("MaxPooling2D: Computed output size would be zero or negative"), text
    assert "\x1b" not in text and "\n" not in text


def test_a_checkpoint_of_another_run_is_refused_not_exported(run_copy, tmp_path):
    """`export --checkpoint` took any checkpoint: one of a MAML++ run exported as this MAML
    run (its learned rates dropped), one holding no model exported the random initial weights,
    each with exit status 0."""
    other = str(tmp_path / "mamlpp")
    trainer.train(config_lib.Config(algorithm="mamlpp", num_iterations=10, num_inner_steps=2,
                                    **TINY), other)
    with pytest.raises(experiment_lib.CheckpointError,
                       match=r"(?=.*algorithm: 'mamlpp' -> 'maml')(?=.*num_inner_steps: 2 -> "
                             r"1)belongs to the run in .*mamlpp, whose configuration differs "
                             r"from this one's in what a resume may not change \(.*: that "
                             r"run's -> this one's\): use that run's model_dir$"):
        experiment_lib.restore(run_copy, checkpoint_path=os.path.join(other, "checkpoints",
                                                                      "ckpt-10"))
    # A run that differs only in how it was trained (another seed: other tasks; another
    # split would have trained on this run's test classes) was exported as this run,
    # labelled with this run's config. What a resume may change (num_iterations) passes.
    sibling = str(tmp_path / "seed1")
    shutil.copytree(run_copy, sibling)
    config_path = os.path.join(sibling, config_lib.CONFIG_FILENAME)
    with open(config_path) as f:
        values = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**values, "seed": 1, "num_iterations": 50}, f)
    with pytest.raises(experiment_lib.CheckpointError,
                       match=r"belongs to the run in .*seed1, whose configuration differs "
                             r"from this one's in what a resume may not change \(seed: 1 -> "
                             r"0: that run's -> this one's\): use that run's model_dir$"):
        experiment_lib.restore(run_copy, checkpoint_path=os.path.join(sibling, "checkpoints",
                                                                      "ckpt-10"))
    with open(config_path, "w") as f:
        json.dump({**values, "num_iterations": 50}, f)
    experiment_lib.restore(run_copy, checkpoint_path=os.path.join(sibling, "checkpoints",
                                                                  "ckpt-10"))
    foreign = tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "foreign" / "ckpt-1"))
    result = _cli("tf_maml.export", f"--model_dir={run_copy}", f"--checkpoint={foreign}",
                  f"--export_dir={tmp_path / 'export'}")
    assert result.returncode == 1 and not (tmp_path / "export").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint {foreign} does not hold this run's meta-parameters")
    # The run's own older checkpoint still exports; an empty --export_dir is refused.
    experiment, step = experiment_lib.restore(
        run_copy, checkpoint_path=os.path.join(run_copy, "checkpoints", "ckpt-20"))
    assert step == 20
    result = _cli("tf_maml.export", f"--model_dir={run_copy}", "--export_dir=")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: --export_dir is empty (an unset variable?): give a directory")


def test_a_second_trainer_on_the_same_model_dir_is_refused(tmp_path):
    """Two trainers on one model_dir both ran: they wrote the same ckpt-N files and
    interleaved train.log (a helper's trial found 748 log lines for 400 steps). The
    directory is locked while a run trains; the lock goes with its process."""
    model_dir = str(tmp_path / "run")
    config = config_lib.Config(num_iterations=3, meta_batch_size=2, validate_every=0)
    held = trainer._lock_run_dir(model_dir)  # another trainer, mid-run
    assert held is not None
    try:
        with pytest.raises(ValueError, match=r"another process is training in .*run \(it holds "
                                             r"the directory's lock\)"):
            trainer.train(config, model_dir)
        assert not os.listdir(model_dir)  # refused before anything was written
    finally:
        trainer._unlock(held)
    _, step = trainer.train(config, model_dir)
    assert step == 3
    trainer._unlock(trainer._lock_run_dir(model_dir))  # released when the run ended
    # A first run that cannot start (its data is missing) leaves no model_dir behind.
    missing = str(tmp_path / "never")
    with pytest.raises(FileNotFoundError, match=r"image folder data_dir '.*no_data' does not exist"):
        trainer.train(config_lib.Config(dataset="folder", data_dir=str(tmp_path / "no_data"),
                                        num_iterations=1), missing)
    assert not os.path.exists(missing)


def test_what_killed_saves_left_is_removed_when_the_run_resumes(tmp_path):
    """kill -9 during a save leaves TensorFlow's `ckpt-N_temp/` shards or the state file's
    `checkpoint.tmp<hex>`; a helper's trial collected six after one run. The next run (which
    holds the directory's lock) removes them, and nothing else."""
    model_dir = str(tmp_path / "run")
    config = config_lib.Config(num_iterations=2, meta_batch_size=2, validate_every=0,
                               checkpoint_every=2)
    trainer.train(config, model_dir)
    checkpoints = os.path.join(model_dir, "checkpoints")
    os.makedirs(os.path.join(checkpoints, "ckpt-3_temp"))
    open(os.path.join(checkpoints, "ckpt-3_temp", "part-00000-of-00001.data-00000-of-00001"),
         "w").close()
    open(os.path.join(checkpoints, "checkpoint.tmp0123abcd"), "w").close()
    open(os.path.join(checkpoints, "notes_temp"), "w").close()  # not a save's: kept
    _, step = trainer.train(config_lib.Config(**{**config.to_dict(), "num_iterations": 4}),
                            model_dir)
    assert step == 4
    left = sorted(os.listdir(checkpoints))
    assert "ckpt-3_temp" not in left and "checkpoint.tmp0123abcd" not in left
    assert "notes_temp" in left and "ckpt-4.index" in left


def test_an_empty_model_dir_is_named_not_errno_2(tmp_path, monkeypatch):
    """`--model_dir=$UNSET` warned "Could not lock  (...)", then failed with "[Errno 2] No
    such file or directory: ''"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^model_dir is empty \(an unset variable\?\): give a "
                                         r"directory$"):
        trainer.train(config_lib.Config(num_iterations=1, meta_batch_size=2), "")
    assert not os.listdir(tmp_path)
