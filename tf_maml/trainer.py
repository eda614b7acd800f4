"""Meta-training: the loop around an algorithm's meta-step.

The loop is the same for every algorithm (`tf_maml.algorithms`): it keeps
checkpoints, summaries, validation, progress and distribution, and calls
`algorithm.meta_step(episode, loss_scale, iteration)` for the gradients of
`algorithm.meta_variables`, which `algorithm.make_optimizer` applies.

`train(config, model_dir)` builds the task family and the model, restores the
latest checkpoint of `model_dir` if there is one (step, weights, optimizer
state; the episodes are a pure function of (seed, step), so a resumed run sees
exactly the tasks an uninterrupted one would), then runs meta-iterations with
progress lines, TensorBoard summaries, periodic validation on held-out tasks and
checkpoints. A checkpoint is also written when the loop is interrupted.

Nothing is written into `model_dir` before the run can start, and training
stops with `TrainingDiverged` when the meta-loss or the meta-parameters stop
being finite: a checkpoint never holds non-finite weights.
"""

import collections
import contextlib
import dataclasses
import logging as std_logging
import math
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml import config as config_lib
from tf_maml import distribute, evaluation
from tf_maml import experiment as experiment_lib
from tf_maml import tasks as tasks_lib
from tf_maml.experiment import CHECKPOINT_SUBDIR

__all__ = ["make_train_step", "make_train_loop", "make_rl_train_step", "train", "TrainingDiverged",
           "Interrupted",
           "CheckpointSaveError"]

NUM_VALIDATION_TASKS = 100
# RL: goals of the validation during training (seeded by `rl.maml_rl.VALIDATION_SEED`).
NUM_RL_VALIDATION_TASKS = 20
# The loop runs as many steps per call as fit in about this many seconds:
# fast steps (sine: ~0.5 ms) are not dominated by Python overhead, and an
# interrupt (Ctrl-C) is still handled within about this long.
SECONDS_PER_CALL = 0.5
MAX_STEPS_PER_CALL = 1000


def _completed(variables, logs):
    """Tensors that exist only once a meta-update is complete: its logs, the updated values.

    The step counter's increment waits for them. Inside a `tf.function` only
    ops on the same resource keep their program order, so an unordered
    increment could run before a later op of the step failed; the failed step
    was then counted, checkpointed, and skipped on every rerun.
    """
    return tf.nest.flatten(logs) + [tf.convert_to_tensor(v) for v in variables]


def make_train_step(experiment, optimizer, step_counter, jit_compile=False, strategy=None):
    """A compiled `train_step(episode) -> logs` performing one meta-update.

    Under a `tf.distribute` strategy the meta-batch is split along the task
    axis: replica r adapts its own slice of the episode's tasks (the first
    replicas take one more when the split is uneven). Each replica's meta-loss
    is its tasks' summed query loss divided by the *global* task count; the
    Keras optimizer sums the replicas' gradients in `apply_gradients`, which
    gives exactly the single-device meta-gradient. Its norm and
    `config.meta_gradient_clip` are taken on that sum
    (`distribute.clip_meta_gradients`).

    Args:
        experiment: an `Experiment`.
        optimizer: a built Keras optimizer for `experiment.algorithm.meta_variables`
            (created in `strategy.scope()`).
        step_counter: int64 `tf.Variable`, incremented by each step.
        jit_compile: compile the meta-gradient computation with XLA.
        strategy: a `tf.distribute.Strategy` (default: the current one).

    Returns:
        A `tf.function` taking a global `Episode`; its logs are scalars over
        the whole meta-batch: `meta_loss`, `support_loss_before_adaptation`
        (not for the pretrained baseline, which has no inner steps), the
        query metric after adaptation and `meta_gradient_norm` (the global norm
        of the meta-gradient before `config.meta_gradient_clip`; not for
        Reptile, whose outer update is not a gradient).
    """
    config = experiment.config
    algorithm = experiment.algorithm
    variables = algorithm.meta_variables
    state_variables = algorithm.state_variables
    strategy = strategy or tf.distribute.get_strategy()
    counts = distribute.replica_task_counts(config.meta_batch_size, strategy.num_replicas_in_sync)
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    scale = 1.0 / config.meta_batch_size
    metric = f"query_{experiment.metric_name}"
    replicas = strategy.num_replicas_in_sync
    gradient_update = config.algorithm != "reptile"  # Reptile's update is not a gradient

    # AutoGraph off, as in Keras' own `fit`: the library's graph code has its control flow
    # explicit (tf.while_loop, tf.cond), and converting it took two thirds of the tracing time.
    @tf.function(jit_compile=jit_compile, autograph=False)
    def compute(episode, iteration):
        meta_loss, grads, outputs = algorithm.meta_step(episode, scale, iteration)
        # Each log is this replica's sum over its tasks / the global task count:
        # summed over replicas, the mean over the meta-batch.
        logs = {"meta_loss": meta_loss}
        if config.num_inner_steps:  # the pretrained baseline has no support set to log
            logs["support_loss_before_adaptation"] = (tf.reduce_sum(outputs.support_losses)
                                                      * scale)
        logs[metric] = tf.reduce_sum(
            experiment.metric_fn(episode.query_y, outputs.query_predictions)) * scale
        if gradient_update and replicas == 1:  # inside the compiled function: cheaper
            grads, logs["meta_gradient_norm"] = distribute.clip_meta_gradients(
                grads, config.meta_gradient_clip)
        return grads, outputs.state_updates or [], logs

    def replica_step(episode):
        grads, state_updates, logs = compute(episode, step_counter.read_value())
        if gradient_update and replicas > 1:  # the sum over replicas, outside `compute`
            grads, norm = distribute.clip_meta_gradients(grads, config.meta_gradient_clip)
            logs = dict(logs, meta_gradient_norm=norm / replicas)
        optimizer.apply_gradients(zip(grads, variables))
        # The algorithm's state (Reptile's carried Adam moments): each replica
        # assigns its value, combined over replicas by the variables' aggregation.
        for variable, value in zip(state_variables, state_updates):
            variable.assign(value)
        with tf.control_dependencies(_completed(variables + state_variables, logs)):
            step_counter.assign_add(1)
        return logs

    def replica_slice(episode, context):
        r = context.replica_id_in_sync_group
        return type(episode)(*[t[offsets[r]:offsets[r] + counts[r]] for t in episode])

    @tf.function
    def train_step(episode):
        if strategy.num_replicas_in_sync == 1:
            per_replica = strategy.run(replica_step, args=(episode,))
        else:
            shards = strategy.experimental_distribute_values_from_function(
                lambda context: replica_slice(episode, context))
            per_replica = strategy.run(replica_step, args=(shards,))
        return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for name, value in per_replica.items()}

    train_step.compute = compute
    return train_step


