"""Assembling a run from its config, and restoring a trained one.

Used by training, evaluation, export and the benchmarks alike; none of them
needs the training loop to get a model back. Restoring needs no data: the model
is built from the config's task spec (`tf_maml.tasks.spec`), and the task
family is loaded only when asked for (evaluation).
"""

import dataclasses
import json
import os
import re

import keras
import tensorflow as tf
from absl import logging

from tf_maml import algorithms, compat, files, functional, losses, models
from tf_maml import config as config_lib
from tf_maml import tasks as tasks_lib
from tf_maml.tasks import sources

__all__ = ["Experiment", "build_experiment", "restore", "make_checkpoint", "save_spec", "load_spec",
           "resolve_jit_compile", "checkpoint_paths", "restore_latest", "check_readable",
           "indexed_checkpoint", "check_writable", "error_text", "CheckpointError",
           "save_data_fingerprint", "check_same_data", "check_same_spec", "CHECKPOINT_SUBDIR",
           "DATA_FILENAME", "read_data_fingerprint", "compare_data_fingerprints"]

CHECKPOINT_SUBDIR = "checkpoints"
SPEC_FILENAME = "task_spec.json"
# The run's data as `tasks.data_fingerprint` sees it: resuming and evaluating must find the same.
DATA_FILENAME = "data_fingerprint.json"


@dataclasses.dataclass
class Experiment:
    """What a config builds.

    Attributes:
        config: the `Config`.
        tasks: the task family (`None` when built without data); for RL
            datasets, the environment (e.g. `tf_maml.rl.Navigation2D`).
        spec: the `TaskSpec` (input shape, output size, classification);
            `None` for RL datasets.
        model: the Keras model; its weights are the meta-initialization θ.
        forward: its task-batched functional forward.
        loss_fn, metric_fn, metric_name: per-task loss and reported metric
            (RL: `None`, `None`, "return").
        algorithm: the algorithm (`tf_maml.algorithms`, or `tf_maml.rl.MAMLRL`
            whose model is the policy's mean network), which owns any
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


def build_experiment(config, tasks=None, load_tasks=True, spec=None, simulate=True):
    """Builds the model (seeded by `config.seed`), its forward, loss, metric and algorithm.

    Args:
        config: a `Config`.
        tasks: a task family to use instead of the config's.
        load_tasks: build the config's task family (loads data); false builds
            only what the model needs (export, restore without evaluation).
        spec: the `TaskSpec` to build the model for when no task family is
            given or loaded (default: derived from the config).
        simulate: RL: the environment will be stepped (false: a policy export,
            which needs only its sizes, builds a HalfCheetah run without
            Gymnasium and MuJoCo).

    Returns:
        An `Experiment`.

    Raises:
        ValueError: invalid config, or bad data.
    """
    config.validate()
    if config.is_rl:
        return _build_rl_experiment(config, simulate)
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


def _build_rl_experiment(config, simulate=True):
    """The meta-RL run of a config: environment, Gaussian MLP policy, `MAMLRL`."""
    from tf_maml import rl  # noqa: PLC0415 -- only RL runs need it

    if config.dataset == "navigation2d":
        env = rl.Navigation2D(horizon=config.horizon or 100, goal_radius=config.goal_radius or None,
                              normalized_actions=config.normalized_actions)
    else:   # halfcheetah_velocity, halfcheetah_direction (Gymnasium + MuJoCo)
        env = rl.HalfCheetahGoals(config.dataset.split("_")[1], horizon=config.horizon or 200,
                                  rllab_halfcheetah=config.rllab_halfcheetah,
                                  simulate=simulate)
    if config.goal_observed:
        env = rl.GoalObserved(env)
    keras.utils.set_random_seed(config.seed)
    model = rl.gaussian_mlp_policy(
        env.observation_dim, env.action_dim,
        output_bound=getattr(env, "action_bound", 1.0) if config.policy_output == "tanh" else None)
    algorithm = rl.MAMLRL(
        env, model, meta_batch_size=config.meta_batch_size,
        fast_batch_size=config.fast_batch_size, inner_lr=config.inner_lr,
        num_inner_steps=config.num_inner_steps, first_order=config.first_order,
        gamma=config.gamma, gae_lambda=config.gae_lambda, outer=config.outer_optimizer,
        max_kl=config.max_kl, cg_iterations=config.cg_iterations, cg_damping=config.cg_damping,
        backtrack_ratio=config.backtrack_ratio, max_backtracks=config.max_backtracks,
        meta_lr=config.meta_lr, horizon=config.horizon or None, seed=config.seed,
        sample_by_steps=config.sample_by_steps)
    return Experiment(config, env, None, model, algorithm.forward, None, None, "return",
                      algorithm)


def save_spec(spec, model_dir):
    """Records the model's input shape and output size beside the config (for restoring)."""
    files.write_json(os.path.join(model_dir, SPEC_FILENAME),
                     {"input_shape": list(spec.input_shape), "output_size": spec.output_size,
                      "is_classification": spec.is_classification})


