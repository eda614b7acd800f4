"""A Keras face for meta-learning: `compile`, `fit`, `evaluate`, `save`, `export`.

`MetaLearner` is a `keras.Model` around any built Keras model. Its
`train_step` is the algorithm's meta-step (`tf_maml.algorithms`, the same code
the CLI trainer runs: there is no second copy of MAML here), so everything a
Keras user expects of `fit()` applies: callbacks (`TensorBoard`,
`ModelCheckpoint`, `EarlyStopping`, `BackupAndRestore`, `CSVLogger`,
`ReduceLROnPlateau`), learning-rate schedules on the meta-optimizer, the
progress bar, `tf.distribute` strategy scopes, `save()` / `keras.models.load_model`.

What `fit` and `evaluate` take:

* `Episodes(tasks, meta_batch_size, split)`: meta-batches sampled from a task
  family (`tf_maml.tasks`: Omniglot, sine, your arrays, folders, TFDS, ...).
  Training episodes are a pure function of `(seed, iteration)` (the optimizer's
  iteration counter): a run resumed by `BackupAndRestore` sees exactly the tasks
  an uninterrupted one would, and `fit` for N steps equals the CLI trainer's N
  steps on the same config. Evaluation episodes are a fixed set, the same at
  every call.
* Any `tf.data.Dataset` of `Episode`s (or of 4-tuples / dicts with the keys
  `support_x`, `support_y`, `query_x`, `query_y`), each a meta-batch.

The logs: `loss` is the meta-loss (the query loss after adaptation, MAML++'s
multi-step loss, Reptile's support loss); the compiled metrics are measured on
the query sets *after* adaptation (`num_inner_steps` steps in `fit`,
`num_eval_steps` in `evaluate`).
"""

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml import algorithms, compat, distribute, evaluation, files, functional, losses
from tf_maml import serving
from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import tasks as tasks_lib
from tf_maml.tasks import Episode
from tf_maml.tasks.episodes import check_positive_ints
from tf_maml.tasks import sources

__all__ = ["MetaLearner", "Episodes", "keras_task_loss"]

# Config fields a `MetaLearner` takes as keyword arguments (the algorithm's
# options and the evaluation protocol); the rest of `Config` is the CLI's.
LEARNER_FIELDS = (
    "algorithm", "inner_lr", "num_inner_steps", "num_eval_steps", "first_order", "meta_lr",
    "meta_gradient_clip",
    "num_iterations", "msl_epochs", "first_order_epochs", "iterations_per_epoch", "per_step_bn",
    "learn_inner_lr", "min_meta_lr", "inner_optimizer", "inner_batch_size",
    "eval_inner_batch_size",
    "carry_inner_state", "meta_step_size",
    "meta_step_size_final", "train_k_shot", "transductive", "transductive_support", "seed",
    "meta_batch_size",
    "recompute_inner_steps",
)
_SOURCE_KEY = "tf_maml_episode_index_"


class Episodes:
    """Meta-batches of a task family, for `MetaLearner.fit` and `MetaLearner.evaluate`.

    Args:
        tasks: a task family (`sample(seed, n, split, k_shot=None)`, e.g.
            `tf_maml.tasks.SineTasks()` or `tf_maml.tasks.array_tasks(...)`).
        meta_batch_size: tasks per meta-batch.
        split: "train", "val" or "test".
        seed: seeds every sampled task (with the training iteration, or the
            episode's index for evaluation); default: the learner's `seed`.
        num_batches: meta-batches per pass, for evaluation (default: enough
            for 100 tasks); training episodes never run out (pass
            `steps_per_epoch` to `fit`).
        k_shot: support examples per class, if not the family's (training
            with more shots than evaluation, as Reptile's recipe does).

    Raises:
        ValueError: a bad split, size or count.

    Example:

    ```python
    train = Episodes(tasks, meta_batch_size=32, split="train")
    val = Episodes(tasks, meta_batch_size=32, split="val", num_batches=4)
    learner.fit(train, epochs=10, steps_per_epoch=100, validation_data=val)
    ```
    """

    def __init__(self, tasks, meta_batch_size, split="train", seed=None, num_batches=None,
                 k_shot=None):
        if not hasattr(tasks, "sample"):
            raise ValueError(f"tasks must be a task family with a sample() method (see "
                             f"tf_maml.tasks), got {type(tasks).__name__}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        sizes = dict(meta_batch_size=meta_batch_size, num_batches=num_batches, k_shot=k_shot)
        check_positive_ints("Episodes", **{k: v for k, v in sizes.items() if v is not None})
        if k_shot is not None and hasattr(tasks, "check_k_shot"):
            tasks.check_k_shot(k_shot, split)  # too few examples: say so now, not in tf.data
        splits = getattr(tasks, "num_classes", None)
        if split == "val" and isinstance(splits, dict) and "val" not in splits:
            logging.warning(
                "Episodes(split='val'): the task family has no validation classes, so these "
                "are tasks of its meta-test classes; a model selected on them (e.g. "
                "ModelCheckpoint(save_best_only=True)) is selected on test data. Give the "
                "family a validation part (class_split)")
        self.tasks, self.meta_batch_size, self.split = tasks, int(meta_batch_size), split
        self.seed, self.k_shot = None if seed is None else int(seed), k_shot
        self.num_batches = num_batches

    def evaluation_batches(self):
        """Meta-batches of one evaluation pass (`num_batches`, default enough for 100 tasks)."""
        return self.num_batches or math.ceil(100 / self.meta_batch_size)

    def with_seed(self, seed):
        """These episodes with `seed` filled in if none was given."""
        if self.seed is not None:
            return self
        return Episodes(self.tasks, self.meta_batch_size, self.split, seed, self.num_batches,
                        self.k_shot)

    @property
    def stream(self):
        return {"train": tasks_lib.TRAIN, "val": tasks_lib.VALIDATION,
                "test": tasks_lib.TEST}[self.split]

    def sample(self, index):
        """The meta-batch of `index` (the iteration, in training), a pure function of it."""
        return self.tasks.sample(tasks_lib.step_seed(self.seed or 0, index, self.stream),
                                 self.meta_batch_size, self.split, k_shot=self.k_shot)


def keras_task_loss(loss):
    """A Keras loss as a per-task loss `fn(y_true, y_pred) -> [num_tasks]` (the core's shape).

    Args:
        loss: a Keras loss: a name ("mse", "sparse_categorical_crossentropy"),
            a `keras.losses.Loss` (its reduction is ignored: each task's mean
            over its examples is taken) or a function returning per-example
            losses.

    Returns:
        A function of task-batched `[num_tasks, batch, ...]` tensors.

    Raises:
        ValueError: `loss` is not a Keras loss.
    """
    if loss is None:
        raise ValueError("MetaLearner needs a loss: compile(loss=...), e.g. keras.losses."
                         "SparseCategoricalCrossentropy(from_logits=True) for a model that "
                         "outputs logits, or 'mse'")
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(f"MetaLearner takes one loss for its model's one output, got {loss!r}")
    try:
        fn = keras.losses.get(loss)
    except (ValueError, TypeError) as e:
        raise ValueError(f"unknown loss {loss!r}: {e}") from None
    is_loss_object = isinstance(fn, keras.losses.Loss)
    call = fn.call if is_loss_object else fn

    def task_loss(y_true, y_pred):
        num_tasks = tf.shape(y_pred)[0]

        def flat(t):
            return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))

        y_true, y_pred = flat(y_true), flat(y_pred)
        if not is_loss_object:  # Keras' loss classes match the ranks in their own `call`
            y_true, y_pred = _same_rank(y_true, y_pred)
        values = tf.convert_to_tensor(call(y_true, y_pred))
        if values.shape.rank == 0:
            raise ValueError(f"the loss {getattr(loss, '__name__', loss)!r} returned a scalar: "
                             f"MetaLearner needs per-example losses (one value per example, "
                             f"as Keras' own loss functions return), to average each task's")
        values = tf.cast(values, y_pred.dtype)
        return tf.reduce_mean(tf.reshape(values, [num_tasks, -1]), axis=1)

    return task_loss


def _same_rank(y_true, y_pred):
    """Targets and predictions as Keras' `compile` gives them to a loss named by a string
    or given as a function: where the ranks differ by one and the larger tensor's last axis
    has size 1, the one-dimensional tensor gets that axis (otherwise the other loses it)."""
    for a, b, swap in ((y_true, y_pred, False), (y_pred, y_true, True)):
        if a.shape.rank is None or b.shape.rank is None or a.shape.rank != b.shape.rank + 1:
            continue
        if a.shape[-1] == 1:
            if b.shape.rank == 1:
                b = b[:, None]
            else:
                a = tf.squeeze(a, -1)
            return (b, a) if swap else (a, b)
    return y_true, y_pred


