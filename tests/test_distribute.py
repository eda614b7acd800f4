"""tf.distribute: a mirrored meta-step equals the single-device one; two workers agree.

Logical CPU devices must be configured before TensorFlow starts, so each check
runs in its own process (tests/scripts/).
"""

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import distribute

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _python(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.mark.parametrize("replicas,order,kind", [
    (2, "second", "sine"), (2, "first", "sine"), (4, "second", "conv"), (2, "first", "conv"),
    (2, "first", "reptile"), (2, "second", "conv_clip")])
def test_mirrored_meta_step_equals_single_device(replicas, order, kind):
    result = _python(os.path.join(SCRIPTS, "mirrored_step.py"), str(replicas), order, kind)
    assert result.returncode == 0, result.stderr[-3000:]
    gaps = json.loads(result.stdout.strip().splitlines()[-1])
    assert gaps["steps"] == [2, 2]
    if kind == "conv_clip":
        # Two SGD(0.5) steps of a gradient clipped to [-0.004, 0.004]: no weight moves
        # more than 0.004, and some by that much (the clip acted, on both steps). Clipping
        # each replica's share instead would move weights by up to twice that.
        assert 0.004 * 0.99 < gaps["max_weight_change"] <= 0.004 * (1 + 1e-5), gaps
        # The unclipped elements keep their float32 round-off, which is that of the whole
        # (unclipped: norm ~150) gradient's sums, not of the small clipped update.
        assert gaps["max_weight_gap"] < 1e-4, gaps
    else:
        assert gaps["max_weight_change"] > 1e-2          # the steps did move the weights
        # Same tasks, same math; only the order of float32 sums differs (kernels see
        # other batch shapes): the weights agree to 5e-4 of the update's size.
        assert gaps["max_weight_gap"] < 5e-4 * gaps["max_weight_change"], gaps
    if kind != "reptile":  # the meta-gradient's norm: of the sum over replicas
        assert gaps["norms"][0] > 0 and gaps["norms"][0] == pytest.approx(gaps["norms"][1],
                                                                          rel=1e-3), gaps
    assert gaps["log_gap"] < 1e-4, gaps
    if kind == "reptile":  # the replicas' shares of the carried Adam state add up
        assert gaps["state_step_counts"] == [2 * 5 * 3] * 2, gaps
        assert max(gaps["state_gaps"]) < 1e-4, gaps


def test_replica_task_counts():
    assert distribute.replica_task_counts(5, 2) == [3, 2]
    assert distribute.replica_task_counts(5, 4) == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="smaller than the number of replicas"):
        distribute.replica_task_counts(2, 4)


#: What a worker says when another program took its port (see `free_ports` in conftest.py).
PORT_TAKEN = "could not start its server on port"


