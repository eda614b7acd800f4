"""Few-shot tasks from the user's own data: arrays, a folder of images, a TFDS data set, a function.

Classification sources become a `ClassPoolTasks`: every class keeps its own
examples (classes may differ in size), and the classes are split into disjoint
meta-training, meta-validation and meta-test classes (`split_classes`), so no
class of a held-out task is ever seen in training. A task picks `n_way` classes
of one split, labels them 0..n_way-1 in random order, and draws `k_shot`
support and `k_query` query examples of each, all distinct; sampling is a pure
function of the stateless seed, in-graph (it runs in a `tf.data` map and inside
`tf.function`).

Classes with fewer than `k_shot + k_query` examples are refused with an error
naming them (`drop_small_classes=True` leaves them out instead, with a
warning).

Regression tasks from a Python function: `FunctionTasks`.
"""

import hashlib
import inspect
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml.config import DEFAULT_CLASS_SPLIT, parse_class_split
from tf_maml.tasks import cache as cache_lib
from tf_maml.tasks import downloads
from tf_maml.tasks.episodes import Episode, check_positive_ints, checked_seed

__all__ = ["ClassPoolTasks", "FunctionTasks", "array_tasks", "folder_tasks", "tfds_tasks",
           "split_classes", "load_folder", "checked", "user_error", "IMAGE_EXTENSIONS",
           "DEFAULT_CLASS_SPLIT"]

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Part of the folder cache key: bump when the decoded arrays change for the same files.
_CACHE_VERSION = 4
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_MAX_NAMED = 8
# Marks the message of a user mistake found inside a graph or a tf.data pipeline (`checked`),
# so that `user_error` can find it in the error TensorFlow raises.
ERROR_TAG = "[tf_maml] "


def checked(ok, message, tensors):
    """`tensors`, available only once an in-graph check has passed.

    Args:
        ok: scalar bool tensor.
        message: scalar string tensor, the one-line error if `ok` is false.
        tensors: a structure of tensors.

    Returns:
        `tensors` (the same structure) after the check.

    Raises:
        ValueError: eagerly, `message` when `ok` is false. In a graph the step
            fails with a `tf.errors.InvalidArgumentError` holding the message;
            `user_error` finds it there.
    """
    if tf.executing_eagerly():
        if not bool(ok):
            raise ValueError(message.numpy().decode())
        return tensors
    check = tf.debugging.Assert(ok, [tf.strings.join([ERROR_TAG, message])])
    with tf.control_dependencies([check]):
        return tf.nest.map_structure(tf.identity, tensors)


def user_error(error):
    """The one-line message of a failed `checked` in TensorFlow's error, or None.

    Args:
        error: an exception (e.g. the `tf.errors.OpError` a step raised).

    Returns:
        The message given to `checked`, or None if `error` holds none.
    """
    text = getattr(error, "message", None) or str(error)
    start = text.find(ERROR_TAG)
    if start < 0:
        return None
    line = text[start + len(ERROR_TAG):].split("\n", 1)[0]
    return line[:-1] if line.endswith("]") else line  # Assert prints its data as [message]