class _RawPixelTasks:
    """A task family that scales uint8 images to [0, 1], giving them back as the integer
    pixels a model declaring an integer input takes (it rescales them itself)."""

    def __init__(self, tasks, dtype):
        self._tasks, self._dtype = tasks, tf.as_dtype(dtype)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_tasks":  # copy/pickle probes: no recursion
            raise AttributeError(name)
        return getattr(self._tasks, name)

    def sample(self, *args, **kwargs):
        episode = self._tasks.sample(*args, **kwargs)

        def pixels(x):  # exact: round(float32(k / 255) * 255) == k
            return tf.cast(tf.round(x * 255), self._dtype)

        return episode._replace(support_x=pixels(episode.support_x),
                                query_x=pixels(episode.query_x))


def _is_family(data):
    """Whether `data` is `Episodes` or a bare task family (endless training episodes)."""
    return isinstance(data, Episodes) or (
        data is not None and hasattr(data, "sample") and not isinstance(data, tf.data.Dataset))


def _as_episode(data):
    if isinstance(data, Episode):
        return data
    if isinstance(data, dict) and set(Episode._fields) <= set(data):
        return Episode(*[data[name] for name in Episode._fields])
    if isinstance(data, (tuple, list)) and len(data) == 4:
        return Episode(*data)
    if isinstance(data, dict):
        missing = [name for name in Episode._fields if name not in data]
        unexpected = sorted(str(k) for k in set(data) - set(Episode._fields))
        raise ValueError(
            "MetaLearner expects meta-batches with the keys " + ", ".join(Episode._fields)
            + "; the dict lacks " + ", ".join(missing)
            + (f" and has {', '.join(unexpected)}" if unexpected else ""))
    raise ValueError(
        "MetaLearner expects meta-batches: tf_maml.Episodes(tasks, meta_batch_size), or a "
        "tf.data.Dataset of Episode (support_x, support_y, query_x, query_y, each with a "
        "leading task axis); got " + (f"elements {data}" if isinstance(data, tf.TypeSpec)
                                      else f"an element of type {type(data).__name__}"))