def save_data_fingerprint(fingerprint, model_dir):
    """Records the run's data (`tasks.data_fingerprint`) beside its config."""
    files.write_json(os.path.join(model_dir, DATA_FILENAME), fingerprint, indent=1)


def check_same_data(model_dir, fingerprint, data_dir):
    """Refuses data other than the run's own: other or added classes, moved examples.

    `data_dir` may change (the data moved), but the classes of each split must
    be the ones the run was trained on: others would redraw the class split
    and put meta-test classes into meta-training (or training classes into a
    meta-test). Runs without the record (from before it was kept, or whose file
    was removed) are not checked, with a warning; resuming one records the data
    it resumes on.

    Args:
        model_dir: the run.
        fingerprint: `tasks.data_fingerprint` of the data found now (None: no check).
        data_dir: where that data was read, for the message.

    Returns:
        Whether the data was checked against a readable record.

    Raises:
        ValueError: the data differs from the recorded one.
    """
    path = os.path.join(model_dir, DATA_FILENAME)
    if fingerprint is None:
        return False
    if not os.path.exists(path):
        # A run from before the record, or one whose record was removed: say so, never silently.
        logging.warning("%s has no %s: the data at data_dir=%r cannot be checked against the "
                        "data the run was trained on", model_dir, DATA_FILENAME, data_dir)
        return False
    saved = read_data_fingerprint(path)
    if saved is None:
        return False
    compare_data_fingerprints(saved, fingerprint, data_dir, f"the run in {model_dir}", path,
                              "Use the run's own data, or train in a new --model_dir")
    return True


def read_data_fingerprint(path):
    """The data record at `path` (`save_data_fingerprint`), or None (warned) if unreadable."""
    keys = ("classes", "examples", "names", "counts")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not (isinstance(saved, dict) and all(isinstance(v, dict) and set(v) == set(keys)
                                                for v in saved.values())):
            raise ValueError("unexpected structure")
    except (OSError, ValueError) as e:
        logging.warning("%s is unreadable (%s); the run's data is not checked", path, e)
        return None
    return saved


def compare_data_fingerprints(saved, fingerprint, data_dir, whose, path, advice):
    """Raises `ValueError` naming the differences unless the fingerprints are equal."""
    if saved == fingerprint:
        return
    differences = []
    for split in sorted(set(saved) | set(fingerprint)):
        before, now = saved.get(split), fingerprint.get(split)
        if before is None or now is None:
            differences.append(f"split {split} {'added' if before is None else 'missing'}")
        elif before != now:
            what = [f"{before[k]} -> {now[k]} {k}" for k in ("classes", "examples")
                    if before[k] != now[k]]
            if not what:
                what = ["other class names" if before["names"] != now["names"]
                        else "other examples per class"]
            differences.append(f"{split}: {', '.join(what)}")
    raise ValueError(
        f"the data at data_dir={data_dir!r} is not the data {whose} was trained on "
        f"({'; '.join(differences)}; recorded in {path}). {advice}")


