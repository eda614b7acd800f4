"""tf.distribute support: the task axis is the batch axis.

Each replica adapts its share of the meta-batch; the meta-loss is the sum of
the query losses over all tasks divided by the *global* number of tasks, so
that the Keras optimizer's own cross-replica sum of gradients (done inside
`apply_gradients`) yields exactly the single-device meta-gradient, however
unevenly the tasks split. Batch normalization statistics stay per task (the
forward computes them itself; nothing is synchronized across replicas).
"""

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import threading

import tensorflow as tf
from absl import logging

from tf_maml import compat
from tf_maml.config import STRATEGIES

__all__ = ["STRATEGIES", "make_strategy", "replica_task_counts", "check_same_config",
           "is_chief", "is_chief_worker_process", "is_multi_worker", "worker_dir",
           "clip_meta_gradients"]

#: Config fields that may differ between the workers of one run: paths on each machine.
PER_MACHINE_FIELDS = ("data_dir", "cache_dir")


def make_strategy(name):
    """The `tf.distribute.Strategy` a `--strategy` value names.

    Args:
        name: "default" (one device), "mirrored" (all local GPUs, or the CPU),
            "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from
            the `TF_CONFIG` environment variable) or "tpu".

    Returns:
        A strategy.

    Raises:
        ValueError: unknown name, "multi_worker" without a usable `TF_CONFIG`, or
            "tpu" without a reachable TPU.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        tf_config = _check_tf_config(os.environ.get("TF_CONFIG"))
        # TensorFlow's preemption notifier takes over SIGTERM while the strategy starts
        # (it only logs "SIGTERM caught"): a preempted worker would train on and lose its
        # work at the SIGKILL that follows. The process's own handler is put back (the
        # CLI's checkpoints and stops).
        previous = _sigterm_handler()
        try:
            with _waiting_for_the_other_workers(tf_config):
                strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.OpError as error:  # UnknownError in TensorFlow 2.21
            if "could not start grpc server" not in str(error).lower():
                raise
            raise ValueError(_server_not_started(tf_config)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return strategy
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            raise ValueError(f"--strategy=tpu found no usable TPU ({reason}); run on a TPU VM, or "
                             "name the TPU in the TPU_NAME environment variable") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def _sigterm_handler():
    """The process's SIGTERM handler, or `None` where it cannot be set back (not the main
    thread, or installed outside Python)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _check_tf_config(text):
    """Refuses a `TF_CONFIG` that MultiWorkerMirroredStrategy could not use, in one line.

    Returns:
        The parsed `TF_CONFIG`.

    Raises:
        ValueError: unset, not JSON, or without a cluster holding this process's task.
    """
    usage = "JSON with 'cluster' and 'task', set on every worker"
    if not text:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                         f"({usage})")
    try:
        tf_config = json.loads(text)
    except ValueError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}); it must be {usage}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f"TF_CONFIG has no 'cluster' (a dict of job name -> addresses); it must "
                         f"be {usage}")
    if not isinstance(task, dict) or "type" not in task:
        raise ValueError("TF_CONFIG has no 'task' naming this process, e.g. "
                         "{'type': 'worker', 'index': 0}")
    if task["type"] == "evaluator":  # TensorFlow's side-car evaluator sits outside the cluster
        return tf_config
    addresses = cluster.get(task["type"])
    index = task.get("index", 0)
    try:  # TensorFlow reads int(index): "1" is index 1
        index = int(index) if not isinstance(index, bool) else None
    except (TypeError, ValueError):
        index = None
    try:  # a job is a list of addresses, or a dict {index: address}
        indices = (range(len(addresses)) if isinstance(addresses, list)
                   else {int(i) for i in addresses} if isinstance(addresses, dict) else ())
    except (TypeError, ValueError):
        indices = ()
    if index is None or index not in indices:
        sizes = {job: len(a) if isinstance(a, (list, dict)) else a for job, a in cluster.items()}
        raise ValueError(f"TF_CONFIG's task {task['type']!r} index {task.get('index', 0)!r} is "
                         f"not in its cluster (tasks per job: {sizes})")
    return tf_config