def _names(items, limit=_MAX_NAMED):
    items = list(items)
    text = ", ".join(str(item) for item in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


class ClassPoolTasks:
    """N-way K-shot classification tasks over pools of examples, one pool per class.

    Classes may hold different numbers of examples. Inputs keep their shape;
    uint8 inputs (images) become float32 in [0, 1] as in `ImageClassTasks`,
    any other dtype is cast to float32 unscaled.

    Args:
        splits: dict split name ("train", "val", "test") -> list of arrays, one
            per class, each `[examples, *input_shape]` (all of one shape and
            dtype). "val" is optional (its tasks then come from "test").
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.
        class_names: optional dict split -> list of class names, for messages
            (default: the class's index in its split).
        name: the data's name, for messages.

    Raises:
        ValueError: a split with fewer than `n_way` classes, classes with fewer
            than `k_shot + k_query` examples (named), inconsistent shapes, or
            NaN or infinite values (named by class).

    Example:

    ```python
    pools = {"train": [np.random.rand(n, 8) for n in (5, 9, 7)],
             "test": [np.random.rand(n, 8) for n in (6, 4, 5)]}
    tasks = ClassPoolTasks(pools, n_way=2, k_shot=1, k_query=2)
    episode = tasks.sample(tf.constant([0, 1], tf.int64), meta_batch_size=4)
    episode.support_x.shape  # [4, 2, 8]
    ```
    """

    is_classification = True

    def __init__(self, splits, n_way, k_shot, k_query, class_names=None, name="data"):
        check_positive_ints(name, n_way=n_way, k_shot=k_shot, k_query=k_query)
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"{name}: unknown splits {unknown}; expected {SPLITS}")
        if "train" not in splits or "test" not in splits:
            raise ValueError(f"{name}: need 'train' and 'test' splits, got {sorted(splits)}")
        self.n_way, self.k_shot, self.k_query, self.name = n_way, k_shot, k_query, name
        self.num_classes, self.class_names, self.counts = {}, {}, {}
        self._pools, self._offsets, self._counts = {}, {}, {}
        shape = dtype = None
        for split, classes in splits.items():
            classes = [np.asarray(c) for c in classes]
            names = list((class_names or {}).get(split) or range(len(classes)))
            if len(classes) < n_way:
                raise ValueError(f"{name}: the {split} split has {len(classes)} classes, fewer "
                                 f"than n_way={n_way}")
            for label, array in zip(names, classes):
                if array.ndim < 1:
                    raise ValueError(f"{name}: class {label} is not an array of examples")
                if shape is None:
                    shape, dtype = array.shape[1:], array.dtype
                if array.shape[1:] != shape or array.dtype != dtype:
                    raise ValueError(f"{name}: class {label} holds {array.dtype} examples of "
                                     f"shape {array.shape[1:]}, others {dtype} {shape}")
                if array.dtype.kind in "fc" and not np.isfinite(array).all():
                    raise ValueError(f"{name}: class {label} of the {split} split holds NaN or "
                                     "infinite values")
            counts = np.array([len(c) for c in classes], np.int64)
            self._check_counts(split, counts, names, k_shot)
            self._pools[split] = tf.constant(np.ascontiguousarray(np.concatenate(classes)))
            self._offsets[split] = tf.constant(np.cumsum(counts) - counts)
            self._counts[split] = tf.constant(counts)
            self.counts[split] = counts
            self.num_classes[split] = len(classes)
            self.class_names[split] = names
        self.input_shape = tuple(shape)
        self.output_size = n_way
        # Whether `sample` gives uint8 inputs scaled to [0, 1] (a model declaring an integer
        # input gets them back as pixels: `MetaLearner`).
        self.scales_uint8_inputs = dtype == np.uint8

    def _check_counts(self, split, counts, names, k_shot, label="k_shot"):
        need = k_shot + self.k_query
        small = [(n, c) for n, c in zip(names, counts) if c < need]
        try:  # the split's classes come shuffled: name them in order
            small.sort(key=lambda pair: pair[0])
        except TypeError:
            small.sort(key=lambda pair: str(pair[0]))
        small = [f"{n} ({c})" for n, c in small]
        if small:
            raise ValueError(
                f"{self.name}: {len(small)} {split} class(es) have fewer than {label} + k_query "
                f"= {need} examples: {_names(small)}")

    def check_k_shot(self, k_shot, split="train", label="k_shot"):
        """Raises `ValueError` unless every class of `split` has `k_shot + k_query` examples.

        `label` names `k_shot` in the message (the setting it came from).
        """
        split = "test" if split == "val" and "val" not in self._pools else split
        self._check_counts(split, self.counts[split], self.class_names[split], k_shot, label)

    def sample(self, seed, meta_batch_size, split="train", k_shot=None):
        """Samples a meta-batch of N-way K-shot tasks.

        Args:
            seed: int64 tensor [2] (see `tf_maml.tasks.step_seed`).
            meta_batch_size: number of tasks.
            split: "train", "val" (falls back to "test" if absent) or "test".
            k_shot: support examples per class, if not the family's `k_shot`.

        Returns:
            An `Episode`: x float32 `[tasks, n_way * k, *input_shape]`, y int32
            `[tasks, n_way * k]`, examples grouped by class.

        Raises:
            ValueError: unknown split, or classes too small for `k_shot`.
        """
        seed = checked_seed(seed, meta_batch_size)
        if split == "val" and "val" not in self._pools:
            split = "test"
        if split not in self._pools:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        k_shot = self.k_shot if k_shot is None else k_shot
        if k_shot != self.k_shot:
            self.check_k_shot(k_shot, split)
        pool, offsets, counts = self._pools[split], self._offsets[split], self._counts[split]
        n, per_class = self.n_way, k_shot + self.k_query
        most = int(self.counts[split].max())
        class_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        # N distinct classes per task (top-k of uniform scores: a random subset in random order).
        scores = tf.random.stateless_uniform([meta_batch_size, self.num_classes[split]],
                                             class_seed)
        classes = tf.math.top_k(scores, n, sorted=False).indices               # [T, N]
        count = tf.gather(counts, classes)                                      # [T, N]
        # K+Q distinct examples among each class's own: scores beyond its count never win.
        scores = tf.random.stateless_uniform([meta_batch_size, n, most], example_seed)
        scores = tf.where(tf.range(most, dtype=tf.int64) < count[..., None], scores, -1.0)
        chosen = tf.math.top_k(scores, per_class, sorted=False).indices        # [T, N, K+Q]
        index = tf.gather(offsets, classes)[..., None] + tf.cast(chosen, tf.int64)
        x = tf.gather(pool, index)                                              # [T, N, K+Q, ...]
        x = tf.cast(x, tf.float32) / 255.0 if pool.dtype == tf.uint8 else tf.cast(x, tf.float32)
        y = tf.broadcast_to(tf.range(n, dtype=tf.int32)[None, :, None],
                            [meta_batch_size, n, per_class])
        x_shape, y_shape = [meta_batch_size, -1, *self.input_shape], [meta_batch_size, -1]
        return Episode(
            tf.reshape(x[:, :, :k_shot], x_shape), tf.reshape(y[:, :, :k_shot], y_shape),
            tf.reshape(x[:, :, k_shot:], x_shape), tf.reshape(y[:, :, k_shot:], y_shape))


# -- class splits -------------------------------------------------------------------------------


