"""Task families. Each yields `Episode`s from a stateless seed: `sample(seed, n, split)`."""

import hashlib
import json
import os

from tf_maml import config as config_lib

from tf_maml.tasks import cache as cache_lib
from tf_maml.tasks.episodes import Episode, episode_dataset, step_seed
from tf_maml.tasks.classification import ImageClassTasks
from tf_maml.tasks.sine import SineTasks
from tf_maml.tasks.sources import (ClassPoolTasks, FunctionTasks, array_tasks, folder_tasks,
                                   split_classes, tfds_tasks)

__all__ = ["Episode", "episode_dataset", "step_seed", "SineTasks", "ImageClassTasks", "TaskSpec",
           "ClassPoolTasks", "FunctionTasks", "array_tasks", "folder_tasks", "tfds_tasks",
           "split_classes", "spec", "build", "data_fingerprint", "TRAIN", "VALIDATION", "TEST"]

# Sampling streams: disjoint random sequences for training, validation and test,
# and the data split each samples from.
TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_OF_STREAM = {TRAIN: "train", VALIDATION: "val", TEST: "test"}


class TaskSpec:
    """What a model needs to know of a task family, without its data.

    Attributes:
        input_shape: shape of one input example.
        output_size: outputs (regression) or classes N (classification).
        is_classification: integer labels and accuracy, or regression targets.
    """

    def __init__(self, input_shape, output_size, is_classification):
        self.input_shape = tuple(input_shape)
        self.output_size = output_size
        self.is_classification = is_classification


def data_fingerprint(tasks):
    """What identifies a classification task family's data, for checking a resumed run.

    Per split: the number of classes and of examples, a digest of the class
    names (where the family has them: folder and tfds data) and one of the
    examples per class. Not the pixels: the same class folders with edited
    images pass.

    Args:
        tasks: a task family.

    Returns:
        A JSON-able dict, or None for families without class splits (sine,
        function tasks).
    """
    num_classes = getattr(tasks, "num_classes", None)
    counts = getattr(tasks, "counts", None)
    if not isinstance(num_classes, dict) or not isinstance(counts, dict):
        return None
    names = getattr(tasks, "class_names", None) or {}
    fingerprint = {}
    for split in sorted(num_classes):
        split_counts = [int(c) for c in counts[split]]
        split_names = [str(n) for n in names.get(split, [])]
        fingerprint[split] = {"classes": int(num_classes[split]), "examples": sum(split_counts),
                              "names": _digest(split_names), "counts": _digest(split_counts)}
    return fingerprint


def _digest(values):
    return hashlib.sha1(json.dumps(values).encode()).hexdigest()[:16]


def spec(config, input_shape=None, output_size=None, is_classification=None):
    """The `TaskSpec` of a `Config`'s task family, known without loading any data.

    Export and restoring a model use it, so they never need the data set. The
    input shape of the user's data (folder, tfds:NAME, custom) is known only
    from the data: pass it (a trained run records its spec in
    `task_spec.json`, which restoring uses instead).

    Args:
        config: a `Config`.
        input_shape: folder, tfds and custom: the shape of one input example.
        output_size: custom: outputs or classes (default: `config.n_way`).
        is_classification: custom: whether the tasks are classification (required).

    Raises:
        ValueError: unknown dataset, or the shape is known only from the data.
    """
    if config.dataset == "sine":
        return TaskSpec(SineTasks.input_shape, SineTasks.output_size, False)
    if config.dataset == "omniglot":
        from tf_maml.tasks import omniglot
        return TaskSpec((omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE, 1), config.n_way, True)
    if config.dataset == "miniimagenet":
        from tf_maml.tasks import miniimagenet
        return TaskSpec((miniimagenet.IMAGE_SIZE, miniimagenet.IMAGE_SIZE, 3), config.n_way, True)
    if _is_own_data(config.dataset):
        if input_shape is None:
            raise ValueError(
                f"dataset {config.dataset}: the input shape is known only from the data; build "
                "the task family (tasks.build) or pass input_shape (a trained run's "
                "task_spec.json records it)")
        if config.dataset == "custom":
            if is_classification is None:
                raise ValueError("dataset custom: pass is_classification (and output_size) to "
                                 "tasks.spec, or give the task family itself")
            return TaskSpec(input_shape, output_size or config.n_way, is_classification)
        return TaskSpec(input_shape, config.n_way, True)
    raise ValueError(f"unknown dataset {config.dataset!r}")


def _is_own_data(dataset):
    return dataset in ("folder", "custom") or dataset.startswith(config_lib.TFDS_PREFIX)


def build(config):
    """The task family a `Config` names, with its data loaded.

    Raises:
        ValueError: unknown dataset, "custom" (its tasks are given in code,
            not built from the config), or bad data.
        FileNotFoundError: missing data.
    """
    if config.dataset == "sine":
        return SineTasks(k_shot=config.k_shot, k_query=config.k_query)
    cache_dir = cache_lib.cache_directory(config.cache_dir)
    if config.dataset == "omniglot":
        from tf_maml.tasks import omniglot
        family = omniglot.omniglot_tasks(
            config.n_way, config.k_shot, config.k_query, data_dir=config.data_dir or None,
            cache_dir=cache_dir, split=config.omniglot_split, split_seed=config.split_seed,
            rotate_train=config.augment_rotations,
            validation_characters=config.omniglot_validation_characters,
            resize_filter=config.omniglot_resize_filter)
    elif config.dataset == "miniimagenet":
        from tf_maml.tasks import miniimagenet
        family = miniimagenet.miniimagenet_tasks(config.n_way, config.k_shot, config.k_query,
                                                 config.data_dir, cache_dir=cache_dir)
    elif config.dataset == "folder":
        family = folder_tasks(config.data_dir, config.n_way, config.k_shot, config.k_query,
                              image_size=config.image_size or None,
                              channels=config.image_channels or None, cache_dir=cache_dir,
                              class_split=config.class_split, seed=config.split_seed)
    elif config.dataset.startswith(config_lib.TFDS_PREFIX):
        family = tfds_tasks(config.dataset[len(config_lib.TFDS_PREFIX):], config.n_way,
                            config.k_shot, config.k_query, image_size=config.image_size or None,
                            data_dir=os.path.expanduser(config.data_dir) if config.data_dir
                            else None, class_split=config.class_split, seed=config.split_seed)
    elif config.dataset == "custom":
        raise ValueError("dataset custom: the task family is given in code (e.g. "
                         "tasks=array_tasks(...)); it cannot be built from the config")
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}")
    if config.train_k_shot:
        family.check_k_shot(config.train_k_shot, "train", label="train_k_shot")
    return family