def _tasks(tf_config):
    """This process's (job, index) and the cluster's training tasks as {(job, index): address}."""
    task = tf_config["task"]
    me = (task["type"], int(task.get("index", 0) or 0))
    tasks = {}
    for job in ("chief", "worker"):
        addresses = tf_config["cluster"].get(job) or []
        items = (enumerate(addresses) if isinstance(addresses, list)
                 else ((int(i), a) for i, a in addresses.items()))
        tasks.update({(job, index): address for index, address in items})
    return me, tasks


def _server_not_started(tf_config):
    """The one-line error for a worker whose gRPC server could not listen."""
    me, tasks = _tasks(tf_config)
    address = tasks.get(me, "?")
    port = str(address).rsplit(":", 1)[-1]
    return (f"--strategy=multi_worker: {me[0]} {me[1]} could not start its server on port "
            f"{port} (its address in TF_CONFIG is {address}): the port is taken (by another "
            "program, or by this worker started twice) or not allowed; free it or give this "
            "worker another port in every worker's TF_CONFIG")


@contextlib.contextmanager
def _waiting_for_the_other_workers(tf_config):
    """Says that the worker waits for the others, and lets Ctrl-C and SIGTERM stop the wait.

    MultiWorkerMirroredStrategy's constructor blocks in C++, holding Python's lock,
    until every worker of the cluster has connected: no Python thread runs and no
    Python signal handler is called meanwhile. Without this, a worker started alone
    printed nothing and ignored Ctrl-C until its peers came. So the notice comes before
    the wait, and SIGINT (where not ignored) takes its default action while it lasts: it
    ends the process at once, as nothing of the run has been written yet. SIGTERM does
    the same until TensorFlow's preemption notifier takes it over during the wait (it
    logs "SIGTERM caught" and waits on; SIGKILL stops it). The handlers are put back
    after.
    """
    restore = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(number)
            if handler not in (signal.SIG_IGN, signal.SIG_DFL, None):
                restore[number] = signal.signal(number, signal.SIG_DFL)
    try:
        me, tasks = _tasks(tf_config)
        if me in tasks and len(tasks) > 1:
            others = ", ".join(f"{job} {index} at {address}" for (job, index), address
                               in sorted(tasks.items()) if (job, index) != me)
            # Ctrl-C stops the wait only where it now takes its default action (not where it
            # is ignored, as for `&` jobs, nor where the strategy is made off the main thread).
            stop = (" Ctrl-C stops it meanwhile (nothing has been written yet)."
                    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL else "")
            logging.info("%s %d of %d (%s) connects to the other workers of the cluster (%s) and "
                         "waits until every one has started with the same command and its own "
                         "TF_CONFIG task.%s", me[0].capitalize(), me[1], len(tasks), tasks[me],
                         others, stop)
        yield
    finally:
        for number, handler in restore.items():
            signal.signal(number, handler)


def replica_task_counts(num_tasks, num_replicas):
    """How many tasks of a meta-batch each replica adapts (the first ones take one more).

    Raises:
        ValueError: fewer tasks than replicas.
    """
    if num_tasks < num_replicas:
        raise ValueError(f"meta_batch_size={num_tasks} is smaller than the number of replicas "
                         f"({num_replicas}): every replica needs at least one task")
    base, extra = divmod(num_tasks, num_replicas)
    return [base + (1 if r < extra else 0) for r in range(num_replicas)]