@keras.saving.register_keras_serializable(package="tf_maml")
class MetaLearner(keras.Model):
    """Meta-learns the initialization of a Keras model with `compile()` and `fit()`.

    The wrapped model's weights are the meta-initialization θ; algorithms with
    meta-parameters of their own (Meta-SGD's and MAML++'s learned rates,
    MAML++'s per-step batch norm) add them as weights of the learner, so they
    are trained, saved, restored and exported with θ.

    Args:
        model: a built Keras model with one input and one output (the
            predictions, e.g. logits).
        algorithm: "maml", "anil", "metasgd", "mamlpp" or "reptile".
        inner_lr: inner step size α (the initial learned rate for Meta-SGD
            and MAML++).
        num_inner_steps: inner steps in meta-training (0 with `algorithm="maml"`
            trains the "pretrained" baseline).
        num_eval_steps: inner steps in `evaluate`, `adapt_and_predict` and
            the export (default `num_inner_steps`, at least 1).
        first_order: first-order meta-gradients.
        **options: other fields of `tf_maml.config.Config` with the same
            meaning as the CLI's flags: `msl_epochs`, `first_order_epochs`,
            `iterations_per_epoch`, `per_step_bn`, `learn_inner_lr`,
            `min_meta_lr` (MAML++), `inner_optimizer`, `inner_batch_size`,
            `eval_inner_batch_size`, `meta_step_size`, `meta_step_size_final`, `carry_inner_state`
            (Reptile),
            `train_k_shot`, `transductive`, `seed`, `meta_batch_size` (the
            default for task families passed without `Episodes`),
            `meta_lr` and `num_iterations` (for `default_optimizer`),
            `meta_gradient_clip` (each element of the meta-gradient, summed
            over replicas, clipped to this before the update; unlike a Keras
            optimizer's `clipvalue`, which clips each replica's share),
            `recompute_inner_steps` (memory for many second-order inner
            steps), `transductive_support`; and Keras' `trainable`, `dtype`.
        name: the learner's name.

    Raises:
        ValueError: an unbuilt or multi-input model, or a bad option.

    Example:

    ```python
    learner = tf_maml.MetaLearner(tf_maml.models.mlp(), inner_lr=0.01, num_inner_steps=1)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    learner.fit(tf_maml.Episodes(tf_maml.tasks.SineTasks(), 25), epochs=2, steps_per_epoch=100)
    ```
    """

    def __init__(self, model, algorithm="maml", inner_lr=0.4, num_inner_steps=1,
                 num_eval_steps=None, first_order=False, name="meta_learner", **options):
        unknown = sorted(set(options) - set(LEARNER_FIELDS) - {"trainable", "dtype"})
        if unknown:
            raise ValueError(f"unknown MetaLearner options: {', '.join(unknown)} (expected "
                             f"some of {', '.join(LEARNER_FIELDS)})")
        base_options = {k: options.pop(k) for k in ("trainable", "dtype") if k in options}
        super().__init__(name=name, **base_options)
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if not model.built:
            raise ValueError("model must be built (call it on a batch, or give it an Input) "
                             "before wrapping it in a MetaLearner")
        input_dtypes = {tf.as_dtype(t.dtype) for t in getattr(model, "inputs", None) or []
                        if t is not None and getattr(t, "dtype", None) is not None}
        for dtype in input_dtypes:
            if dtype == tf.string:
                raise ValueError(
                    f"model {model.name!r} takes {dtype.name} inputs, but adaptation needs "
                    "numbers: do the lookup (StringLookup, TextVectorization) in the input "
                    "pipeline, a tf.data map or numpy, and give the model the integer ids")
        try:
            structure = model.output
        except (AttributeError, ValueError):
            structure = None  # a subclassed model
        if isinstance(structure, (dict, list, tuple)):
            # The core's forward reads the one tensor out of it; Keras' loss and metrics
            # (and `predict`) would get the structure.
            raise ValueError(_single_output_message(model, structure))
        if num_eval_steps is None:
            # (a bad num_inner_steps is left for the config's check to name)
            num_eval_steps = (max(int(num_inner_steps), 1)
                              if isinstance(num_inner_steps, numbers.Integral) else 1)
        values = dict(dataset="custom", algorithm=algorithm, inner_lr=inner_lr,
                      num_inner_steps=num_inner_steps, num_eval_steps=num_eval_steps,
                      first_order=first_order, **options)
        try:
            self.meta_config = config_lib.Config(**values).validate()
        except TypeError as e:
            raise ValueError(str(e)) from None
        self.model = model
        random_layers = functional.random_layers(model)
        if random_layers:
            augmenting = any("dropout" not in type(layer).__name__.lower()
                             and not functional.is_recurrent_cell(layer)
                             for layer in random_layers)
            logging.warning(
                "MetaLearner: layer(s) %s of model %r draw random numbers in training mode, "
                "which adaptation, evaluation, adapt_and_predict and the exported signatures "
                "all use (batch norm's per-task statistics need it): they stay active there, "
                "and predictions vary from call to call.%s",
                ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in random_layers),
                model.name, " Data augmentation belongs in the input pipeline (a tf.data map), "
                "not in the model" if augmenting else "")
        self.forward = functional.make_forward(model)
        self._input_dtype = functional.integer_input_dtype(model)
        self.algorithm = algorithms.build(self.meta_config, model, self.forward,
                                          self._task_loss)
        # The algorithm's own meta-parameters become weights of this layer: Keras
        # trains, saves and distributes them like any weight.
        extras = self.algorithm.extra_variables
        if extras:
            self.algorithm.state.meta_parameters = [
                self.add_weight(shape=tuple(v.shape), dtype=v.dtype.name,
                                initializer=keras.initializers.Constant(v.numpy()),
                                name=v.name.split(":")[0], trainable=True)
                for v in extras]
        # Its state (Reptile's carried Adam moments): non-trainable weights that each
        # replica's train step assigns, aggregated as the algorithm's own variables are
        # (moments: each replica's share, summed; the step count: the first replica's).
        carried = self.algorithm.state_variables
        if carried:
            aggregation = {tf.VariableAggregation.SUM: "sum",
                           tf.VariableAggregation.ONLY_FIRST_REPLICA: "only_first_replica"}
            self.algorithm.state.carried = [
                self.add_weight(shape=tuple(v.shape), dtype=v.dtype.name,
                                initializer=keras.initializers.Constant(v.numpy()),
                                name=v.name.split(":")[0], trainable=False,
                                aggregation=aggregation[v.aggregation])
                for v in carried]
        self.is_classification = None
        self._sources, self._source_count, self._validation_key = {}, 0, None
        self._task_input_shape = self._task_output_size = None
        self._loss_cache = (None, None)
        self.built = True

    # -- configuration --------------------------------------------------------------------------

    def save(self, filepath, *args, **kwargs):
        """Saves the learner as a `.keras` file (Keras' `Model.save`).

        Args:
            filepath: a path ending in `.keras`.
            *args, **kwargs: passed on to `keras.Model.save`.

        Returns:
            What `keras.Model.save` returns (None).

        Raises:
            ValueError: a legacy HDF5 path (`.h5`, `.hdf5`): Keras writes it, but the
                file cannot be loaded back as a MetaLearner.
        """
        if str(filepath).lower().endswith((".h5", ".hdf5")):
            raise ValueError(
                f"MetaLearner.save({str(filepath)!r}): a MetaLearner saves to the .keras format "
                "only (Keras' legacy .h5 format writes it but cannot load it back); use a "
                "path ending in .keras, learner.save_weights('name.weights.h5') for the "
                "weights alone, or learner.export(...) for a SavedModel")
        return super().save(filepath, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(model=keras.saving.serialize_keras_object(self.model),
                      is_classification=self.is_classification,
                      task_input_shape=self._task_input_shape,
                      task_output_size=self._task_output_size,
                      **{k: v for k, v in self.meta_config.to_dict().items()
                         if k in LEARNER_FIELDS})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        is_classification = config.pop("is_classification", None)
        input_shape = config.pop("task_input_shape", None)
        output_size = config.pop("task_output_size", None)
        # Saved before options of another algorithm were refused: they had no effect.
        config, reset = config_lib.drop_ignored_options(config)
        if reset:
            logging.warning("MetaLearner.from_config: %s reset to the default(s): algorithm=%s "
                            "ignores them", ", ".join(reset), config.get("algorithm", "maml"))
        try:
            functional.check_no_regularization(model)
        except ValueError as e:
            # Saved before such models were refused: loaded as trained, with them left out.
            logging.warning("MetaLearner.from_config: %s. Loading it as it was trained, "
                            "with them left out of fit, adaptation and export", e)
        with functional.keras_losses_ignored():
            learner = cls(model, **config)
        learner.is_classification = is_classification
        learner._task_input_shape = None if input_shape is None else tuple(input_shape)
        learner._task_output_size = output_size
        return learner

    def default_optimizer(self):
        """The algorithm's own outer optimizer (the CLI's): Adam(meta_lr); MAML++'s cosine
        schedule; Reptile's SGD with ε annealed over `num_iterations`."""
        return self.algorithm.make_optimizer(self.meta_config.meta_lr,
                                             self.meta_config.num_iterations)

    def _resolve_auto_jit_compile(self):
        # Keras' "auto" never uses XLA on CPU-only machines, under a distribution
        # strategy, or for layers that do not support it. The CLI's rule uses it where
        # it is faster (dense models on the layer-batched forward, also on CPU) and not
        # for models run task by task, convolutions on CPU (slower) or second-order
        # max-pooling (inexact); both sets of exclusions apply.
        if self._distribute_strategy or not compat.model_supports_jit(self):
            return False
        return experiment_lib.resolve_jit_compile(
            dataclasses.replace(self.meta_config, jit_compile="auto"), self.model,
            self.forward.vectorized)

    # -- the loss -------------------------------------------------------------------------------

    def _task_loss(self, y_true, y_pred):
        loss = getattr(self, "loss", None)
        if self._loss_cache[0] is not loss or self._loss_cache[1] is None:
            self._loss_cache = (loss, keras_task_loss(loss))
        return self._loss_cache[1](y_true, y_pred)

    # -- data -----------------------------------------------------------------------------------

    def _as_dataset(self, data, training):
        """`Episodes` (or a bare task family) as a dataset for Keras' loop.

        One device: a prefetching dataset of meta-batches. Several replicas: a
        dataset of episode indices, sampled inside the step (see `_episode`).
        Anything else (a dataset of `Episode`s) is returned as it is.
        """
        if data is not None and not isinstance(data, Episodes) and hasattr(data, "sample") \
                and not isinstance(data, tf.data.Dataset):
            data = Episodes(data, self.meta_config.meta_batch_size,
                            "train" if training else "val")
        if isinstance(data, Episode) or (isinstance(data, dict)
                                         and set(Episode._fields) <= set(data)):
            # One meta-batch of arrays: a dataset of that one element.
            data = tf.data.Dataset.from_tensors(Episode(*[data[n] for n in Episode._fields])
                                                if isinstance(data, dict) else data)
        if isinstance(data, tf.data.Dataset):
            return self._checked_dataset(data)
        if not isinstance(data, Episodes):
            return data
        if training and data.split != "train":
            raise ValueError(f"fit() trains on Episodes(split='train'), got split={data.split!r}")
        data = data.with_seed(self.meta_config.seed)
        self._note_task_kind(data.tasks)
        data = copy.copy(data)
        data.tasks = self._family(data.tasks)
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas == 1:
            # One device: the episodes come sampled and prefetched by tf.data, beside the
            # meta-step. Training starts at the optimizer's iteration counter, read when
            # Keras creates the iterator (after BackupAndRestore has restored it): a
            # resumed run sees the episodes of an uninterrupted one.
            if training:
                start = self._data_start_variable()
                steps = tf.data.Dataset.from_tensors(0).flat_map(
                    lambda _: tf.data.Dataset.range(start.read_value(), 2**62))
            else:
                steps = tf.data.Dataset.range(data.evaluation_batches())
            outputs = self._num_outputs()

            def sample(index):
                episode = data.sample(index)
                return self._labels_checked(episode, episode, outputs)

            return steps.map(sample, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True).prefetch(tf.data.AUTOTUNE)
        # Several replicas: every replica samples the step's meta-batch inside the step
        # (from the iteration counter when training) and takes its own slice of tasks.
        self._source_count += 1
        key = _SOURCE_KEY + str(self._source_count)
        self._sources = {key: data, **{k: v for k, v in self._sources.items()
                                       if k == self._validation_key}}
        # Evaluation: every replica gets the index of the step's meta-batch.
        indices = tf.data.Dataset.range(2**62 if training else data.evaluation_batches())
        return indices.map(lambda i: {key: tf.fill([replicas], i)})

    def _family(self, tasks):
        """`tasks` as this model takes their inputs: a model declaring an integer input
        gets the images a family scales to [0, 1] back as integer pixels."""
        if self._input_dtype is not None and getattr(tasks, "scales_uint8_inputs", False):
            return _RawPixelTasks(tasks, self._input_dtype)
        return tasks

    def _diverged_at_variable(self):
        """The first training step (1-based) whose meta-loss or gradient was not finite
        (without a strategy), 0 if none: reset when `fit` begins, read by
        `_StopWhenDiverged`."""
        return self._step_variable("_diverged_at", "diverged_at")

    def _divergence_message(self, step):
        outer = ("the meta step size" if self.meta_config.algorithm == "reptile"
                 else "the optimizer's learning rate")
        return (_DIVERGED.replace("{}", str(step)) + ". Lower inner_lr (now "
                f"{self.meta_config.inner_lr:g}) or {outer}, or check the scale of the data")

    def _data_start_variable(self):
        """Where a training pass over `Episodes` starts: set to the optimizer's iteration
        counter when training begins (after `BackupAndRestore` restored it)."""
        return self._step_variable("_data_start", "episodes_start")

    def _step_variable(self, attribute, name):
        """The int64 step variable kept in `attribute`, made (0) on first use: not a
        weight of the learner, so never saved with it."""
        if getattr(self, attribute, None) is None:
            with tf.init_scope():
                setattr(self, attribute, tf.Variable(0, dtype=tf.int64, trainable=False,
                                                     name=name))
        return getattr(self, attribute)

    def _checked_dataset(self, dataset):
        """A user's dataset of meta-batches, checked where it enters.

        The shapes now, from its element spec (against the model's input and
        each other); integer labels of classification losses in every
        element as it is read (in the tf.data pipeline, beside the step: an
        out-of-range label fails `fit` with a one-line error instead of
        training to NaN).
        """
        spec = _as_episode(dataset.element_spec)
        self._check_shapes(*(tf.TensorShape(t.shape) for t in spec))
        self._check_label_kinds([(name, t.dtype, t.shape) for name, t in
                                 (("support_y", spec.support_y), ("query_y", spec.query_y))])
        dataset = dataset.map(_values_checked, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        example_shape = tf.TensorShape(spec.support_x.shape)[2:]
        if (_input_shape(self.model) is None and self._task_input_shape is None
                and example_shape.is_fully_defined()):
            # A subclassed model learns its input shape from the data, as from a task family.
            self._task_input_shape = tuple(example_shape.as_list())
        if any(self._adds_output_axis(t.shape.rank) for t in (spec.support_y, spec.query_y)):
            def add_output_axis(*element):  # one output's targets without its axis
                element = element[0] if len(element) == 1 else element
                episode = _as_episode(element)
                return episode._replace(support_y=self._with_output_axis(episode.support_y),
                                        query_y=self._with_output_axis(episode.query_y))

            dataset = dataset.map(add_output_axis)
        if self._input_dtype is not None and tf.as_dtype(spec.support_x.dtype).is_floating:
            def inputs_checked(*element):
                element = element[0] if len(element) == 1 else element
                episode = _as_episode(element)
                return episode._replace(
                    support_x=_whole_numbers_checked(episode.support_x, self._input_dtype),
                    query_x=_whole_numbers_checked(episode.query_x, self._input_dtype))

            dataset = dataset.map(inputs_checked)
        if not self._labels_index_outputs() or not any(
                t.dtype.is_integer or self._float_labels_are_ids(t.dtype)
                for t in (spec.support_y, spec.query_y)):
            return dataset
        outputs = self._num_outputs(tf.TensorShape(spec.support_x.shape)[2:])

        def check(*element):
            element = element[0] if len(element) == 1 else element
            return self._labels_checked(element, _as_episode(element), outputs)

        return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).prefetch(tf.data.AUTOTUNE)

    def _check_shapes(self, support_x, support_y, query_x, query_y=None, single=False):
        """Raises a one-line ValueError unless task-batched shapes fit the model and each other.

        Args:
            support_x, support_y, query_x, query_y: `tf.TensorShape`s with the
                task axis (`query_y` may be None).
            single: the task axis was added to one task's inputs (messages
                show the shapes without it).

        Raises:
            ValueError: examples that are not of the model's input shape, not
                one label per example, or different task counts.
        """
        def shown(shape):
            return tuple(shape[1:] if single else shape)

        expected = _input_shape(self.model) or self._task_input_shape
        for name, shape in (("support_x", support_x), ("query_x", query_x)):
            if (not single and expected is not None and shape.rank == len(expected) + 1
                    and shape[1:].is_compatible_with(expected)):
                raise ValueError(
                    f"{name} of shape {tuple(shape)} looks like one task's examples: a "
                    f"meta-batch has a leading task axis, [tasks, examples, "
                    f"{', '.join(map(str, expected))}] (batch the tasks, e.g. "
                    f"dataset.batch(meta_batch_size))")
            if expected is not None and not shape[2:].is_compatible_with(expected):
                raise ValueError(f"{name} must hold examples of the model's input shape "
                                 f"{expected}, got {name} of shape {shown(shape)}")
        for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
            if y is not None and not y[:2].is_compatible_with(x[:2]):
                raise ValueError(f"{name}_y must hold one label per {name}_x example, got "
                                 f"{name}_x of shape {shown(x)} and {name}_y of shape "
                                 f"{shown(y)}")
            # Sparse labels index the last output axis: one per position of an example's
            # output (one per example for a classifier), maybe with a trailing 1.
            positions = _output_positions(self.model)
            if (y is not None and self._labels_index_outputs() and y.rank is not None
                    and positions is not None and y.rank > 2
                    and not any(y[2:].is_compatible_with(p)
                                for p in (positions, positions + (1,)))):
                per = f" per output position {positions}" if positions else ""
                raise ValueError(f"{name}_y must hold one integer class label per example"
                                 f"{per}, got {name}_y of shape {shown(y)}")
            # Targets of Keras' elementwise regression losses are compared with the
            # outputs value by value: they must have the outputs' shape.
            # (A single output's axis may be left out: `_with_output_axis` adds it.)
            outputs = _output_example_shape(self.model)
            if (y is not None and y.rank is not None and outputs is not None
                    and not self._labels_index_outputs() and self._loss_compares_elementwise()
                    and not y[2:].is_compatible_with(outputs)
                    and not self._adds_output_axis(y.rank)):
                raise ValueError(f"{name}_y must hold targets of the model's output shape "
                                 f"{outputs} per example, got {name}_y of shape {shown(y)}")
        if support_x.rank is not None and support_x.rank > 1 and support_x[1] == 0:
            raise ValueError("the support set is empty: adaptation needs at least one example")
        if query_x.rank is not None and query_x.rank > 1 and query_x[1] == 0:
            raise ValueError("the query set is empty: give at least one query example per "
                             "task (the meta-loss and the predictions are on the query set)")
        if not single and not query_x[:1].is_compatible_with(support_x[:1]):
            raise ValueError(f"support_x and query_x must hold the same tasks, got "
                             f"{support_x[0]} and {query_x[0]} tasks")

    def _adds_output_axis(self, rank):
        """Whether regression targets of this rank are `[tasks, examples]` of a one-output
        model, to be given the output axis (Keras' elementwise losses only: a custom loss
        gets its targets as they are)."""
        return (rank == 2 and not self._labels_index_outputs()
                and self._loss_compares_elementwise()
                and _output_example_shape(self.model) == (1,))

    def _with_output_axis(self, y):
        """`y` with the output axis `_adds_output_axis` asks for."""
        return y[..., None] if y is not None and self._adds_output_axis(y.shape.rank) else y

    def _loss_compares_elementwise(self):
        """Whether the compiled loss compares predictions with targets of the same shape.

        Keras' regression losses do (a model with another output count would be
        broadcast against the targets, silently); a custom loss may not (a
        Gaussian model's mean and log-variance against one target).
        """
        return self._compiled_loss_name() in ELEMENTWISE_LOSSES

    def _labels_index_outputs(self):
        """Whether integer labels index the model's outputs (classification, sparse labels)."""
        return (bool(self.is_classification)
                or self._compiled_loss_name() == "sparse_categorical_crossentropy")

    def _compiled_loss_name(self):
        """The compiled loss's function name (see `_loss_name`), or None if there is none."""
        try:
            return _loss_name(keras.losses.get(getattr(self, "loss", None)))
        except (ValueError, TypeError):
            return None

    def _outputs_probabilities(self):
        """Whether the model outputs probabilities: its last layer is a softmax, or the
        compiled cross-entropy takes probabilities (Keras' `from_logits=False`: a subclassed
        model, or a softmax in a `Lambda`)."""
        if functional.output_is_softmax(self.model):
            return True
        loss = getattr(self, "loss", None)
        from_logits = getattr(loss, "from_logits", None)
        if isinstance(from_logits, bool):
            return not from_logits
        # Keras' cross-entropy functions by name take probabilities unless told otherwise.
        return self._compiled_loss_name() in ("sparse_categorical_crossentropy",
                                              "categorical_crossentropy")

    def _num_outputs(self, example_shape=None):
        """The model's output size: Keras', or (subclassed) that of one call, or the tasks'."""
        size = _output_size(self.model)
        if size is None and example_shape is None and self._task_input_shape is not None:
            example_shape = tf.TensorShape(self._task_input_shape)
        if size is None and example_shape is not None and example_shape.is_fully_defined():
            dtype = self.algorithm.meta_variables[0].dtype
            y = self.model(tf.zeros([1, *example_shape], dtype), training=False)
            if isinstance(y, (dict, list, tuple)):  # a subclassed model's several outputs
                raise ValueError(_single_output_message(self.model, y))
            size = y.shape[-1]
        return size or self._task_output_size

    def _labels_checked(self, tensors, episode, num_outputs):
        """`tensors` after a check that the episode's integer labels index the model's outputs.

        Only for classification losses with integer labels; eagerly a failed
        check raises at once, in a graph (a tf.data map) when it runs (see
        `tf_maml.tasks.sources.checked`).
        """
        if num_outputs is None or not self._labels_index_outputs():
            return tensors
        try:
            ignore_class = getattr(keras.losses.get(getattr(self, "loss", None)),
                                   "ignore_class", None)
        except (ValueError, TypeError):
            ignore_class = None
        for name in ("support_y", "query_y"):
            y = getattr(episode, name, None)
            if y is None or not (y.dtype.is_integer or self._float_labels_are_ids(y.dtype)):
                continue
            if ignore_class is not None:  # the loss masks these labels out
                y = tf.where(tf.equal(y, tf.cast(ignore_class, y.dtype)), tf.zeros_like(y), y)
            if y.dtype.is_integer:
                low = tf.cast(tf.reduce_min(y), tf.int64)
                high = tf.cast(tf.reduce_max(y), tf.int64)
                message = tf.strings.format(
                    f"{name} labels must be in [0, {num_outputs}), got {{}}",
                    tf.where(low < 0, low, high))
                ok = (low >= 0) & (high < num_outputs)
            else:  # float class ids (Keras casts them): whole numbers in range
                flat = tf.reshape(y, [-1])
                bad = ~((flat >= 0) & (flat < num_outputs) & tf.equal(flat, tf.floor(flat)))
                first = tf.gather(flat, tf.argmax(tf.cast(bad, tf.int32)))
                message = tf.strings.format(
                    f"{name} labels must be whole numbers in [0, {num_outputs}), got {{}}",
                    first)
                ok = ~tf.reduce_any(bad)
            tensors = sources.checked(ok, message, tensors)
        return tensors

    def _check_label_kinds(self, labels):
        """Raises a one-line ValueError for labels the compiled loss cannot take.

        Args:
            labels: `(name, dtype, shape)` of each label tensor, task axis
                included.
        """
        loss_name = self._compiled_loss_name()
        outputs = _output_example_shape(self.model)
        for name, dtype, shape in labels:
            dtype, shape = tf.as_dtype(dtype), tf.TensorShape(shape)
            if not (dtype.is_integer or dtype.is_floating or dtype.is_bool):
                raise ValueError(f"{name} must hold numbers (integer class ids or regression "
                                 f"targets), got {dtype.name}")
            if (loss_name in _ONE_HOT_LOSSES and dtype.is_integer and outputs is not None
                    and shape.rank is not None and shape.rank - 2 == len(outputs) - 1):
                raise ValueError(f"{name} holds integer class ids but {loss_name} takes one-hot "
                                 "labels: use keras.losses.SparseCategoricalCrossentropy (or "
                                 "one-hot the labels)")

    def _float_labels_are_ids(self, dtype):
        """Whether float labels of `dtype` are class ids (a sparse categorical loss; with
        the categorical ones they are one-hot)."""
        return (dtype.is_floating
                and self._compiled_loss_name() == "sparse_categorical_crossentropy")

    def _note_task_kind(self, tasks):
        kind = getattr(tasks, "is_classification", None)
        if kind is not None:
            self.is_classification = bool(kind)
        task_shape = getattr(tasks, "input_shape", None)
        if task_shape is not None:
            self._task_input_shape = task_shape = tuple(task_shape)
        model_shape = _input_shape(self.model)
        if (task_shape is not None and model_shape is not None
                and not tf.TensorShape(task_shape).is_compatible_with(model_shape)):
            raise ValueError(f"the model takes inputs of shape {model_shape} but the tasks' "
                             f"inputs are {task_shape}: build it for input_shape="
                             "tasks.input_shape")
        if kind and self._loss_compares_elementwise():
            raise ValueError(
                f"loss {self._compiled_loss_name()} compares predictions with targets of their "
                "shape, but the tasks are classification (their labels are integer class ids): "
                "compile with a loss that takes labels, e.g. "
                "'sparse_categorical_crossentropy'")
        size = getattr(tasks, "output_size", None)
        if size is not None:
            self._task_output_size = int(size)
        if kind:  # a family's labels are integer class ids, one per example
            self._check_label_kinds([("the task family", tf.int32, [None, None])])
        # A subclassed model's size comes from one call on the tasks' input shape.
        outputs = self._num_outputs() if kind else _output_size(self.model)
        if kind and size is not None and outputs is not None and size != outputs:
            raise ValueError(f"the model outputs {outputs} values but the tasks are "
                             f"{size}-way: give the model {size} outputs (one logit per class)")
        if (kind is False and size is not None and outputs is not None and size != outputs
                and self._loss_compares_elementwise()):
            raise ValueError(f"the model outputs {outputs} values but the tasks' targets have "
                             f"{size}: give the model output_size={size}")

    def _episode(self, data, training):
        """The local (this replica's) meta-batch of a step, and the global task count."""
        source_key = next((k for k in data if k.startswith(_SOURCE_KEY)), None) if isinstance(
            data, dict) else None
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync if replica else 1
        if source_key is None:
            episode = _as_episode(data)
            # uint8 images are scaled to [0, 1], as the task families and adapt_and_predict do.
            episode = episode._replace(support_x=self._model_input(episode.support_x),
                                       query_x=self._model_input(episode.query_x))
            local = tf.shape(episode.support_x)[0]
            if replicas == 1:
                return episode, local, local
            # Keras split the meta-batch over the replicas, maybe unevenly.
            return episode, replica.all_reduce(tf.distribute.ReduceOp.SUM, local), local
        source = self._sources[source_key]
        # Training: the meta-batch of this iteration, as the CLI trainer samples it;
        # evaluation: the meta-batch of the step's index. Each replica adapts its own
        # slice of the tasks.
        index = (self.optimizer.iterations if training
                 else tf.reshape(data[source_key], [-1])[0])
        episode = source.sample(index)
        total = source.meta_batch_size
        if replicas == 1:
            return episode, total, total
        counts = distribute.replica_task_counts(total, replicas)
        offsets = tf.constant([sum(counts[:r]) for r in range(replicas)], tf.int32)
        sizes = tf.constant(counts, tf.int32)
        r = replica.replica_id_in_sync_group
        start, size = offsets[r], sizes[r]
        episode = Episode(*[t[start:start + size] for t in episode])
        return episode, total, size

    # -- steps ----------------------------------------------------------------------------------

    def _meta_variables_order(self):
        """Where each of `trainable_variables` sits in `algorithm.meta_variables`."""
        index = {id(v): i for i, v in enumerate(self.algorithm.meta_variables)}
        return [index[id(v)] for v in self.trainable_variables]

    def train_step(self, data):
        episode, global_tasks, local_tasks = self._episode(data, training=True)
        dtype = self.algorithm.meta_variables[0].dtype
        scale = 1.0 / tf.cast(global_tasks, dtype)
        loss, grads, outputs = self.algorithm.meta_step(episode, scale,
                                                        tf.cast(self.optimizer.iterations,
                                                                tf.int64))
        order = self._meta_variables_order()
        grads = [grads[i] for i in order]
        updates = list(outputs.state_updates or [])
        # A step whose meta-loss or gradient is not finite must not reach the weights:
        # `fit` then stops with a one-line error (`_StopWhenDiverged`) and the weights are
        # those of the last good step (the CLI's trainer keeps its last checkpoint).
        finite = _all_finite([loss, *grads])
        if self.meta_config.meta_gradient_clip:  # on the sum over replicas, as the CLI's
            grads, _ = distribute.clip_meta_gradients(grads,
                                                      self.meta_config.meta_gradient_clip)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Keras' compile wraps the optimizer in one under a mixed_float16 policy; it
            # divides the gradients by its loss scale, which the meta-step did not apply
            # (its own scaling is by the task count): scale them here, exactly (a power of
            # 2), so that the update is the meta-gradient's.
            loss_scale = self.optimizer.dynamic_scale
            grads = [None if g is None else g * tf.cast(loss_scale, g.dtype) for g in grads]

        def update():
            self.optimizer.apply(grads, self.trainable_variables)
            for variable, value in zip(self.algorithm.state_variables, updates):
                variable.assign(value)

        if tf.distribute.has_strategy():
            # A strategy (its optimizer update synchronises replicas, which a tf.cond
            # cannot hold): every replica fails the same step before the update, an
            # in-graph check (a no-op where the step is compiled with XLA, which a
            # strategy does only when asked to; the callback then stops `fit` after it).
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                bad = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                         tf.cast(tf.logical_not(finite), tf.float32))
                finite = tf.equal(bad, 0.0)
            grads = sources.checked(finite, tf.constant(_DIVERGED_IN_GRAPH), grads)
            with tf.control_dependencies(grads):  # the iteration count waits for it too
                update()
        else:
            # No strategy (maybe under XLA, which has no in-graph errors): the update is
            # skipped, the step recorded for the callback.
            diverged_at = self._diverged_at_variable()
            tf.cond(finite & tf.equal(diverged_at, 0), update, lambda: None)
            diverged_at.assign(tf.where(finite | (diverged_at > 0), diverged_at,
                                        tf.cast(self.optimizer.iterations, tf.int64) + 1))
        return self._logs(loss * tf.cast(global_tasks, loss.dtype), local_tasks, episode.query_y,
                          outputs.query_predictions)

    def _logs(self, replica_loss_sum, local_tasks, query_y, predictions):
        # `replica_loss_sum` is the sum of this replica's task losses (its share of the
        # meta-loss times the global task count): its mean, weighted by its task count.
        local = tf.cast(local_tasks, replica_loss_sum.dtype)
        self._loss_tracker.update_state(replica_loss_sum / local, sample_weight=local)
        return self.compute_metrics(None, _flat(query_y), _flat(predictions), None)

    def test_step(self, data):
        episode, _, local_tasks = self._episode(data, training=False)
        predictions = self._adapt_predict(episode.support_x, episode.support_y, episode.query_x,
                                          self.meta_config.num_eval_steps)
        query_losses = self._task_loss(episode.query_y, predictions)
        weight = tf.cast(local_tasks, query_losses.dtype)
        self._loss_tracker.update_state(tf.reduce_mean(query_losses), sample_weight=weight)
        return self.compute_metrics(None, _flat(episode.query_y), _flat(predictions), None)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`: the meta-initialization's predictions for inputs `x`, or,
        for a dataset of `Episode`s (or of dicts with `support_x`, `support_y`,
        `query_x`), the query predictions after `num_eval_steps` inner steps; for
        `Episodes` (one device), those of its `num_batches` meta-batches, stacked."""
        one_device = self.distribute_strategy.num_replicas_in_sync == 1
        if isinstance(x, Episodes) and one_device:
            x = self._as_dataset(x, training=False)  # its evaluation pass: num_batches
        elif _is_family(x):
            raise ValueError(
                "predict takes model inputs, a dataset of Episode meta-batches, or Episodes "
                "(on one device) for adapted query predictions; for a bare task family use "
                "Episodes(tasks, meta_batch_size, split='test', num_batches=...), "
                "adapt_and_predict on its samples, or evaluate_tasks")
        self._check_variables()
        return super().predict(x, *args, **kwargs)

    def predict_step(self, data):
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        if isinstance(data, Episode):
            data = data._asdict()
        if isinstance(data, dict) and {"support_x", "support_y", "query_x"} <= set(data):
            return self._adapt_predict(self._model_input(data["support_x"]), data["support_y"],
                                       self._model_input(data["query_x"]),
                                       self.meta_config.num_eval_steps)
        return self(self._model_input(data), training=False)

    def _model_input(self, x):
        """Inputs as the model takes them: uint8 images scaled to [0, 1] in the weights'
        dtype, as the task families do, unless the model declares an integer input (token
        ids, or raw pixels it rescales itself), which it then gets unscaled."""
        return _model_input(x, self._input_dtype or self.algorithm.meta_variables[0].dtype)

    def call(self, x, training=False):
        """The meta-initialization's predictions (no adaptation); uint8 images scaled as
        `predict` scales them."""
        if isinstance(x, (tf.Tensor, np.ndarray)):
            x = self._model_input(x)
        return self.model(x, training=training)

    # -- adaptation -----------------------------------------------------------------------------

    def _adapt_predict(self, support_x, support_y, query_x, num_steps, inner_lr=None):
        """Query predictions after `num_steps` first-order inner steps (a graph loop)."""
        params = [tf.convert_to_tensor(v) for v in self.algorithm.meta_variables]
        steps = tf.convert_to_tensor(num_steps, tf.int32)
        adapted, _ = self.algorithm.adapt(params, support_x, support_y, steps, first_order=True,
                                          inner_lr=inner_lr)
        return self.algorithm.predict(params, adapted, query_x, steps)

    def adapt_and_predict(self, support_x, support_y, query_x, num_steps=None, inner_lr=None):
        """Adapts to support sets and predicts their query inputs.

        Args:
            support_x: one task's support inputs `[k, ...]`, or tasks'
                `[num_tasks, k, ...]`.
            support_y: their labels/targets.
            query_x: the query inputs `[q, ...]` (or `[num_tasks, q, ...]`).
            num_steps: inner steps (default `num_eval_steps`).
            inner_lr: a scalar step size replacing the algorithm's own rates
                (default: the algorithm's, learned ones included).

        Returns:
            A numpy array of query predictions, with a task axis iff the
            inputs had one.

        Raises:
            ValueError: the learner is not compiled, inputs that do not fit the
                model or each other, NaN or infinite inputs, an empty support
                set, a negative or non-finite `inner_lr`, (classification)
                labels outside `[0, outputs)`, or an adaptation that diverged
                (non-finite predictions), as the exported `adapt` refuses them.
        """
        self._check_compiled()
        input_shape = _input_shape(self.model) or self._task_input_shape
        if input_shape is None:
            # A subclassed model never fitted: the request's own examples, if they have the
            # shape of the batch the model was built on.
            built = _first_call_example_shape(self.model)
            x = tf.convert_to_tensor(support_x)
            if built is not None and x.shape.rank in (len(built) + 1, len(built) + 2) and (
                    tuple(x.shape[-len(built):]) == built):
                input_shape = built
        if input_shape is None:
            raise ValueError("the model's input shape is unknown (a subclassed model): fit or "
                             "evaluate it on a task family or a dataset of episodes first")
        input_rank = len(input_shape) + 1  # batch axis included
        dtype = self.algorithm.meta_variables[0].dtype
        support_x, query_x = self._model_input(support_x), self._model_input(query_x)
        single = support_x.shape.rank == input_rank
        if not single and support_x.shape.rank != input_rank + 1:
            shape = ", ".join(map(str, input_shape))
            raise ValueError(f"support_x must be [k, {shape}] or have a leading task axis, got "
                             f"shape {support_x.shape}")
        support_y = tf.convert_to_tensor(support_y)
        self._check_label_kinds([("support_y", support_y.dtype,
                                  [1, *support_y.shape] if single else support_y.shape)])
        if single:
            support_x, support_y, query_x = support_x[None], support_y[None], query_x[None]
        self._check_shapes(support_x.shape, support_y.shape, query_x.shape, single=single)
        support_y = self._with_output_axis(support_y)
        if self._labels_index_outputs():
            support_y = self._labels_checked(support_y, Episode(None, support_y, None, None),
                                             self._num_outputs(support_x.shape[2:]))
        if not self.is_classification and support_y.dtype != dtype:
            support_y = tf.cast(support_y, dtype)
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(
                num_steps, (int, np.integer)) or num_steps < 0):
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        steps = self.meta_config.num_eval_steps if num_steps is None else int(num_steps)
        if support_x.shape[1] == 0:
            raise ValueError("the support set is empty: adaptation needs at least one example")
        if inner_lr is not None:
            try:
                value = None if isinstance(inner_lr, bool) else float(inner_lr)
            except (TypeError, ValueError):
                value = None
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr!r}")
        for name, t in (("support_x", support_x), ("support_y", support_y),
                        ("query_x", query_x)):
            if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
                raise ValueError(f"{name} holds NaN or infinite values")
        predictions = _compiled_adapt(self, inner_lr is not None)(
            support_x, support_y, query_x, tf.constant(steps, tf.int32),
            tf.constant(0.0 if inner_lr is None else value, dtype))
        predictions = predictions.numpy()
        if np.issubdtype(predictions.dtype, np.floating) and not np.isfinite(predictions).all():
            raise ValueError("the adaptation diverged: predictions are not finite (inputs far "
                             "from the scale of the training data, or a step size too large "
                             "for them?)")
        return predictions[0] if single else predictions

    # -- evaluation with the CLI's protocol -----------------------------------------------------

    def evaluate_tasks(self, tasks, num_tasks=600, split="test", num_steps=None, metric=None,
                       seed=None, batch_size=None):
        """The CLI's evaluation: the metric after 0..`num_steps` inner steps on held-out tasks.

        Args:
            tasks: a task family.
            num_tasks: held-out tasks (600 in the paper).
            split: "test" or "val".
            num_steps: inner steps (default `num_eval_steps`).
            metric: "accuracy", "mse" or a per-task function `(y_true, y_pred)
                -> [num_tasks]` (default: accuracy for classification, else mse).
            seed: default: the learner's `seed` (so every model evaluated with
                one seed sees the same tasks, as in the CLI).
            batch_size: tasks per call (default 100).

        Returns:
            A dict: `steps` (0..num_steps), `mean` and `ci95` (1.96·std/√n) of
            the metric after each step, and `metric` (its name).

        Raises:
            ValueError: the learner is not compiled, `tasks` is not a task
                family (an `Episodes` passes its family), tasks that do not fit
                the model, a bad `split`, `metric`, `num_tasks` or `num_steps`.
        """
        self._check_compiled()
        if isinstance(tasks, Episodes):
            tasks = tasks.tasks
        if not hasattr(tasks, "sample"):
            raise ValueError(f"tasks must be a task family with a sample() method (see "
                             f"tf_maml.tasks), got {type(tasks).__name__}")
        sizes = dict(num_tasks=num_tasks, batch_size=batch_size)
        check_positive_ints("evaluate_tasks", **{k: v for k, v in sizes.items() if v is not None})
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(
                num_steps, (int, np.integer)) or num_steps < 0):
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        self._note_task_kind(tasks)
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if metric is None:
            metric = "accuracy" if getattr(tasks, "is_classification", False) else "mse"
        names = {"accuracy": losses.accuracy, "mse": losses.mean_squared_error}
        if isinstance(metric, str):
            if metric not in names:
                raise ValueError(f"metric must be 'accuracy', 'mse' or a function, got {metric!r}")
            metric_name, metric_fn = metric, names[metric]
        elif callable(metric):
            metric_name, metric_fn = getattr(metric, "__name__", "metric"), _per_task(metric)
        else:
            raise ValueError(f"metric must be 'accuracy', 'mse' or a function, got {metric!r}")
        num_steps = self.meta_config.num_eval_steps if num_steps is None else num_steps
        curve = evaluation.make_curve_fn(
            self.algorithm, metric_fn, num_steps, transductive=self.meta_config.transductive,
            transductive_support=self.meta_config.transductive_support)
        stream = tasks_lib.VALIDATION if split == "val" else tasks_lib.TEST
        with _one_line_errors():
            per_task = evaluation.evaluate_model(
                curve, self.algorithm.meta_variables, self._family(tasks),
                self.meta_config.seed if seed is None else seed, num_tasks, stream, batch_size)
        mean, ci95 = evaluation.summarize(per_task)
        return {"metric": metric_name, "steps": list(range(num_steps + 1)),
                "mean": [float(m) for m in mean], "ci95": [float(c) for c in ci95]}

    # -- fit / evaluate: task families become episode indices -----------------------------------

    def fit(self, x=None, y=None, validation_data=None, **kwargs):
        """`keras.Model.fit` over meta-batches (`Episodes`, or a dataset of `Episode`s).

        `y` must be `None`: labels are inside the episodes. Everything else is
        Keras' (`epochs`, `steps_per_epoch`, `callbacks`, `initial_epoch`, ...).
        """
        if y is not None:
            raise ValueError("MetaLearner.fit takes meta-batches (the labels are inside them); "
                             "y must be None")
        for name in ("class_weight", "sample_weight"):
            if kwargs.get(name) is not None:
                raise ValueError(f"MetaLearner.fit does not take {name}: every task counts "
                                 "once in the meta-loss (weight examples in a custom loss)")
        if kwargs.get("batch_size") is not None:
            raise ValueError("MetaLearner.fit does not take batch_size: a meta-batch holds "
                             "Episodes(tasks, meta_batch_size) tasks (or is one element of "
                             "a dataset of meta-batches)")
        if kwargs.get("validation_split"):
            raise ValueError("MetaLearner.fit does not take validation_split: pass "
                             "validation_data=Episodes(tasks, meta_batch_size, split='val')")
        if _is_family(x) and kwargs.get("steps_per_epoch") is None:
            raise ValueError("fit over Episodes (or a task family) needs steps_per_epoch: "
                             "training episodes never run out, so an epoch would never end")
        self._check_compiled()
        self._validation_key = None
        if validation_data is not None:
            validation_data = self._as_dataset(validation_data, training=False)
            self._validation_key = (next(iter(self._sources), None)
                                    if self.distribute_strategy.num_replicas_in_sync > 1
                                    else None)
        x = self._as_dataset(x, training=True)
        kwargs.setdefault("shuffle", False)  # episodes are sampled, never shuffled
        # Last, so that it runs after BackupAndRestore has restored the counter.
        self._diverged_at_variable()
        if (isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
                and not self.optimizer.built):
            # Its loss scale is a variable of the built optimizer (`train_step` reads it).
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [_StartAtIteration(),
                                                                     _StopWhenDiverged()]
        self._check_backups(kwargs["callbacks"])
        with _one_line_errors():
            self._build_metrics(x)
            try:
                return super().fit(x, validation_data=validation_data, **kwargs)
            except tf.errors.OpError as e:
                if sources.user_error(e) == _DIVERGED_IN_GRAPH:  # a strategy's step
                    step = int(self.optimizer.iterations.numpy()) + 1
                    raise ValueError(self._divergence_message(step)) from None
                raise

    def _check_backups(self, callbacks):
        """Refuses to resume a `BackupAndRestore` backup made by another learner.

        Keras restores whatever weights the backup holds if they fit: a rerun
        with another algorithm or inner rate went on from the old run's weights
        and optimizer, silently (and another head size failed in Keras' loader).
        Beside a new backup this writes what the learner computes (its options,
        as the CLI's resume check reads them, and its weights' shapes), and
        compares it with a backup's before Keras restores it.
        """
        identity = {"config": config_lib.as_stored(self.meta_config).to_dict(),
                    "weight_shapes": [list(v.shape) for v in self.weights]}
        for callback in callbacks:
            if not isinstance(callback, keras.callbacks.BackupAndRestore):
                continue
            try:
                backup_dir = os.fspath(callback.backup_dir)
            except (AttributeError, TypeError):
                continue
            if "://" in backup_dir:  # a remote directory: Keras' own checks only
                continue
            path = os.path.join(backup_dir, "tf_maml_learner.json")
            backup = getattr(callback, "_weights_path", None)
            if not (backup and os.path.exists(backup)):
                os.makedirs(backup_dir, exist_ok=True)
                files.write_json(path, identity, indent=1)
                continue
            try:
                with open(path) as f:
                    saved = json.load(f)
                saved_config = config_lib.Config.from_dict(saved["config"])
                before = saved["weight_shapes"]
            except FileNotFoundError:
                continue  # a backup of something else: Keras' own checks only
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} is damaged: remove the backup directory "
                                 f"{backup_dir} to start anew") from None
            changed = config_lib.resume_changes(saved_config, self.meta_config)
            after = identity["weight_shapes"]
            if before != after:
                changed.append(f"the model's weights: {len(before)} tensors of shapes "
                               f"{before[:6]} -> {len(after)} of {after[:6]}")
            if changed:
                raise ValueError(
                    f"BackupAndRestore's directory {backup_dir} holds the backup of a learner "
                    f"with another configuration ({'; '.join(changed)}). Use another backup "
                    "directory, or the same learner to resume.")

    def evaluate(self, x=None, y=None, **kwargs):
        """`keras.Model.evaluate`: the loss and compiled metrics after `num_eval_steps` steps."""
        if y is not None:
            raise ValueError("MetaLearner.evaluate takes meta-batches; y must be None")
        with _one_line_errors():
            if not kwargs.get("_use_cached_eval_dataset"):
                self._check_compiled()
                self._validation_key = None
                x = self._as_dataset(x, training=False)
                self._build_metrics(x)
            return super().evaluate(x, **kwargs)

    def _build_metrics(self, dataset):
        """Builds the compiled metrics from one meta-batch's query set.

        Keras builds them from the first element of the data, which it takes
        for `(x, y)`; here an element is a meta-batch (or an episode index),
        so the query labels and the model's predictions build them instead.
        """
        metrics, loss = self._compile_metrics, self._compile_loss
        if (metrics is None or metrics.built) and (loss is None or loss.built):
            return
        if isinstance(dataset, tf.data.Dataset):
            element = next(iter(dataset), None)
            if element is None:
                raise ValueError("the dataset is empty: it holds no meta-batch")
        else:
            element = dataset
        if isinstance(element, dict) and any(k.startswith(_SOURCE_KEY) for k in element):
            key = next(k for k in element if k.startswith(_SOURCE_KEY))
            episode = self._sources[key].sample(0)
        else:
            episode = _as_episode(element)
        y_true = _flat(episode.query_y)
        with self.distribute_strategy.scope():
            y_pred = self.model(_flat(episode.query_x)[:1], training=False)
            y_pred = tf.zeros(tf.concat([tf.shape(y_true)[:1], tf.shape(y_pred)[1:]], 0),
                              y_pred.dtype)
            for each in (metrics, loss):
                if each is not None and not each.built:
                    each.build(y_true, y_pred)

    def _check_variables(self):
        if len(self.model.trainable_variables) != self.algorithm.num_model_weights:
            raise ValueError(
                f"the model has {len(self.model.trainable_variables)} trainable weights now but "
                f"had {self.algorithm.num_model_weights} when the MetaLearner was built: set "
                "`trainable` on layers before wrapping the model")

    def _check_compiled(self):
        if not self.compiled:
            raise ValueError("compile the MetaLearner first: learner.compile(optimizer=..., "
                             "loss=..., metrics=[...])")
        keras_task_loss(getattr(self, "loss", None))  # a clear error for a missing/bad loss
        self._check_variables()
        if (not getattr(self, "_warned_logits", False) and self._outputs_probabilities()
                and functional.output_is_linear(self.model)):
            self._warned_logits = True
            logging.warning(
                "the model's last layer has a linear activation (it outputs logits), but the "
                "compiled loss %s takes probabilities (from_logits=False): the loss, the "
                "adaptation and the export's `probabilities` would be wrong. Compile with e.g. "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True), or end the "
                "model with a softmax", self._compiled_loss_name())

    # -- saving ---------------------------------------------------------------------------------

    def experiment(self, input_shape=None, output_size=None, is_classification=None):
        """The learner as a `tf_maml.experiment.Experiment` (for `tf_maml.serving`)."""
        if is_classification is None:
            is_classification = self.is_classification
        if is_classification is None:
            # What the compiled loss says: integer class ids, or targets compared value by
            # value; a custom loss could be either.
            name = self._compiled_loss_name()
            is_classification = {"sparse_categorical_crossentropy": True,
                                 **{n: False for n in ELEMENTWISE_LOSSES}}.get(name)
        if is_classification is None:
            raise ValueError("say whether the model classifies: export(..., "
                             "is_classification=True/False) (it is known after fit or "
                             "evaluate on a task family, or from a Keras sparse categorical "
                             "or regression loss)")
        input_shape = (input_shape or _input_shape(self.model) or self._task_input_shape
                       or _first_call_example_shape(self.model))
        output_size = output_size or _output_size(self.model) or self._task_output_size
        if output_size is None and input_shape is not None:  # a subclassed model: one call
            output_size = self._num_outputs(tf.TensorShape(input_shape))
        if input_shape is None or output_size is None:
            raise ValueError("the model's input shape or output size is unknown (a subclassed "
                             "model): fit it on a task family first")
        spec = tasks_lib.TaskSpec(input_shape, output_size, bool(is_classification))
        _, metric_fn, metric_name = losses.for_tasks(spec)
        return experiment_lib.Experiment(self.meta_config, None, spec, self.model, self.forward,
                                         self._task_loss, metric_fn, metric_name, self.algorithm)

    def export(self, export_dir, version=1, num_eval_steps=None, inner_lr=None, overwrite=False,
               limits=None, is_classification=None, image_format=None):
        """Writes the SavedModel the export CLI writes, to `<export_dir>/<version>/`.

        The signatures (`serving_default`, `adapt`, `adapt_custom`,
        `adapted_weights`, `adapt_tasks`, `adapt_tasks_custom`; see
        `tf_maml.serving`) adapt with the learner's algorithm (learned rates
        included) for `num_eval_steps` steps.

        Args:
            export_dir: TF Serving's base path for the model.
            version: positive integer.
            num_eval_steps: inner steps of `adapt` (default the learner's).
            inner_lr: a scalar step size replacing the algorithm's rates.
            overwrite: replace an existing version.
            limits: a dict of `tf_maml.serving.ServingLimits` fields.
            is_classification: needed only if no task family has been seen
                and the compiled loss is neither Keras' sparse categorical
                cross-entropy nor one of its regression losses.
            image_format: a `tf_maml.serving.ImageFormat` to add the image
                signatures.

        Returns:
            The version's path.

        Raises:
            ValueError: the learner is not compiled, its model's input shape or
                output size is unknown (a subclassed model neither called on a
                batch nor fitted),
                non-finite weights, bad limits, or the version exists.
        """
        if self.compiled:
            keras_task_loss(getattr(self, "loss", None))
        else:
            raise ValueError("compile the MetaLearner (its loss is the adaptation's loss) "
                             "before exporting it")
        self._check_variables()
        steps = self.meta_config.num_eval_steps if num_eval_steps is None else num_eval_steps
        return serving.export(self.experiment(is_classification=is_classification), export_dir,
                              version, steps, inner_lr, overwrite=overwrite, limits=limits,
                              image_format=image_format,
                              outputs_probabilities=self._outputs_probabilities())


class _StartAtIteration(keras.callbacks.Callback):
    """Points the training episodes at the optimizer's iteration when training begins."""

    def on_train_begin(self, logs=None):
        start = getattr(self.model, "_data_start", None)
        if start is not None:
            start.assign(tf.cast(self.model.optimizer.iterations, tf.int64))


def _per_task(metric):
    """A user's metric `(y_true, y_pred) -> [num_tasks]`, its result's shape checked when
    traced (a per-example or scalar result would fail later, inside numpy)."""
    name = getattr(metric, "__name__", type(metric).__name__)

    def checked(y_true, y_pred):
        values = tf.convert_to_tensor(metric(y_true, y_pred))
        tasks = y_pred.shape[:1]
        if values.shape.rank != 1 or not values.shape[:1].is_compatible_with(tasks):
            raise ValueError(
                f"metric {name} must return one value per task, shape [num_tasks] (here "
                f"{tasks[0]}), got shape {values.shape.as_list()}; it takes y_true and y_pred "
                f"of shape [num_tasks, num_query, ...] (here {y_pred.shape.as_list()}): reduce "
                "over the query examples, e.g. tf.reduce_mean(..., axis=1)")
        if not (values.dtype.is_floating or values.dtype.is_integer or values.dtype == tf.bool):
            raise ValueError(f"metric {name} must return numbers, got {values.dtype.name}")
        return values if values.dtype.is_floating else tf.cast(values, y_pred.dtype)

    return checked


def _values_checked(*element):
    """A user's meta-batch, after checks that its support and query sets are not empty and its
    float tensors are finite (a NaN would otherwise train every weight to NaN)."""
    element = element[0] if len(element) == 1 else element
    episode = _as_episode(element)
    checks = [(tf.shape(episode.support_x)[1] > 0,
               "a meta-batch has empty support sets (support_x of shape [tasks, 0, ...]): "
               "adaptation needs at least one example per task")]
    if episode.query_x is not None:
        checks.append((tf.shape(episode.query_x)[1] > 0,
                       "a meta-batch has empty query sets (query_x of shape [tasks, 0, ...]): "
                       "the meta-loss needs at least one query example per task"))
    for name in Episode._fields:
        t = getattr(episode, name)
        if t is not None and t.dtype.is_floating:
            checks.append((tf.reduce_all(tf.math.is_finite(t)),
                           f"{name} holds NaN or infinite values (in a meta-batch of the dataset)"))
    for ok, message in checks:
        element = sources.checked(ok, tf.constant(message), element)
    return element


def _single_output_message(model, outputs):
    count = len(tf.nest.flatten(outputs))
    kind = type(outputs).__name__
    what = f"a {kind} of one output" if count == 1 else f"a {kind} of {count} outputs"
    return (f"MetaLearner needs a model that returns a single tensor; model {model.name!r} "
            f"returns {what}. Wrap it in a model that returns the tensor to adapt (e.g. "
            "keras.Model(model.input, model.outputs[0]))")


class _StopWhenDiverged(keras.callbacks.Callback):
    """Stops `fit` with a one-line error at a step whose meta-loss or gradient was not
    finite (its update was skipped, so the weights are those of the step before)."""

    def on_train_begin(self, logs=None):
        self.model._diverged_at_variable().assign(0)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model._diverged_at_variable().numpy())
        if step:
            raise ValueError(self.model._divergence_message(step))
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            # Only where the checks above cannot run (a strategy's step forced under XLA).
            step = int(self.model.optimizer.iterations.numpy())
            raise ValueError(f"meta-training diverged by step {step}: the meta-loss is not "
                             "finite, and so may be the weights. Lower "
                             f"inner_lr (now {self.model.meta_config.inner_lr:g}) or the "
                             "optimizer's learning rate")


_DIVERGED = ("meta-training diverged at step {}: the meta-loss or its gradient is not "
             "finite; the update was not applied, so the weights are those of the step before")
# In a graph (no string formatting: it would keep the step from compiling with XLA); `fit`
# adds the step.
_DIVERGED_IN_GRAPH = _DIVERGED.replace(" at step {}", "")


def _all_finite(tensors):
    """Whether every element of every (non-None) tensor is finite: a scalar bool tensor."""
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t))
                                   for t in tensors if t is not None]))


@contextlib.contextmanager
def _one_line_errors():
    """Re-raises a user mistake found inside a graph or the input pipeline (a failed
    `tf_maml.tasks.sources.checked`) as its one-line ValueError, without TensorFlow's trace."""
    try:
        yield
    except tf.errors.OpError as e:
        message = sources.user_error(e)
        if message is None:
            raise
        raise ValueError(message) from None


# Keras' losses that take one-hot labels (integer class ids need the sparse one).
_ONE_HOT_LOSSES = ("categorical_crossentropy", "categorical_focal_crossentropy")

# Keras' losses that compare predictions and targets element by element.
ELEMENTWISE_LOSSES = ("mean_squared_error", "mean_absolute_error",
                      "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
                      "huber", "log_cosh", "cosine_similarity")


def _loss_name(loss):
    """A Keras loss's function name (`keras.losses.SparseCategoricalCrossentropy` wraps one)."""
    return getattr(getattr(loss, "fn", loss), "__name__", type(loss).__name__)


def _compiled_adapt(learner, use_lr):
    cache = learner.__dict__.setdefault("_adapt_fns", {})
    if use_lr not in cache:
        def fn(support_x, support_y, query_x, steps, inner_lr):
            return learner._adapt_predict(support_x, support_y, query_x, steps,
                                          inner_lr if use_lr else None)
        cache[use_lr] = tf.function(fn, autograph=False)
    return cache[use_lr]


def _input_shape(model):
    """One example's input shape, or `None` where Keras does not know it (subclassed)."""
    try:
        return tuple(model.input_shape[1:])
    except (AttributeError, ValueError):
        return None


def _first_call_example_shape(model):
    """One example's shape in the batch a subclassed model was first called on, or `None`.

    Only a last resort (before any task family or dataset has shown the shape): a
    shape-agnostic model (global pooling, a recurrent net) may have been built on a dummy
    batch of another shape than its tasks'.
    """
    shape = compat.first_call_input_shape(model)
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    return shape[1:]


def _output_positions(model):
    """The output shape of one example without its last (class) axis, or `None` if unknown."""
    try:
        return tuple(model.output_shape[1:-1])
    except (AttributeError, ValueError, TypeError):
        return None


def _output_example_shape(model):
    """One example's output shape, or `None` where Keras does not know it (subclassed)."""
    try:
        return tuple(model.output_shape[1:])
    except (AttributeError, ValueError, TypeError):
        return None


def _output_size(model):
    """The model's output size (last axis), or `None` where Keras does not know it."""
    try:
        return model.output_shape[-1]
    except (AttributeError, ValueError):
        return None


def _model_input(x, dtype):
    """Inputs as `dtype`; uint8 images scaled to [0, 1] as the task families do, unless
    `dtype` is an integer type (the model takes integers itself)."""
    x = tf.convert_to_tensor(x)
    dtype = tf.as_dtype(dtype)
    if x.dtype == tf.uint8 and not dtype.is_integer:
        return tf.cast(x, dtype) / 255
    if dtype.is_integer and x.dtype.is_floating and tf.executing_eagerly():
        x = _whole_numbers_checked(x, dtype)
    return tf.cast(x, dtype)


def _whole_numbers_checked(x, dtype):
    """Float inputs `x` of a model declaring integer inputs, after a check that casting them
    to `dtype` loses nothing (images scaled to [0, 1] would become zeros)."""
    ok = tf.reduce_all(tf.equal(x, tf.round(x)))
    return sources.checked(ok, tf.constant(
        f"the model takes {dtype.name} inputs but got non-integer values (images scaled to "
        "[0, 1]? a model declaring an integer input gets pixels 0-255 or ids)"), x)


def _flat(t):
    """`[num_tasks, batch, ...]` -> `[num_tasks * batch, ...]` (what Keras metrics read)."""
    return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