def split_classes(classes, class_split=DEFAULT_CLASS_SPLIT, seed=0, name="data", labels=None):
    """Splits class ids into disjoint meta-training, meta-validation and meta-test classes.

    Args:
        classes: the class ids (any order; duplicates are ignored).
        class_split: fractions of the classes for train, val and test: a
            string "0.64,0.16,0.2" or 3 numbers summing to 1 (classes shuffled
            with `seed`; val may be 0); or explicit classes: a dict
            {"train": ids, "val": ids, "test": ids} ("val" optional) or a
            sequence of 3 lists of ids. Classes not listed are left out.
        seed: the shuffle seed of a fractional split.
        name: the data's name, for messages.
        labels: what messages call class id `i`: `labels[i]` (the user's class
            names, when `classes` are positions in a list of them); None: the ids.

    Returns:
        dict split -> numpy array of class ids ("val" absent when empty).

    Raises:
        ValueError: bad fractions, unknown or repeated class ids.

    Example:

    ```python
    split_classes(range(10), "0.6,0.2,0.2")  # {"train": 6 ids, "val": 2, "test": 2}
    split_classes(range(10), {"train": [0, 1, 2], "test": [3, 4]})
    ```
    """
    classes = np.unique(np.asarray(list(classes)))
    explicit = isinstance(class_split, dict) or (
        not isinstance(class_split, str) and len(class_split) == 3
        and all(np.ndim(part) == 1 for part in class_split))
    if explicit:
        parts = (class_split if isinstance(class_split, dict)
                 else dict(zip(SPLITS, class_split)))
        unknown = sorted(set(parts) - set(SPLITS))
        if unknown:
            raise ValueError(f"{name}: class_split has unknown splits {unknown}; expected "
                             f"{SPLITS}")
        known, seen, out = set(classes.tolist()), set(), {}
        for split in SPLITS:
            ids = parts.get(split)
            ids = [] if ids is None else list(ids)  # a numpy array has no truth value
            missing = [i for i in ids if i not in known]
            if missing:
                raise ValueError(f"{name}: class_split {split} names classes that are not in "
                                 f"the data: {_names(missing)}")
            here, repeated = set(), {}
            for i in ids:
                if i in seen or i in here:
                    repeated[i] = None  # in order, once each
                here.add(i)
            if repeated:
                shown = repeated if labels is None else (labels[i] for i in repeated)
                raise ValueError(f"{name}: class_split lists classes in more than one split "
                                 f"or twice: {_names(shown)}")
            seen.update(ids)
            if ids:
                out[split] = np.asarray(ids)
        return out
    fractions = parse_class_split(class_split)
    order = classes[np.random.RandomState(seed).permutation(len(classes))]
    bounds = np.round(np.cumsum(fractions) * len(classes)).astype(int)
    out = {"train": order[:bounds[0]], "val": order[bounds[0]:bounds[1]],
           "test": order[bounds[1]:]}
    if fractions[1] == 0:
        del out["val"]
    return out


def _pools_from_split(per_class, names, class_split, seed, n_way, k_shot, k_query, name,
                      drop_small_classes):
    """A `ClassPoolTasks` from {class name: examples}, split by `class_split`."""
    need = k_shot + k_query
    small = [n for n in names if len(per_class[n]) < need]
    if small and drop_small_classes:
        logging.warning("%s: leaving out %d class(es) with fewer than k_shot + k_query = %d "
                        "examples: %s", name, len(small), need,
                        _names(f"{n} ({len(per_class[n])})" for n in small))
        names = [n for n in names if n not in set(small)]
    elif small:
        raise ValueError(
            f"{name}: {len(small)} class(es) have fewer than k_shot + k_query = {need} "
            f"examples: {_names(f'{n} ({len(per_class[n])})' for n in small)} (add examples, "
            "lower k_shot/k_query, or leave them out: drop_small_classes=True in Python, or "
            "remove their folders for the command line)")
    if len(names) < n_way:
        raise ValueError(f"{name}: {len(names)} classes, fewer than n_way={n_way}")
    index = {n: i for i, n in enumerate(names)}
    parts = split_classes(range(len(names)), _by_index(class_split, index, name), seed, name,
                          labels=names)
    for split, ids in parts.items():
        if len(ids) < n_way:
            how = (f"class_split {class_split!r}" if isinstance(class_split, str)
                   else "class_split")
            raise ValueError(
                f"{name}: the {split} split has {len(ids)} classes (of {len(names)}, "
                f"{how}), fewer than n_way={n_way}; use more classes, a smaller n_way or "
                "another class_split")
    logging.info("%s: %s classes", name,
                 ", ".join(f"{len(ids)} {split}" for split, ids in parts.items()))
    pools = {split: [per_class[names[i]] for i in ids] for split, ids in parts.items()}
    return ClassPoolTasks(pools, n_way, k_shot, k_query,
                          class_names={s: [names[i] for i in ids] for s, ids in parts.items()},
                          name=name)


def _by_index(class_split, index, name):
    """`class_split` with explicit class ids mapped to positions in the class list."""
    if isinstance(class_split, str) or not (isinstance(class_split, dict) or (
            len(class_split) == 3 and all(np.ndim(p) == 1 for p in class_split))):
        return class_split
    parts = class_split if isinstance(class_split, dict) else dict(zip(SPLITS, class_split))
    out = {}
    for split, ids in parts.items():
        ids = [i.item() if isinstance(i, np.generic) else i
               for i in ([] if ids is None else ids)]
        missing = [i for i in ids if i not in index]
        if missing:
            raise ValueError(f"{name}: class_split {split} names classes that are not in the "
                             f"data (or were left out): {_names(missing)}")
        out[split] = [index[i] for i in ids]
    return out


# -- arrays -------------------------------------------------------------------------------------