def clip_meta_gradients(grads, clip_value=0.0):
    """The meta-gradient's global norm, and its elements clipped to [-clip_value, clip_value].

    Under a strategy each replica holds its share of the meta-gradient, which the
    Keras optimizer sums in `apply_gradients`; a clip (or a norm) of those shares
    would not be the single-device one. The shares are summed here first, and each
    replica passes the optimizer 1/replicas of the clipped sum, so that the update
    equals the single-device one (to round-off).

    Args:
        grads: this replica's meta-gradient (a list of tensors).
        clip_value: clip bound; 0 leaves the gradient as it is (the norm is still
            computed).

    Returns:
        `(grads, norm)`: what this replica passes to `apply_gradients`, and the
        global norm of the whole meta-gradient before clipping.
    """
    replica = tf.distribute.get_replica_context()
    replicas = replica.num_replicas_in_sync if replica is not None else 1
    total = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads) if replicas > 1 else grads
    norm = tf.linalg.global_norm(total)
    if not clip_value:
        return grads, norm
    clipped = [tf.clip_by_value(g, -clip_value, clip_value) for g in total]
    if replicas > 1:
        clipped = [g / replicas for g in clipped]
    return clipped, norm


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes (a cluster of more than one task)."""
    resolver = compat.cluster_resolver(strategy)
    if resolver is None or resolver.task_type == "evaluator":  # outside the training group
        return False
    cluster = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for job, tasks in cluster.items() if job in ("chief", "worker")) > 1


def check_same_config(strategy, config):
    """Refuses a multi-worker run whose workers were started with different settings.

    Every worker must take part (one all-reduce of 64 bits of a hash of the
    config, without `PER_MACHINE_FIELDS`); a no-op on one worker.

    Args:
        strategy: the run's strategy.
        config: this worker's `Config`.

    Raises:
        ValueError: the workers' configs differ.
    """
    if not is_multi_worker(strategy):
        return
    settings = {k: v for k, v in config.to_dict().items() if k not in PER_MACHINE_FIELDS}
    digest = int.from_bytes(hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=str).encode()).digest()[:8], "little")
    bits = tf.constant([(digest >> i) & 1 for i in range(64)], tf.float32)

    @tf.function
    def mean_over_workers():
        return strategy.reduce(tf.distribute.ReduceOp.MEAN,
                               strategy.run(lambda: tf.identity(bits)), axis=None)

    mean = mean_over_workers().numpy()
    if not all(value in (0.0, 1.0) for value in mean):
        raise ValueError(
            "the workers of this multi-worker run were started with different settings: run "
            "the same command (the same flags and flagfile) on every worker; only "
            f"{' and '.join('--' + f for f in PER_MACHINE_FIELDS)} may differ")


def is_chief(strategy):
    """Whether this worker writes checkpoints, summaries and results."""
    resolver = compat.cluster_resolver(strategy)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return _chief_rule(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict())


def _chief_rule(task_type, task_id, cluster):
    """The chief: the "chief" task, or worker 0 of a cluster without one."""
    if task_type == "chief":
        return True
    return task_type in (None, "worker") and task_id == 0 and "chief" not in cluster


def is_chief_worker_process(strategy_name):
    """Whether this process is the chief of a `--strategy` run, read from `TF_CONFIG`.

    For code that runs after training, outside any strategy (the CLI's evaluation):
    the same rule as `is_chief`.

    Args:
        strategy_name: the run's `--strategy` value.

    Returns:
        False only for a "multi_worker" process that is not the chief: a worker
        other than worker 0, worker 0 of a cluster with a "chief" task, or an
        evaluator or parameter server.
    """
    if strategy_name != "multi_worker":
        return True
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
        cluster, task = tf_config.get("cluster") or {}, tf_config.get("task") or {}
    except (ValueError, AttributeError):
        return True  # make_strategy has refused it already
    return _chief_rule(task.get("type"), int(task.get("index", 0) or 0), cluster)


def worker_dir(model_dir, strategy):
    """Where this worker writes: `model_dir` for the chief, a temporary directory otherwise.

    Every worker of a multi-worker run must take part in saving (the variables
    are shared); only the chief's files are kept.
    """
    if is_chief(strategy):
        return model_dir
    return tempfile.mkdtemp(prefix="tf_maml_worker_")
