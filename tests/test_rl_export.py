"""Meta-RL policy export: the SavedModel's `adapt` is the training inner loop's step, in a fresh
process; it moves the policy toward the episodes' goal; bad requests fail clearly; the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import core, serving, trainer
from tf_maml.rl import Navigation2D, process_trajectories, sample_trajectories
from tf_maml.rl import serving as rl_serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # float32, same kernels; reordering only
# A tiny run (test_rl_train's sizes): one meta-iteration takes a second or two.
TINY = dict(dataset="navigation2d", meta_batch_size=3, fast_batch_size=2, horizon=5,
            log_every=1, num_eval_tasks=6, num_eval_steps=2, validate_every=0, inner_lr=0.1,
            num_iterations=2, checkpoint_every=2)
LIMITS = rl_serving.PolicyServingLimits(max_episodes=30, max_horizon=40,
                                        max_query_observations=50)
CORNERS = [(0.4, 0.4), (-0.4, 0.4), (0.4, -0.4), (-0.4, -0.4)]
QUERY = np.stack(np.meshgrid(np.linspace(-0.3, 0.3, 3), np.linspace(-0.3, 0.3, 3)),
                 -1).reshape(-1, 2).astype(np.float32)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def rl_export(tmp_path_factory):
    """A tiny trained RL run, exported by the CLI."""
    model_dir = str(tmp_path_factory.mktemp("rl_run"))
    experiment, step = trainer.train(config_lib.Config(**TINY), model_dir)
    assert step == 2
    export_dir = str(tmp_path_factory.mktemp("rl_serving"))
    command = [sys.executable, "-m", "tf_maml.export", f"--model_dir={model_dir}",
               f"--export_dir={export_dir}", *(f"--{k}={v}" for k, v in LIMITS.to_dict().items())]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return experiment, model_dir, os.path.join(export_dir, "2"), command, result


def _episodes(experiment, goal, num_episodes, horizon, seed):
    """One task's episodes sampled with the run's meta-initialization (the library's sampler)."""
    algorithm = experiment.algorithm
    weights = core.broadcast_to_tasks(algorithm.meta_variables, 1)
    return sample_trajectories(Navigation2D(), algorithm.policy, weights,
                               tf.constant([goal], tf.float32), num_episodes,
                               tf.constant(seed, tf.int64), horizon)


def _in_process(experiment, trajectories, query, inner_lr=None):
    """The training inner loop's step: `process_trajectories` with the run's settings, then
    `MAMLRL.adapt` (core.adapt on the REINFORCE loss); the adapted policy at `query`."""
    algorithm = experiment.algorithm
    batch = process_trajectories(trajectories, algorithm.gamma, algorithm.gae_lambda,
                                 algorithm.baseline_reg, algorithm.normalize_advantages)
    adapted = algorithm.adapt(algorithm.meta_variables, [batch], first_order=True,
                              inner_lr=inner_lr)
    mean, log_std = algorithm.policy.distribution(adapted, tf.constant(query)[None])
    return mean[0].numpy(), log_std.numpy().reshape(-1)


def _request(trajectories, lengths, query, padding=None):
    """`adapt`'s inputs for task 0 of `trajectories`; steps past `lengths` replaced by `padding`."""
    fields = {name: getattr(trajectories, name)[0].numpy()
              for name in ("observations", "actions", "rewards")}
    if padding is not None:
        invalid = np.arange(fields["rewards"].shape[1])[None, :] >= np.asarray(lengths)[:, None]
        for name, value in fields.items():
            noise = padding.normal(0, 100, value.shape).astype(np.float32)
            fields[name] = np.where(invalid.reshape(invalid.shape + (1,) * (value.ndim - 2)),
                                    noise, value)
    return {**fields, "lengths": np.asarray(lengths, np.int32), "query_observations": query}


LOAD_SCRIPT = """
import json, sys
# Keras and tf_maml cannot be imported at all here.
for name in ("keras", "tf_keras", "tf_maml"):
    sys.modules[name] = None
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
requests = json.loads(sys.argv[2])
inputs = dict(np.load(sys.argv[3]))
out = {}
for name, signature in requests.items():
    args = {k.split("/", 1)[1]: tf.constant(v) for k, v in inputs.items()
            if k.split("/", 1)[0] == name}
    for key, value in model.signatures[signature](**args).items():
        out[name + "/" + key] = value.numpy()
np.savez(sys.argv[4], **out)
print(json.dumps(sorted(name for name, module in sys.modules.items() if module is not None)))
"""


@pytest.fixture(scope="module")
def fresh_answers(rl_export, tmp_path_factory):
    """Every request of the tests below, answered by a process without Keras or tf_maml."""
    experiment, _, path, _, _ = rl_export
    tmp = tmp_path_factory.mktemp("fresh")
    requests, inputs, expected = {}, {}, {}

    def add(name, signature, request, answer):
        requests[name] = signature
        inputs.update({f"{name}/{k}": v for k, v in request.items()})
        expected[name] = answer

    trajectories = _episodes(experiment, (0.3, -0.2), 6, 8, [1, 2])
    lengths = [8, 3, 8, 1, 5, 8]
    masked = trajectories._replace(mask=tf.sequence_mask(lengths, 8, tf.float32)[None])
    add("serve", "serving_default", {"observations": QUERY},
        (experiment.model(QUERY).numpy(), experiment.algorithm.policy.log_std.numpy()))
    add("full", "adapt", _request(trajectories, [8] * 6, QUERY),
        _in_process(experiment, trajectories, QUERY))
    # Shorter episodes: the steps after each one's end are noise in the request, unused.
    add("lengths", "adapt", _request(trajectories, lengths, QUERY, np.random.default_rng(0)),
        _in_process(experiment, masked, QUERY))
    add("custom", "adapt_custom",
        {**_request(trajectories, lengths, QUERY), "inner_lr": np.float32(0.3)},
        _in_process(experiment, masked, QUERY, inner_lr=0.3))
    for i, goal in enumerate(CORNERS):
        add(f"goal{i}", "adapt", _request(_episodes(experiment, goal, 20, 20, [7, i]), [20] * 20,
                                          QUERY), None)
    np.savez(tmp / "in.npz", **inputs)
    script = tmp / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run([sys.executable, str(script), path, json.dumps(requests),
                             str(tmp / "in.npz"), str(tmp / "out.npz")],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "tensorflow" in modules
    assert not [m for m in modules if m == "keras" or m.startswith(("keras.", "tf_maml"))]
    return dict(np.load(tmp / "out.npz")), expected


def test_fresh_process_adapt_equals_the_training_inner_step(fresh_answers):
    out, expected = fresh_answers
    mean, log_std = expected["serve"]
    np.testing.assert_allclose(out["serve/action_mean"], mean, **TOLERANCE)
    np.testing.assert_allclose(out["serve/log_std"], log_std, **TOLERANCE)
    assert out["serve/action_mean"].shape == (len(QUERY), 2) and out["serve/log_std"].shape == (2,)
    for name in ("full", "lengths", "custom"):
        mean, log_std = expected[name]
        np.testing.assert_allclose(out[f"{name}/action_mean"], mean, **TOLERANCE, err_msg=name)
        np.testing.assert_allclose(out[f"{name}/log_std"], log_std, **TOLERANCE, err_msg=name)
        # The step changed the policy (mean and log-std both adapt).
        assert not np.allclose(out[f"{name}/action_mean"], out["serve/action_mean"], atol=1e-4)
        assert not np.allclose(out[f"{name}/log_std"], out["serve/log_std"], atol=1e-5)
    # Lengths matter; a larger step moves further.
    assert not np.allclose(out["full/action_mean"], out["lengths/action_mean"], atol=1e-4)
    moved = {name: np.abs(out[f"{name}/action_mean"] - out["serve/action_mean"]).mean()
             for name in ("lengths", "custom")}
    assert moved["custom"] > 2 * moved["lengths"]


def test_the_adapted_policy_does_not_depend_on_the_scale_of_the_rewards(rl_export):
    """Baseline fit and advantages are linear in the rewards, normalization removes the scale:
    rewards of 1e19 adapt as rewards of 1 do (their squares once overflowed, and the request
    silently returned the unadapted policy)."""
    experiment = rl_export[0]
    trajectories = _episodes(experiment, (0.3, -0.2), 6, 8, [1, 2])
    mean, log_std = _in_process(experiment, trajectories, QUERY)
    assert not np.allclose(mean, experiment.model(QUERY).numpy(), atol=1e-4)
    for scale in (1e3, 1e19):
        scaled = trajectories._replace(rewards=trajectories.rewards * scale)
        scaled_mean, scaled_log_std = _in_process(experiment, scaled, QUERY)
        np.testing.assert_allclose(scaled_mean, mean, rtol=1e-3, atol=1e-5, err_msg=scale)
        np.testing.assert_allclose(scaled_log_std, log_std, rtol=1e-3, atol=1e-5)


def test_adapting_on_a_goals_episodes_moves_the_actions_toward_it(fresh_answers):
    out, _ = fresh_answers
    before = out["serve/action_mean"]
    for i, goal in enumerate(CORNERS):
        after = out[f"goal{i}/action_mean"]
        change, toward = after - before, np.array(goal) - QUERY
        cosine = (change * toward).sum(-1) / (np.linalg.norm(change, axis=-1)
                                              * np.linalg.norm(toward, axis=-1))
        assert cosine.min() > 0 and cosine.mean() > 0.5, (goal, cosine)

        # The next position (actions are clipped to 0.1) is closer to the goal on average.
        def distance(mean, goal=goal):
            return np.linalg.norm(QUERY + np.clip(mean, -0.1, 0.1) - goal, axis=-1).mean()

        assert distance(after) < distance(before) - 0.01, goal


def test_bad_requests_fail_clearly_and_the_next_request_works(rl_export):
    experiment, _, path, _, _ = rl_export
    model = tf.saved_model.load(path)
    adapt, custom, serve = (model.signatures[name]
                            for name in ("adapt", "adapt_custom", "serving_default"))
    good = {k: tf.constant(v) for k, v in _request(
        _episodes(experiment, (0.1, 0.2), 4, 6, [3, 3]), [6, 2, 6, 6], QUERY).items()}
    before = adapt(**good)
    obs, actions, rewards = good["observations"], good["actions"], good["rewards"]
    nan = float("nan")
    bad_requests = [
        (adapt, {"observations": obs[0]}, "observations must have shape \\[num_episodes, "
                                          "horizon, 2\\]; got shape.*\\[6 2\\]"),
        (adapt, {"observations": obs[..., :1]}, "observations must have shape"),
        (adapt, {"observations": obs[:, :0], "actions": actions[:, :0],
                 "rewards": rewards[:, :0]}, "observations must not be empty"),
        (adapt, {"observations": obs[:0], "actions": actions[:0], "rewards": rewards[:0],
                 "lengths": good["lengths"][:0]}, "observations must not be empty"),
        (adapt, {"actions": actions[..., :1]}, "actions must have shape \\[num_episodes, "
                                               "horizon, 2\\]"),
        (adapt, {"actions": actions[:, :5]}, "actions must have the episodes and steps of "
                                             "observations"),
        (adapt, {"rewards": rewards[..., None]}, "rewards must have shape \\[num_episodes, "
                                                 "horizon\\]"),
        (adapt, {"rewards": rewards[:3]}, "rewards must have the episodes and steps"),
        (adapt, {"lengths": good["lengths"][:, None]}, "lengths must have shape "
                                                       "\\[num_episodes\\]"),
        (adapt, {"lengths": good["lengths"][:3]}, "lengths must have one entry per episode"),
        (adapt, {"lengths": tf.constant([6, 0, 6, 6])}, "lengths must be in \\[1, horizon\\]"),
        (adapt, {"lengths": tf.constant([6, 7, 6, 6])}, "lengths must be in \\[1, horizon\\]"),
        # Wrong dtypes are refused by the signature itself (TF names the input's position).
        (adapt, {"lengths": tf.constant([6.0, 2.0, 6.0, 6.0])}, "int32"),
        (adapt, {"observations": tf.cast(obs, tf.float64)}, "double"),
        # Non-finite values anywhere, also past an episode's end.
        (adapt, {"observations": tf.tensor_scatter_nd_update(obs, [[1, 5, 0]], [nan])},
         "observations has NaN or infinite values"),
        (adapt, {"actions": actions * float("inf")}, "actions has NaN or infinite values"),
        (adapt, {"rewards": rewards * nan}, "rewards has NaN or infinite values"),
        # Finite, but their sums overflow (it was called a diverged policy).
        (adapt, {"rewards": tf.fill(tf.shape(rewards), 3e38)},
         "rewards are too large: their sum over an episode overflows float32"),
        (adapt, {"query_observations": good["query_observations"] * nan},
         "query_observations has NaN or infinite values"),
        (adapt, {"query_observations": good["query_observations"][:, :1]},
         "query_observations must have shape \\[num_observations, 2\\]"),
        (adapt, {"query_observations": tf.zeros([0, 2])}, "query_observations must not be empty"),
        # The export's limits (recorded in assets.extra).
        (adapt, {"observations": tf.zeros([31, 6, 2]), "actions": tf.zeros([31, 6, 2]),
                 "rewards": tf.zeros([31, 6]), "lengths": tf.fill([31], 6)},
         "observations has too many episodes: this export accepts at most 30 \\(max_episodes\\)"),
        (adapt, {"observations": tf.zeros([4, 41, 2]), "actions": tf.zeros([4, 41, 2]),
                 "rewards": tf.zeros([4, 41]), "lengths": tf.fill([4], 41)},
         "too many steps per episode: this export accepts at most 40 \\(max_horizon\\)"),
        (adapt, {"query_observations": tf.zeros([51, 2])},
         "query_observations has too many observations: this export accepts at most 50 "
         "\\(max_query_observations\\)"),
        (serve, {"observations": tf.zeros([51, 2])}, "observations has too many observations"),
        (serve, {"observations": tf.zeros([3, 3])}, "observations must have shape"),
        (custom, {"inner_lr": tf.constant(-1.0)}, "inner_lr must be finite and >= 0"),
        (custom, {"inner_lr": tf.constant([0.1])}, "inner_lr must be a scalar"),
        # A step size that makes the adaptation diverge: an error, not NaN with status OK.
        (custom, {"inner_lr": tf.constant(3e38)},
         "the adaptation diverged: (action_mean|log_std) is not finite \\(episodes far from "
         "the scale of the training ones, or an inner_lr too large for them\\?\\)"),
        # ... or a finite log-std whose std is not (it was answered with status OK).
        (custom, {"inner_lr": tf.constant(1e6)},
         "the adaptation diverged: log_std is too large, its std exp\\(log_std\\) is not "
         "finite"),
    ]
    for signature, change, message in bad_requests:
        request = ({"observations": QUERY} if signature is serve else
                   {**good, **({"inner_lr": tf.constant(0.1)} if signature is custom else {}),
                    **change})
        request.update(change)
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(**request)
        # The server keeps serving: a good request still gets the answer it got before.
        again = adapt(**good)
        for name in ("action_mean", "log_std"):
            np.testing.assert_array_equal(again[name].numpy(), before[name].numpy())
    # adapt_custom with the run's inner_lr is adapt.
    same = custom(**good, inner_lr=tf.constant(0.1))
    np.testing.assert_allclose(same["action_mean"].numpy(), before["action_mean"].numpy(),
                               **TOLERANCE)


def test_export_cli_writes_a_versioned_policy(rl_export, tmp_path):
    _, model_dir, path, _, result = rl_export
    assert "exported the policy of step 2" in result.stdout
    assert "one policy-gradient step with inner_lr 0.1" in result.stdout
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    recorded = json.load(open(os.path.join(path, "assets.extra", serving.CONFIG_ASSET)))
    assert recorded["dataset"] == "navigation2d" and recorded["num_iterations"] == 2
    assert recorded["export_kind"] == "policy" and recorded["export_inner_steps"] == 1
    assert recorded["export_inner_lr"] == 0.1
    assert recorded["export_limits"] == LIMITS.to_dict()
    assert recorded["export_advantages"] == {"gamma": 0.99, "gae_lambda": 1.0,
                                             "baseline_reg": 1e-5, "normalize_advantages": True}
    assert recorded["export_signatures"] == list(rl_serving.POLICY_SIGNATURES)
    assert (recorded["export_observation_dim"], recorded["export_action_dim"]) == (2, 2)
    assert set(tf.saved_model.load(path).signatures) == set(rl_serving.POLICY_SIGNATURES)
    # A supervised limit is refused in one line, naming the policy's own; so is a step count
    # (the policy's adapt takes one step; it was accepted and ignored). Nothing written.
    for flag, message in (
            ("--max_support_examples=5", "--max_support_examples: not a limit of a meta-RL "
             "policy's export (its limits: --max_episodes, --max_horizon, "
             "--max_query_observations)"),
            ("--num_eval_steps=5", "--num_eval_steps does not apply to a meta-RL policy's "
             "export: its adapt signatures take one policy-gradient step")):
        wrong = subprocess.run([sys.executable, "-m", "tf_maml.export",
                                f"--model_dir={model_dir}", f"--export_dir={tmp_path}", flag],
                               capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
        assert message in wrong.stderr, wrong.stderr
    assert os.listdir(tmp_path) == []
    # Evaluating the export through its signatures names the policy first, whatever else
    # was given (a protocol override would be refused for any export).
    from tf_maml import reporting  # noqa: PLC0415
    for overrides in ({}, {"sample_by_steps": False}):
        with pytest.raises(ValueError, match="is a policy: evaluate its run with --model_dir"):
            reporting.evaluate_export(path, **overrides)


def test_policy_signatures_in_process_and_export_arguments(rl_export, tmp_path):
    experiment = rl_export[0]
    signatures = rl_serving.PolicySignatures(experiment.algorithm, inner_lr=0.25, limits=LIMITS)
    trajectories = _episodes(experiment, (-0.2, 0.3), 3, 4, [5, 5])
    out = signatures.adapt(**_request(trajectories, [4, 4, 4], QUERY))
    mean, log_std = _in_process(experiment, trajectories, QUERY, inner_lr=0.25)
    np.testing.assert_allclose(out["action_mean"].numpy(), mean, **TOLERANCE)
    np.testing.assert_allclose(out["log_std"].numpy(), log_std, **TOLERANCE)
    for bad, message in [(dict(inner_lr=-0.1), "inner_lr must be finite and >= 0"),
                         (dict(limits={"max_tasks": 2}), "max_tasks: not a limit of this export"),
                         (dict(limits={"max_episodes": 0}), "max_episodes must be a positive"),
                         (dict(version=0), "version must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            rl_serving.export_policy(experiment, str(tmp_path), **{"version": 1, **bad})
    assert os.listdir(tmp_path) == []
    # Outputs that overflow are an error (here: a policy whose first layer is huge).
    kernel = experiment.model.trainable_variables[0]
    saved = kernel.numpy()
    try:
        kernel.assign(saved * 1e30)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="the meta-initialization's output: action_mean is not finite"):
            signatures.serve(tf.fill([2, 2], 1e30))
    finally:
        kernel.assign(saved)