def make_train_loop(train_step):
    """A compiled `train_loop(iterator, num_steps) -> logs` running `train_step` repeatedly.

    One Python call runs `num_steps` meta-iterations in a graph loop (a tensor
    argument: no retracing when it changes); returns the last step's logs.
    """

    @tf.function
    def train_loop(iterator, num_steps):
        logs = train_step(next(iterator)[1])
        for _ in tf.range(num_steps - 1):
            logs = train_step(next(iterator)[1])
        return logs

    return train_loop


class _Progress:
    """Progress lines with steps/s and ETA.

    steps/s is the last interval's; the ETA uses the median of the last five
    intervals' rates, so one interval stretched by a pause (a suspended
    process, a slow validation or save) does not make it read as hours.

    Args:
        start_step: the step training starts from.
        total: the last step.
        units: optional `(log_name, label)`: the log `log_name` counts units of
            work per step (e.g. "env_steps"); lines also give units/s, and
            `scalars` holds it as "<log_name>_per_second" for the summaries.
    """

    def __init__(self, start_step, total, units=None):
        self.total = total
        self.units = units
        self.scalars = {}
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.recent_rates = collections.deque(maxlen=5)

    def compiled(self, step):
        """The first call (tracing and compilation included) ended at `step`: rates start here."""
        now = time.perf_counter()
        self.first_call_seconds = now - self.last_time
        self.last_step, self.last_time = step, now

    def line(self, step, logs):
        now = time.perf_counter()
        counted = self.units[0] if self.units else None
        values = " ".join(f"{k}={v:.0f}" if k == counted else f"{k}={v:.4f}"
                          for k, v in logs.items())
        if step == self.last_step:  # only the first call so far: no rate to tell yet
            return (f"step {step}/{self.total} ({100 * step / self.total:.1f}%) {values} "
                    f"| first call {getattr(self, 'first_call_seconds', 0.0):.1f}s (tracing "
                    f"and compilation included) | ETA ?")
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        self.recent_rates.append(rate)
        typical = float(np.median(self.recent_rates))
        eta = (self.total - step) / typical if typical > 0 else float("inf")
        rate_text = f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
        throughput = ""
        if self.units and self.units[0] in logs:
            per_second = rate * logs[self.units[0]]
            self.scalars = {f"{self.units[0]}_per_second": per_second}
            throughput = f" | {per_second:,.0f} {self.units[1]}/s"
        return (f"step {step}/{self.total} ({100 * step / self.total:.1f}%) {values} "
                f"| {rate_text} steps/s{throughput} | ETA {_duration(eta)}")


def _duration(seconds):
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class TrainingDiverged(ValueError):
    """The meta-loss or the meta-parameters became non-finite (NaN or infinity).

    Training stops at once; no checkpoint with non-finite weights is written,
    so the run's last checkpoint stays the last good one.
    """


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permissions changed during the run)."""


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); says what is saved.

    Attributes:
        step: the step reached.
        saved: the checkpoint written on the way out, or `None`.
        latest: the run's newest checkpoint now (`saved`, an earlier one, or `None`).
        chief: whether this process writes the run's checkpoints (false for the
            other workers of a multi-worker run: `saved` and `latest` are then
            `None`, whatever the chief wrote).
    """

    def __init__(self, step, saved, latest, chief=True):
        self.step, self.saved, self.latest, self.chief = step, saved, latest, chief
        super().__init__(self.describe())

    def describe(self):
        if not self.chief:
            return (f"interrupted at step {self.step} (a worker other than the chief, which "
                    "writes the run's checkpoints)")
        if self.saved:
            return f"interrupted at step {self.step}; saved checkpoint {self.saved}"
        if self.latest:
            return (f"interrupted at step {self.step}; no new checkpoint written, the latest is "
                    f"{self.latest}")
        return f"interrupted at step {self.step}; no checkpoint has been written"


