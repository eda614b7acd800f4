"""HalfCheetah goal velocity / direction on Gymnasium + MuJoCo (the "rl" extra)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

gym = pytest.importorskip("gymnasium", reason='needs the "rl" extra: pip install -e ".[rl]"')
pytest.importorskip("mujoco", reason='needs the "rl" extra (MuJoCo): pip install -e ".[rl]"')

from tf_maml import config as config_lib  # noqa: E402
from tf_maml import core, experiment, reporting, trainer  # noqa: E402
from tf_maml.rl import GaussianPolicy, HalfCheetahGoals, gaussian_mlp_policy  # noqa: E402
from tf_maml.rl import locomotion, sample_trajectories  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(meta_batch_size=2, fast_batch_size=2, horizon=8, log_every=1, num_eval_tasks=3,
            num_eval_steps=2, validate_every=0)


_POLICY = []


def _rollout(env, num_tasks, num_trajectories, seed, goals=None):
    if not _POLICY:   # one policy for every rollout of this module
        _POLICY.append(GaussianPolicy(gaussian_mlp_policy(17, 6, hidden=(8,))))
    policy = _POLICY[0]
    weights = core.broadcast_to_tasks(policy.variables, num_tasks)
    if goals is None:
        goals = env.sample_tasks(num_tasks, tf.constant([4, 2], tf.int64))
    return goals, sample_trajectories(env, policy, weights, goals, num_trajectories,
                                      tf.constant(seed, tf.int64))


@pytest.mark.parametrize("task", ["velocity", "direction"])
def test_rewards_are_the_goal_rewards_of_an_independent_gymnasium_rollout(task):
    env = HalfCheetahGoals(task, horizon=12)
    goals, batch = _rollout(env, 2, 3, (1, 2))
    if task == "velocity":
        assert np.all((goals.numpy() >= 0) & (goals.numpy() <= 2))
    else:
        assert set(np.unique(env.sample_tasks(64, tf.constant([0, 3], tf.int64)))) == {-1, 1}
    assert batch.observations.shape == (2, 3, 12, 17) and float(tf.reduce_min(batch.mask)) == 1
    # Replay trajectory (1, 2)'s actions in a fresh HalfCheetah-v5 with the same initial state.
    # The simulation steps 0.01 s per action (frame_skip 1: the rllab model's time step).
    locomotion._log_mujoco_warnings_once()   # no MUJOCO_LOG.TXT in the working directory
    cheetah = gym.make("HalfCheetah-v5", frame_skip=1)
    assert cheetah.unwrapped.dt == pytest.approx(0.01)
    cheetah.reset()
    first = batch.observations[1, 2, 0].numpy().astype(np.float64)
    qpos = np.concatenate([[0.0], first[:8]])   # the x coordinate is not observed
    cheetah.unwrapped.set_state(qpos, first[8:])
    goal = float(goals[1])
    for t in range(12):
        action = np.clip(batch.actions[1, 2, t].numpy(), -1, 1)
        observation, _, _, _, info = cheetah.step(action)
        forward = (-abs(info["x_velocity"] - goal) if task == "velocity"
                   else goal * info["x_velocity"])
        expected = forward - 0.05 * np.sum(np.square(action))
        assert float(batch.rewards[1, 2, t]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        if t < 11:
            np.testing.assert_allclose(batch.observations[1, 2, t + 1].numpy(), observation,
                                       rtol=1e-4, atol=1e-4)


def _rllab_comvel(mujoco, model, data, body):
    """rllab's `get_body_comvel` (mujoco_py's `_compute_subtree`), written out independently.

    Each body's linear velocity at its centre of mass (`mj_objectVelocity`, world
    frame) times its mass, summed up the kinematic tree, over the subtree's mass.
    """
    momentum = np.zeros([model.nbody, 3])
    mass = model.body_mass.copy()
    velocity = np.zeros(6)
    for i in range(model.nbody):
        mujoco.mj_objectVelocity(model, data, mujoco.mjtObj.mjOBJ_BODY, i, velocity, 0)
        momentum[i] = velocity[3:] * mass[i]
    for i in range(model.nbody - 1, 0, -1):
        momentum[model.body_parentid[i]] += momentum[i]
        mass[model.body_parentid[i]] += mass[i]
    return momentum[body] / mass[body]


def test_the_rllab_halfcheetah_observes_and_rewards_as_the_original_environment():
    import mujoco
    env = HalfCheetahGoals("velocity", horizon=10, rllab_halfcheetah=True)
    assert env.observation_dim == 20
    policy = GaussianPolicy(gaussian_mlp_policy(20, 6, hidden=(8,)))
    goals = env.sample_tasks(2, tf.constant([4, 2], tf.int64))
    batch = sample_trajectories(env, policy, core.broadcast_to_tasks(policy.variables, 2),
                                goals, 16, tf.constant([5, 6], tf.int64))
    assert batch.observations.shape == (2, 16, 10, 20)
    # rllab's reset noise: qpos + 0.01 N(0, 1) (Gymnasium's: U(-0.1, 0.1)), qvel + 0.1 N(0, 1).
    first = batch.observations[:, :, 0].numpy().reshape(32, 20).astype(np.float64)
    assert 0.006 < first[:, :8].std() < 0.014 and 0.07 < first[:, 8:17].std() < 0.13
    # Replay trajectory (1, 3) in a fresh HalfCheetah-v5 model, observing and rewarding as
    # rllab's HalfCheetahEnvRand.step: forward_dynamics (step, then forward), then
    # [qpos[1:], qvel, com_subtree[torso]] and -|comvel_x - goal| - 0.05 |clip(a)|^2.
    locomotion._log_mujoco_warnings_once()
    cheetah = gym.make("HalfCheetah-v5", frame_skip=1).unwrapped
    cheetah.reset()
    model, data = cheetah.model, cheetah.data
    torso = model.body("torso").id
    start = batch.observations[1, 3, 0].numpy().astype(np.float64)
    qpos = np.concatenate([[0.0], start[:8]])
    cheetah.set_state(qpos, start[8:17])
    # The x coordinate is not in qpos's observed part but is in the centre of mass: shift it.
    qpos[0] = start[17] - data.subtree_com[torso, 0]
    cheetah.set_state(qpos, start[8:17])
    np.testing.assert_allclose(data.subtree_com[torso], start[17:], atol=1e-5)
    goal = float(goals[1])
    for t in range(10):
        action = np.clip(batch.actions[1, 3, t].numpy().astype(np.float64), -1, 1)
        data.ctrl[:] = action
        mujoco.mj_step(model, data)
        mujoco.mj_forward(model, data)
        expected = (-abs(_rllab_comvel(mujoco, model, data, torso)[0] - goal)
                    - 0.05 * np.sum(np.square(action)))
        assert float(batch.rewards[1, 3, t]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        if t < 9:
            observation = np.concatenate([data.qpos[1:], data.qvel, data.subtree_com[torso]])
            np.testing.assert_allclose(batch.observations[1, 3, t + 1].numpy(), observation,
                                       rtol=1e-4, atol=1e-4)


def test_rllab_halfcheetah_trains_exports_and_is_kept_apart(tmp_path):
    with pytest.raises(ValueError, match="rllab_halfcheetah applies to the HalfCheetah"):
        config_lib.Config(dataset="navigation2d", rllab_halfcheetah=True).validate()
    with pytest.raises(ValueError, match="needs the half cheetah model.*Hopper-v5.*nq=6"):
        HalfCheetahGoals("velocity", rllab_halfcheetah=True, env_id="Hopper-v5")
    config = config_lib.Config(dataset="halfcheetah_velocity", rllab_halfcheetah=True,
                               num_iterations=1, **TINY)
    model_dir = str(tmp_path / "rllab")
    trainer.train(config, model_dir)
    # A run in the other environment is not compared with it.
    other = str(tmp_path / "v5")
    config_lib.save(config_lib.Config(**{**config.__dict__, "rllab_halfcheetah": False}), other)
    with pytest.raises(ValueError, match="rllab_halfcheetah=False"):
        reporting.evaluate_and_report(model_dir, baseline_dir=other,
                                      output_dir=str(tmp_path / "eval"))
    # Evaluation on the original test scripts' goals: the numbers test_maml_cheetah.py printed.
    results = reporting.evaluate_and_report(model_dir, output_dir=str(tmp_path / "eval"),
                                            original_test_goals=True)
    saved = json.load(open(tmp_path / "eval" / reporting.RESULTS_FILENAME))
    assert saved["original_test_goals"] is True and all(np.isfinite(results["MAML"][0]))
    np.testing.assert_allclose(saved["goals"], [0.834044, 1.440649, 0.000229], atol=1e-6)
    env = HalfCheetahGoals("velocity")
    np.testing.assert_allclose(env.original_test_goals(4).numpy(),
                               [0.834044, 1.440649, 0.000229, 0.604665], atol=1e-6)
    np.testing.assert_array_equal(HalfCheetahGoals("direction").original_test_goals(4).numpy(),
                                  [-1, 1, -1, -1])
    assert abs(float(tf.reduce_mean(env.original_test_goals(40))) - 0.9185) < 1e-4
    # The export's policy takes the 20 observations.
    from tf_maml import serving
    trained, step = experiment.restore(model_dir)
    path = serving.export(trained, str(tmp_path / "export"), step, 1)
    loaded = tf.saved_model.load(path)
    observations = np.random.default_rng(0).normal(size=(3, 20)).astype(np.float32)
    out = loaded.signatures["serving_default"](observations=tf.constant(observations))
    np.testing.assert_allclose(out["action_mean"], trained.model(observations), rtol=1e-5,
                               atol=1e-6)


def test_rollouts_are_a_pure_function_of_the_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import mujoco
    mujoco.set_mju_user_warning(None)   # MuJoCo's default: print and append to MUJOCO_LOG.TXT
    env = HalfCheetahGoals("velocity", horizon=6)
    goals, a = _rollout(env, 2, 2, (3, 4))
    # MuJoCo's model warning goes to the log once, not into MUJOCO_LOG.TXT in the working dir.
    assert os.listdir(tmp_path) == []
    _, b = _rollout(env, 2, 2, (3, 4), goals)
    _, c = _rollout(env, 2, 2, (3, 5), goals)
    np.testing.assert_array_equal(a.observations.numpy(), b.observations.numpy())
    np.testing.assert_array_equal(a.rewards.numpy(), b.rewards.numpy())
    # Another seed: other initial states (reset noise) and other actions.
    assert not np.allclose(a.observations[:, :, 0].numpy(), c.observations[:, :, 0].numpy())
    # Every simulation starts from its own random state.
    initial = a.observations[:, :, 0].numpy().reshape(4, 17)
    assert len({tuple(row) for row in initial.round(6)}) == 4


def test_the_oracle_sees_the_goal_velocity_and_the_same_simulation():
    from tf_maml.rl import GoalObserved
    env = HalfCheetahGoals("velocity", horizon=5)
    observed = GoalObserved(env)
    assert observed.observation_dim == 18 and observed.action_dim == 6
    policy = GaussianPolicy(gaussian_mlp_policy(18, 6, hidden=(8,)))
    goals = env.sample_tasks(2, tf.constant([4, 2], tf.int64))
    seen = sample_trajectories(observed, policy, core.broadcast_to_tasks(policy.variables, 2),
                               goals, 2, tf.constant([3, 4], tf.int64))
    np.testing.assert_array_equal(seen.observations[..., 17].numpy(),
                                  np.broadcast_to(goals.numpy()[:, None, None], (2, 2, 5)))
    # The simulations are the wrapped environment's: replaying the oracle's actions on the
    # plain environment from the same seed gives the same states and rewards.
    replay = sample_trajectories(env, _Replay(seen.actions), [tf.zeros([2, 1])], goals, 2,
                                 tf.constant([3, 4], tf.int64))
    np.testing.assert_allclose(replay.observations.numpy(), seen.observations[..., :17].numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(replay.rewards.numpy(), seen.rewards.numpy(), rtol=1e-6,
                               atol=1e-6)


class _Replay:
    """Replays recorded actions (noise-free: a tiny std) whatever it observes."""

    action_dim = 6
    dtype = tf.float32

    def __init__(self, actions):
        self.actions, self.step = actions, 0

    def distribution(self, weights, observations):
        del weights
        t = self.step   # one call per time step, in order
        self.step += 1
        return self.actions[:, :, t], tf.fill([2, 1, 6], -30.0)


def test_an_unstable_simulation_is_a_clear_error(monkeypatch):
    env = HalfCheetahGoals("velocity", horizon=3)
    _rollout(env, 1, 2, (0, 0))
    vector = env._vectors[2]
    step = vector.step

    def broken(actions):
        observations, *rest = step(actions)
        return (observations * np.nan, *rest)

    monkeypatch.setattr(vector, "step", broken)
    with pytest.raises(RuntimeError, match="HalfCheetah-v5 simulation became unstable"):
        _rollout(env, 1, 2, (0, 0))
    # Inside a graph, as in training, it surfaces as an OpError with the same message.
    with pytest.raises(tf.errors.OpError, match="HalfCheetah-v5 simulation became unstable") as e:
        tf.function(lambda: _rollout(env, 1, 2, (0, 0))[1].rewards)()
    # The command line's one-line error names the simulation, not "Graph execution error:".
    assert experiment.error_text(e.value).startswith(
        "RuntimeError: the HalfCheetah-v5 simulation became unstable")


def test_a_real_mujoco_instability_is_caught_although_mujoco_resets_the_simulation():
    env = HalfCheetahGoals("velocity", horizon=3)
    goals, _ = _rollout(env, 1, 1, (0, 0))
    data = env._vectors[1].envs[0].unwrapped.data
    step = env._py_step

    def blow_up(actions):   # MuJoCo detects the bad state, warns and resets it: finite obs
        data.qvel[:] = 1e40
        return step(actions)

    env._py_step = blow_up
    with pytest.raises(RuntimeError, match="simulation became unstable"):
        _rollout(env, 1, 1, (0, 0), goals)


def test_a_sampling_horizon_longer_than_the_environments_runs_on():
    env = HalfCheetahGoals("direction", horizon=2)
    policy_goals = env.sample_tasks(2, tf.constant([1, 1], tf.int64))
    policy = GaussianPolicy(gaussian_mlp_policy(17, 6, hidden=(4,)))
    batch = sample_trajectories(env, policy, core.broadcast_to_tasks(policy.variables, 2),
                                policy_goals, 1, tf.constant([0, 1], tf.int64), horizon=1005)
    assert batch.rewards.shape == (2, 1, 1005)   # past Gymnasium's 1000-step limit...
    assert np.all(np.isfinite(batch.rewards.numpy())) and float(tf.reduce_min(batch.mask)) == 1
    # ...and no reset: the simulation goes on from step 998's state, as a fresh one replays it.
    locomotion._log_mujoco_warnings_once()
    cheetah = gym.make("HalfCheetah-v5", frame_skip=1)
    cheetah.reset()
    state = batch.observations[1, 0, 998].numpy().astype(np.float64)
    cheetah.unwrapped.set_state(np.concatenate([[0.0], state[:8]]), state[8:])
    for t in range(998, 1005):
        action = np.clip(batch.actions[1, 0, t].numpy(), -1, 1)
        observation, _, _, _, info = cheetah.step(action)
        expected = float(policy_goals[1]) * info["x_velocity"] - 0.05 * np.sum(np.square(action))
        assert float(batch.rewards[1, 0, t]) == pytest.approx(expected, rel=1e-3, abs=1e-3), t
        if t < 1004:
            np.testing.assert_allclose(batch.observations[1, 0, t + 1].numpy(), observation,
                                       rtol=1e-3, atol=1e-3, err_msg=f"step {t + 1}")


def test_missing_gymnasium_and_xla_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[rl\]"'):
        HalfCheetahGoals("velocity")
    # Without simulating (a policy export): its sizes and goals only; a step asks for it.
    sizes_only = HalfCheetahGoals("velocity", rllab_halfcheetah=True, simulate=False)
    assert (sizes_only.observation_dim, sizes_only.action_dim) == (20, 6)
    goals = sizes_only.sample_tasks(2, tf.constant([0, 1], tf.int64))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[rl\]"'):
        sizes_only.reset(goals, 1, tf.constant([0, 2], tf.int64))
    with pytest.raises(ValueError, match="task must be one of velocity, direction"):
        HalfCheetahGoals("sideways")
    with pytest.raises(ValueError, match="jit_compile=true is not possible"):
        config_lib.Config(dataset="halfcheetah_direction", jit_compile="true").validate()
    for flag in (dict(normalized_actions=True), dict(goal_radius=0.5)):
        with pytest.raises(ValueError, match="applies to navigation2d only"):
            config_lib.Config(dataset="halfcheetah_velocity", **flag).validate()
    # From the command line: one line with the install hint, nothing written.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['gymnasium'] = None\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(
        [sys.executable, "-m", "tf_maml.train", "--dataset=halfcheetah_velocity",
         f"--model_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=300)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the HalfCheetah environments need Gymnasium and MuJoCo: "
                                'pip install -e ".[rl]"')
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_cli_trains_evaluates_and_exports_a_cheetah_policy(tmp_path, monkeypatch):
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    flags = [f"--{name}={value}" for name, value in TINY.items()]
    result = subprocess.run(
        [sys.executable, "-m", "tf_maml.train", "--flagfile=flags/rl_cheetah_dir.flags",
         f"--model_dir={model_dir}", "--num_iterations=2", "--noevaluate", *flags],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "halfcheetah_direction" in result.stderr and "env steps/s" in result.stderr
    # Resuming in this process continues from the checkpoint.
    config = config_lib.load(model_dir)
    assert config.horizon == 8 and config.inner_lr == 0.1
    messages, info = [], trainer.logging.info  # absl's handler may bypass caplog in a suite

    def spy(message, *args, **kwargs):
        messages.append(message % args if args else message)
        return info(message, *args, **kwargs)

    monkeypatch.setattr(trainer.logging, "info", spy)
    _, step = trainer.train(config_lib.Config(**{**config.__dict__, "num_iterations": 3}),
                            model_dir)
    monkeypatch.undo()
    assert step == 3
    assert any(m.startswith("Resumed from") and m.endswith("at step 2") for m in messages)
    results = reporting.evaluate_and_report(model_dir, output_dir=str(tmp_path / "eval"))
    assert list(results) == ["MAML", "random init"]   # no analytic oracle for locomotion
    saved = json.load(open(tmp_path / "eval" / reporting.RESULTS_FILENAME))
    assert saved["dataset"] == "halfcheetah_direction" and saved["eval_fast_batch_size"] == 20
    assert all(np.isfinite(saved["results"]["MAML"]["mean"]))
    # Exporting needs no simulator (nothing is simulated): Gymnasium blocked here.
    blocker = tmp_path / "no_gymnasium"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['gymnasium'] = None\n")
    result = subprocess.run(
        [sys.executable, "-m", "tf_maml.export", f"--model_dir={model_dir}",
         f"--export_dir={export_dir}"], capture_output=True, text=True, cwd=ROOT,
        env=dict(env, PYTHONPATH=f"{blocker}{os.pathsep}{env.get('PYTHONPATH', '')}"),
        timeout=600)
    assert result.returncode == 0, result.stderr
    versions = os.listdir(export_dir)
    loaded = tf.saved_model.load(os.path.join(export_dir, versions[0]))
    observations = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32)
    out = loaded.signatures["serving_default"](observations=tf.constant(observations))
    trained, _ = experiment.restore(model_dir)  # the exported policy is the run's
    np.testing.assert_allclose(out["action_mean"], trained.model(observations), rtol=1e-5,
                               atol=1e-6)
