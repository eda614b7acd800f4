"""Meta-training: the loop around `core.meta_gradients`.

`train(config, model_dir)` builds the task family and the model, restores the
latest checkpoint of `model_dir` if there is one (step, weights, optimizer
state; the episodes are a pure function of (seed, step), so a resumed run sees
exactly the tasks an uninterrupted one would), then runs meta-iterations with
progress lines, TensorBoard summaries, periodic validation on held-out tasks and
checkpoints. A checkpoint is also written when the loop is interrupted.
"""

import dataclasses
import os
import time

import keras
import tensorflow as tf
from absl import logging

from tf_maml import config as config_lib
from tf_maml import core, distribute, evaluation, functional, losses, models
from tf_maml import tasks as tasks_lib

__all__ = ["Experiment", "build_experiment", "make_train_step", "make_train_loop",
           "restore_model", "train", "resolve_jit_compile"]

CHECKPOINT_SUBDIR = "checkpoints"
NUM_VALIDATION_TASKS = 100
# The loop runs as many steps per call as fit in about this many seconds:
# fast steps (sine: ~0.5 ms) are not dominated by Python overhead, and an
# interrupt (Ctrl-C) is still handled within about this long.
SECONDS_PER_CALL = 0.5
MAX_STEPS_PER_CALL = 1000


@dataclasses.dataclass
class Experiment:
    """What a config builds: the task family, the model and its functional form."""
    config: config_lib.Config
    tasks: object
    model: keras.Model
    forward: object
    loss_fn: object
    metric_fn: object
    metric_name: str


def build_experiment(config, tasks=None):
    """Builds tasks (unless given), model (seeded by `config.seed`), forward, loss and metric."""
    config.validate()
    tasks = tasks if tasks is not None else tasks_lib.build(config)
    keras.utils.set_random_seed(config.seed)
    model = models.build(config, tasks.input_shape, tasks.output_size)
    loss_fn, metric_fn, metric_name = losses.for_tasks(tasks)
    return Experiment(config, tasks, model, functional.make_forward(model), loss_fn, metric_fn,
                      metric_name)


def resolve_jit_compile(config, model):
    """XLA on/off for a run.

    "auto" uses XLA except (a) for convolutional models on CPU: measured on TF
    2.21, XLA makes dense meta-steps ~2.5x faster and convolutional ones 11-16x
    slower; (b) for second-order training of models with max-pooling, whose
    second derivative XLA computes only approximately (~2% meta-gradient error).
    """
    if config.jit_compile != "auto":
        return config.jit_compile == "true"
    layers = list(model._flatten_layers())
    has_conv = any(isinstance(layer, keras.layers.Conv2D) for layer in layers)
    has_max_pool = any(isinstance(layer, keras.layers.MaxPooling2D) for layer in layers)
    if has_max_pool and not config.first_order and config.num_inner_steps > 0:
        return False
    return not (has_conv and not tf.config.list_physical_devices("GPU"))


def make_train_step(experiment, optimizer, step_counter, jit_compile=False, strategy=None):
    """A compiled `train_step(episode) -> logs` performing one meta-update.

    Under a `tf.distribute` strategy the meta-batch is split along the task
    axis: replica r adapts its own slice of the episode's tasks (the first
    replicas take one more when the split is uneven). Each replica's meta-loss
    is its tasks' summed query loss divided by the *global* task count; the
    Keras optimizer sums the replicas' gradients in `apply_gradients`, which
    gives exactly the single-device meta-gradient.

    Args:
        experiment: an `Experiment`.
        optimizer: a built Keras optimizer for `model.trainable_variables`
            (created in `strategy.scope()`).
        step_counter: int64 `tf.Variable`, incremented by each step.
        jit_compile: compile the meta-gradient computation with XLA.
        strategy: a `tf.distribute.Strategy` (default: the current one).

    Returns:
        A `tf.function` taking a global `Episode`; its logs are scalars over
        the whole meta-batch: `meta_loss`, `support_loss_before_adaptation` and
        the query metric after adaptation.
    """
    config = experiment.config
    variables = experiment.model.trainable_variables
    strategy = strategy or tf.distribute.get_strategy()
    counts = distribute.replica_task_counts(config.meta_batch_size, strategy.num_replicas_in_sync)
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    scale = 1.0 / config.meta_batch_size
    metric = f"query_{experiment.metric_name}"

    @tf.function(jit_compile=jit_compile)
    def compute(episode):
        meta_loss, grads, outputs = core.meta_gradients(
            experiment.forward, variables, episode, experiment.loss_fn, config.inner_lr,
            config.num_inner_steps, first_order=config.first_order, loss_scale=scale)
        # Each log is this replica's sum over its tasks / the global task count:
        # summed over replicas, the mean over the meta-batch.
        return grads, {
            "meta_loss": meta_loss,
            "support_loss_before_adaptation": tf.reduce_sum(outputs["support_losses"]) * scale,
            metric: tf.reduce_sum(
                experiment.metric_fn(episode.query_y, outputs["query_predictions"])) * scale,
        }

    def replica_step(episode):
        grads, logs = compute(episode)
        optimizer.apply_gradients(zip(grads, variables))
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


def restore_model(model_dir, overrides=None, tasks=None, checkpoint_path=None):
    """Loads the config and the latest meta-initialization of a training run.

    Args:
        model_dir: a directory written by `train`.
        overrides: dict of `Config` fields replacing the saved ones (e.g. a
            moved `data_dir`, evaluation settings).
        tasks: use this task family instead of building the config's.
        checkpoint_path: a checkpoint (default: the latest in `model_dir`).

    Returns:
        `(experiment, step)`.

    Raises:
        FileNotFoundError: no config or no checkpoint in `model_dir`.
        ValueError: invalid overrides.
    """
    config = dataclasses.replace(config_lib.load(model_dir), **(overrides or {})).validate()
    experiment = build_experiment(config, tasks)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=experiment.model, step=step)
    path = checkpoint_path or tf.train.latest_checkpoint(
        os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(model_dir, CHECKPOINT_SUBDIR)}")
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint.restore(path).expect_partial()
    return experiment, int(step.numpy())