def _make_finite_check(variables):
    """A compiled `() -> bool tensor`: whether every float variable is finite (one call)."""
    variables = [v for v in variables if tf.as_dtype(v.dtype).is_floating]

    @tf.function
    def all_finite():
        return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables]))

    return all_finite


def _non_finite_meta_loss(logs):
    """`{name: value}` of the meta-loss (and TRPO's step size) where NaN or infinite.

    Only those: other logs may be NaN by design (a pretrained baseline has no
    support loss before adaptation). A non-finite TRPO step leaves the
    meta-parameters as they were (the line search rejects it), so their check
    would never see it; every later iteration would be rejected too.
    """
    bad = {}
    for name in ("meta_loss", "step_size"):
        if name in logs and not math.isfinite(float(logs[name])):
            bad[name] = float(logs[name])
    return bad


def _rates(config):
    if config.is_rl:
        outer = (("max_kl", config.max_kl) if config.outer_optimizer == "trpo"
                 else ("meta_lr", config.meta_lr))
        return f"inner_lr (now {config.inner_lr:g}) or {outer[0]} (now {outer[1]:g})"
    outer = ("meta_step_size", config.meta_step_size) if config.algorithm == "reptile" else (
        "meta_lr", config.meta_lr)
    return f"inner_lr (now {config.inner_lr:g}) or {outer[0]} (now {outer[1]:g})"


def _divergence_message(config, bad_logs, first, last, latest):
    where = f"at step {last}" if first == last else f"between steps {first} and {last}"
    if bad_logs:
        what = ("the meta-loss is not finite" if "meta_loss" in bad_logs else
                "TRPO's step is not finite (the surrogate's gradient or curvature overflowed)")
        what += " (" + ", ".join(f"{name}={value}" for name, value in bad_logs.items()) + ")"
    elif config.is_rl:
        what = ("the meta-parameters became NaN or infinite, or the policy's standard deviation "
                "over- or underflowed")
    else:
        what = "the meta-gradient is not finite (the meta-parameters became NaN or infinite)"
    if latest:
        return (f"training diverged {where}: {what}; the last checkpoint, {latest}, is kept. "
                f"Lower {_rates(config)} and train again in a new model_dir")
    return (f"training diverged {where}: {what}; no checkpoint was written. Lower "
            f"{_rates(config)} and rerun")


# Resumable settings that change the kernels a step runs, so its float32 rounding.
_OTHER_KERNELS = ("jit_compile", "recompute_inner_steps", "strategy")


def _check_run_dir(config, model_dir, checkpoint_dir):
    """Refuses a `model_dir` holding another run, or checkpoints without their config."""
    has_checkpoints = bool(experiment_lib.checkpoint_paths(checkpoint_dir))
    if os.path.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        try:
            saved = config_lib.load(model_dir)
            config_lib.check_resumable(saved, config)
            # The same folder, however it is named (runs saved before paths were stored
            # absolute hold relative ones).
            stored, before = config_lib.as_stored(config), config_lib.as_stored(saved)
            changed = [f"{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}"
                       for name in sorted(config_lib.RESUMABLE_FIELDS)
                       if getattr(before, name) != getattr(stored, name)]
            if changed and has_checkpoints:
                kernels = [name for name in _OTHER_KERNELS
                           if getattr(before, name) != getattr(stored, name)]
                note = ("; the same mathematics with other kernels: float32 rounding differs "
                        f"from an uninterrupted run's ({', '.join(kernels)})" if kernels else "")
                logging.info("Resuming with changed settings (they do not change what is "
                             "trained%s): %s", note, "; ".join(changed))
        except ValueError:
            if has_checkpoints:
                raise
            # A run that stopped before its first checkpoint: nothing to resume.
            logging.warning("%s holds a different config.json but no checkpoint; replacing it",
                            model_dir)
    elif has_checkpoints:
        raise ValueError(
            f"{checkpoint_dir} holds checkpoints but {model_dir} has no "
            f"{config_lib.CONFIG_FILENAME}, so they cannot be checked against this "
            "configuration: put the run's config.json back, or use a new model_dir")


def train(config, model_dir, tasks=None):
    """Meta-trains a model as `config` says, resuming from `model_dir` if possible.

    Nothing is written into `model_dir` until the run can start (config valid,
    data loaded, model built, checkpoint restored). From then on the log lines
    also go to `model_dir/train.log` (appended; the chief's only), with the
    error that stopped the run, if one did. Training stops with
    `TrainingDiverged` as soon as the meta-loss or the meta-parameters stop
    being finite; checkpoints with non-finite weights are never written.

    An RL dataset (`config.is_rl`, e.g. "navigation2d") trains `tf_maml.rl.MAMLRL`
    with the same loop: checkpoints (policy, log-std, outer optimizer state,
    step), exact resume (a meta-iteration is a pure function of (seed,
    iteration) and θ), divergence checks and interrupts.

    Args:
        config: a `Config`.
        model_dir: where checkpoints, `config.json` and summaries go.
        tasks: a task family to train on instead of the config's (needed for
            `dataset="custom"`); its spec is recorded, so the run restores and
            exports without it.

    Returns:
        `(experiment, step)`: the trained experiment (its model holds the
        meta-initialization) and the final step.

    Raises:
        ValueError: invalid config, bad data, `model_dir` holds a different run, or
            the workers of a multi-worker run were started with different configs.
        ConnectionError: another worker of a multi-worker run stopped or became
            unreachable (the message names the chief's latest checkpoint).
        experiment.CheckpointError: (a `ValueError`) `model_dir` holds
            checkpoints but none can be read; training does not start over
            on top of them.
        TrainingDiverged: (a `ValueError`) non-finite meta-loss or meta-gradient.
        PermissionError, NotADirectoryError: `model_dir` cannot be written.
        Interrupted: (a `KeyboardInterrupt`) Ctrl-C or SIGTERM; a checkpoint of
            the current step was written if it is new and finite.

    Example:

    ```python
    config = Config(num_iterations=1000)
    experiment, _ = train(config, "/tmp/sine")
    ```
    """
    run_log = _RunLog(model_dir)
    logger = logging.get_absl_logger()
    logger.addHandler(run_log)
    try:
        return _train(config, model_dir, tasks, run_log)
    except Exception as e:
        run_log.write(f"{_now()} ERROR stopped: {experiment_lib.error_text(e, limit=2000)}")
        raise
    except KeyboardInterrupt as e:
        run_log.write(f"{_now()} WARNING {e}")
        raise
    finally:
        logger.removeHandler(run_log)
        _unlock(run_log.run_dir_lock, model_dir)


