"""Assembling a run from its config, and restoring a trained one.

Used by training, evaluation, export and the benchmarks alike; none of them
needs the training loop to get a model back. Restoring needs no data: the model
is built from the config's task spec (`tf_maml.tasks.spec`), and the task
family is loaded only when asked for (evaluation).
"""

import dataclasses
import json
import os

import keras
import tensorflow as tf

from tf_maml import algorithms, functional, losses, models
from tf_maml import config as config_lib
from tf_maml import tasks as tasks_lib

__all__ = ["Experiment", "build_experiment", "restore", "make_checkpoint", "save_spec", "load_spec",
           "resolve_jit_compile", "CHECKPOINT_SUBDIR"]

CHECKPOINT_SUBDIR = "checkpoints"
SPEC_FILENAME = "task_spec.json"


@dataclasses.dataclass
class Experiment:
    """What a config builds.

    Attributes:
        config: the `Config`.
        tasks: the task family (`None` when built without data).
        spec: the `TaskSpec` (input shape, output size, classification).
        model: the Keras model; its weights are the meta-initialization θ.
        forward: its task-batched functional forward.
        loss_fn, metric_fn, metric_name: per-task loss and reported metric.
        algorithm: the algorithm (`tf_maml.algorithms`), which owns any
            meta-parameters beyond the model's weights.
    """
    config: config_lib.Config
    tasks: object
    spec: object
    model: keras.Model
    forward: object
    loss_fn: object
    metric_fn: object
    metric_name: str
    algorithm: object


def build_experiment(config, tasks=None, load_tasks=True, spec=None):
    """Builds the model (seeded by `config.seed`), its forward, loss, metric and algorithm.

    Args:
        config: a `Config`.
        tasks: a task family to use instead of the config's.
        load_tasks: build the config's task family (loads data); false builds
            only what the model needs (export, restore without evaluation).
        spec: the `TaskSpec` to build the model for when no task family is
            given or loaded (default: derived from the config).

    Returns:
        An `Experiment`.

    Raises:
        ValueError: invalid config, or bad data.
    """
    config.validate()
    if tasks is None and load_tasks:
        tasks = tasks_lib.build(config)
    if tasks is not None:
        spec = tasks_lib.TaskSpec(tasks.input_shape, tasks.output_size, tasks.is_classification)
    elif spec is None:
        spec = tasks_lib.spec(config)
    keras.utils.set_random_seed(config.seed)
    model = models.build(config, spec.input_shape, spec.output_size)
    loss_fn, metric_fn, metric_name = losses.for_tasks(spec)
    forward = functional.make_forward(model)
    algorithm = algorithms.build(config, model, forward, loss_fn)
    return Experiment(config, tasks, spec, model, forward, loss_fn, metric_fn, metric_name,
                      algorithm)


def save_spec(spec, model_dir):
    """Records the model's input shape and output size beside the config (for restoring)."""
    path = os.path.join(model_dir, SPEC_FILENAME)
    with open(path + ".tmp", "w") as f:
        json.dump({"input_shape": list(spec.input_shape), "output_size": spec.output_size,
                   "is_classification": spec.is_classification}, f)
    os.replace(path + ".tmp", path)


def load_spec(model_dir, config):
    """The `TaskSpec` a run was trained with (recorded, or derived from its config)."""
    path = os.path.join(model_dir, SPEC_FILENAME)
    if os.path.exists(path):
        with open(path) as f:
            values = json.load(f)
        return tasks_lib.TaskSpec(values["input_shape"], values["output_size"],
                                  values["is_classification"])
    return tasks_lib.spec(config)


def make_checkpoint(experiment, **extra):
    """The `tf.train.Checkpoint` of a run: model, the algorithm's meta-parameters, and `extra`."""
    items = dict(model=experiment.model, **extra)
    if experiment.algorithm.extra_variables:
        items["algorithm"] = experiment.algorithm.state
    return tf.train.Checkpoint(**items)


def restore(model_dir, overrides=None, tasks=None, load_tasks=False, checkpoint_path=None):
    """Loads the config and the latest meta-parameters of a training run.

    Args:
        model_dir: a directory written by `tf_maml.train`.
        overrides: dict of `Config` fields replacing the saved ones (e.g. a
            moved `data_dir`, evaluation settings).
        tasks: use this task family instead of building the config's.
        load_tasks: load the config's task family (evaluation needs it; export
            does not).
        checkpoint_path: a checkpoint (default: the latest in `model_dir`).

    Returns:
        `(experiment, step)`.

    Raises:
        FileNotFoundError: no config or no checkpoint in `model_dir`.
        ValueError: invalid overrides.
    """
    config = dataclasses.replace(config_lib.load(model_dir), **(overrides or {})).validate()
    experiment = build_experiment(config, tasks, load_tasks=load_tasks,
                                  spec=load_spec(model_dir, config))
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = make_checkpoint(experiment, step=step)
    path = checkpoint_path or tf.train.latest_checkpoint(
        os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(model_dir, CHECKPOINT_SUBDIR)}")
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint.restore(path).expect_partial()
    return experiment, int(step.numpy())


def _layers(model):
    stack, out = list(model.layers), []
    while stack:
        layer = stack.pop()
        out.append(layer)
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
    return out


def resolve_jit_compile(config, model):
    """XLA on/off for a run.

    "auto" uses XLA except (a) for convolutional models on CPU: measured on TF
    2.21, XLA makes dense meta-steps ~2.5x faster and convolutional ones 11-16x
    slower; (b) for second-order training of models with max-pooling, whose
    second derivative XLA computes only approximately (~2% meta-gradient error).
    """
    if config.jit_compile != "auto":
        return config.jit_compile == "true"
    layers = _layers(model)
    has_conv = any(isinstance(layer, keras.layers.Conv2D) for layer in layers)
    has_max_pool = any(isinstance(layer, keras.layers.MaxPooling2D) for layer in layers)
    second_order = not config.first_order and config.algorithm != "reptile"
    if has_max_pool and second_order and config.num_inner_steps > 0:
        return False
    return not (has_conv and not tf.config.list_physical_devices("GPU"))