def _wait_all(processes, timeout):
    """Waits for every process; one that fails ends the others (they would wait for it)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
            for p in processes:
                if p.poll() is None:
                    p.kill()
            if time.monotonic() > deadline:
                for p in processes:
                    p.wait()
                raise subprocess.TimeoutExpired(processes[0].args, timeout)
            break
        time.sleep(0.2)
    for p in processes:
        p.wait()


def _run_workers(model_dir, num_iterations, tmp_path, tag, free_ports):
    """Runs two workers; each gets its own TMPDIR, and the non-chief a umask of 077.

    Ports come reserved (`free_ports`); should another program take one anyway, a worker
    reports it before writing anything and the pair is started again on new ports (at most
    three times).

    Returns their final weights and what each reported (multi_worker.py's .json), per worker.
    """
    for attempt in range(3):
        ports = free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        workers = []
        for index in range(2):
            tmpdir = tmp_path / f"{tag}{attempt}_tmp{index}"
            tmpdir.mkdir()
            env = dict(ENV, TMPDIR=str(tmpdir),
                       TF_CONFIG=json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": index}}))
            out = str(tmp_path / f"{tag}{attempt}_worker{index}.npz")
            log = open(out + ".stderr", "w")
            # Files the non-chief (worker 1) creates are private (0600/0700): any of them
            # found in model_dir afterwards was written by the wrong worker.
            umask = 0o022 if index == 0 else 0o077
            workers.append((subprocess.Popen(
                [sys.executable, os.path.join(SCRIPTS, "multi_worker.py"), model_dir,
                 str(num_iterations), out], env=env, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=lambda umask=umask: os.umask(umask)), out, tmpdir))
            log.close()
        _wait_all([process for process, _, _ in workers], timeout=600)
        errors = []
        for _, out, _ in workers:
            with open(out + ".stderr") as f:
                errors.append(f.read())
        if not any(PORT_TAKEN in e for e in errors):
            break
    # A worker that failed ended the other (-9): show what every failed worker said.
    assert all(process.returncode == 0 for process, _, _ in workers), "\n".join(
        f"worker {index} (status {process.returncode}): {stderr[-3000:]}"
        for index, ((process, _, _), stderr) in enumerate(zip(workers, errors))
        if process.returncode != 0)
    reports = []
    for index, (_, out, tmpdir) in enumerate(workers):
        with open(out + ".json") as f:
            report = json.load(f)
        assert report["task"] == ["worker", index]          # compat.cluster_resolver
        assert report["chief"] == (index == 0)
        # Nothing is left in either worker's temporary directory.
        assert os.listdir(tmpdir) == [], (index, os.listdir(tmpdir))
        reports.append(report)
    chief, other = reports
    assert chief["worker_dirs"] in ([], [os.path.abspath(model_dir)])
    # The non-chief wrote into a temporary directory of its own, outside model_dir, and
    # removed it.
    (worker_dir,) = other["worker_dirs"]
    assert worker_dir.startswith(str(workers[1][2])) and other["worker_dirs_exist"] == [False]
    _assert_written_by_the_chief_only(model_dir, chief["pid"], other["pid"])
    return [dict(np.load(out)) for _, out, _ in workers], reports


def _assert_written_by_the_chief_only(model_dir, chief_pid, other_pid):
    for root, dirs, files in os.walk(model_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.stat(path).st_mode
            assert mode & 0o044 == 0o044, f"{path} was written by the non-chief ({oct(mode)})"
    # Summary files are named after the process writing them.
    events = os.listdir(os.path.join(model_dir, "train"))
    assert not [name for name in events if f".{other_pid}." in name], events
    assert [name for name in events if f".{chief_pid}." in name], events


def test_two_workers_agree_checkpoint_and_resume(tmp_path, free_ports):
    model_dir = str(tmp_path / "run")
    first, reports = _run_workers(model_dir, 6, tmp_path, "a", free_ports)
    assert [r["start_steps"] for r in reports] == [[0], [0]]
    assert int(first[0]["step"]) == int(first[1]["step"]) == 6
    for key in first[0]:
        np.testing.assert_array_equal(first[0][key], first[1][key])
    # The chief's files only: the checkpoints at 4 and 6, the run's config and spec, its summaries
    # (and its log, when anything was logged at the scripts' verbosity).
    assert sorted(set(os.listdir(model_dir)) - {"train.log"}) == [
        "checkpoints", "config.json", "task_spec.json", "train"]
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index",
        "ckpt-6.data-00000-of-00001", "ckpt-6.index"]
    # Resuming continues the same run on both workers...
    resumed, reports = _run_workers(model_dir, 8, tmp_path, "b", free_ports)
    assert int(resumed[0]["step"]) == 8
    # (from the checkpoint at 6: a rerun from 0 would end with the same weights)
    assert [r["start_steps"] for r in reports] == [[6], [6]]
    for key in resumed[0]:
        np.testing.assert_array_equal(resumed[0][key], resumed[1][key])
    # ...and the two workers computed what one device computes for the same run.
    single = _python(os.path.join(SCRIPTS, "multi_worker.py"), str(tmp_path / "single"), "8",
                     str(tmp_path / "single.npz"), "default")
    assert single.returncode == 0, single.stderr[-3000:]
    single = dict(np.load(tmp_path / "single.npz"))
    for key in single:
        np.testing.assert_allclose(resumed[0][key], single[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tf_config, chief", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}},
     False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     True),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}, False),
])
def test_only_the_chief_process_evaluates_after_multi_worker_training(monkeypatch, tf_config,
                                                                       chief):
    """`python -m tf_maml.train` evaluates after training in the chief only: the other workers
    would write the same results files into the shared model_dir."""
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribute.is_chief_worker_process("multi_worker") is chief
    assert distribute.is_chief_worker_process("mirrored") is True
    assert distribute.is_chief_worker_process("default") is True


@pytest.mark.parametrize("tf_config, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{bad", "TF_CONFIG is not valid JSON"),
    ("[1]", "TF_CONFIG has no 'cluster'"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG has no 'task'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     "index 3 is not in its cluster"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "'chief' index 0 is not in its cluster"),
])
def test_multi_worker_refuses_an_unusable_tf_config_naming_what_is_wrong(monkeypatch, tf_config,
                                                                         message):
    """A TF_CONFIG that is set but malformed is not reported as missing, and never reaches
    MultiWorkerMirroredStrategy (whose own errors come from deep inside TensorFlow)."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=re.escape(message)):
        distribute.make_strategy("multi_worker")



@pytest.mark.parametrize("tf_config", [
    {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": "1"}},
    {"cluster": {"worker": {"0": "a:1", "1": "b:2"}}, "task": {"type": "worker", "index": 1}},
    {"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}},
])
def test_tf_config_shapes_tensorflow_accepts_pass_the_check(tf_config):
    """Launchers write string indices and jobs as {index: address}; TensorFlow takes both."""
    distribute._check_tf_config(json.dumps(tf_config))


def test_tpu_strategy_without_a_tpu_is_one_line_naming_the_flag(monkeypatch):
    """On a machine without a TPU, `--strategy=tpu` says so instead of "Please provide a TPU
    Name to connect to." from the resolver."""
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ValueError, match=r"^--strategy=tpu found no usable TPU .*TPU_NAME"):
        distribute.make_strategy("tpu")


def test_workers_started_with_different_settings_are_refused(tmp_path, free_ports):
    """Two workers with different flags trained together silently (the logged meta-loss a
    mix of both), and the run's config.json recorded the chief's only."""
    model_dir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    workers = []
    for index, inner_lr in enumerate(["0.01", "0.05"]):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tf_maml.train", "--dataset=sine", f"--model_dir={model_dir}",
             "--num_iterations=2", "--noevaluate", "--strategy=multi_worker",
             f"--inner_lr={inner_lr}", "--cache_dir=" + str(tmp_path / f"may_differ{index}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in workers:
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in workers:
                p.kill()
            raise
        assert process.returncode == 1, stderr[-3000:]
        assert ("error: the workers of this multi-worker run were started with different "
                "settings") in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not model_dir.exists()


def _worker_env(ports, index):
    return dict(ENV, TF_CONFIG=json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index}}))