def array_tasks(x, y, n_way, k_shot, k_query, class_split=DEFAULT_CLASS_SPLIT, seed=0,
                drop_small_classes=False, name="arrays"):
    """N-way K-shot tasks from examples `x` with integer class labels `y`.

    Args:
        x: array `[examples, ...]`: uint8 images (scaled to [0, 1]) or features
            (kept as float32).
        y: integer class labels `[examples]`.
        n_way, k_shot, k_query: task shape (k per class).
        class_split: how classes are split into meta-train/val/test (see
            `split_classes`): fractions (default "0.64,0.16,0.2") or explicit
            lists of class ids.
        seed: shuffle seed of a fractional split.
        drop_small_classes: leave out classes with fewer than
            `k_shot + k_query` examples (with a warning) instead of refusing.
        name: the data's name, for messages.

    Returns:
        A `ClassPoolTasks`.

    Raises:
        ValueError: mismatched lengths, labels that are not integers (or floats
            holding whole numbers), too few classes in
            a split, or classes with too few examples.

    Example:

    ```python
    (x, y), _ = keras.datasets.mnist.load_data()
    tasks = array_tasks(x[..., None], y, n_way=2, k_shot=1, k_query=5,
                        class_split={"train": range(6), "val": [6, 7], "test": [8, 9]})
    ```
    """
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be a vector [examples], got shape {y.shape}")
    if x.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x) if x.ndim else 0} examples but y has {len(y)} "
                         "labels")
    if np.issubdtype(y.dtype, np.floating):  # np.loadtxt's labels: taken if whole numbers
        wide = y.astype(np.float64)
        bad = ~np.isfinite(wide) | (wide != np.round(wide)) | (np.abs(wide) >= 2.0 ** 53)
        if bad.any():
            raise ValueError(f"{name}: labels must be integer class ids; the float labels hold "
                             f"{y[bad][0].item()!r} (at index {int(np.argmax(bad))}), not a "
                             "whole number below 2**53")
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{name}: labels must be integer class ids, got {y.dtype}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{name}: x must be numeric, got {x.dtype}")
    order = np.argsort(y, kind="stable")
    labels, starts = np.unique(y[order], return_index=True)
    groups = np.split(x[order], starts[1:])
    per_class = {int(label): group for label, group in zip(labels, groups)}
    return _pools_from_split(per_class, [int(label) for label in labels], class_split, seed,
                             n_way, k_shot, k_query, name, drop_small_classes)


# -- a folder of images -------------------------------------------------------------------------


def _image_size(image_size):
    if image_size is None or image_size == 0:
        return None
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got "
                         f"{image_size!r}")
    return image_size


def _list_folder(data_dir):
    """[(class name, [relative image paths])], sorted, or raises with the expected layout."""
    layout = ("expected one sub-folder per class holding its images "
              f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    if not data_dir or not os.path.isdir(data_dir):
        what = "is not a directory" if data_dir and os.path.exists(data_dir) else "does not exist"
        raise FileNotFoundError(f"image folder data_dir {data_dir!r} {what}; {layout}")
    classes, skipped, repeated, loose, nested = [], [], [], [], []
    owners, shared = {}, []  # every image's real path -> (class, path): one class per image
    for entry in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, entry)
        if entry.startswith(".") or not os.path.isdir(folder):
            if not entry.startswith(".") and os.path.splitext(entry)[1].lower() in \
                    IMAGE_EXTENSIONS:
                loose.append(entry)
            continue
        files, seen_dirs, seen_files = [], set(), set()
        for root, dirs, names in os.walk(folder, followlinks=True):
            # Hidden folders (.ipynb_checkpoints, ...) are skipped like hidden files; a
            # folder reached twice (a symlink loop, two links to one folder) is read once.
            real = os.path.realpath(root)
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in names:
                if f.startswith("."):
                    continue
                path = os.path.join(root, f)
                if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                    skipped.append(os.path.relpath(path, data_dir))
                elif os.path.islink(path) and not os.path.exists(path):  # target gone
                    raise FileNotFoundError(
                        f"{path}: a broken link (to {os.readlink(path)!r}, which does not "
                        "exist); restore its target or remove the link")
                elif os.path.realpath(path) in seen_files:
                    repeated.append(os.path.relpath(path, data_dir))
                else:
                    real_file = os.path.realpath(path)
                    seen_files.add(real_file)
                    files.append(os.path.relpath(path, data_dir))
                    owner = owners.setdefault(real_file, (entry, files[-1]))
                    if owner[0] != entry:
                        shared.append((files[-1], entry, *owner))
        classes.append((entry, sorted(files)))
        # Images in several sub-folders of one class: perhaps the sub-folders are the
        # classes (Omniglot's alphabet/character layout), merged here without a word.
        parts = [os.path.normpath(f).split(os.sep) for f in files]
        subfolders = {p[1] for p in parts if len(p) > 2}
        if len(subfolders) > 1:
            nested.append((entry, len(subfolders)))
    if not classes:
        raise ValueError(f"image folder {data_dir} has no class sub-folders; {layout}")
    if shared:
        # Through links (a class linked under a second name, a link to a folder above its
        # class): one image in two classes, perhaps a meta-test image in a training class.
        path, entry, other_entry, other_path = shared[0]
        raise ValueError(
            f"image folder {data_dir}: {len(shared)} image(s) are in more than one class "
            f"through links, e.g. {path} (class {entry}) is {other_path} (class "
            f"{other_entry}); every image must belong to one class folder only")
    if nested:
        logging.warning(
            "%s: %d class folder(s) hold images in several sub-folders, e.g. %s (%d "
            "sub-folders); each class folder is one class with all the images below it. If "
            "the sub-folders are the classes (e.g. Omniglot's alphabet/character folders), "
            "give a data_dir whose sub-folders are those classes (links to them will do)",
            data_dir, len(nested), *nested[0])
    if loose:
        logging.warning("%s: ignored %d image(s) outside the class folders, e.g. %s", data_dir,
                        len(loose), loose[0])
    if skipped:
        logging.warning("%s: skipped %d file(s) that are not %s images, e.g. %s", data_dir,
                        len(skipped), "/".join(e[1:].upper() for e in IMAGE_EXTENSIONS),
                        skipped[0])
    if repeated:
        logging.warning("%s: skipped %d link(s) to an image already in its class, e.g. %s",
                        data_dir, len(repeated), repeated[0])
    return classes