def _train(config, model_dir, tasks, run_log):
    """`train`'s body (`run_log` stays silent on workers other than the chief)."""
    config.validate()
    if config.is_rl:
        if tasks is not None:
            raise ValueError(f"dataset {config.dataset} is an environment: it takes no task "
                             "family")
        return _train_rl(config, model_dir, run_log)
    strategy = distribute.make_strategy(config.strategy)
    with _lost_worker_while_starting(strategy):
        # Refused before anything is written: too small a meta-batch, workers that disagree.
        distribute.check_same_config(strategy, config)
        distribute.replica_task_counts(config.meta_batch_size, strategy.num_replicas_in_sync)
        chief = distribute.is_chief(strategy)
        run_log.enabled = chief
        checkpoint_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
        run_log.run_dir_lock = _prepare_run_dir(config, model_dir, checkpoint_dir, chief)

        with strategy.scope():
            experiment = experiment_lib.build_experiment(config, tasks)
            model = experiment.model
            algorithm = experiment.algorithm
            optimizer = algorithm.make_optimizer(config.meta_lr, config.num_iterations)
            optimizer.build(algorithm.meta_variables)
            step = tf.Variable(0, dtype=tf.int64, name="step",
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        fingerprint = tasks_lib.data_fingerprint(experiment.tasks)
        data_checked = True
        if experiment_lib.checkpoint_paths(checkpoint_dir):
            experiment_lib.check_same_spec(model_dir, experiment.tasks, config.data_dir)
            data_checked = experiment_lib.check_same_data(model_dir, fingerprint, config.data_dir)
        checkpoint = experiment_lib.make_checkpoint(experiment, optimizer=optimizer, step=step)
        all_finite = _make_finite_check(algorithm.meta_variables + algorithm.state_variables)
        # Every worker resumes from the chief's checkpoints: the newest readable one.
        latest = _restore(config, checkpoint, checkpoint_dir, step, all_finite)
    # The run can start: only now is anything written.
    if chief:
        config_lib.save(_as_trained(config, step), model_dir)
        experiment_lib.save_spec(experiment.spec, model_dir)
        if fingerprint is not None:
            if latest and not data_checked:
                logging.warning(
                    "%s now records the data found at data_dir=%r as the run's: later resumes "
                    "are checked against it, so make sure it is the data the run was trained on",
                    os.path.join(model_dir, experiment_lib.DATA_FILENAME), config.data_dir)
            experiment_lib.save_data_fingerprint(fingerprint, model_dir)
    run_log.start()
    start = int(step.numpy())
    if start >= config.num_iterations:
        logging.info("Already trained for %d iterations; nothing to do.", start)
        return experiment, start

    jit = experiment_lib.resolve_jit_compile(config, model, experiment.forward.vectorized)
    logging.info("Meta-training %s with %s on %s: %d iterations, layer-batched forward: %s%s, "
                 "XLA: %s, %d replica(s)", config.model_for(experiment.spec.input_shape),
                 algorithm.name, config.dataset, config.num_iterations,
                 experiment.forward.vectorized,
                 f" ({experiment.forward.unsupported_reason})"
                 if experiment.forward.unsupported_reason else "",
                 jit, strategy.num_replicas_in_sync)
    classes = getattr(experiment.tasks, "num_classes", None)
    if config.validate_every and isinstance(classes, dict):
        logging.info("Validation every %d iterations: %d tasks of the %s", config.validate_every,
                     NUM_VALIDATION_TASKS,
                     f"{classes['val']} validation classes" if "val" in classes else
                     f"{classes['test']} meta-test classes (monitoring only: no validation "
                     f"classes held out)")
    train_step = make_train_step(experiment, optimizer, step, jit_compile=jit, strategy=strategy)
    curve_fn = evaluation.make_curve_fn(algorithm, experiment.metric_fn,
                                        max(config.num_inner_steps, 1), jit_compile=jit)
    train_k_shot = config.train_k_shot or None
    dataset = tasks_lib.episode_dataset(
        lambda seed: experiment.tasks.sample(seed, config.meta_batch_size, k_shot=train_k_shot),
        config.seed, start, config.num_iterations, stream=tasks_lib.TRAIN)
    output_dir = distribute.worker_dir(model_dir, strategy)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(output_dir, CHECKPOINT_SUBDIR),
                                         max_to_keep=3)
    writer = (tf.summary.create_file_writer(os.path.join(model_dir, "train")) if chief
              else tf.summary.create_noop_writer())
    train_loop = make_train_loop(train_step)
    iterator = iter(dataset)
    try:
        current = _run_loop(
            config, step, all_finite, manager, writer, start, latest,
            lambda num_steps: train_loop(iterator, tf.constant(num_steps, tf.int64)),
            lambda current: _validate(experiment, curve_fn, writer, current), chief=chief,
            optimizer=optimizer)
    except tf.errors.OpError as e:
        # A user's task function that failed in the input pipeline (`tasks.FunctionTasks`).
        message = tasks_lib.sources.user_error(e)
        if message is not None:
            raise ValueError(message) from None
        if distribute.is_multi_worker(strategy) and _lost_worker(e):
            raise ConnectionError(_lost_worker_message(e, int(step.numpy()), chief,
                                                       manager.latest_checkpoint,
                                                       model_dir)) from None
        raise
    finally:
        writer.flush()
        if not chief:
            tf.io.gfile.rmtree(output_dir)
    return experiment, current