def test_a_taken_port_is_one_line_naming_it(tmp_path, free_ports):
    """A worker whose port another program held stopped with "error: Could not start gRPC
    server", naming neither the port nor the cause."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _python("-m", "tf_maml.train", "--dataset=sine", f"--model_dir={tmp_path / 'run'}",
                         "--num_iterations=2", "--noevaluate", "--strategy=multi_worker",
                         env=_worker_env([port, *free_ports(1)], 0), timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (f"error: --strategy=multi_worker: worker 0 could not start its server on port {port} "
            f"(its address in TF_CONFIG is 127.0.0.1:{port}): the port is taken"
            ) in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("outcome", ["starts", "port_taken"])
def test_the_signal_handlers_are_put_back_after_the_workers_connect(outcome, monkeypatch,
                                                                   free_ports):
    """SIGINT and SIGTERM take their default action only while the strategy waits for the
    other workers: left so, Ctrl-C or a preemption during training would kill the worker
    without its checkpoint."""
    ports = free_ports(2)
    monkeypatch.setenv("TF_CONFIG", _worker_env(ports, 1)["TF_CONFIG"])
    during = {}

    def strategy():
        during.update({n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)})
        if outcome == "port_taken":
            raise tf.errors.UnknownError(None, None, "Could not start gRPC server")
        return "strategy"

    def handler(number, frame):
        raise AssertionError("not called")

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", strategy)
    before = {n: signal.signal(n, handler) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        if outcome == "starts":
            assert distribute.make_strategy("multi_worker") == "strategy"
        else:
            with pytest.raises(ValueError, match=(
                    rf"^--strategy=multi_worker: worker 1 could not start its server on port "
                    rf"{ports[1]} \(its address in TF_CONFIG is 127.0.0.1:{ports[1]}\)")):
                distribute.make_strategy("multi_worker")
        after = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    finally:
        for number, previous in before.items():
            signal.signal(number, previous)
    assert during == {signal.SIGINT: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL}
    assert after == {signal.SIGINT: handler, signal.SIGTERM: handler}


@pytest.mark.parametrize("index", [0, 1])
def test_a_worker_waiting_for_the_others_says_so_and_stops_on_ctrl_c(index, tmp_path,
                                                                     free_ports):
    """A worker started alone waits in TensorFlow's C++ for the others, holding Python's
    lock: it printed nothing and ignored Ctrl-C until its peers came."""
    ports = free_ports(2)
    model_dir = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tf_maml.train", "--dataset=sine", f"--model_dir={model_dir}",
             "--num_iterations=2", "--noevaluate", "--strategy=multi_worker"],
            env=_worker_env(ports, index), stdout=subprocess.DEVNULL, stderr=log,
            # As at a terminal (test runners may start workers with SIGINT ignored).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while "connects to the other workers" not in (tmp_path / "stderr").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "stderr").read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(2)  # into TensorFlow's wait
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.wait()
    stderr = (tmp_path / "stderr").read_text()
    other = 1 - index
    assert (f"Worker {index} of 2 (127.0.0.1:{ports[index]}) connects to the other workers of "
            f"the cluster (worker {other} at 127.0.0.1:{ports[other]})") in stderr, stderr[-3000:]
    assert "Ctrl-C stops it meanwhile (nothing has been written yet)" in stderr
    assert process.returncode == -signal.SIGINT, stderr[-3000:]
    assert not model_dir.exists()


@pytest.mark.parametrize("where", ["check_same_config", "restore"])
def test_a_worker_lost_while_the_workers_start_is_one_line(where, tmp_path, monkeypatch):
    """Comparing the workers' settings and restoring run collectives too: a worker lost
    there is the same one line (with nothing written), not the collective's error."""
    from tf_maml import config as config_lib
    from tf_maml import distribute as distribute_lib
    from tf_maml import trainer

    def lost(*args, **kwargs):
        raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket "
                                         "closed\nAdditional GRPC error information ...")

    monkeypatch.setattr(distribute_lib, "is_multi_worker", lambda strategy: True)
    if where == "restore":
        monkeypatch.setattr(trainer, "_restore", lost)
    else:
        monkeypatch.setattr(distribute_lib, "check_same_config", lost)
    config = config_lib.Config(dataset="sine", num_iterations=2, meta_batch_size=2)
    with pytest.raises(ConnectionError) as raised:
        trainer.train(config, str(tmp_path / "run"))
    assert str(raised.value) == (
        "another worker of this multi-worker run stopped or became unreachable while the "
        "workers were starting, before the first step (Collective ops is aborted by: Socket "
        "closed; see the other workers' logs for the cause); nothing was trained. Rerun the "
        "same command on every worker")
    assert not (tmp_path / "run" / "config.json").exists()
    # Any other error of those steps is not taken for a lost worker.
    def bad_shape(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "bad shape")

    monkeypatch.setattr(distribute_lib, "check_same_config", bad_shape)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bad shape"):
        trainer.train(config, str(tmp_path / "run"))


