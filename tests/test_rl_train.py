"""Meta-RL from the command line: training, exact resume, errors, the Fig. 5 evaluation."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import reporting, rl, serving, trainer
from tf_maml.rl import MAMLRL, Navigation2D, gaussian_mlp_policy
from tf_maml.rl import serving as rl_serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny run of the paper's recipe: a few seconds per meta-iteration at most.
TINY = dict(meta_batch_size=3, fast_batch_size=2, horizon=5, log_every=1, num_eval_tasks=6,
            num_eval_steps=2, validate_every=0, inner_lr=0.1)
TINY_FLAGS = [f"--{name}={value}" for name, value in TINY.items()]


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def _state(model_dir):
    """Every variable of a run's latest checkpoint (policy, log-std, optimizer, step)."""
    checkpoints = experiment_lib.checkpoint_paths(
        os.path.join(model_dir, experiment_lib.CHECKPOINT_SUBDIR))
    reader = tf.train.load_checkpoint(checkpoints[0])
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_dtype_map()
            if "save_counter" not in name and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _assert_same_state(dir_a, dir_b):
    a, b = _state(dir_a), _state(dir_b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_trains_rl_and_a_rerun_resumes_exactly(tmp_path):
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    common = ["tf_maml.train", "--flagfile=flags/rl_navigation.flags", f"--model_dir={resumed}",
              "--checkpoint_every=2", "--noevaluate", *TINY_FLAGS]
    first = _run(*common, "--num_iterations=2")
    assert first.returncode == 0, first.stderr
    assert "env steps/s" in first.stderr and "ETA" in first.stderr
    assert "return_after=" in first.stderr and "kl=" in first.stderr
    second = _run(*common, "--num_iterations=4")
    assert second.returncode == 0, second.stderr
    # It resumed at the checkpoint's step (a rerun from 0 would end in the same state).
    assert re.search(r"Resumed from \S*ckpt-2 at step 2\b", second.stderr), second.stderr
    assert "step 3/4" in second.stderr and "step 1/4" not in second.stderr
    config = config_lib.load(resumed)
    assert config.dataset == "navigation2d" and config.outer_optimizer == "trpo"
    assert config.max_kl == 0.01 and config.num_iterations == 4
    # The same config, uninterrupted, in this process: bit-identical state.
    _, step = trainer.train(config, straight)
    assert step == 4
    _assert_same_state(resumed, straight)
    # TensorBoard scalars of the RL loop.
    tags = set()
    for path in tf.io.gfile.glob(os.path.join(resumed, "train", "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    assert {"return_before", "return_after", "kl", "backtracks", "env_steps_per_second",
            "loss_after", "policy_std"} <= tags
    # The surrogate before the update is zero by construction: not logged.
    assert "meta_loss" not in tags and "loss" not in tags


def test_a_failed_meta_iteration_is_neither_applied_nor_counted():
    """The step counter moves only with a completed update (a failed one was once counted and
    checkpointed, and every rerun skipped an iteration)."""
    import keras

    theta = tf.Variable([1.0, 2.0])

    class FailsOnItsSecondIteration:
        meta_variables = [theta]

        def meta_step(self, iteration):
            # Some work first, so that an unordered step increment would run before the check.
            x = tf.random.stateless_normal([300, 300], [1, 2])
            for _ in range(30):
                x = tf.linalg.matmul(x, x) / 300.0
            check = tf.debugging.assert_less(iteration, tf.constant(1, tf.int64),
                                             message="the baseline fit failed")
            with tf.control_dependencies([check]):
                update = [tf.ones([2]) + 0.0 * tf.reduce_sum(x)]
            return None, update, {"loss": tf.reduce_sum(x)}

    optimizer = keras.optimizers.SGD(1.0)
    optimizer.build([theta])
    step = tf.Variable(0, dtype=tf.int64)
    train_step = trainer.make_rl_train_step(FailsOnItsSecondIteration(), optimizer, step)
    train_step()
    for _ in range(5):
        with pytest.raises(tf.errors.InvalidArgumentError, match="the baseline fit failed"):
            train_step()
        assert int(step.numpy()) == 1
        np.testing.assert_array_equal(theta.numpy(), [0.0, 1.0])


def test_a_policy_whose_variance_overflows_counts_as_diverged():
    """log σ = ±999 is finite, but σ² is not: the run stops there, not in the next baseline fit."""
    algorithm = experiment_lib.build_experiment(
        config_lib.Config(dataset="navigation2d", **TINY)).algorithm
    usable = trainer.make_rl_finite_check(algorithm)
    log_std = algorithm.policy.log_std
    assert bool(usable())
    for value in ([999.0, 0.0], [0.0, -999.0], [float("nan"), 0.0], [40.0, -40.0]):
        log_std.assign(value)
        assert bool(usable()) == (value == [40.0, -40.0]), value
    log_std.assign([0.0, 0.0])
    algorithm.meta_variables[0].assign(algorithm.meta_variables[0] * float("inf"))
    assert not bool(usable())


def test_a_streak_of_rejected_trpo_steps_is_reported(monkeypatch):
    warnings = []
    monkeypatch.setattr(trainer.logging, "warning",
                        lambda message, *args: warnings.append(message % args))
    rejected = trainer._RejectedSteps(config_lib.Config(dataset="navigation2d", max_kl=1e6))
    no = dict(accepted=0.0, kl=float("inf"), loss_after=float("nan"))
    for _ in range(9):
        rejected.update(no)
    rejected.update(dict(no, accepted=1.0))  # an accepted step ends the streak
    for _ in range(9):
        rejected.update(no)
    assert warnings == []
    rejected.update(no)
    assert warnings == [
        "TRPO has accepted no step in the last 10 iterations, so the initialization is not "
        "changing; the KL of every try is not finite (inf): max_kl (now 1e+06) is likely far "
        "too large"]


def test_interrupted_rl_run_with_adam_resumes_exactly(tmp_path, monkeypatch):
    config = config_lib.Config(dataset="navigation2d", num_iterations=4, checkpoint_every=100,
                               outer_optimizer="adam", meta_lr=0.01,
                               **{**TINY, "validate_every": 3})
    trainer.train(config, str(tmp_path / "straight"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real_validate = trainer._validate_rl
    monkeypatch.setattr(trainer, "_validate_rl", interrupt)
    with pytest.raises(trainer.Interrupted) as info:
        trainer.train(config, str(tmp_path / "resumed"))
    assert info.value.step == 3 and info.value.saved
    monkeypatch.setattr(trainer, "_validate_rl", real_validate)
    # Count the meta-iterations the rerun trains: a rerun that ignored the checkpoint and
    # trained 0 -> 4 again would end with the same state (training is deterministic).
    real_make_step, calls = trainer.make_rl_train_step, []

    def counted_step(*args, **kwargs):
        train_step = real_make_step(*args, **kwargs)

        def step_fn():
            calls.append(1)
            return train_step()
        return step_fn

    monkeypatch.setattr(trainer, "make_rl_train_step", counted_step)
    _, step = trainer.train(config, str(tmp_path / "resumed"))
    assert step == 4 and len(calls) == 1  # resumed at 3: one iteration, not four
    # Adam's moments are restored too.
    assert any("optimizer" in name for name in _state(str(tmp_path / "straight")))
    _assert_same_state(str(tmp_path / "resumed"), str(tmp_path / "straight"))


def test_bad_rl_flags_are_one_line_errors_and_write_nothing(tmp_path):
    model_dir = tmp_path / "run"
    bad = _run("tf_maml.train", "--flagfile=flags/rl_navigation.flags",
               f"--model_dir={model_dir}", "--outer_optimizer=sgd")
    assert bad.returncode != 0 and "outer_optimizer must be one of trpo, adam" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not model_dir.exists()
    base = dict(dataset="navigation2d")
    for field, value, message in [("max_kl", 0.0, "max_kl must be a positive number"),
                                  ("gamma", 1.5, "gamma must be in"),
                                  ("backtrack_ratio", 1.0, "backtrack_ratio must be in"),
                                  ("fast_batch_size", 0, "fast_batch_size must be a positive"),
                                  ("horizon", -1, "horizon must be a non-negative"),
                                  # (an [H, H] matrix: 100,000 steps failed with 180 lines
                                  # of allocator dump)
                                  ("horizon", 100000, r"horizon must be at most 10000 steps "
                                                      r"\(the discounted returns take an "
                                                      r"\[horizon, horizon\] matrix"),
                                  ("algorithm", "reptile", "trains with algorithm=maml"),
                                  ("model", "conv4", "the policy is an mlp")]:
        with pytest.raises(ValueError, match=message):
            config_lib.Config(**base, **{field: value}).validate()
    config_lib.Config(**base, horizon=10000).validate()
    with pytest.raises(ValueError, match="max_horizon must be at most 10000"):
        rl_serving.PolicyServingLimits(100, 10001, 100).validate()
    with pytest.raises(ValueError, match="takes no task family"):
        trainer.train(config_lib.Config(**base), str(model_dir), tasks=object())
    assert not model_dir.exists()
    # Exporting the policy (tests/test_rl_export.py): bad arguments and a diverged policy are
    # refused in one line, before anything is written.
    experiment = experiment_lib.build_experiment(config_lib.Config(**base))
    with pytest.raises(ValueError, match="max_support_examples: not a limit of this export"):
        serving.export(experiment, str(model_dir), 1, 3, limits={"max_support_examples": 5})
    with pytest.raises(ValueError, match="version must be a positive integer"):
        serving.export(experiment, str(model_dir), 0, 3)
    experiment.algorithm.policy.log_std.assign([np.nan, 0.0])
    with pytest.raises(ValueError, match="refusing to export: NaN or infinite values in log_std"):
        serving.export(experiment, str(model_dir), 1, 3)
    assert not model_dir.exists()


def test_evaluate_reports_the_run_baseline_random_init_and_oracle(tmp_path):
    maml_dir, base_dir = str(tmp_path / "maml"), str(tmp_path / "pretrained")
    trainer.train(config_lib.Config(dataset="navigation2d", num_iterations=2, **TINY), maml_dir)
    trainer.train(config_lib.Config(dataset="navigation2d", num_iterations=1, num_inner_steps=0,
                                    **TINY), base_dir)
    out = tmp_path / "eval"
    result = _run("tf_maml.evaluate", f"--model_dir={maml_dir}", f"--baseline_dir={base_dir}",
                  f"--output_dir={out}", "--num_eval_steps=3")
    assert result.returncode == 0, result.stderr
    assert "average return on 6 held-out navigation2d goals" in result.stdout
    saved = json.load(open(out / reporting.RESULTS_FILENAME))
    assert list(saved["results"]) == ["MAML", "pretrained", "random init", "oracle"]
    for row in saved["results"].values():
        assert len(row["mean"]) == 4 and len(row["ci95"]) == 4
        assert all(-10 < value < 0 for value in row["mean"])  # finite (NaN fails it)
    # Adaptation moved the policies: their returns after 0..3 steps are not all one number.
    for name in ("MAML", "pretrained", "random init"):
        assert len(set(saved["results"][name]["mean"])) > 1, name
    assert saved["step_sizes"] == pytest.approx([0.1, 0.05, 0.05])
    oracle = saved["results"]["oracle"]["mean"]
    assert oracle[0] == oracle[-1] and oracle[0] > saved["results"]["random init"]["mean"][0]
    assert saved["steps_trained"] == {"MAML": 2, "pretrained": 1, "random init": 0}
    assert os.path.getsize(out / reporting.CURVE_FILENAME) > 10_000
    # The same goals and noise for every run: evaluating again gives the same numbers.
    again = reporting.evaluate_and_report(maml_dir, output_dir=str(tmp_path / "again"),
                                          num_eval_steps=3)
    np.testing.assert_allclose(again["MAML"][0], saved["results"]["MAML"]["mean"], rtol=1e-6)
    # No gradient step: no step size is reported.
    reporting.evaluate_and_report(maml_dir, output_dir=str(tmp_path / "zero"), num_eval_steps=0)
    zero = json.load(open(tmp_path / "zero" / reporting.RESULTS_FILENAME))
    assert zero["step_sizes"] == [] and len(zero["results"]["MAML"]["mean"]) == 1


def test_evaluate_reports_a_trained_oracle_beside_the_run(tmp_path):
    maml_dir, oracle_dir = str(tmp_path / "maml"), str(tmp_path / "oracle")
    for flagfile, model_dir in (("rl_navigation", maml_dir), ("rl_navigation_oracle", oracle_dir)):
        result = _run("tf_maml.train", f"--flagfile=flags/{flagfile}.flags",
                      f"--model_dir={model_dir}", "--num_iterations=1", "--noevaluate",
                      *TINY_FLAGS, "--validate_every=1")
        assert result.returncode == 0, result.stderr
        # Validation reports the oracle as evaluate does: its return, never an adapted one.
        oracle = "oracle" in flagfile
        assert ("(the oracle does not adapt)" in result.stderr) == oracle, result.stderr
        assert ("after 1 step" in result.stderr) != oracle
    out = tmp_path / "eval"
    result = _run("tf_maml.evaluate", f"--model_dir={maml_dir}", f"--oracle_dir={oracle_dir}",
                  f"--output_dir={out}")
    assert result.returncode == 0, result.stderr
    saved = json.load(open(out / reporting.RESULTS_FILENAME))
    assert list(saved["results"]) == ["MAML", "random init", "oracle", "oracle (trained)"]
    assert saved["steps_trained"]["oracle (trained)"] == 1
    # The row is the oracle's own return without adaptation on the same goals; evaluating the
    # oracle run itself gives the same row (it is not adapted there either).
    alone = reporting.evaluate_and_report(oracle_dir, output_dir=str(tmp_path / "alone"))
    assert list(alone) == ["oracle (trained)", "random init", "oracle"]
    np.testing.assert_allclose(alone["oracle (trained)"][0],
                               saved["results"]["oracle (trained)"]["mean"], rtol=1e-6)
    assert len(set(alone["oracle (trained)"][0])) == 1

    # The oracle's policy reads the goal, and so does its export: changing the goal columns
    # changes the action, and the metadata says how many there are.
    exported = _run("tf_maml.export", f"--model_dir={oracle_dir}",
                    f"--export_dir={tmp_path / 'export'}")
    assert exported.returncode == 0, exported.stderr
    version = tmp_path / "export" / os.listdir(tmp_path / "export")[0]
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    position = tf.constant([[0.1, -0.2, 0.3, 0.3], [0.1, -0.2, -0.4, 0.2]])
    actions = serve(observations=position)["action_mean"].numpy()
    assert not np.allclose(actions[0], actions[1])
    metadata = json.load(open(version / "assets.extra" / "tf_maml_config.json"))
    assert metadata["export_goal_dim"] == 2 and metadata["export_observation_dim"] == 4

    # Mistakes are one-line errors that write nothing.
    def edited(name, **changes):
        path = tmp_path / name
        os.makedirs(path / "checkpoints")
        config = json.load(open(os.path.join(oracle_dir, "config.json")))
        json.dump({**config, **changes}, open(path / "config.json", "w"))
        return str(path)

    cases = {
        maml_dir: "must hold a run trained with --goal_observed",
        str(tmp_path / "missing"): "--oracle_dir",
        edited("cheetah", dataset="halfcheetah_velocity", normalized_actions=False,
               goal_radius=0.0): "holds a halfcheetah_velocity run, not navigation2d",
        edited("longer", horizon=50): "was trained with horizon=50",
        edited("no_checkpoint"): "--oracle_dir: ",
    }
    for bad_dir, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            reporting.evaluate_and_report(maml_dir, oracle_dir=bad_dir,
                                          output_dir=str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="give it as --oracle_dir"):
        reporting.evaluate_and_report(maml_dir, baseline_dir=oracle_dir,
                                      output_dir=str(tmp_path / "bad"))
    # From the command line, one line and no traceback.
    bad = _run("tf_maml.evaluate", f"--model_dir={maml_dir}", f"--oracle_dir={maml_dir}",
               f"--output_dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "must hold a run trained with --goal_observed" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    # A step size for the oracle, which does not adapt (it wrote the same numbers to an
    # eval_inner_lr=... folder).
    idle = _run("tf_maml.evaluate", f"--model_dir={oracle_dir}", "--inner_lr=0.1",
                "--eval_step_size_decay=0.5")
    assert idle.returncode != 0 and "Traceback" not in idle.stderr
    assert ("--inner_lr, --eval_step_size_decay: the run in " in idle.stderr
            and "is a goal-observed oracle, which does not adapt" in idle.stderr), idle.stderr
    assert not [f for f in os.listdir(oracle_dir) if f.startswith("eval_")]
    sine_dir = str(tmp_path / "sine")
    trainer.train(config_lib.Config(dataset="sine", num_iterations=1, validate_every=0),
                  sine_dir)
    with pytest.raises(ValueError, match="applies to reinforcement-learning runs only"):
        reporting.evaluate_and_report(sine_dir, oracle_dir=oracle_dir)
    with pytest.raises(ValueError, match="goal_observed applies to the reinforcement-learning"):
        config_lib.Config(dataset="sine", goal_observed=True).validate()


def test_pretrained_baseline_and_the_oracle():
    env = Navigation2D(horizon=5)
    algorithm = MAMLRL(env, gaussian_mlp_policy(2, 2, (8,)), meta_batch_size=2,
                       fast_batch_size=2, num_inner_steps=0)
    logs = algorithm.make_train_step()(tf.constant(0, tf.int64))
    # No inner loop: the episodes before and after "adaptation" are the same ones.
    assert float(logs["return_before"]) == float(logs["return_after"])
    assert int(logs["env_steps"]) == 2 * 2 * 5
    goals = Navigation2D().sample_tasks(2000, tf.constant([5, 6], tf.int64))
    # Straight to the goal: about -0.505 over U[-0.5, 0.5]^2 goals (test_rl's greedy policy).
    assert float(tf.reduce_mean(Navigation2D().oracle_returns(goals))) == pytest.approx(
        -0.5, abs=0.05)


def test_bounded_policy_mean_and_goal_radius_reach_the_run():
    config = config_lib.Config(dataset="navigation2d", inner_lr=0.1, policy_output="tanh",
                               goal_radius=0.01).validate()
    experiment = experiment_lib.build_experiment(config)
    far = np.array([[50.0, -50.0], [0.3, 0.2], [-80.0, 3.0]], np.float32)
    means = experiment.model(far).numpy()
    assert np.all(np.abs(means) <= 0.1 + 1e-7)  # inside the action clip, however far away
    assert experiment.algorithm.env.goal_radius == 0.01
    linear = experiment_lib.build_experiment(dataclasses.replace(config, policy_output="linear",
                                                                 goal_radius=0.0))
    assert linear.algorithm.env.goal_radius is None
    assert not linear.algorithm.env.normalized_actions
    # rllab's normalize: the bounded mean spans the unit box the environment scales by 0.1.
    normalized = experiment_lib.build_experiment(dataclasses.replace(config,
                                                                     normalized_actions=True))
    assert normalized.algorithm.env.normalized_actions
    means = normalized.model(far).numpy()
    assert np.all(np.abs(means) <= 1.0 + 1e-6) and np.max(np.abs(means)) > 0.1
    with pytest.raises(ValueError, match="policy_output must be linear or tanh"):
        dataclasses.replace(config, policy_output="sigmoid").validate()


def test_settings_that_would_train_nothing_or_mislabel_the_run_are_refused():
    """Found by trying the RL surface as a user: each of these used to be accepted and then
    train nothing (`max_backtracks=0`: TRPO never tried a step), NaN returns (empty batches),
    or a MAML run logged, evaluated and exported as the non-adapting oracle."""
    with pytest.raises(ValueError, match="goal_observed trains the oracle.*needs "
                                         "num_inner_steps=0, got 1"):
        config_lib.Config(dataset="navigation2d", goal_observed=True).validate()
    with pytest.raises(ValueError, match="max_backtracks must be a positive integer, got 0"):
        config_lib.Config(dataset="navigation2d", max_backtracks=0).validate()
    env = Navigation2D(horizon=5)
    for arguments, pattern in [
            (dict(fast_batch_size=0), "fast_batch_size must be a positive integer, got 0"),
            (dict(meta_batch_size=0), "meta_batch_size must be a positive integer"),
            (dict(max_backtracks=0), "max_backtracks must be a positive integer"),
            (dict(cg_iterations=0), "cg_iterations must be a positive integer"),
            (dict(horizon=0), "horizon must be a positive integer"),
            (dict(num_inner_steps=1.5), r"num_inner_steps must be an integer >= 0, got 1\.5"),
            (dict(inner_lr=-1.0), r"inner_lr must be a number positive and finite, got -1\.0"),
            (dict(max_kl=-1.0), "max_kl must be a number positive and finite"),
            (dict(gamma=2.0), r"gamma must be a number in \(0, 1\], got 2\.0"),
            (dict(backtrack_ratio=1.0), "backtrack_ratio must be a number in"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            MAMLRL(env, gaussian_mlp_policy(2, 2, (8,)), **arguments)


def test_a_trpo_step_that_is_not_finite_stops_the_run_naming_inner_lr(tmp_path):
    """An inner step far too large made every TRPO step NaN: the line search rejected each,
    the weights stayed finite, and the run went on training nothing (exit 0), with a warning
    that blamed max_kl. Larger still, NaN rollouts failed in the baseline's eigendecomposition
    with TensorFlow's message."""
    config = config_lib.Config(dataset="navigation2d", num_iterations=3,
                               **{**TINY, "inner_lr": 100.0})
    with pytest.raises(trainer.TrainingDiverged, match=r"TRPO's step is not finite .*"
                                                       r"Lower inner_lr \(now 100\)"):
        trainer.train(config, str(tmp_path / "run"))
    result = _run("tf_maml.train", "--dataset=navigation2d", "--num_iterations=1",
                  "--inner_lr=1e20", f"--model_dir={tmp_path / 'huge'}", "--noevaluate",
                  *[flag for flag in TINY_FLAGS if "inner_lr" not in flag])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the rollouts hold NaN or infinite observations or returns: the policy diverged "
        "(an inner step too large? lower inner_lr)")


def test_an_export_whose_limits_refuse_the_runs_own_episodes_is_refused(tmp_path):
    model_dir = str(tmp_path / "run")
    trainer.train(config_lib.Config(dataset="navigation2d", num_iterations=1,
                                    **{**TINY, "horizon": 20}), model_dir)
    experiment, _ = experiment_lib.restore(model_dir)
    from tf_maml.rl import serving as rl_serving
    with pytest.raises(ValueError, match=r"max_horizon \(10\) is below the run's horizon \(20\)"):
        rl_serving.export_policy(experiment, str(tmp_path / "export"), 1,
                                 limits={"max_horizon": 10})
    assert not (tmp_path / "export").exists()


def test_sample_by_steps_reaches_the_run_and_every_row_of_its_evaluation(tmp_path, monkeypatch):
    tiny = dict(TINY, goal_radius=0.3, normalized_actions=True)
    maml_dir, base_dir = str(tmp_path / "maml"), str(tmp_path / "pretrained")
    trainer.train(config_lib.Config(dataset="navigation2d", num_iterations=1,
                                    sample_by_steps=True, **tiny), maml_dir)
    trainer.train(config_lib.Config(dataset="navigation2d", num_iterations=1, num_inner_steps=0,
                                    **tiny), base_dir)
    experiment, _ = experiment_lib.restore(maml_dir)
    assert experiment.algorithm.sample_by_steps
    assert experiment.algorithm.max_valid_steps() == (2 + 1) * 5 - 1
    seen = []
    evaluate = rl.MAMLRL.evaluate

    def recording(self, *args, **kwargs):
        seen.append(self.max_valid_steps(kwargs.get("num_trajectories")) is not None)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(rl.MAMLRL, "evaluate", recording)
    for by_steps in (None, False):    # the run's own setting, then overridden
        seen.clear()
        out = tmp_path / f"eval_{by_steps}"
        overrides = {} if by_steps is None else {"sample_by_steps": by_steps}
        reporting.evaluate_and_report(maml_dir, baseline_dir=base_dir, output_dir=str(out),
                                      **overrides)
        expected = by_steps is None
        # The run, the baseline (trained by episodes) and the random init: one protocol.
        assert seen == [expected] * 3, seen
        assert json.load(open(out / reporting.RESULTS_FILENAME))["sample_by_steps"] == expected
    # The navigation flagfile sets it: the message says how to turn it off.
    with pytest.raises(ValueError, match=r"sample_by_steps is for episodes that can end early "
                       r".*, not navigation2d with goal_radius=0: pass --sample_by_steps=false"):
        config_lib.Config(dataset="navigation2d", sample_by_steps=True).validate()