@contextlib.contextmanager
def _lost_worker_while_starting(strategy):
    """A worker lost while the workers compare settings or restore: one line, not the
    collective's error (the step loop reports its own, with the step)."""
    try:
        yield
    except tf.errors.OpError as e:
        if distribute.is_multi_worker(strategy) and _lost_worker(e):
            # Chained: the wrapped steps also read data and checkpoints, whose own errors
            # could read alike (a network file system's 'Connection reset').
            raise ConnectionError(_lost_worker_message(e, None, False, None, None)) from e
        raise


def _lost_worker(error):
    """Whether a multi-worker step failed because another worker stopped or is unreachable."""
    text = str(error)
    return any(sign in text for sign in ("Collective ops is aborted", "Socket closed",
                                         "tasks are unhealthy", "Connection reset"))


def _lost_worker_message(error, step, chief, latest, model_dir):
    first_line = experiment_lib.error_text(error, limit=300)
    if step is None:
        return (f"another worker of this multi-worker run stopped or became unreachable while "
                f"the workers were starting, before the first step ({first_line}; see the other "
                f"workers' logs for the cause); nothing was trained. Rerun the same command on "
                f"every worker")
    where = (f"the latest checkpoint is {latest}" if chief and latest else
             "no checkpoint has been written yet" if chief else
             f"the chief worker writes the checkpoints into {model_dir}")
    rerun = ("to start again" if chief and not latest else
             "to resume from the chief's latest checkpoint")
    return (f"another worker of this multi-worker run stopped or became unreachable during "
            f"step {step + 1} ({first_line}; see the other workers' logs for the cause); "
            f"{where}. Rerun the same command on every worker {rerun}")


LOG_FILENAME = "train.log"


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S")


class _RunLog(std_logging.Handler):
    """Appends log lines to `model_dir/train.log` once the run has started (`start`).

    Before that nothing is written (a run that cannot start, or a refused
    resume, leaves `model_dir` untouched); the lines logged while it prepared
    (what it resumed from, checkpoints it skipped) are written when it starts.
    A log file that cannot be written never stops training. TensorFlow's
    per-checkpoint "Sharding callback duration" lines are left out.
    """

    _EARLY_LINES = 200  # kept until the run starts

    def __init__(self, model_dir):
        super().__init__(std_logging.INFO)
        self.path = os.path.join(model_dir, LOG_FILENAME)
        self.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.enabled, self.started, self._early = True, False, []
        self.run_dir_lock = None  # the chief's lock on model_dir while it trains

    def start(self):
        self.started = True
        early, self._early = self._early, []
        for line in early:
            self.write(line)

    def write(self, line):
        if not self.enabled:
            return
        if not self.started:
            if len(self._early) < self._EARLY_LINES:
                self._early.append(line)
            return
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            self.enabled = False

    def emit(self, record):
        if record.levelno <= std_logging.INFO and "Sharding callback" in str(record.msg):
            return
        self.write(self.format(record))


def _prepare_run_dir(config, model_dir, checkpoint_dir, chief=True):
    """Checks, before anything is built or written, that `model_dir` can hold this run.

    Returns:
        The chief's lock on `model_dir` (`_lock_run_dir`), or `None`.
    """
    if not chief:
        _check_run_dir(config, model_dir, checkpoint_dir)
        return None
    experiment_lib.check_writable(model_dir, "model_dir")
    lock = _lock_run_dir(model_dir)  # first: a second trainer learns only that it is second
    try:
        _check_run_dir(config, model_dir, checkpoint_dir)
        experiment_lib.check_writable(checkpoint_dir, "checkpoint directory")
        experiment_lib.check_writable(os.path.join(model_dir, "train"), "summary directory")
        if lock is not None:
            _remove_partial_saves(checkpoint_dir)
    except BaseException:
        _unlock(lock, model_dir)
        raise
    return lock


_PARTIAL_SAVE = re.compile(r"^(ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]+)$")