def test_a_lost_worker_is_one_line_that_says_how_to_resume():
    from tf_maml import trainer
    error = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed"
                                       "\nAdditional GRPC error information ...")
    assert trainer._lost_worker(error)
    assert not trainer._lost_worker(tf.errors.InvalidArgumentError(None, None, "bad shape"))
    # An input pipeline's own timeout is not a lost worker.
    assert not trainer._lost_worker(tf.errors.DeadlineExceededError(None, None, "read timed out"))
    chief = trainer._lost_worker_message(error, 460, True, "/runs/a/checkpoints/ckpt-460",
                                         "/runs/a")
    assert chief == ("another worker of this multi-worker run stopped or became unreachable "
                     "during step 461 (Collective ops is aborted by: Socket closed; see the "
                     "other workers' logs for the cause); the latest checkpoint is "
                     "/runs/a/checkpoints/ckpt-460. Rerun the same command on every worker to "
                     "resume from the chief's latest checkpoint")
    first = trainer._lost_worker_message(error, 0, True, None, "/runs/a")
    assert "no checkpoint has been written yet. Rerun the same command on every worker to " \
           "start again" in first
    other = trainer._lost_worker_message(error, 460, False, None, "/runs/a")
    assert "the chief worker writes the checkpoints into /runs/a" in other
    # A worker other than the chief, interrupted: not "no checkpoint has been written".
    from tf_maml import train
    message = train._interrupted_message(trainer.Interrupted(460, None, None, chief=False),
                                         "/runs/a")
    assert message == ("Interrupted at step 460 (a worker other than the chief, which writes "
                       "the run's checkpoints). Rerun the same command on every worker to "
                       "resume from the chief's latest checkpoint in /runs/a.")