def _folder_key(data_dir, classes, image_size, channels):
    digest = hashlib.sha1(f"v{_CACHE_VERSION}:{image_size}:{channels};".encode())
    for name, files in classes:
        # File names are bytes to the OS: names that are not UTF-8 (zips made on Windows)
        # come as surrogate escapes, which encode back to those bytes.
        digest.update(os.fsencode(f"[{name}]"))
        for file in files:
            stat = os.stat(os.path.join(data_dir, file))
            digest.update(os.fsencode(f"{file}:{stat.st_size}:{stat.st_mtime_ns};"))
    return digest.hexdigest()[:16]


def _open(path):
    from PIL import Image
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"{path}: not a readable image ({e})") from None


def _to_8_bits(image, path):
    """A 16-bit grayscale image (PIL modes I;16*, or I with values in 0..65535) as 8 bits.

    Values are scaled by 255 / 65535 (v / 257, rounded); PIL's own conversion
    clips them to 255 instead.

    Args:
        image: a PIL image.
        path: its file, for messages.

    Returns:
        `image` itself, or an 8-bit ("L") copy of a 16-bit one.

    Raises:
        ValueError: a 32-bit integer image with values outside 0..65535.
    """
    from PIL import Image
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{path}: a 32-bit integer image with values in [{values.min()}, "
                         f"{values.max()}]; expected 8-bit or 16-bit (0..65535) images")
    return Image.fromarray(np.rint(values / 257).astype(np.uint8))


def _png_over_white(image, path):
    """A PNG's transparent pixels (alpha, or a transparent palette entry or gray or RGB
    value) composited over white, as the export's image signatures do; 16-bit gray is
    scaled to 8 bits (`_to_8_bits`). Other images are returned as `_to_8_bits` gives them.

    Without this, PIL's conversion to "L" or "RGB" drops the alpha channel: black strokes
    drawn on transparent black pixels would become a black square. Only PNGs: TensorFlow's
    GIF decoder, which serving uses, gives no alpha, so a GIF is decoded as it is there.
    """
    from PIL import Image
    eight_bit = _to_8_bits(image, path)
    if image.format != "PNG" or (image.mode not in ("RGBA", "LA", "PA")
                                 and "transparency" not in image.info):
        return eight_bit
    if eight_bit is not image:  # 16-bit gray with a transparent value: its alpha from it
        alpha = np.where(np.asarray(image) == image.info["transparency"], 0, 255)
        eight_bit = Image.fromarray(np.stack([np.asarray(eight_bit),
                                              alpha.astype(np.uint8)], -1), "LA")
    rgba = eight_bit.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


# EXIF orientations that swap an image's width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(image):
    """A JPEG's EXIF orientation (1-8; 1 where it has none or another format).

    The export's image signatures read the same (`serving._jpeg_orientation`):
    the Exif segment's orientation only when it is one number (PIL's `getexif`
    would also fall back on an XMP packet's, which they cannot), and JPEGs
    holding several pictures (PIL's format "MPO", many phones' photos) too.
    """
    from PIL import Image
    if image.format not in ("JPEG", "MPO") or not image.info.get("exif"):
        return 1
    try:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        value = exif.get(0x0112, 1)
    except Exception:  # damaged metadata: taken as none, as the export's signatures do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image):
    """A JPEG turned as its EXIF orientation says (a phone's photos are stored sideways),
    as a viewer and the export's image signatures show it; other images unchanged
    (TensorFlow's decoders, which serving uses, read no other format's orientation)."""
    from PIL import Image
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(_orientation(image))
    return image if method is None else image.transpose(method)


