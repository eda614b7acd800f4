"""N-way K-shot episodes sampled in-graph from images held in memory."""

import numpy as np
import tensorflow as tf

from tf_maml.tasks.episodes import Episode, check_positive_ints, checked_seed

__all__ = ["ImageClassTasks"]

SPLITS = ("train", "val", "test")


class ImageClassTasks:
    """N-way K-shot classification tasks over classes of images kept in memory.

    Each split is a uint8 array `[classes, examples, H, W, C]`. A task picks
    `n_way` distinct classes, gives them labels 0..n_way-1 in random order,
    and draws `k_shot` support and `k_query` query examples of each (distinct
    examples). With `rotate_train=True`, every training class also appears
    rotated by 90°, 180° and 270°, each rotation a class of its own (the MAML
    paper's Omniglot augmentation). Sampling is a pure function of the seed.

    Args:
        splits: dict split name ("train", "val", "test") -> uint8 array
            `[classes, examples, H, W, C]`; "val" is optional (falls back to
            "test").
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.
        rotate_train: add the three rotations of each training class as classes.
        name: dataset name, for messages.

    Raises:
        ValueError: no "train" or "test" split, a split that is not a uint8
            `[classes, examples, H, W, C]` array, splits of different image
            shapes, non-square images with `rotate_train`, a split with fewer
            than `n_way` classes, or classes with fewer than
            `k_shot + k_query` examples.

    Example:

    ```python
    images = np.zeros([10, 20, 28, 28, 1], np.uint8)  # 10 classes of 20 images
    tasks = ImageClassTasks({"train": images[:6], "test": images[6:]}, n_way=2, k_shot=1,
                            k_query=5)
    episode = tasks.sample(tf.constant([0, 0], tf.int64), 4)  # 4 tasks
    ```
    """

    is_classification = True
    scales_uint8_inputs = True  # `sample` gives the uint8 images scaled to [0, 1]

    def __init__(self, splits, n_way, k_shot, k_query, rotate_train=False, name="images"):
        check_positive_ints(name, n_way=n_way, k_shot=k_shot, k_query=k_query)
        if "train" not in splits or "test" not in splits:
            raise ValueError(f"{name}: need 'train' and 'test' splits, got {sorted(splits)}")
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.rotate_train, self.name = rotate_train, name
        self.num_classes, self.counts = {}, {}
        self._pools = {}
        for split, images in splits.items():
            images = np.asarray(images)
            if images.ndim != 5 or images.dtype != np.uint8:
                raise ValueError(f"{name} {split}: expected uint8 [classes, examples, H, W, C], "
                                 f"got {images.dtype} {images.shape}")
            rotations = 4 if (split == "train" and rotate_train) else 1
            classes = images.shape[0] * rotations
            if classes < n_way:
                raise ValueError(f"{name} {split} split has {classes} classes, fewer than "
                                 f"n_way={n_way}")
            if images.shape[1] < k_shot + k_query:
                raise ValueError(f"{name} {split} split has {images.shape[1]} examples per class, "
                                 f"fewer than k_shot + k_query = {k_shot + k_query}")
            if rotations > 1:
                if images.shape[2] != images.shape[3]:
                    raise ValueError(f"{name}: rotations need square images, got {images.shape}")
                images = np.stack([np.rot90(images, k, axes=(2, 3)) for k in range(4)])
            else:
                images = images[None]
            # [rotations, classes, examples, H, W, C]; kept on the host as a constant.
            self._pools[split] = tf.constant(np.ascontiguousarray(images))
            self.num_classes[split] = classes
            self.counts[split] = np.full(classes, images.shape[2], np.int64)
        shapes = {tuple(p.shape[3:]) for p in self._pools.values()}
        if len(shapes) != 1:
            raise ValueError(f"{name}: splits have different image shapes {sorted(shapes)}")
        self.input_shape = shapes.pop()
        self.output_size = n_way

    def check_k_shot(self, k_shot, split="train", label="k_shot"):
        """Raises `ValueError` unless `split`'s classes have `k_shot + k_query` examples.

        `label` names `k_shot` in the message (the setting it came from).
        """
        split = "test" if split == "val" and "val" not in self._pools else split
        examples = self._pools[split].shape[2]
        if k_shot + self.k_query > examples:
            raise ValueError(f"{self.name} {split} split has {examples} examples per class, "
                             f"fewer than {label} + k_query = {k_shot + self.k_query}")

    def sample(self, seed, meta_batch_size, split="train", k_shot=None):
        """Samples a meta-batch of N-way K-shot tasks.

        Args:
            seed: int64 tensor [2] (see `tf_maml.tasks.step_seed`).
            meta_batch_size: number of tasks.
            split: "train", "val" (falls back to "test" if absent) or "test".
            k_shot: support examples per class, if not the family's `k_shot`.

        Returns:
            An `Episode`: x float32 `[tasks, n_way * k, H, W, C]` in [0, 1], y int32
            `[tasks, n_way * k]`.
        """
        seed = checked_seed(seed, meta_batch_size)
        if split == "val" and "val" not in self._pools:
            split = "test"
        if split not in self._pools:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        pool = self._pools[split]
        rotations, base_classes, examples = pool.shape[0], pool.shape[1], pool.shape[2]
        k_shot = self.k_shot if k_shot is None else k_shot
        n, per_class = self.n_way, k_shot + self.k_query
        self.check_k_shot(k_shot, split)
        class_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        # N distinct classes per task (top-k of uniform scores = a random subset in random order).
        scores = tf.random.stateless_uniform([meta_batch_size, base_classes * rotations],
                                             class_seed)
        classes = tf.math.top_k(scores, n, sorted=False).indices           # [T, N]
        rotation, character = classes // base_classes, classes % base_classes
        scores = tf.random.stateless_uniform([meta_batch_size, n, examples], example_seed)
        chosen = tf.math.top_k(scores, per_class, sorted=False).indices     # [T, N, K+Q]
        index = tf.stack([
            tf.broadcast_to(rotation[..., None], chosen.shape),
            tf.broadcast_to(character[..., None], chosen.shape),
            chosen], axis=-1)
        images = tf.cast(tf.gather_nd(pool, index), tf.float32) / 255.0     # [T, N, K+Q, H, W, C]
        labels = tf.broadcast_to(tf.range(n, dtype=tf.int32)[None, :, None],
                                 [meta_batch_size, n, per_class])
        shape = tf.concat([[meta_batch_size, -1], tf.shape(images)[3:]], 0)

        def part(t, start, size):
            return t[:, :, start:start + size]

        return Episode(
            tf.reshape(part(images, 0, k_shot), shape),
            tf.reshape(part(labels, 0, k_shot), [meta_batch_size, -1]),
            tf.reshape(part(images, k_shot, self.k_query), shape),
            tf.reshape(part(labels, k_shot, self.k_query), [meta_batch_size, -1]))
