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
"""

import os
import time

import tensorflow as tf
from absl import logging

from tf_maml import config as config_lib
from tf_maml import distribute, evaluation
from tf_maml import experiment as experiment_lib
from tf_maml import tasks as tasks_lib
from tf_maml.experiment import CHECKPOINT_SUBDIR

__all__ = ["make_train_step", "make_train_loop", "train"]

NUM_VALIDATION_TASKS = 100
# The loop runs as many steps per call as fit in about this many seconds:
# fast steps (sine: ~0.5 ms) are not dominated by Python overhead, and an
# interrupt (Ctrl-C) is still handled within about this long.
SECONDS_PER_CALL = 0.5
MAX_STEPS_PER_CALL = 1000


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
        optimizer: a built Keras optimizer for `experiment.algorithm.meta_variables`
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
    algorithm = experiment.algorithm
    variables = algorithm.meta_variables
    strategy = strategy or tf.distribute.get_strategy()
    counts = distribute.replica_task_counts(config.meta_batch_size, strategy.num_replicas_in_sync)
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    scale = 1.0 / config.meta_batch_size
    metric = f"query_{experiment.metric_name}"

    @tf.function(jit_compile=jit_compile)
    def compute(episode, iteration):
        meta_loss, grads, outputs = algorithm.meta_step(episode, scale, iteration)
        # Each log is this replica's sum over its tasks / the global task count:
        # summed over replicas, the mean over the meta-batch.
        return grads, {
            "meta_loss": meta_loss,
            "support_loss_before_adaptation": tf.reduce_sum(outputs.support_losses) * scale,
            metric: tf.reduce_sum(
                experiment.metric_fn(episode.query_y, outputs.query_predictions)) * scale,
        }

    def replica_step(episode):
        grads, logs = compute(episode, step_counter.read_value())
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
        experiment = experiment_lib.build_experiment(config)
        model = experiment.model
        algorithm = experiment.algorithm
        optimizer = algorithm.make_optimizer(config.meta_lr, config.num_iterations)
        optimizer.build(algorithm.meta_variables)
        step = tf.Variable(0, dtype=tf.int64, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    if chief:
        experiment_lib.save_spec(experiment.spec, model_dir)
    checkpoint = experiment_lib.make_checkpoint(experiment, optimizer=optimizer, step=step)
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

    jit = experiment_lib.resolve_jit_compile(config, model)
    logging.info("Meta-training %s with %s on %s: %d iterations, layer-batched forward: %s, "
                 "XLA: %s, %d replica(s)", config.model_name, algorithm.name, config.dataset,
                 config.num_iterations, experiment.forward.vectorized, jit,
                 strategy.num_replicas_in_sync)
    train_step = make_train_step(experiment, optimizer, step, jit_compile=jit, strategy=strategy)
    curve_fn = evaluation.make_curve_fn(algorithm, experiment.metric_fn,
                                        max(config.num_inner_steps, 1), jit_compile=jit)
    train_k_shot = config.train_k_shot or None
    dataset = tasks_lib.episode_dataset(
        lambda seed: experiment.tasks.sample(seed, config.meta_batch_size, k_shot=train_k_shot),
        config.seed, start, config.num_iterations, stream=tasks_lib.TRAIN)
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
        curve_fn, experiment.algorithm.meta_variables, experiment.tasks, config.seed,
        NUM_VALIDATION_TASKS, tasks_lib.VALIDATION, evaluation.batch_size_for(config))
    mean, _ = evaluation.summarize(per_task)
    name = experiment.metric_name
    with writer.as_default(step=step):
        tf.summary.scalar(f"validation/{name}_before_adaptation", mean[0])
        tf.summary.scalar(f"validation/{name}_after_adaptation", mean[-1])
    logging.info("validation at step %d: %s before adaptation %.4f, after %d step(s) %.4f",
                 step, name, mean[0], len(mean) - 1, mean[-1])