def _decode_folder(data_dir, classes, image_size, channels):
    """`(images [examples, H, W, C] uint8, counts [classes])` decoded with PIL."""
    from PIL import Image
    paths = [os.path.join(data_dir, f) for _, files in classes for f in files]
    modes, sizes = set(), {}
    for path in paths:  # headers only: a quick check before decoding everything
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                size = image.size
                if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
                    size = size[::-1]  # as it is shown, turned a quarter
                sizes.setdefault(size, path)
        except Exception as e:  # PIL raises many types for bad data
            raise ValueError(f"{path}: not a readable image ({e})") from None
        if image.mode == "F":
            raise ValueError(f"{path}: a floating-point image (PIL mode F); expected 8-bit or "
                             "16-bit images")
        if image_size is None and len(sizes) > 1:
            (w1, h1), (w2, h2) = list(sizes)[:2]
            raise ValueError(
                f"mixed image sizes in {data_dir}: {sizes[(w1, h1)]} is {w1}x{h1}, "
                f"{sizes[(w2, h2)]} is {w2}x{h2} (width x height); pass image_size to resize "
                "them all to one size")
    if channels is None:
        channels = 1 if modes <= set(_GRAY_MODES) else 3
    images = []
    for path in paths:
        with _open(path) as image:
            image = _png_over_white(_upright(image), path).convert(
                "L" if channels == 1 else "RGB")
            if image_size is not None:
                image = image.resize(image_size[::-1], Image.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
        images.append(array[..., None] if channels == 1 else array)
    counts = np.array([len(files) for _, files in classes], np.int64)
    return np.stack(images), counts


def _check_fits_in_memory(count, image_size, channels, source):
    """Refuses a decode whose uint8 arrays alone would exceed half of the machine's memory."""
    needed = count * image_size[0] * image_size[1] * channels
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if needed > physical // 2:
        raise ValueError(
            f"{source}: {count} images of {image_size[0]}x{image_size[1]}x{channels} need "
            f"{needed / 2**30:.1f} GiB decoded, more than half of this machine's "
            f"{physical / 2**30:.1f} GiB; choose a smaller image_size")


def load_folder(data_dir, image_size=None, channels=None, cache_dir=None):
    """Decodes a folder of images with one sub-folder per class.

    The layout `keras.utils.image_dataset_from_directory` reads:
    `data_dir/<class>/<image>` (images in nested folders count for their
    class; hidden files are skipped), PNG, JPEG, BMP or GIF (first frame).
    16-bit grayscale images are scaled to 8 bits (v / 257, rounded);
    a PNG's transparent pixels are composited over white, as a viewer shows
    them (a GIF's are not: TensorFlow's decoder, which serving uses, has no
    alpha); a JPEG is turned as its EXIF orientation says (phones store photos
    sideways), as the export's image signatures do.

    Args:
        data_dir: the folder.
        image_size: resize every image to this (int: square, or
            `(height, width)`; Lanczos); None: keep the size, which all
            images must share.
        channels: 1 (grayscale) or 3 (RGB); None: 1 if every image is
            grayscale, else 3.
        cache_dir: where decoded arrays are cached (None: no cache), keyed by
            the files' names, sizes and modification times.

    Returns:
        `(images, counts, class_names)`: uint8 `[examples, H, W, C]` (classes
        in sorted order, each class's files sorted), int64 `[classes]`, and
        the sorted class folder names.

    Raises:
        FileNotFoundError: `data_dir` does not exist.
        ValueError: no class folders, an unreadable image (named), mixed image
            sizes without `image_size`, a floating-point or 32-bit image
            (named; PIL modes F, or I beyond 16 bits).
    """
    image_size = _image_size(image_size)
    data_dir = os.path.expanduser(data_dir)
    cache_dir = cache_lib.cache_directory(cache_dir)
    if channels not in (None, 0, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    channels = channels or None
    classes = _list_folder(data_dir)
    names = [name for name, _ in classes]
    cache = None
    if cache_dir:
        key = _folder_key(data_dir, classes, image_size, channels)
        cache = os.path.join(cache_dir, f"folder_{key}.npz")
        cached = cache_lib.read_npz(cache, ["images", "counts"], "image folder", layout="flat")
        if (cached is not None and cached[1].tolist() == [len(f) for _, f in classes]
                and len(cached[0]) == cached[1].sum()):
            return cached[0], cached[1], names
    if any(files for _, files in classes):
        count = sum(len(f) for _, f in classes)
        if image_size is not None:
            _check_fits_in_memory(count, image_size, channels or 3, data_dir)
        logging.info("Decoding %d images of %d classes in %s", count, len(classes), data_dir)
        images, counts = _decode_folder(data_dir, classes, image_size, channels)
    else:
        raise ValueError(f"image folder {data_dir}: its {len(classes)} class folders hold no "
                         f"images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    if cache:
        cache_lib.write_npz(cache, images=images, counts=counts)
    return images, counts, names


def folder_tasks(data_dir, n_way, k_shot, k_query, image_size=None, channels=None, cache_dir=None,
                 class_split=DEFAULT_CLASS_SPLIT, seed=0, drop_small_classes=False):
    """N-way K-shot tasks from a folder of images, one sub-folder per class.

    Args:
        data_dir: `data_dir/<class>/<image>.png|jpg|jpeg|bmp|gif`.
        n_way, k_shot, k_query: task shape (k per class).
        image_size: int or `(height, width)` to resize to; None: keep the
            images' size (all must share it).
        channels: 1 or 3; None: 1 if every image is grayscale, else 3.
        cache_dir: cache for the decoded images (None: none).
        class_split: see `split_classes`; explicit class ids are folder names.
        seed: shuffle seed of a fractional split.
        drop_small_classes: leave out classes with too few images (warning)
            instead of refusing.

    Returns:
        A `ClassPoolTasks` (images as float32 in [0, 1]).

    Raises:
        FileNotFoundError: `data_dir` does not exist.
        ValueError: no class folders, an unreadable image (named), mixed image
            sizes without `image_size`, a floating-point or 32-bit image, a
            too large `image_size`; too few classes or images.

    Example:

    ```python
    tasks = folder_tasks("~/photos_by_species", n_way=5, k_shot=1, k_query=5,
                         image_size=84, cache_dir="~/.cache/tf_maml")
    ```
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    images, counts, names = load_folder(data_dir, image_size, channels, cache_dir)
    per_class = dict(zip(names, np.split(images, np.cumsum(counts)[:-1])))
    return _pools_from_split(per_class, names, class_split, seed, n_way, k_shot, k_query,
                             f"image folder {data_dir}", drop_small_classes)


# -- TensorFlow Datasets ------------------------------------------------------------------------


def _tfds_feature_keys(info, image_key, label_key, name):
    import tensorflow_datasets as tfds
    features = info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    supervised = info.supervised_keys or (None, None)
    if image_key is None:
        image_key = supervised[0] if isinstance(supervised[0], str) else next(
            (k for k in keys if isinstance(features[k], tfds.features.Image)), None)
    if label_key is None:
        label_key = supervised[1] if isinstance(supervised[1], str) else next(
            (k for k in keys if isinstance(features[k], tfds.features.ClassLabel)), None)
    for what, key in (("image", image_key), ("label", label_key)):
        if key is None or key not in keys:
            raise ValueError(f"TFDS {name}: no {what} feature {key or ''} found among "
                             f"{keys}; pass {what}_key")
    return image_key, label_key


def _load_tfds(name, data_dir, splits, download, image_key, label_key, image_size):
    import tensorflow_datasets as tfds
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"unknown TFDS dataset {name!r} ({first})") from None
    if download and not builder.is_prepared():
        downloads.check_tfds_downloadable(
            builder, f"Without network: prepare it on a connected machine (tfds build {name}, "
            "or tfds.load) and pass the data directory that holds it as data_dir")
        logging.info("TFDS %s is not prepared in %s: downloading it", name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 -- network errors come in many types
            first = " ".join(str(e).split())[:300]
            raise ValueError(
                f"TFDS {name} is not prepared in {builder.data_dir} and could not be downloaded "
                f"({type(e).__name__}: {first}). Without network: prepare it on a connected "
                f"machine (tfds build {name}, or tfds.load) and pass the data directory that "
                f"holds it as data_dir") from None
    image_key, label_key = _tfds_feature_keys(builder.info, image_key, label_key, name)
    splits = list(splits or builder.info.splits or ("train", "test"))
    label_feature = builder.info.features[label_key]
    class_names = getattr(label_feature, "names", None)
    channels = (builder.info.features[image_key].shape or (None,))[-1] or 3
    if image_size is not None:  # as for a folder: refused before anything is decoded
        try:
            count = sum(builder.info.splits[split].num_examples for split in splits)
        except (KeyError, TypeError, AttributeError):
            count = 1  # unknown here: checked again once the images are counted
        _check_fits_in_memory(max(count, 1), image_size, channels, f"TFDS {name}")
    images, labels = [], []
    for split in splits:
        try:
            dataset = builder.as_dataset(split=split)
        except AssertionError as e:  # TFDS' "could not find data in ...; download_and_prepare"
            raise FileNotFoundError(f"TFDS {name}: {e}") from None
        dataset = dataset.map(lambda ex: (ex[image_key], ex[label_key]))
        static = dataset.element_spec[0].shape
        if static.is_fully_defined():  # one shape: batched (resized below)
            dataset = dataset.batch(4096)
            for x, y in dataset.as_numpy_iterator():
                images.append(x)
                labels.append(y)
            continue
        for x, y in dataset.as_numpy_iterator():
            images.append(_resize_array(x, image_size, name)[None])
            labels.append(np.asarray(y)[None])
    if not images:
        raise ValueError(f"TFDS {name}: splits {splits} hold no examples")
    shapes = {i.shape[1:] for i in images}
    if len(shapes) > 1:
        raise ValueError(f"TFDS {name}: mixed image sizes {sorted(shapes)[:3]}; pass image_size")
    x, y = np.concatenate(images), np.concatenate(labels)
    if image_size is not None and x.shape[1:3] != image_size:
        _check_fits_in_memory(len(x), image_size, x.shape[-1], f"TFDS {name}")
        x = np.stack([_resize_array(image, image_size, name) for image in x])
    return x, y, class_names


def _resize_array(image, image_size, name):
    if image_size is None or image.shape[:2] == image_size:
        return image
    from PIL import Image
    if image.dtype != np.uint8:
        raise ValueError(f"TFDS {name}: image_size needs uint8 images, got {image.dtype}")
    gray = image.ndim == 3 and image.shape[-1] == 1
    resized = Image.fromarray(image[..., 0] if gray else image).resize(image_size[::-1],
                                                                       Image.LANCZOS)
    resized = np.asarray(resized, dtype=np.uint8)
    return resized[..., None] if gray else resized


def tfds_tasks(name, n_way, k_shot, k_query, image_size=None, data_dir=None,
               class_split=DEFAULT_CLASS_SPLIT, seed=0, splits=None, download=True,
               image_key=None, label_key=None, drop_small_classes=False):
    """N-way K-shot tasks from a TensorFlow Datasets image-classification data set.

    All of the data set's splits are pooled as `(image, label)` examples, and
    its classes are split into meta-train/val/test classes.

    Args:
        name: the TFDS name, with a config if any: "cifar100", "emnist/balanced".
        n_way, k_shot, k_query: task shape (k per class).
        image_size: int or `(height, width)` to resize to (Lanczos); None:
            keep the data set's size.
        data_dir: TFDS' data directory (None: its default); a prepared
            data set there is read without downloading.
        class_split: see `split_classes`; explicit class ids are label numbers.
        seed: shuffle seed of a fractional split.
        splits: the TFDS splits to pool (default: all).
        download: download and prepare the data set if it is not in `data_dir`.
        image_key, label_key: the features to use (default: the supervised
            keys, or the first image and class-label features).
        drop_small_classes: leave out classes with too few examples (warning)
            instead of refusing.

    Returns:
        A `ClassPoolTasks`.

    Raises:
        ValueError: unknown data set or features, too few classes or examples.
        FileNotFoundError: the data set is not prepared in `data_dir` and
            `download` is false.

    Example:

    ```python
    tasks = tfds_tasks("cifar100", n_way=5, k_shot=1, k_query=15)
    ```
    """
    image_size = _image_size(image_size)
    x, y, class_names = _load_tfds(name, data_dir, splits, download, image_key, label_key,
                                   image_size)
    return array_tasks(x, y, n_way, k_shot, k_query, class_split, seed,
                       drop_small_classes=drop_small_classes, name=f"TFDS {name}")


# -- regression from a function -----------------------------------------------------------------


class FunctionTasks:
    """Regression tasks from a Python function: `sample_task(seed) -> (x, y)` gives one task.

    The first `k_shot` rows of a task are its support set, the next `k_query`
    its query set. `sample_task` runs through `tf.numpy_function`, so the
    family works in `tf.data` and `tf.function` (not in an exported graph);
    episodes are deterministic when `sample_task` is a function of its seed.

    Args:
        sample_task: `sample_task(seed: int) -> (x, y)`, numpy arrays with at
            least `k_shot + k_query` rows; y `[rows]` or `[rows, outputs]`.
            If it takes a `split` keyword, it is passed "train", "val" or
            "test".
        k_shot: support examples per task.
        k_query: query examples per task.

    Raises:
        ValueError: bad `k_shot`/`k_query`, or `sample_task(0)` returns
            arrays of the wrong kind or too few rows. A later task that is
            bad (or a `sample_task` that raises) fails the graph step that
            samples it with a one-line message (`MetaLearner.fit` and the
            CLI trainer stop with it as a `ValueError`).

    Example:

    ```python
    def line(seed):
        rng = np.random.default_rng(seed)
        slope, x = rng.normal(), rng.uniform(-1, 1, (20, 1))
        return x, slope * x
    tasks = FunctionTasks(line, k_shot=5, k_query=10)
    ```
    """

    is_classification = False

    def __init__(self, sample_task, k_shot, k_query):
        check_positive_ints("FunctionTasks", k_shot=k_shot, k_query=k_query)
        self.sample_task, self.k_shot, self.k_query = sample_task, k_shot, k_query
        try:
            self._takes_split = "split" in inspect.signature(sample_task).parameters
        except (TypeError, ValueError):
            self._takes_split = False
        self.input_shape = self.output_size = None
        x, y = self._call(0, "train", k_shot + k_query)
        self.input_shape = tuple(x.shape[1:])
        self.output_size = int(y.shape[1])

    @property
    def _name(self):
        return getattr(self.sample_task, "__name__", "sample_task")

    def _call(self, seed, split, rows):
        """One task's first `rows` rows as float32 `(x [rows, ...], y [rows, outputs])`."""
        name = self._name
        result = (self.sample_task(seed, split=split) if self._takes_split
                  else self.sample_task(seed))
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise _BadTask(f"{name}(seed) must return (x, y), got {type(result).__name__}")
        try:
            x, y = (np.asarray(a) for a in result)
        except ValueError as e:  # ragged rows
            raise _BadTask(f"{name}({seed}) returned rows that are not arrays: "
                           f"{' '.join(str(e).split())}") from None
        if y.ndim == 1:
            y = y[:, None]
        if x.ndim < 1 or y.ndim != 2 or len(x) != len(y):
            raise _BadTask(f"{name}({seed}) returned x {x.shape} and y {y.shape}; expected "
                           "the same number of rows, y [rows] or [rows, outputs]")
        if len(x) < rows:
            raise _BadTask(f"{name}({seed}) returned {len(x)} rows, fewer than k_shot + "
                           f"k_query = {rows}")
        if self.input_shape is not None and (x.shape[1:] != self.input_shape
                                             or y.shape[1] != self.output_size):
            raise _BadTask(f"{name}({seed}) returned x {x.shape} and y {y.shape}; expected "
                           f"rows of shape {self.input_shape} and ({self.output_size},) as "
                           f"{name}(0) returned")
        for what, values in (("x", x), ("y", y)):
            if values.dtype.kind not in "biuf":
                raise _BadTask(f"{name}({seed}) returned {what} of dtype {values.dtype}; "
                               f"expected real numbers")
        with np.errstate(over="ignore"):  # overflow to float32 infinity is reported below
            x, y = x[:rows].astype(np.float32), y[:rows].astype(np.float32)
        for what, values in (("x", x), ("y", y)):
            if not np.isfinite(values).all():
                raise _BadTask(f"{name}({seed}) returned {what} with NaN or infinite values "
                               f"(in float32)")
        return x, y

    def sample(self, seed, meta_batch_size, split="train", k_shot=None):
        """Samples a meta-batch of tasks as an `Episode`.

        Each task's integer seed is drawn from `seed` (stateless), then
        `sample_task` gives its rows.

        Args:
            seed: int64 tensor [2] (see `tf_maml.tasks.step_seed`).
            meta_batch_size: number of tasks.
            split: passed to `sample_task` if it takes a `split` keyword.
            k_shot: support examples per task, if not the family's `k_shot`.

        Returns:
            An `Episode` of float32 tensors `[tasks, k, ...]`.

        Raises:
            ValueError: a bad seed or meta-batch size; eagerly, a task's bad
                rows or `sample_task`'s error (in a graph, a one-line error of
                the step that samples it).
        """
        seed = checked_seed(seed, meta_batch_size)
        k_shot = self.k_shot if k_shot is None else k_shot
        rows = k_shot + self.k_query
        seeds = tf.random.stateless_uniform([meta_batch_size], seed, minval=0,
                                            maxval=2**31 - 1, dtype=tf.int64)

        x_shape = [meta_batch_size, rows, *self.input_shape]
        y_shape = [meta_batch_size, rows, self.output_size]

        @tf.autograph.experimental.do_not_convert
        def tasks(seeds):
            # A failure becomes an error message (and placeholder rows), raised by `checked`
            # in one line rather than in TensorFlow's traceback of this function.
            pairs = []
            for seed in seeds.tolist():
                try:
                    pairs.append(self._call(seed, split, rows))
                except _BadTask as e:
                    return np.zeros(x_shape, np.float32), np.zeros(y_shape, np.float32), str(e)
                except Exception as e:  # the user's function failed: name it and the seed
                    text = " ".join(str(e).split())
                    return (np.zeros(x_shape, np.float32), np.zeros(y_shape, np.float32),
                            f"{self._name}({seed}) raised {type(e).__name__}: {text}")
            return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs]), ""

        x, y, error = tf.numpy_function(tasks, [seeds], [tf.float32, tf.float32, tf.string],
                                        stateful=False)
        x, y = checked(tf.equal(error, ""), error, (x, y))
        x.set_shape(x_shape)
        y.set_shape(y_shape)
        return Episode(x[:, :k_shot], y[:, :k_shot], x[:, k_shot:], y[:, k_shot:])


class _BadTask(ValueError):
    """`FunctionTasks.sample_task` returned something other than a task's rows."""