class _Progress:
    """Progress lines with steps/s and ETA."""

    def __init__(self, start_step, total):
        self.total = total
        self.last_step, self.last_time = start_step, time.perf_counter()

    def line(self, step, logs):
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        values = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
        return (f"step {step}/{self.total} ({100 * step / self.total:.1f}%) {values} "
                f"| {rate:.1f} steps/s | ETA {_duration(eta)}")


def _duration(seconds):
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train(config, model_dir):
    """Meta-trains a model as `config` says, resuming from `model_dir` if possible.

    Args:
        config: a `Config`.
        model_dir: where checkpoints, `config.json` and summaries go.

    Returns:
        `(experiment, step)`: the trained experiment (its model holds the
        meta-initialization) and the final step.

    Raises:
        ValueError: invalid config, or `model_dir` holds a different run.

    Example:

    ```python
    config = Config(num_iterations=1000)
    experiment, _ = train(config, "/tmp/sine")
    ```
    """
    config.validate()
    strategy = distribute.make_strategy(config.strategy)
    chief = distribute.is_chief(strategy)
    if os.path.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        config_lib.check_resumable(config_lib.load(model_dir), config)
    if chief:
        config_lib.save(config, model_dir)
    output_dir = distribute.worker_dir(model_dir, strategy)

    with strategy.scope():
        experiment = build_experiment(config)
        model = experiment.model
        optimizer = keras.optimizers.Adam(config.meta_lr)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(output_dir, CHECKPOINT_SUBDIR),
                                         max_to_keep=3)
    # Every worker resumes from the chief's checkpoints.
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed from %s at step %d", latest, int(step.numpy()))
    start = int(step.numpy())
    if start >= config.num_iterations:
        logging.info("Already trained for %d iterations; nothing to do.", start)
        return experiment, start

    jit = resolve_jit_compile(config, model)
    logging.info("Meta-training %s on %s: %d iterations, layer-batched forward: %s, XLA: %s, "
                 "%d replica(s)", config.model_name, config.dataset, config.num_iterations,
                 experiment.forward.vectorized, jit, strategy.num_replicas_in_sync)
    train_step = make_train_step(experiment, optimizer, step, jit_compile=jit, strategy=strategy)
    curve_fn = evaluation.make_curve_fn(experiment.forward, experiment.loss_fn,
                                        experiment.metric_fn, config.inner_lr,
                                        max(config.num_inner_steps, 1), jit_compile=jit)
    dataset = tasks_lib.episode_dataset(
        lambda seed: experiment.tasks.sample(seed, config.meta_batch_size), config.seed, start,
        config.num_iterations, stream=tasks_lib.TRAIN)
    writer = (tf.summary.create_file_writer(os.path.join(model_dir, "train")) if chief
              else tf.summary.create_noop_writer())
    progress = _Progress(start, config.num_iterations)
    saved_step = start
    current = start
    train_loop = make_train_loop(train_step)
    iterator = iter(dataset)
    steps_per_call = 1
    try:
        while current < config.num_iterations:
            events = [config.num_iterations, current + config.log_every - current % config.log_every,
                      current + config.checkpoint_every - current % config.checkpoint_every]
            if config.validate_every:
                events.append(current + config.validate_every - current % config.validate_every)
            num_steps = min(steps_per_call, min(events) - current)
            started = time.perf_counter()
            logs = train_loop(iterator, tf.constant(num_steps, tf.int64))
            elapsed = time.perf_counter() - started
            if current > start:  # the first call includes tracing and compilation
                steps_per_call = int(min(MAX_STEPS_PER_CALL, max(
                    1, SECONDS_PER_CALL * num_steps / max(elapsed, 1e-9))))
            current += num_steps
            if chief and (current % config.log_every == 0 or current == config.num_iterations):
                logs = {k: float(v) for k, v in logs.items()}
                logging.info(progress.line(current, logs))
                with writer.as_default(step=current):
                    for name, value in logs.items():
                        tf.summary.scalar(name, value)
            if chief and config.validate_every and (current % config.validate_every == 0
                                                    or current == config.num_iterations):
                _validate(experiment, curve_fn, writer, current)
            if current % config.checkpoint_every == 0:
                manager.save(checkpoint_number=current)
                saved_step = current
    finally:
        current = int(step.numpy())
        if current != saved_step:
            manager.save(checkpoint_number=current)
            logging.info("Saved checkpoint at step %d", current)
        writer.flush()
        if not chief:
            tf.io.gfile.rmtree(output_dir)
    return experiment, current


def _validate(experiment, curve_fn, writer, step):
    """Pre/post-adaptation query metrics on held-out validation tasks."""
    config = experiment.config
    per_task = evaluation.evaluate_model(
        curve_fn, experiment.model.trainable_variables, experiment.tasks, config.seed,
        NUM_VALIDATION_TASKS, tasks_lib.VALIDATION, evaluation.batch_size_for(config))
    mean, _ = evaluation.summarize(per_task)
    name = experiment.metric_name
    with writer.as_default(step=step):
        tf.summary.scalar(f"validation/{name}_before_adaptation", mean[0])
        tf.summary.scalar(f"validation/{name}_after_adaptation", mean[-1])
    logging.info("validation at step %d: %s before adaptation %.4f, after %d step(s) %.4f",
                 step, name, mean[0], len(mean) - 1, mean[-1])