def load_spec(model_dir, config):
    """The `TaskSpec` a run was trained with (recorded, or derived from its config; RL: None)."""
    if config.is_rl:
        return None
    path = os.path.join(model_dir, SPEC_FILENAME)
    if not os.path.exists(path):
        return tasks_lib.spec(config)
    try:
        return _read_spec(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        try:
            derived = tasks_lib.spec(config)
        except ValueError:
            raise ValueError(f"{path} is unreadable ({reason}): it records the input shape and "
                             "output size of the run's model, which its config cannot tell for "
                             f"dataset {config.dataset}; restore the file") from None
        logging.warning("%s is unreadable (%s); using the config's inputs of shape %s and %d "
                        "outputs", path, reason, tuple(derived.input_shape), derived.output_size)
        return derived


def _read_spec(path):
    """The `TaskSpec` in `path`; raises on a file that does not hold one."""
    with open(path) as f:
        values = json.load(f)
    shape, size = values["input_shape"], values["output_size"]
    if not (isinstance(shape, list) and shape and all(_positive_int(d) for d in shape)
            and _positive_int(size) and isinstance(values["is_classification"], bool)):
        raise ValueError(f"unexpected values {values}")
    return tasks_lib.TaskSpec(tuple(shape), size, values["is_classification"])


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_same_spec(model_dir, tasks, data_dir):
    """Refuses data whose inputs or outputs have other shapes than the run's.

    An RGB image among grayscale ones makes a folder's images RGB; other image
    sizes change the shape too. Without this check the run's checkpoints would
    fail to restore with a message about incompatible tensors.

    Args:
        model_dir: the run (its `task_spec.json`; runs without one are not checked).
        tasks: the task family loaded now (`input_shape`, `output_size`).
        data_dir: where that data was read, for the message.

    Raises:
        ValueError: the shapes differ from the recorded ones.
    """
    path = os.path.join(model_dir, SPEC_FILENAME)
    if tasks is None or not hasattr(tasks, "input_shape") or not os.path.exists(path):
        return
    try:
        recorded = _read_spec(path)
    except (OSError, ValueError, KeyError, TypeError):
        return  # load_spec says so
    now = (tuple(tasks.input_shape), tasks.output_size)
    before = (tuple(recorded.input_shape), recorded.output_size)
    if now != before:
        raise ValueError(
            f"the data at data_dir={data_dir!r} gives inputs of shape {now[0]} and {now[1]} "
            f"outputs, but the run in {model_dir} was trained on {before[0]} and {before[1]} "
            f"(recorded in {path}): the images' size or channels changed (one colour image "
            "makes a folder RGB; --image_channels and --image_size fix them). Use the run's "
            "own data, or train in a new --model_dir")


def make_checkpoint(experiment, **extra):
    """The `tf.train.Checkpoint` of a run: model, the algorithm's meta-parameters, and `extra`."""
    items = dict(model=experiment.model, **extra)
    if experiment.algorithm.saved_variables:
        items["algorithm"] = experiment.algorithm.state
    return tf.train.Checkpoint(**items)


class CheckpointError(ValueError):
    """Checkpoints exist but none can be restored (truncated, corrupt, or another model's)."""


_NUMBERED = re.compile(r"-(\d+)$")


def checkpoint_paths(checkpoint_dir):
    """The checkpoints in `checkpoint_dir`, newest (highest number) first.

    Found from the `<prefix>-<N>.index` files on disk, not from the `checkpoint`
    index file, which may be missing (only the `ckpt-*` files were copied),
    garbled or stale.

    Returns:
        list of checkpoint prefixes (paths without `.index`).
    """
    if not tf.io.gfile.isdir(checkpoint_dir):
        return []
    found = []
    for path in tf.io.gfile.glob(os.path.join(checkpoint_dir, "*.index")):
        prefix = path[:-len(".index")]
        match = _NUMBERED.search(prefix)
        if match:
            found.append((int(match.group(1)), prefix))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def error_text(error, limit=300):
    """An exception's message in one line, without TensorFlow's `{{function_node ...}}` noise."""
    checked = sources.user_error(error)  # a failed in-graph check: its own one line
    if checked:
        return checked if len(checked) <= limit else checked[:limit - 3] + "..."
    text = getattr(error, "message", None) if isinstance(error, tf.errors.OpError) else None
    text = (text or str(error)).strip()
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    # A Python error raised inside a graph (tf.numpy_function, e.g. a crashed simulation): its
    # own line says what happened; the first line only says "Graph execution error:".
    raised = (re.search(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): .+$", text, re.MULTILINE)
              if text.startswith("Graph execution error") else None)
    if raised:
        text = raised.group(0).strip()
    elif text.startswith("Graph execution error"):
        # An op's own error: its message is the first unindented line after the
        # stack ("Detected at node ... defined at", then "  File ..." lines).
        lines = text.splitlines()
        frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
        message = next((line.strip() for line in lines[frames[-1] + 1 if frames else 1:]
                        if line.strip() and not line[0].isspace()
                        and not line.startswith("Detected at node")), None)
        if message and re.match(r"\d+ root error\(s\) found", message):
            # Several replicas failed (tf.distribute): the first one's own error.
            first = re.search(r"^\s*\(\d+\) \w+: (.+)$", text, re.MULTILINE)
            message = first.group(1).strip() if first else message
        text = message or text
    if text.startswith("in user code:"):
        # A Python error raised while a tf.function was traced: its own line is the last
        # "SomethingError: message" of the trace.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raised = [line for line in lines
                  if re.match(r"(?:\w+\.)*\w*(?:Error|Exception): ", line)]
        text = raised[-1] if raised else lines[-1]
    keras_call = re.match(r"Exception encountered when calling (\S+?)\.call\(\)\.\s*\n+"
                          r"(?:\x1b\[1m)?(.+?)(?:\x1b\[0m)?\s*$", text, re.MULTILINE)
    if keras_call:  # Keras wraps a layer's error: its own message is the second line
        text = f"{keras_call.group(1)}: {keras_call.group(2)}"
    text = text.splitlines()[0].strip() if text else ""
    text = re.sub(r"\s*\[Op:\w+\]$", "", text) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_readable(path):
    """Why the checkpoint `path` cannot be read, or `None` if every tensor reads back intact.

    Reads every tensor (TensorFlow checks each one's CRC32C): finds truncated or
    corrupt files before anything is restored from them. Checkpoints here are
    small (the meta-parameters and the optimizer state).
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001 -- TF raises OpError, IndexError, ... for bad files
        return error_text(e)
    return None


def indexed_checkpoint(checkpoint_dir):
    """The latest checkpoint the `checkpoint` index file names, or `None` (missing, garbled)."""
    try:
        state = tf.train.get_checkpoint_state(checkpoint_dir)
    except Exception:  # noqa: BLE001 -- a garbled file can raise parse errors
        return None
    if state is None or not state.model_checkpoint_path:
        return None
    path = state.model_checkpoint_path
    return path if os.path.isabs(path) else os.path.join(checkpoint_dir, path)


def restore_latest(checkpoint, checkpoint_dir, partial=False):
    """Restores the newest readable checkpoint of `checkpoint_dir` into `checkpoint`.

    The one restore path of training, evaluation and export. Checkpoints are
    found from their files (a missing or garbled `checkpoint` index file does
    not hide them); a truncated or corrupt one is skipped, with a warning naming
    it, for the next older one.

    Args:
        checkpoint: a `tf.train.Checkpoint`.
        checkpoint_dir: the run's checkpoint directory.
        partial: allow the checkpoint to hold objects `checkpoint` lacks (the
            optimizer state, when restoring for evaluation). Either way every
            object of `checkpoint` must be restored.

    Returns:
        `(path, skipped)`: the restored checkpoint (`None` if the directory
        holds none) and the list of `(path, reason)` of newer ones skipped.

    Raises:
        CheckpointError: there are checkpoints but none can be restored.
    """
    candidates = checkpoint_paths(checkpoint_dir)
    if not candidates:
        return None, []
    if indexed_checkpoint(checkpoint_dir) is None:
        logging.warning("%s is missing or unreadable; using the checkpoint files found there "
                        "(newest: %s)", os.path.join(checkpoint_dir, "checkpoint"),
                        os.path.basename(candidates[0]))
    skipped = []
    for path in candidates:
        problem = check_readable(path)
        if problem is None:
            try:
                status = checkpoint.restore(path)
                if partial:
                    status.expect_partial()
                status.assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                problem = error_text(e)
        if problem is None:
            if skipped:
                logging.warning("restored %s instead of the newer %s", path,
                                ", ".join(p for p, _ in skipped))
            return path, skipped
        logging.warning("skipping checkpoint %s: it cannot be restored (%s)", path, problem)
        skipped.append((path, problem))
    raise CheckpointError(
        f"none of the {len(candidates)} checkpoint(s) in {checkpoint_dir} can be restored ("
        + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped) + ")")


def check_writable(path, name):
    """Raises `PermissionError` (or `NotADirectoryError`) naming `path` if it cannot be written.

    `path` is a directory that is written later; if it does not exist yet, the
    nearest existing parent must be a writable directory (nothing is created).
    Remote paths (`gs://...`) are not checked.

    Args:
        path: the directory.
        name: what it is, for the message (e.g. "--model_dir").

    Raises:
        ValueError: `path` is empty.
        NotADirectoryError: a file stands where a directory would be.
        PermissionError: the directory (or the nearest existing parent) is not writable.
    """
    if not path or not path.strip():
        raise ValueError(f"{name} is empty (an unset variable?): give a directory")
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{name} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == os.path.abspath(path) else f" (it would be created in {existing})"
        raise PermissionError(f"{name} {path} is not writable{where}")


# A checkpoint of a run that differs in what a resume may not change cannot stand for this
# run's (its variables may even restore, meaning something else, or trained on other data).
def _check_same_run(checkpoint_path, model_dir):
    """Raises CheckpointError if `checkpoint_path` sits in another run's directory whose
    config differs from `model_dir`'s in a field a resume could not change (what the
    meta-parameters mean, and how they were trained: data split, seeds, shots): the export
    and evaluation would record `model_dir`'s config beside another run's weights."""
    owner = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    if (os.path.realpath(owner) == os.path.realpath(model_dir)
            or not os.path.exists(os.path.join(owner, config_lib.CONFIG_FILENAME))):
        return
    try:
        theirs = config_lib.load(owner)
    except ValueError:
        return
    changed = config_lib.resume_changes(theirs, config_lib.load(model_dir))
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint_path} belongs to the run in {owner}, "
                              f"whose configuration differs from this one's in what a resume "
                              f"may not change ({'; '.join(changed)}: that run's -> this "
                              f"one's): use that run's model_dir")


def restore(model_dir, overrides=None, tasks=None, load_tasks=False, checkpoint_path=None,
            simulate=True):
    """Loads the config and the latest meta-parameters of a training run.

    The newest readable checkpoint is used: a truncated or corrupt latest one is
    skipped with a warning (see `restore_latest`).

    Args:
        model_dir: a directory written by `tf_maml.train`.
        overrides: dict of `Config` fields replacing the saved ones (e.g. a
            moved `data_dir`, evaluation settings).
        tasks: use this task family instead of building the config's.
        load_tasks: load the config's task family (evaluation needs it; export
            does not).
        checkpoint_path: a checkpoint (default: the newest readable one in `model_dir`).
        simulate: see `build_experiment`.

    Returns:
        `(experiment, step)`.

    Raises:
        FileNotFoundError: no config or no checkpoint in `model_dir`.
        CheckpointError: (a `ValueError`) the checkpoint(s) cannot be read.
        ValueError: invalid overrides, or (`load_tasks`) data other than the
            run's (`check_same_data`).
    """
    config = dataclasses.replace(config_lib.load(model_dir), **(overrides or {})).validate()
    checkpoint_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    if checkpoint_path is None and not checkpoint_paths(checkpoint_dir):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    if checkpoint_path is not None:
        if not tf.io.gfile.exists(checkpoint_path + ".index"):
            raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist")
        problem = check_readable(checkpoint_path)
        if problem:
            raise CheckpointError(f"checkpoint {checkpoint_path} cannot be read ({problem})")
        _check_same_run(checkpoint_path, model_dir)
    experiment = build_experiment(config, tasks, load_tasks=load_tasks,
                                  spec=load_spec(model_dir, config), simulate=simulate)
    if load_tasks and tasks is None:
        check_same_spec(model_dir, experiment.tasks, config.data_dir)
        check_same_data(model_dir, tasks_lib.data_fingerprint(experiment.tasks), config.data_dir)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = make_checkpoint(experiment, step=step)
    if checkpoint_path is not None:
        status = checkpoint.restore(checkpoint_path)
        status.expect_partial()  # the optimizer's state is not restored here
        try:
            status.assert_existing_objects_matched()
        except AssertionError:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} does not hold this run's meta-parameters (a "
                f"checkpoint of another run or algorithm?): give one of "
                f"{os.path.join(model_dir, CHECKPOINT_SUBDIR)}") from None
    else:
        restore_latest(checkpoint, checkpoint_dir, partial=True)
    return experiment, int(step.numpy())


_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                 keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
                 keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
                 keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                 keras.layers.Conv3DTranspose)
_MAX_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D)
# Recurrent layers run graph loops whose second derivative XLA cannot compile
# (`while_grad`: shapes not known at compile time).
_RECURRENT = (keras.layers.RNN, keras.layers.Bidirectional)


def resolve_jit_compile(config, model, vectorized=None):
    """XLA on/off for a run.

    "auto" uses XLA only for models on the layer-batched forward (where it was
    measured; a model run task by task, `make_forward`'s fallback, may hold ops
    whose second derivative XLA cannot compile, e.g. `Permute`'s transpose), and
    even there not (a) for convolutional models on CPU: measured on TF
    2.21, XLA makes dense meta-steps ~2.5x faster and convolutional ones 11-16x
    slower; (b) for second-order training of models with max-pooling, whose
    second derivative XLA computes only approximately (~2% meta-gradient error);
    (c) with `recompute_inner_steps`, whose recomputation XLA's common
    subexpression elimination would merge back into the forward pass (no
    memory saved); (d) for recurrent layers (LSTM, GRU, any `keras.layers.RNN`),
    whose loops XLA fails to compile under the meta-gradient. Layers are looked
    for everywhere in the model, inside nested models and custom layers too.

    Args:
        config: the run's `Config` (`jit_compile`, order, algorithm, ...).
        model: the built Keras model.
        vectorized: whether the model runs on the layer-batched forward
            (`make_forward(model).vectorized`); None: planned here.

    Returns:
        bool.

    Raises:
        ValueError: `vectorized` is None and `make_forward` refuses the model.
    """
    if config.jit_compile != "auto":
        return config.jit_compile == "true"
    if config.recompute_inner_steps:
        return False
    if config.is_rl:  # rollouts are graph loops of tiny ops: not measured with XLA
        return False
    if vectorized is None:
        vectorized = functional.make_forward(model).vectorized
    if not vectorized:
        return False
    layers = compat.all_layers(model)
    if any(isinstance(layer, _RECURRENT) for layer in layers):
        return False
    has_conv = any(isinstance(layer, _CONVOLUTIONS) for layer in layers)
    has_max_pool = any(isinstance(layer, _MAX_POOLING) for layer in layers)
    second_order = not config.first_order and config.algorithm != "reptile"
    if has_max_pool and second_order and config.num_inner_steps > 0:
        return False
    return not (has_conv and not tf.config.list_physical_devices("GPU"))