def _remove_partial_saves(checkpoint_dir):
    """Removes what saves killed part-way left (TensorFlow's `ckpt-N_temp/` shards, the state
    file's `checkpoint.tmp<hex>`): never read, but every crash added one. Only while this
    process holds the run's lock (no other save can be in progress)."""
    if not os.path.isdir(checkpoint_dir):
        return
    for name in os.listdir(checkpoint_dir):
        if not _PARTIAL_SAVE.match(name):
            continue
        path = os.path.join(checkpoint_dir, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as e:
            logging.warning("Could not remove %s, left by an interrupted save (%s)", path, e)
            continue
        logging.info("Removed %s, left by an interrupted save", path)


def _lock_run_dir(model_dir):
    """An exclusive lock on `model_dir` (the directory itself: no file is left behind).

    Two trainers on one `model_dir` would write the same checkpoint files and
    interleave their logs; the second is refused. The kernel drops the lock when
    the process ends, however it ends. Where locks are not supported (some
    network filesystems, not POSIX), training goes on unlocked.

    Returns:
        `(file descriptor, whether the lock created model_dir)` for `_unlock`, or `None`.

    Raises:
        ValueError: another process holds the lock.
        OSError: `model_dir` cannot be created.
    """
    if "://" in model_dir:  # remote storage: no local lock
        return None
    created = not os.path.exists(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:  # (/sys, /proc: os.access lets root through; creating fails)
        raise type(e)(f"model_dir {model_dir} cannot be created ({e.strerror})") from None
    try:
        import fcntl  # noqa: PLC0415 -- POSIX only
        fd = os.open(model_dir, os.O_RDONLY)
    except (ImportError, OSError) as e:
        logging.warning("Could not lock %s (%s); make sure no other trainer uses it", model_dir, e)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another process is training in {model_dir} (it holds the directory's "
                         "lock): two trainers would overwrite each other's checkpoints. Wait for "
                         "it or stop it (its progress is in train.log), or use another "
                         "model_dir") from None
    except OSError as e:
        os.close(fd)
        logging.warning("Could not lock %s (%s); make sure no other trainer uses it", model_dir, e)
        return None
    return fd, created


def _unlock(lock, model_dir=None):
    """Releases `_lock_run_dir`'s lock; removes `model_dir` if the lock created it and the
    run left nothing in it (a run that could not start leaves no trace)."""
    if lock is None:
        return
    fd, created = lock
    os.close(fd)  # closing the descriptor releases the lock
    if created and model_dir is not None:
        try:
            os.rmdir(model_dir)  # only if empty
        except OSError:
            pass


def _restore(config, checkpoint, checkpoint_dir, step, all_finite):
    """Restores the newest readable checkpoint (if any); returns its path or `None`."""
    try:
        latest, _ = experiment_lib.restore_latest(checkpoint, checkpoint_dir)
    except experiment_lib.CheckpointError as e:
        raise experiment_lib.CheckpointError(
            f"{e}. Training does not start over on top of them: move them away to start from "
            "step 0, or use a new model_dir") from None
    if latest:
        logging.info("Resumed from %s at step %d", latest, int(step.numpy()))
        if not bool(all_finite()):
            raise TrainingDiverged(
                f"{latest} holds non-finite weights (the run diverged before this version "
                f"refused to save them). Lower {_rates(config)} and train again in a new "
                "model_dir")
    return latest


def _as_trained(config, step):
    """The config to save: a rerun asking for fewer iterations than the run has does not
    lower its `num_iterations` (its evaluation settings are still taken)."""
    return dataclasses.replace(config, num_iterations=max(config.num_iterations,
                                                          int(step.numpy())))


def _run_loop(config, step, all_finite, manager, writer, start, latest, run_steps, validate=None,
              chief=True, progress=None, optimizer=None):
    """The meta-training loop shared by every kind of run: logs, validation, checkpoints.

    Args:
        config: the `Config` (`num_iterations`, `log_every`, `checkpoint_every`,
            `validate_every`).
        step: the int64 step variable that `run_steps` advances.
        all_finite: `() -> bool tensor`, whether the meta-parameters are finite.
        manager: the `tf.train.CheckpointManager`.
        writer: the summary writer.
        start: the step the loop starts from.
        latest: the checkpoint restored (or `None`).
        run_steps: `run_steps(num_steps) -> logs`: runs that many meta-iterations,
            returns the last one's logs (supervised runs: with "meta_loss", whose
            non-finite value stops the run).
        validate: `validate(step)`, called every `validate_every` steps (chief only).
        chief: whether this worker writes logs and summaries.
        progress: a `_Progress` (default: steps/s and ETA only).
        optimizer: the Keras optimizer whose `iterations` counts the steps
            (one update per step). A step that failed part-way (a multi-worker
            all-reduce whose peer died) may have counted it although nothing
            was applied; the checkpoint saved on the way out counts it as
            the step variable does.

    Returns:
        The final step.

    Raises:
        TrainingDiverged, CheckpointSaveError, Interrupted: see `train`.
    """
    progress = progress or _Progress(start, config.num_iterations)
    saved = {"step": start, "path": latest}
    updates_before_start = (None if optimizer is None else
                            int(optimizer.iterations.numpy()) - start)
    current = start
    steps_per_call = 1

    def save(number):  # every worker takes part (the variables are shared)
        try:
            path = manager.save(checkpoint_number=number)
        except (tf.errors.OpError, OSError) as e:
            raise CheckpointSaveError(
                f"could not write the checkpoint of step {number} into {manager.directory}: "
                f"{experiment_lib.error_text(e)}") from e
        saved.update(step=number, path=path if chief else None)
        return path

    try:
        while current < config.num_iterations:
            events = [config.num_iterations,
                      current + config.log_every - current % config.log_every,
                      current + config.checkpoint_every - current % config.checkpoint_every]
            if config.validate_every:
                events.append(current + config.validate_every - current % config.validate_every)
            num_steps = min(steps_per_call, min(events) - current)
            started = time.perf_counter()
            logs = run_steps(num_steps)
            elapsed = time.perf_counter() - started
            if current > start:  # the first call includes tracing and compilation
                steps_per_call = int(min(MAX_STEPS_PER_CALL, max(
                    1, SECONDS_PER_CALL * num_steps / max(elapsed, 1e-9))))
            previous, current = current, current + num_steps
            if previous == start:
                progress.compiled(current)
            # A non-finite step anywhere in the call leaves non-finite weights (and
            # losses) behind: checking once per call costs microseconds.
            bad_logs = _non_finite_meta_loss(logs)
            if bad_logs or not bool(all_finite()):
                raise TrainingDiverged(_divergence_message(config, bad_logs, previous + 1,
                                                           current, saved["path"]))
            if chief and (current % config.log_every == 0 or current == config.num_iterations):
                logs = {k: float(v) for k, v in logs.items()}
                logging.info(progress.line(current, logs))
                with writer.as_default(step=current):
                    for name, value in {**logs, **progress.scalars}.items():
                        tf.summary.scalar(name, value)
            if chief and validate and config.validate_every and (
                    current % config.validate_every == 0 or current == config.num_iterations):
                validate(current)
            if current % config.checkpoint_every == 0:
                save(current)
        if current != saved["step"]:
            save(current)
    except TrainingDiverged:
        raise
    except BaseException as e:
        # Keep the progress (Ctrl-C, SIGTERM, an error): a checkpoint of the
        # current step, unless it is already saved or not finite.
        current = int(step.numpy())
        saved_now = None
        if (optimizer is not None
                and int(optimizer.iterations.numpy()) != current + updates_before_start):
            optimizer.iterations.assign(current + updates_before_start)
        if current != saved["step"] and not isinstance(e, CheckpointSaveError):
            try:
                if bool(all_finite()):
                    saved_now = save(current)
                    if chief:
                        logging.info("Saved checkpoint at step %d", current)
                else:
                    logging.warning("Not saving step %d: its weights are not finite", current)
            except Exception as save_error:  # noqa: BLE001 -- report the original error
                logging.warning("Could not save a checkpoint at step %d: %s", current, save_error)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(current, saved_now if chief else None,
                              saved["path"] if chief else None, chief=chief) from None
        raise
    return current


def _validate(experiment, curve_fn, writer, step):
    """Pre/post-adaptation query metrics on held-out validation tasks."""
    config = experiment.config
    per_task = evaluation.evaluate_model(
        curve_fn, experiment.algorithm.meta_variables, experiment.tasks, config.seed,
        NUM_VALIDATION_TASKS, tasks_lib.VALIDATION, evaluation.batch_size_for(config))
    mean, _ = evaluation.summarize(per_task)
    name = experiment.metric_name
    with writer.as_default(step=step):
        tf.summary.scalar(f"validation/{name}_before_adaptation", mean[0])
        tf.summary.scalar(f"validation/{name}_after_adaptation", mean[-1])
    logging.info("validation at step %d: %s before adaptation %.4f, after %d step(s) %.4f",
                 step, name, mean[0], len(mean) - 1, mean[-1])


# -- meta-reinforcement learning -------------------------------------------------------------


def make_rl_train_step(algorithm, optimizer, step_counter, jit_compile=False):
    """A compiled `train_step() -> logs`: the meta-iteration `step_counter`, then the increment.

    Args:
        algorithm: a `tf_maml.rl.MAMLRL`.
        optimizer: a built `algorithm.make_optimizer(...)` (TRPO: SGD(1) applying
            the step; Adam: the meta-gradient).
        step_counter: int64 `tf.Variable`; the iteration to run (with the
            run's seed, it determines the tasks and every action noise).
        jit_compile: compile the meta-iteration with XLA.

    Returns:
        A `tf.function` without arguments; its logs are `MAMLRL.meta_step`'s
        without "loss": the surrogate before the update is zero up to rounding
        (normalized advantages, probability ratio 1), so it says nothing;
        TRPO's `loss_after` is the surrogate after it.
    """
    variables = algorithm.meta_variables

    @tf.function(jit_compile=jit_compile, autograph=False)
    def compute(iteration):
        _, update, logs = algorithm.meta_step(iteration)
        return update, logs

    @tf.function
    def train_step():
        update, logs = compute(step_counter.read_value())
        optimizer.apply_gradients(zip(update, variables))
        with tf.control_dependencies(_completed(variables, logs)):
            step_counter.assign_add(1)
        logs = dict(logs)
        del logs["loss"]
        return logs

    return train_step


def make_rl_finite_check(algorithm):
    """`() -> bool tensor`: the meta-parameters are finite and the policy's variance is too.

    A log-std beyond about ±44 (float32) is finite but its variance,
    `exp(2 log σ)`, over- or underflows: the next rollouts' actions and the baseline fit then
    fail far from the cause. Such a policy counts as diverged.
    """
    finite = _make_finite_check(algorithm.meta_variables + algorithm.state_variables)
    log_std = algorithm.policy.log_std

    @tf.function
    def all_finite():
        variance = tf.exp(2.0 * tf.convert_to_tensor(log_std))  # in the policy's dtype
        usable = tf.reduce_all(tf.math.is_finite(variance) & (variance > 0.0))
        return tf.logical_and(finite(), usable)

    return all_finite


def _train_rl(config, model_dir, run_log):
    """`train` for an RL dataset: MAML-RL (or the pretrained baseline) with the same loop."""
    checkpoint_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    run_log.run_dir_lock = _prepare_run_dir(config, model_dir, checkpoint_dir)
    experiment = experiment_lib.build_experiment(config)
    algorithm = experiment.algorithm
    optimizer = algorithm.make_optimizer(config.meta_lr)
    optimizer.build(algorithm.meta_variables)
    step = tf.Variable(0, dtype=tf.int64, name="step")
    checkpoint = experiment_lib.make_checkpoint(experiment, optimizer=optimizer, step=step)
    all_finite = make_rl_finite_check(algorithm)
    latest = _restore(config, checkpoint, checkpoint_dir, step, all_finite)
    # The run can start: only now is anything written.
    config_lib.save(_as_trained(config, step), model_dir)
    run_log.start()
    start = int(step.numpy())
    if start >= config.num_iterations:
        logging.info("Already trained for %d iterations; nothing to do.", start)
        return experiment, start

    jit = experiment_lib.resolve_jit_compile(config, experiment.model,
                                               experiment.forward.vectorized)
    what = ("the goal-observed oracle (no inner loop)" if config.goal_observed else
            "the pretrained baseline (no inner loop)" if config.num_inner_steps == 0 else
            f"MAML-RL ({config.num_inner_steps} inner step(s), "
            f"{'first' if config.first_order else 'second'} order)")
    logging.info("Meta-training %s on %s with %s: %d iterations, meta-batch %d x %d episodes "
                 "x %d steps%s, XLA: %s", what, config.dataset, config.outer_optimizer.upper(),
                 config.num_iterations, config.meta_batch_size, config.fast_batch_size,
                 algorithm.horizon,
                 " (sampled by steps: episodes ending early make room for more)"
                 if config.sample_by_steps else "", jit)
    train_step = make_rl_train_step(algorithm, optimizer, step, jit_compile=jit)
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=3)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "train"))

    rejected = _RejectedSteps(config) if config.outer_optimizer == "trpo" else None

    def run_steps(num_steps):
        for _ in range(num_steps):
            logs = train_step()
            if rejected is not None:
                rejected.update(logs)
        return logs

    progress = _Progress(start, config.num_iterations, units=("env_steps", "env steps"))
    try:
        current = _run_loop(config, step, all_finite, manager, writer, start, latest, run_steps,
                            lambda current: _validate_rl(algorithm, writer, current,
                                                         adapts=not config.goal_observed),
                            progress=progress)
    finally:
        writer.flush()
        if hasattr(algorithm.env, "close"):   # simulations (re-created if used again)
            algorithm.env.close()
    return experiment, current


class _RejectedSteps:
    """Warns when TRPO's line search has accepted no step for `WARN_AFTER` iterations in a row.

    A rejected step leaves θ as it was; a streak of them (a `max_kl` so large
    that every try's KL overflows, a damping or step that never improves the
    surrogate) would otherwise train nothing while the progress lines go on.
    """

    WARN_AFTER = 10

    def __init__(self, config):
        self.config, self.streak = config, 0

    def update(self, logs):
        if float(logs["accepted"]):
            self.streak = 0
            return
        self.streak += 1
        if self.streak % self.WARN_AFTER == 0:
            kl = float(logs["kl"])
            why = (f"the KL of every try is not finite ({kl}): max_kl (now "
                   f"{self.config.max_kl:g}) is likely far too large" if not math.isfinite(kl)
                   else f"the last try's KL was {kl:.3g} against max_kl {self.config.max_kl:g}, "
                        f"its surrogate {float(logs['loss_after']):.3g}")
            logging.warning("TRPO has accepted no step in the last %d iterations, so the "
                            "initialization is not changing; %s", self.streak, why)


def _validate_rl(algorithm, writer, step, adapts=True):
    """Average return before and after one gradient step on held-out goals.

    A goal-observed oracle (`adapts=False`) is evaluated as `evaluate` reports it:
    without adaptation, its return only.
    """
    from tf_maml.rl import maml_rl  # noqa: PLC0415 -- RL only
    returns = algorithm.evaluate(maml_rl.VALIDATION_SEED, num_tasks=NUM_RL_VALIDATION_TASKS,
                                 num_steps=1 if adapts else 0)
    with writer.as_default(step=step):
        tf.summary.scalar("validation/return_before_adaptation", returns[0])
        if adapts:
            tf.summary.scalar("validation/return_after_adaptation", returns[1])
    if adapts:
        logging.info("validation at step %d: return before adaptation %.2f, after 1 step %.2f",
                     step, returns[0], returns[1])
    else:
        logging.info("validation at step %d: return %.2f (the oracle does not adapt)", step,
                     returns[0])
