"""Exports a meta-initialization as a SavedModel whose signatures adapt per request.

Signatures, one task per request (no task axis in the inputs):

* `serving_default`: `x` -> `predictions` with the meta-initialization.
* `adapt`: `support_x`, `support_y`, `query_x` -> `predictions` for the query
  set after `num_eval_steps` inner steps of size `inner_lr` (the training run's
  values) on the support set; classification also returns `probabilities` (the
  softmax of `predictions`, or `predictions` themselves for a model ending in a softmax).
* `adapt_custom`: the same plus scalar inputs `inner_steps` (int32) and
  `inner_lr` (float32).
* `adapted_weights`: `support_x`, `support_y` -> the adapted weights, one
  output per model weight (named after the variable).

Task-major signatures, several tasks per request (a leading task axis on every
input and output, so TF Serving's request batching and REST's row format
apply):

* `adapt_tasks`: `support_x` `[tasks, k, ...]`, `support_y` `[tasks, k(, ...)]`,
  `query_x` `[tasks, q, ...]` -> `predictions` `[tasks, q, ...]` (+
  `probabilities`), each task as `adapt` would answer it alone.
* `adapt_tasks_custom`: the same plus `inner_steps` `[tasks]` int32 and
  `inner_lr` `[tasks]` float32: every task its own step count and step size.

Image models (Omniglot, MiniImagenet, image folder and TFDS exports) also have:

* `decode_images`: `images` `[n]` encoded PNG/JPEG/BMP/GIF -> `x`, the
  model's input, preprocessed as in training up to the resampling filter (see
  `ImageFormat`).
* `adapt_images`: `support_images` `[k]`, `support_y`, `query_images` `[q]`
  -> `adapt` on the decoded images.

Every request is stateless: weights are adapted as tensors inside the graph,
never assigned, so concurrent requests cannot see each other's adaptation.
The inner steps run in a graph loop (`tf.while_loop`): the graph's size does
not depend on the number of steps. Sizes are dynamic within the export's
`ServingLimits` (examples per support and query set, inner steps, tasks per
request); the input shape and (for classification) the number of classes N
are fixed by the model. Malformed or oversized requests, and requests whose
adaptation diverges (non-finite predictions, e.g. from a too large
`inner_lr`), fail with INVALID_ARGUMENT and a message naming the input, and
leave nothing behind.

With batch normalization using per-task batch statistics (the paper's
behaviour), predictions for a query example depend on the other examples in
the same query set: send a task's whole query set in one request. Tasks never
interact (statistics are per task).

The graph uses only standard TensorFlow ops (no `py_function`, no XLA), so TF
Serving's C++ runtime runs it.

Meta-RL runs export a policy instead (`serving_default` for action means,
`adapt` and `adapt_custom` for one policy-gradient step on a request's
episodes): see `tf_maml.rl.serving`; `export` dispatches to it.
"""

import ctypes
import dataclasses
import errno
import json
import math
import os
import re
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml import algorithms as algorithms_lib
from tf_maml import config as config_lib
from tf_maml import core, files, functional

__all__ = ["AdaptationSignatures", "build_export_archive", "export", "ServingLimits",
           "ImageFormat", "default_limits", "image_format_for", "check_finite_parameters",
           "MAX_INNER_STEPS", "SIGNATURES", "IMAGE_SIGNATURES", "DEFAULT_LIMITS",
           "validate_limits", "limits_from", "check_version", "version_path", "write_version"]

SIGNATURES = ("serving_default", "adapt", "adapt_custom", "adapted_weights", "adapt_tasks",
              "adapt_tasks_custom")
IMAGE_SIGNATURES = ("decode_images", "adapt_images")
# The largest image side the image signatures decode: a small PNG of 16000x16000 blank pixels
# would otherwise take a gigabyte to decode. Read from the file's header before decoding.
MAX_IMAGE_SIDE = 4096
CONFIG_ASSET = "tf_maml_config.json"
# Config fields an export of tasks given in code (dataset "custom") does not record.
CUSTOM_UNRECORDED_FIELDS = ("n_way", "k_shot", "k_query")
DATA_FINGERPRINT_ASSET = "tf_maml_data_fingerprint.json"  # the run's data (`evaluate_export`)


def validate_limits(limits):
    """Raises `ValueError` unless every field of the limits dataclass is a positive int32."""
    for field in dataclasses.fields(limits):
        value = getattr(limits, field.name)
        if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                or not 1 <= value <= 2**31 - 1):
            raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
    return limits


def limits_from(defaults, limits):
    """`limits` (a limits dataclass, a dict of some of `defaults`' fields, or None), validated.

    Raises:
        ValueError: a field `defaults` does not have, a non-positive value, or
            limits of another kind than `defaults`.
    """
    if limits is None or isinstance(limits, dict):
        unknown = sorted(set(limits or {}) - {f.name for f in dataclasses.fields(defaults)})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a limit of this export (its limits: "
                             f"{', '.join(f.name for f in dataclasses.fields(defaults))})")
        limits = dataclasses.replace(defaults, **(limits or {}))
    if type(limits) is not type(defaults):
        raise ValueError(f"this export takes {type(defaults).__name__}, got "
                         f"{type(limits).__name__}")
    return validate_limits(limits)


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of an export; larger requests fail with INVALID_ARGUMENT.

    Attributes:
        max_support_examples: examples in one task's support set (rows of
            `support_x`; per task in the task-major signatures).
        max_query_examples: examples in one task's query set (rows of
            `query_x`, of `serving_default`'s `x`, of `query_images`).
        max_inner_steps: the largest `inner_steps` of the custom signatures
            (and the most the export's own `num_eval_steps` may be).
        max_tasks: tasks in one request of the task-major signatures (with
            TF Serving's batching, in one merged batch).
    """
    max_support_examples: int
    max_query_examples: int
    max_inner_steps: int
    max_tasks: int

    def validate(self):
        return validate_limits(self)

    def to_dict(self):
        return dataclasses.asdict(self)


# Per dataset: one task at all the limits takes seconds on one CPU core (1.2 s
# for sine, 2.6 s for Omniglot, 5.1 s for MiniImagenet, measured on a busy
# 2-core machine) and at most about 400 MB (see export/README.md).
DEFAULT_LIMITS = {
    "sine": ServingLimits(max_support_examples=1000, max_query_examples=10000,
                          max_inner_steps=1000, max_tasks=16),
    "omniglot": ServingLimits(max_support_examples=100, max_query_examples=500,
                              max_inner_steps=50, max_tasks=8),
    "miniimagenet": ServingLimits(max_support_examples=50, max_query_examples=100,
                                  max_inner_steps=20, max_tasks=4),
}
# Kept for compatibility: the sine export's (and the largest default) step limit.
MAX_INNER_STEPS = DEFAULT_LIMITS["sine"].max_inner_steps


def default_limits(dataset_or_spec):
    """The default `ServingLimits` of a dataset name, or guessed from a `TaskSpec`.

    A spec is matched by its input size: at most 16 values per example as
    sine, up to 28×28×3 as Omniglot, larger as MiniImagenet.
    """
    if isinstance(dataset_or_spec, str):
        if dataset_or_spec not in DEFAULT_LIMITS:
            raise ValueError(f"no default serving limits for dataset {dataset_or_spec!r}")
        return DEFAULT_LIMITS[dataset_or_spec]
    size = int(np.prod(dataset_or_spec.input_shape))
    if size <= 16:
        return DEFAULT_LIMITS["sine"]
    return DEFAULT_LIMITS["omniglot" if size <= 28 * 28 * 3 else "miniimagenet"]


@dataclasses.dataclass(frozen=True)
class ImageFormat:
    """How encoded images become the model's input, as training decodes them.

    Images are decoded to `channels` (1: the codec's grayscale conversion),
    resized to the model's input size when they differ (`resize`: "lanczos3",
    with antialiasing, where training used PIL's LANCZOS; "nearest" where it
    used nearest neighbour, Omniglot's `omniglot_resize_filter="nearest"`),
    rounded to 8 bits, inverted when `invert` (Omniglot: ink = 1 on background
    0, from dark ink on a light page), and scaled to [0, 1].

    `pil_jpeg`: JPEGs are decoded as PIL decodes them (training's loaders but
    TFDS): libjpeg's accurate integer transform, and for one channel the RGB
    picture converted to gray by luma (which also reads CMYK JPEGs). False:
    as TensorFlow's `decode_image` (TFDS' decoder), whose fast transform is a
    few levels off PIL's.
    """
    channels: int
    invert: bool
    resize: str = "lanczos3"
    pil_jpeg: bool = True

    def to_dict(self):
        return dataclasses.asdict(self)


def image_format_for(dataset, input_shape=None, omniglot_resize_filter="lanczos"):
    """The `ImageFormat` of a dataset's images, or `None` (not an image dataset).

    Args:
        dataset: a `Config.dataset`.
        input_shape: the model's input shape; the user's images ("folder",
            "tfds:NAME") are recognized from it: `(H, W, 1)` or `(H, W, 3)`,
            decoded as training decoded them (grayscale or RGB, not inverted).
        omniglot_resize_filter: the run's `Config.omniglot_resize_filter`.
    """
    resize = "nearest" if omniglot_resize_filter == "nearest" else "lanczos3"
    known = {"omniglot": ImageFormat(channels=1, invert=True, resize=resize),
             "miniimagenet": ImageFormat(channels=3, invert=False)}
    if dataset in known:
        return known[dataset]
    own_images = dataset == "folder" or dataset.startswith("tfds:")
    if own_images and input_shape is not None and len(input_shape) == 3 and \
            input_shape[-1] in (1, 3):
        return ImageFormat(channels=int(input_shape[-1]), invert=False,
                           pil_jpeg=dataset == "folder")
    return None


# -- validation ---------------------------------------------------------------------------------


def _pil_gray(rgb):
    """RGB pixels (0-255, any dtype holding whole numbers) -> `[..., 1]` float gray levels,
    PIL's "L" conversion exactly (ITU-R 601-2 luma in its integer arithmetic)."""
    rgb = tf.cast(rgb, tf.int32)
    gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536
    return tf.cast(gray[..., None], tf.float32)


def _check(condition, message, data=()):
    return tf.debugging.Assert(condition, [message, *data], summarize=16)


def _encoded_image_size(data):
    """`(height, width)` from an encoded image's header (PNG, JPEG, GIF, BMP), int64.

    (0, 0) for other data (the image signatures refuse it: TensorFlow would
    decode some other formats, WebP, without a size check). Reads only the
    header, so nothing is decompressed.
    """
    header = tf.io.decode_raw(tf.strings.substr(
        tf.strings.join([data, tf.constant(b"\0" * 26)]), 0, 26), tf.uint8)
    b = tf.cast(header, tf.int64)

    def big_endian(start, count):
        return sum(b[start + i] * 256 ** (count - 1 - i) for i in range(count))

    def little_endian(start, count):
        return sum(b[start + i] * 256 ** i for i in range(count))

    def starts_with(prefix):
        return tf.reduce_all(tf.equal(header[:len(prefix)], list(prefix)))

    def signed(value):  # BMP heights are negative for top-down images
        return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0], shape[1]

    zero = tf.constant(0, tf.int64)
    return tf.case([
        (starts_with(b"\x89PNG"), lambda: (big_endian(20, 4), big_endian(16, 4))),
        (starts_with(b"\xff\xd8"), jpeg),
        (starts_with(b"GIF8"), lambda: (little_endian(8, 2), little_endian(6, 2))),
        (starts_with(b"BM"), lambda: (signed(little_endian(22, 4)), signed(little_endian(18, 4)))),
    ], default=lambda: (zero, zero))


# Chunks read before IDAT when a PNG of under 8 bits is searched for a tRNS chunk (writers
# put a handful there); a file with more is taken as opaque.
_MAX_PNG_CHUNKS = 64


def _png_is_transparent(data):
    """Whether PNG `data` has a pixel that is not opaque.

    `decode_png(channels=4)` gives the true alpha of files with an alpha channel
    or a tRNS chunk and of 8- and 16-bit files (255 where they have none); below
    8 bits without tRNS it fills alpha with the source's maximum value (1 for a
    1-bit image), so such files are first searched for a tRNS chunk (among the
    first `_MAX_PNG_CHUNKS` chunks before IDAT).
    """
    padded = tf.strings.join([data, tf.constant(b"\0" * 26)])
    bit_depth = tf.io.decode_raw(tf.strings.substr(padded, 24, 1), tf.uint8)[0]
    size = tf.cast(tf.strings.length(data, unit="BYTE"), tf.int64)

    def has_trns():
        def body(offset, found, done):
            head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, 8), tf.uint8),
                           tf.int64)
            length = head[0] * 2 ** 24 + head[1] * 2 ** 16 + head[2] * 2 ** 8 + head[3]
            kind = tf.strings.substr(data, offset + 4, 4)
            end = tf.logical_or(tf.equal(kind, b"IDAT"), tf.equal(kind, b"IEND"))
            return offset + 12 + length, tf.equal(kind, b"tRNS"), end

        _, found, _ = tf.while_loop(
            lambda offset, found, done: tf.logical_and(
                tf.logical_not(tf.logical_or(found, done)), offset + 8 <= size),
            body, (tf.constant(8, tf.int64), tf.constant(False), tf.constant(False)),
            maximum_iterations=_MAX_PNG_CHUNKS)
        return found

    alpha_is_true = tf.cond(bit_depth >= 8, lambda: tf.constant(True), has_trns)
    return tf.cond(alpha_is_true,
                   lambda: tf.reduce_any(tf.io.decode_png(data, channels=4)[..., 3] < 255),
                   lambda: tf.constant(False))


# JPEG segments (and fill bytes) read before the image data when looking for the EXIF
# orientation (APP0, APP1 and a few others come first), and entries of its first IFD searched
# for the tag.
_MAX_JPEG_SEGMENTS = 64
_MAX_EXIF_ENTRIES = 64
# TIFF field types an orientation is read from: SHORT, LONG, SSHORT, SLONG (PIL reads these
# as a number; other types as bytes, a fraction or a float, which it does not turn by).
_EXIF_NUMBER_TYPES = {3: 2, 4: 4, 8: 2, 9: 4}  # type -> bytes


def _jpeg_orientation(data):
    """The EXIF orientation (1-8) of JPEG `data`, int32; 1 where it has none.

    What the folder loader reads with PIL (`tasks.sources._orientation`): the
    first APP1 segment that starts with `Exif\\0\\0` (fill bytes, standalone
    markers and segments of any length before it; among the first
    `_MAX_JPEG_SEGMENTS`), a TIFF header in either byte order, and the first
    orientation tag (0x0112) among the first `_MAX_EXIF_ENTRIES` entries of its
    first IFD: the first value of a `_EXIF_NUMBER_TYPES` type. Anything else, damaged
    or truncated metadata (bytes past the end read as zeros) or a value outside
    1-8 reads as 1. Never fails.
    """
    size = tf.cast(tf.strings.length(data, unit="BYTE"), tf.int64)
    padded = tf.strings.join([data, tf.constant(b"\0" * 8)])

    def number(position, count, little=False):  # unsigned; bytes past the end read as zeros
        position = tf.clip_by_value(position, 0, size)
        values = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, position, count), tf.uint8),
                         tf.int64)
        powers = tf.constant([256 ** i for i in range(count)], tf.int64)
        return tf.reduce_sum(values * tf.where(little, powers, tf.reverse(powers, [0])))

    def find_exif():
        def body(offset, found, done):
            marker = number(offset, 2)
            # Start of scan or end of image: no more metadata; a non-marker: damaged.
            stop = (marker < 0xFF00) | tf.equal(marker, 0xFFDA) | tf.equal(marker, 0xFFD9)
            exif = tf.equal(marker, 0xFFE1) & tf.equal(
                tf.strings.substr(padded, tf.minimum(offset + 4, size), 6), b"Exif\0\0")
            found_here = tf.logical_not(stop) & exif
            fill = tf.equal(marker, 0xFFFF)  # a fill byte before a marker
            standalone = ((marker >= 0xFFD0) & (marker <= 0xFFD7)) | tf.equal(marker, 0xFF01)
            length = tf.maximum(number(offset + 2, 2), 2)  # as PIL: at least its own 2 bytes
            step = tf.where(fill, tf.constant(1, tf.int64),
                            tf.where(standalone, tf.constant(2, tf.int64), 2 + length))
            return tf.where(found_here, offset, offset + step), found_here, stop

        offset, found, _ = tf.while_loop(
            lambda offset, found, done: tf.logical_not(found | done) & (offset + 4 <= size),
            body, (tf.constant(2, tf.int64), tf.constant(False), tf.constant(False)),
            maximum_iterations=_MAX_JPEG_SEGMENTS)
        return offset, found

    def orientation_at(tiff):
        order = tf.strings.substr(padded, tf.minimum(tiff, size), 2)
        little = tf.equal(order, b"II")
        header_ok = (little | tf.equal(order, b"MM")) & tf.equal(number(tiff + 2, 2, little), 42)
        ifd = tiff + number(tiff + 4, 4, little)
        entries = tf.where(header_ok, tf.minimum(number(ifd, 2, little), _MAX_EXIF_ENTRIES), 0)

        def body(index, value, found):
            entry = ifd + 2 + 12 * index
            kind = number(entry + 2, 2, little)
            count = number(entry + 4, 4, little)
            pointed = tiff + number(entry + 8, 4, little)
            read_value = tf.constant(0, tf.int64)
            for type_code, width in _EXIF_NUMBER_TYPES.items():
                # The first value (PIL takes it where there are several): in the entry when
                # they all fit in its 4 bytes, else where the entry points.
                at = tf.where(count * width <= 4, entry + 8, pointed)
                read_value = tf.where(tf.equal(kind, type_code) & (count >= 1),
                                      number(at, width, little), read_value)
            is_tag = tf.equal(number(entry, 2, little), 0x0112)
            return index + 1, tf.where(is_tag, read_value, value), is_tag

        _, value, _ = tf.while_loop(
            lambda index, value, found: (index < entries) & tf.logical_not(found), body,
            (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(False)),
            maximum_iterations=_MAX_EXIF_ENTRIES)
        return value

    offset, found = find_exif()
    value = tf.cond(found, lambda: orientation_at(offset + 10), lambda: tf.constant(0, tf.int64))
    valid = tf.logical_and(value >= 1, value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def _oriented(image, orientation):
    """`image` `[height, width, channels]` turned upright for its EXIF `orientation` (1-8).

    The transformations of PIL's `ImageOps.exif_transpose`: 2 mirrors left-right,
    3 turns 180°, 4 mirrors top-bottom, 5 transposes, 6 turns 90° clockwise,
    7 transposes across the other diagonal, 8 turns 90° counter-clockwise.
    """
    # Plain reverses and transposes: tf.image's versions add shape assertions, which inside
    # the decoding loop make Grappler log a warning on every trace.
    def transposed():
        return tf.transpose(image, [1, 0, 2])

    return tf.switch_case(orientation - 1, [
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        transposed,
        lambda: tf.reverse(transposed(), [1]),
        lambda: tf.reverse(transposed(), [0, 1]),
        lambda: tf.reverse(transposed(), [0]),
    ])


def _dim(x, index):
    """`tf.shape(x)[index]`, or -1 when `x` has no such axis (never fails, for any rank)."""
    return tf.concat([tf.shape(x), tf.fill([index + 1], -1)], 0)[index]


def _shape_is(x, lead, shape):
    """Whether `x` is `[*lead free dims, *shape]`; evaluates without error for any rank.

    (Graph optimizations may run both branches of a `tf.cond`, so the
    comparison is made on vectors padded to a fixed length instead.)
    """
    k = len(shape)
    padded = tf.concat([tf.shape(x)[lead:], tf.fill([k + 1], -1)], 0)[:k + 1]
    return tf.logical_and(tf.rank(x) >= lead,
                          tf.reduce_all(tf.equal(padded, [*shape, -1])))


def _gated(x, valid, checks, static_shape):
    """`x` once `checks` passed, with the static shape `static_shape`.

    `tf.ensure_shape` alone would fail while the graph is instantiated for a
    request of the wrong rank, before the assertions could say what is wrong;
    behind a `tf.cond` on `valid` (false when `x` does not have that shape,
    and then an assertion fails first) the static shape is unknown there, and
    the assertions report.
    """
    with tf.control_dependencies(checks):
        x, valid = tf.identity(x), tf.identity(valid)
    empty = tf.zeros([0 if d is None else d for d in static_shape], x.dtype)
    return tf.ensure_shape(tf.cond(valid, lambda: x, lambda: empty), static_shape)


def _shape_text(lead, shape):
    return "[" + ", ".join([*lead, *(str(d) for d in shape)]) + "]"


def _lead_names(task_major, what="num_examples"):
    return ["num_tasks", what] if task_major else [what]


def _validated_examples(name, x, shape, limit, limit_name, task_major, max_tasks=None,
                        what="examples", integer_dtype=None):
    """Asserts `x` is `[(tasks,) n, *shape]`, non-empty, finite, within the limits.

    `what` names the rows in the messages ("examples", "observations");
    `integer_dtype` (a model declaring integer inputs) also asserts whole
    numbers within its range.

    Returns:
        `x` with its static shape.
    """
    lead = 2 if task_major else 1
    expected = _shape_text(_lead_names(task_major, f"num_{what}"), shape)
    shape_ok = _shape_is(x, lead, shape) & tf.equal(tf.rank(x), lead + len(shape))
    checks = [_check(shape_ok, f"{name} must have shape {expected}; got shape", [tf.shape(x)])]
    count = _dim(x, lead - 1)
    per_task = " per task" if task_major else ""
    with tf.control_dependencies(checks):
        checks.append(_check(tf.size(x) > 0, f"{name} must not be empty"))
        checks.append(_check(count <= limit,
                             f"{name} has too many {what}{per_task}: this export accepts at "
                             f"most {limit} ({limit_name}); got", [count]))
        if task_major:
            checks.append(_check(_dim(x, 0) <= max_tasks,
                                 f"{name} has too many tasks: this export accepts at most "
                                 f"{max_tasks} per request (max_tasks); got", [_dim(x, 0)]))
    with tf.control_dependencies(checks):
        # Only once the size is known to be within the limits.
        checks.append(_check(tf.reduce_all(tf.math.is_finite(x)),
                             f"{name} has NaN or infinite values"))
    if integer_dtype is not None:
        with tf.control_dependencies(checks):
            whole = tf.reduce_all(tf.equal(x, tf.round(x)))
            in_range = tf.reduce_all((x >= integer_dtype.min) & (x <= integer_dtype.max))
            checks.append(_check(whole & in_range, f"{name} must hold whole numbers in "
                                 f"[{integer_dtype.min}, {integer_dtype.max}]: the model "
                                 f"takes {integer_dtype.name} inputs (pixels 0-255 or ids, "
                                 "not images scaled to [0, 1]); got other values"))
    return _gated(x, shape_ok, checks, [None] * lead + list(shape))


def _validated_labels(y, support_x, classification, output_size, task_major,
                      x_name="support_x"):
    """Asserts `support_y` matches `support_x` (validated) example by example.

    `x_name` names the examples' input in messages (`support_images` for `adapt_images`).
    """
    lead = 2 if task_major else 1
    rows = tf.shape(support_x)[:lead]
    names = _lead_names(task_major)
    counts = "[num_tasks num_examples]" if task_major else "[num_examples]"
    if classification:
        expected = f"{_shape_text(names, [])} integer labels in [0, {output_size})"
        shape_ok = tf.equal(tf.rank(y), lead)
        checks = [_check(shape_ok, f"support_y must be {expected}; got shape", [tf.shape(y)])]
        padded = tf.concat([tf.shape(y), tf.fill([lead], -1)], 0)[:lead]
        same = tf.reduce_all(tf.equal(padded, rows))
        with tf.control_dependencies(checks):
            checks.append(_check(same, f"support_y must have one label per {x_name} example; "
                                       f"got label and example counts {counts}", [padded, rows]))
        with tf.control_dependencies(checks):
            checks.append(_check(tf.reduce_all((y >= 0) & (y < output_size)),
                                 f"support_y labels must be in [0, {output_size}); got", [y]))
        return _gated(y, shape_ok & same, checks, [None] * lead)
    expected = _shape_text(names, [output_size])
    shape_ok = _shape_is(y, lead, [output_size]) & tf.equal(tf.rank(y), lead + 1)
    checks = [_check(shape_ok, f"support_y must have shape {expected}; got shape", [tf.shape(y)])]
    padded = tf.concat([tf.shape(y), tf.fill([lead], -1)], 0)[:lead]
    same = tf.reduce_all(tf.equal(padded, rows))
    with tf.control_dependencies(checks):
        checks.append(_check(same, f"support_y must have one row per {x_name} example; got "
                                   f"row and example counts {counts}", [padded, rows]))
    with tf.control_dependencies(checks):
        checks.append(_check(tf.reduce_all(tf.math.is_finite(y)),
                             "support_y has NaN or infinite values"))
    return _gated(y, shape_ok & same, checks, [None] * lead + [output_size])


def _same_tasks(query_x, support_x):
    """Asserts the task-major query set has as many tasks as the support set."""
    check = _check(tf.equal(tf.shape(query_x)[0], tf.shape(support_x)[0]),
                   "query_x must have as many tasks as support_x; got", [
                       tf.shape(query_x)[0], tf.shape(support_x)[0]])
    with tf.control_dependencies([check]):
        return tf.identity(query_x)


def _validated_per_task(name, value, num_tasks, task_major):
    """A per-task input: a scalar (one task) or `[num_tasks]`; returns `[num_tasks]`."""
    if not task_major:
        scalar = tf.equal(tf.rank(value), 0)
        checks = [_check(scalar, f"{name} must be a scalar (adapt_custom adapts one task; "
                                 "adapt_tasks_custom takes one value per task); got shape",
                         [tf.shape(value)])]
        return _gated(tf.reshape(value, [-1])[:1], scalar, checks, [1])
    expected = "[num_tasks]"
    shape_ok = tf.equal(tf.rank(value), 1)
    checks = [_check(shape_ok, f"{name} must have shape {expected} (one value per task); got "
                               "shape", [tf.shape(value)])]
    same = tf.equal(_dim(value, 0), num_tasks)
    with tf.control_dependencies(checks):
        checks.append(_check(same, f"{name} must have one value per task; got values and tasks",
                             [_dim(value, 0), num_tasks]))
    return _gated(value, shape_ok & same, checks, [None])


def _per_task(value, like):
    """`[tasks]` values reshaped to broadcast against the task-batched `like`."""
    return tf.reshape(value, tf.concat([[-1], tf.ones([like.shape.rank - 1], tf.int32)], 0))


def _weight_names(model):
    names, seen = [], set()
    for variable in model.trainable_variables:
        name = re.sub(r"[^A-Za-z0-9_]", "_", variable.path)
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names


class _PerTaskRate:
    """The algorithm's update rule with the step size replaced by one value per task.

    Each weight gets the rule the algorithm uses for a scalar `inner_lr`, built
    with that weight's `[tasks, 1, ...]` rates, so each task's update is
    exactly the scalar rule's. Assumes the rule treats weights independently
    (SGD, Adam); a rule with per-weight state to start from (Reptile's carried
    Adam state) gives each weight its own part through `for_weights`.
    """

    def __init__(self, algorithm, meta_params, inner_lr, weights):
        self.rules = []
        for index, w in enumerate(weights):
            rule = algorithm.inner_update(meta_params, _per_task(inner_lr, w))
            if hasattr(rule, "for_weights"):
                rule = rule.for_weights([index])
            self.rules.append(rule)

    def init(self, weights):
        return [rule.init([w]) for rule, w in zip(self.rules, weights)]

    def apply(self, weights, grads, state, step):
        new_weights, new_state = [], []
        for rule, w, g, s in zip(self.rules, weights, grads, state):
            (new,), s = rule.apply([w], [g], s, step)
            new_weights.append(new)
            new_state.append(s)
        return new_weights, new_state


class AdaptationSignatures:
    """The serving signatures as plain, testable methods over the requests' tensors.

    Built from the algorithm (which holds the model, its forward, its loss and
    any learned meta-parameters) and the input/label spec; nothing here knows
    the data pipeline. `build_export_archive` registers each method as a
    signature.

    Args:
        algorithm: a `tf_maml.algorithms` algorithm whose variables hold the
            meta-parameters to export.
        spec: the task family's `TaskSpec` (input shape, output size,
            classification).
        num_eval_steps: inner steps of `adapt`, `adapt_tasks` and
            `adapted_weights`.
        inner_lr: a scalar step size for those replacing the algorithm's own
            rates, or `None` to use the algorithm's (learned rates included).
        limits: `ServingLimits` (default: `default_limits(spec)`).
        image_format: an `ImageFormat` to add the image signatures, or `None`.
        outputs_probabilities: (classification) whether the model's outputs are
            already probabilities, so that `probabilities` repeats
            `predictions` instead of taking their softmax; `None`: as
            `functional.output_is_softmax(model)` says (False where it cannot).

    Raises:
        ValueError: bad limits, or `num_eval_steps` above `max_inner_steps`.

    Example:

    ```python
    signatures = AdaptationSignatures(experiment.algorithm, experiment.spec, 10, None)
    out = signatures.adapt(support_x, support_y, query_x)["predictions"]
    ```
    """

    def __init__(self, algorithm, spec, num_eval_steps, inner_lr=None, limits=None,
                 image_format=None, outputs_probabilities=None):
        self.algorithm = algorithm
        self.model = algorithm.model
        self.classification = spec.is_classification
        if outputs_probabilities is None:
            outputs_probabilities = bool(functional.output_is_softmax(self.model))
        self.outputs_probabilities = bool(outputs_probabilities) and self.classification
        self.input_shape = list(spec.input_shape)
        self.output_size = spec.output_size
        self.limits = (limits or default_limits(spec)).validate()
        if not isinstance(num_eval_steps, int) or num_eval_steps < 0:
            raise ValueError(f"num_eval_steps must be a non-negative integer, got "
                             f"{num_eval_steps!r}")
        if num_eval_steps > self.limits.max_inner_steps:
            raise ValueError(f"num_eval_steps ({num_eval_steps}) exceeds max_inner_steps "
                             f"({self.limits.max_inner_steps}); raise max_inner_steps")
        self.num_eval_steps = num_eval_steps
        self.inner_lr = inner_lr
        self.image_format = image_format
        if image_format is not None and (len(self.input_shape) != 3
                                         or self.input_shape[-1] != image_format.channels):
            raise ValueError(f"image_format {image_format} does not fit input shape "
                             f"{self.input_shape}")
        self.dtype = self.model.trainable_variables[0].dtype
        # A model declaring integer inputs (keras.Input(dtype="uint8")) gets raw pixels.
        self.integer_input_dtype = functional.integer_input_dtype(self.model)
        self.takes_integer_pixels = self.integer_input_dtype is not None
        self.label_dtype = tf.int32 if self.classification else self.dtype
        self.weight_names = _weight_names(self.model)
        # The adaptation itself, task-major, traced once and called (after each
        # signature's own validation) by the one-task and the task-major signatures.
        x = tf.TensorSpec([None, None, *self.input_shape], self.dtype)
        y = tf.TensorSpec([None, None] + ([] if self.classification else [self.output_size]),
                          self.label_dtype)
        self._adapted_fn = tf.function(lambda sx, sy: self._adapt_fixed(sx, sy)[0],
                                       input_signature=[x, y], autograph=False)
        self._fixed_fn = tf.function(self._predict_fixed, input_signature=[x, y, x],
                                     autograph=False)
        self._custom_fn = tf.function(self._adapt_and_predict, input_signature=[
            x, y, x, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], self.dtype)],
            autograph=False)
        # Task-major requests are answered one task at a time where adapting several at
        # once would differentiate grouped convolutions: their gradient kernels exist on
        # CPU only with oneDNN on, which a server (TF Serving, a loader on a CPU without
        # AVX-512) may not have; one task's convolution is a plain one, valid everywhere.
        self.one_task_at_a_time = algorithm.adapts_through_grouped_convolutions

    @property
    def meta_params(self):
        return self.algorithm.meta_variables

    @property
    def signature_names(self):
        return SIGNATURES + (IMAGE_SIGNATURES if self.image_format is not None else ())

    # -- pieces ---------------------------------------------------------------------------------

    def _outputs(self, predictions):
        result = {"predictions": predictions}
        if self.classification:
            # (a softmax model's outputs are probabilities already)
            result["probabilities"] = (tf.identity(predictions) if self.outputs_probabilities
                                       else tf.nn.softmax(predictions))
        return result

    def _support(self, support_x, support_y, task_major, x_name="support_x"):
        support_x = _validated_examples(x_name, support_x, self.input_shape,
                                        self.limits.max_support_examples, "max_support_examples",
                                        task_major, self.limits.max_tasks,
                                        integer_dtype=self.integer_input_dtype)
        support_y = _validated_labels(support_y, support_x, self.classification,
                                      self.output_size, task_major, x_name)
        if not task_major:
            support_x, support_y = support_x[None], support_y[None]
        return support_x, support_y

    def _query(self, query_x, support_x, task_major, name="query_x"):
        query_x = _validated_examples(name, query_x, self.input_shape,
                                      self.limits.max_query_examples, "max_query_examples",
                                      task_major, self.limits.max_tasks,
                                      integer_dtype=self.integer_input_dtype)
        if not task_major:
            return query_x[None]
        return _same_tasks(query_x, support_x)

    def _custom_inputs(self, inner_steps, inner_lr, support_x, task_major):
        num_tasks = tf.shape(support_x)[0]
        inner_steps = _validated_per_task("inner_steps", inner_steps, num_tasks, task_major)
        inner_lr = _validated_per_task("inner_lr", inner_lr, num_tasks, task_major)
        limit = self.limits.max_inner_steps
        checks = [
            _check(tf.reduce_all((inner_steps >= 0) & (inner_steps <= limit)),
                   f"inner_steps must be in [0, {limit}] (max_inner_steps); got", [inner_steps]),
            _check(tf.reduce_all(tf.math.is_finite(inner_lr) & (inner_lr >= 0)),
                   "inner_lr must be finite and >= 0; got", [inner_lr]),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(inner_steps), tf.identity(inner_lr)

    def _finite(self, values, task_major, message=None):
        """Asserts `values` `[tasks, ...]` are finite: divergence is an error, not NaN."""
        message = message or ("the adaptation diverged: predictions are not finite (inputs far "
                              "from the scale of the training data, or a step size too large "
                              "for them?)")
        finite = tf.reduce_all(tf.math.is_finite(values), axis=list(range(1, values.shape.rank)))
        check = _check(tf.reduce_all(finite), message + ("; in tasks" if task_major else ""),
                       [tf.where(~finite)[:, 0]] if task_major else [])
        with tf.control_dependencies([check]):
            return tf.identity(values)

    def _adapt_fixed(self, support_x, support_y):
        """The export's protocol: `num_eval_steps` steps with its rates, in a graph loop."""
        steps = tf.constant(self.num_eval_steps, tf.int32)
        adapted, _ = self.algorithm.adapt(self.meta_params, support_x, support_y, steps,
                                          first_order=True, inner_lr=self.inner_lr)
        return adapted, steps

    def _predict_fixed(self, support_x, support_y, query_x):
        adapted = self._adapted_fn(support_x, support_y)
        steps = tf.constant(self.num_eval_steps, tf.int32)
        return self.algorithm.predict(self.meta_params, adapted, query_x, steps)

    def _task_by_task(self, task_major, fn, *args):
        """`fn` of task-major `args`, run on each task alone where the export asks for it.

        Each task is a one-task call of `fn` (so its answer is `fn`'s for that
        task alone); `tf.map_fn` runs up to 10 tasks in parallel.
        """
        if not (task_major and self.one_task_at_a_time):
            return fn(*args)
        output = fn.get_concrete_function().structured_outputs
        return tf.map_fn(lambda task: fn(*[value[None] for value in task])[0], args,
                         fn_output_signature=tf.TensorSpec(output.shape[1:], output.dtype))

    def _tasks(self, support_x, support_y, query_x, task_major, names=("support_x", "query_x")):
        support_x, support_y = self._support(support_x, support_y, task_major, names[0])
        query_x = self._query(query_x, support_x, task_major, names[1])
        predictions = self._task_by_task(task_major, self._fixed_fn, support_x, support_y, query_x)
        predictions = self._finite(predictions, task_major)
        return self._outputs(predictions if task_major else predictions[0])

    def _tasks_custom(self, support_x, support_y, query_x, inner_steps, inner_lr, task_major):
        support_x, support_y = self._support(support_x, support_y, task_major)
        query_x = self._query(query_x, support_x, task_major)
        inner_steps, inner_lr = self._custom_inputs(inner_steps, inner_lr, support_x, task_major)
        predictions = self._task_by_task(task_major, self._custom_fn, support_x, support_y,
                                         query_x, inner_steps, tf.cast(inner_lr, self.dtype))
        predictions = self._finite(predictions, task_major)
        return self._outputs(predictions if task_major else predictions[0])

    def _adapt_and_predict(self, support_x, support_y, query_x, inner_steps, inner_lr):
        """Adapts every task with its own step count and size; its query predictions.

        One graph loop runs to the largest step count; a task's query set is
        predicted when the loop reaches the task's own count (with that step
        index, which per-step parameters such as MAML++'s batch norm read).
        Tasks never interact, so the steps a task takes after that (for the
        tasks that need more) change nothing of its answer.
        """
        algorithm, params = self.algorithm, self.meta_params
        num_tasks = tf.shape(support_x)[0]
        support = algorithm.task_inputs(params, support_x)
        query = algorithm.task_inputs(params, query_x)
        weights = algorithm.initial_weights(params, num_tasks)
        task_loss = algorithm.task_loss(params, support, support_y)
        update = _PerTaskRate(algorithm, params, inner_lr, weights)
        state = update.init(weights)
        predictions = algorithm.predict_from_inputs(params, weights, query, 0)

        def body(step, weights, flat_state, predictions):
            weights, new_state, _ = core.inner_step(
                task_loss, list(weights), update, tf.nest.pack_sequence_as(state, flat_state),
                step, first_order=True)
            step = step + 1
            done = tf.equal(inner_steps, step)

            def predict():
                now = algorithm.predict_from_inputs(params, weights, query, step)
                return tf.where(_per_task(done, now), now, predictions)

            predictions = tf.cond(tf.reduce_any(done), predict, lambda: predictions)
            return step, weights, tf.nest.flatten(new_state), predictions

        _, _, _, predictions = tf.while_loop(
            lambda step, *_: step < tf.reduce_max(inner_steps), body,
            (tf.constant(0, inner_steps.dtype), list(weights), tf.nest.flatten(state),
             predictions))
        return predictions

    def _images(self, name, images, limit, limit_name):
        """Decodes `[n]` encoded images to `[n, *input_shape]` model inputs."""
        height, width, channels = self.input_shape
        invert = self.image_format.invert
        pil_jpeg = self.image_format.pil_jpeg
        rank_ok = tf.equal(tf.rank(images), 1)
        checks = [_check(rank_ok, f"{name} must have shape [num_images] (encoded PNG, JPEG, "
                                  "GIF or BMP images); got shape", [tf.shape(images)])]
        count = _dim(images, 0)
        with tf.control_dependencies(checks):
            checks.append(_check(count > 0, f"{name} must not be empty"))
            checks.append(_check(count <= limit, f"{name} has too many images: this export "
                                                 f"accepts at most {limit} ({limit_name}); got",
                                 [count]))
        images = _gated(images, rank_ok, checks, [None])

        def decode(data):
            image_height, image_width = _encoded_image_size(data)
            known = tf.minimum(image_height, image_width) > 0
            small = tf.maximum(image_height, image_width) <= MAX_IMAGE_SIDE
            with tf.control_dependencies([
                    _check(known, f"{name}: an image is not a PNG, JPEG, GIF or BMP image (or "
                                  "its header is damaged)"),
                    _check(small, f"{name}: an image is larger than {MAX_IMAGE_SIDE} pixels on "
                                  "a side (height, width):", [image_height, image_width])]):
                data = tf.identity(data)
            prefix = tf.strings.substr(tf.strings.join([data, b"\0\0\0\0"]), 0, 4)

            is_jpeg = tf.equal(tf.strings.substr(prefix, 0, 2), b"\xff\xd8")

            def decode(image_channels):
                if not pil_jpeg:
                    return tf.io.decode_image(data, channels=image_channels,
                                              expand_animations=False)
                # libjpeg's accurate transform, as PIL decodes (TensorFlow's default, the
                # fast one, is up to tens of levels off on noisy pictures).
                return tf.cond(
                    is_jpeg,
                    lambda: tf.io.decode_jpeg(data, channels=image_channels,
                                              dct_method="INTEGER_ACCURATE"),
                    lambda: tf.io.decode_image(data, channels=image_channels,
                                               expand_animations=False))

            def opaque():
                if channels != 1:
                    return tf.cast(decode(channels), tf.float32)
                # TensorFlow's GIF and BMP decoders give RGB only: converted to gray
                # as PIL's "L" conversion does (ITU-R 601-2 luma, integer arithmetic); so are
                # JPEGs decoded as PIL does (its "L" of the RGB picture; a gray JPEG's
                # levels come back exactly, and a CMYK one, which libjpeg cannot turn
                # gray, is read).
                rgb_only = tf.logical_or(tf.equal(prefix, b"GIF8"),
                                         tf.equal(tf.strings.substr(prefix, 0, 2), b"BM"))
                if pil_jpeg:
                    rgb_only = tf.logical_or(rgb_only, is_jpeg)
                return tf.cond(
                    rgb_only,
                    lambda: _pil_gray(decode(3)),
                    lambda: tf.cast(decode(1), tf.float32))

            def over_white():
                # A PNG's transparent pixels over white, as a viewer shows them (the
                # codec's conversions drop alpha: black strokes on transparent black
                # pixels would decode to a black square).
                rgba = tf.cast(tf.io.decode_png(data, channels=4), tf.float32)
                alpha = rgba[..., 3:] / 255.0
                rgb = tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha))
                # Gray as for GIF and BMP: PIL's "L" conversion, exactly.
                return _pil_gray(rgb) if channels == 1 else rgb

            transparent = tf.cond(tf.equal(prefix, b"\x89PNG"),
                                  lambda: _png_is_transparent(data), lambda: tf.constant(False))
            image = tf.cond(transparent, over_white, opaque)
            # A photo's EXIF orientation, as a viewer (and the folder loader) applies it.
            image = tf.cond(tf.equal(tf.strings.substr(prefix, 0, 2), b"\xff\xd8"),
                            lambda: _oriented(image, _jpeg_orientation(data)), lambda: image)
            same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
            image = tf.cond(same, lambda: image, lambda: tf.clip_by_value(tf.round(
                tf.image.resize(image, [height, width], method=self.image_format.resize,
                                antialias=self.image_format.resize != "nearest")),
                0.0, 255.0))
            image = tf.ensure_shape(image, [height, width, channels])
            if invert:
                image = 255.0 - image
            if self.takes_integer_pixels:  # the model rescales its uint8 pixels itself
                return tf.cast(image, self.dtype)
            return tf.cast(image / 255.0, self.dtype)

        # Under the input's name: a decoder's own error (a damaged image whose header reads
        # well) names its node, and so the input.
        with tf.name_scope(f"decode_{name}"):
            return tf.map_fn(decode, images,
                             fn_output_signature=tf.TensorSpec([height, width, channels],
                                                               self.dtype))

    # -- signatures -----------------------------------------------------------------------------

    def serve(self, x):
        """`x` `[n, *input_shape]` -> predictions of the meta-initialization."""
        x = self._query(x, None, False, name="x")
        initial = self.algorithm.initial_weights(self.meta_params, 1)
        predictions = self.algorithm.predict(self.meta_params, initial, x, 0)
        message = "predictions are not finite (are the inputs too large?)"
        return self._outputs(self._finite(predictions, False, message)[0])

    def adapt(self, support_x, support_y, query_x):
        """Adapts to one support set with the export's protocol; predicts the query set."""
        return self._tasks(support_x, support_y, query_x, task_major=False)

    def adapt_custom(self, support_x, support_y, query_x, inner_steps, inner_lr):
        """`adapt` with the request's step count and scalar step size.

        The step size replaces the algorithm's rates (learned ones included)
        in its own update rule (SGD; Adam for Reptile with Adam).
        """
        return self._tasks_custom(support_x, support_y, query_x, inner_steps, inner_lr,
                                  task_major=False)

    def adapted_weights(self, support_x, support_y):
        """The model's weights after `adapt`'s adaptation, one output per weight."""
        support_x, support_y = self._support(support_x, support_y, False)
        adapted = self._adapted_fn(support_x, support_y)
        steps = tf.constant(self.num_eval_steps, tf.int32)
        weights = self.algorithm.full_weights(self.meta_params, adapted, steps)
        message = ("the adaptation diverged: adapted weights are not finite (inputs far from the "
                   "scale of the training data, or a step size too large for them?)")
        return {name: self._finite(w, False, message)[0]
                for name, w in zip(self.weight_names, weights)}

    def adapt_tasks(self, support_x, support_y, query_x):
        """`adapt` for every task of task-major inputs `[tasks, ...]`."""
        return self._tasks(support_x, support_y, query_x, task_major=True)

    def adapt_tasks_custom(self, support_x, support_y, query_x, inner_steps, inner_lr):
        """`adapt_custom` for every task, with per-task `inner_steps` and `inner_lr` `[tasks]`."""
        return self._tasks_custom(support_x, support_y, query_x, inner_steps, inner_lr,
                                  task_major=True)

    def decode_images(self, images):
        """`images` `[n]` encoded images -> `x` `[n, *input_shape]`, as training decodes them."""
        return {"x": self._images("images", images, self.limits.max_query_examples,
                                  "max_query_examples")}

    def adapt_images(self, support_images, support_y, query_images):
        """`adapt` on encoded images (decoded as `decode_images` does)."""
        support_x = self._images("support_images", support_images,
                                 self.limits.max_support_examples, "max_support_examples")
        query_x = self._images("query_images", query_images, self.limits.max_query_examples,
                               "max_query_examples")
        return self._tasks(support_x, support_y, query_x, task_major=False,
                           names=("support_images", "query_images"))


class SignatureArchive:
    """A SavedModel of serving signatures, each traced once.

    `keras.export.ExportArchive`'s interface (`track`, `add_endpoint`,
    `write_out`) and the layout TF Serving and `tf.saved_model.load` see (the
    signatures; the root's `variables`, `trainable_variables` and
    `non_trainable_variables`, the tracked layers' in their order first), but
    each endpoint is traced once, when it is added. Keras' archive traces every
    endpoint twice: once to list its variables and again inside
    `tf.saved_model.save`, whose save context is part of `tf.function`'s cache
    key; an adaptation signature's trace (the inner loop and its gradients) is
    most of an export's time. Here the root holds the traced
    `ConcreteFunction`s (loaded, they are called as Keras' endpoints are, but
    have no `get_concrete_function`), which saving does not retrace. Tracing
    outside the save context has one cost: under a `tf.distribute` strategy, an
    endpoint that assigns to a variable, or reads a variable synchronized on
    read by sum, cannot be saved (TensorFlow marks such traces unsaveable);
    the adaptation signatures do neither.

    Example:

    ```python
    archive = SignatureArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", model.__call__,
                         [tf.TensorSpec(None, tf.float32, name="x")])
    archive.write_out("/tmp/model/1")
    ```
    """

    def __init__(self):
        self._tracked = []
        self._functions = {}

    def track(self, resource):
        """Keeps `resource` with the SavedModel: a built layer's variables, in its order, and
        any lookup tables or other resources it holds.

        Raises:
            ValueError: `resource` is a layer not built yet, or not trackable.
        """
        if isinstance(resource, keras.layers.Layer) and not resource.built:
            raise ValueError(f"the layer {resource.name!r} is not built yet: call it on "
                             "data (or build it) before exporting it")
        if not isinstance(resource, tf.__internal__.tracking.Trackable):
            raise ValueError(f"cannot track {resource!r}: not a layer or a TensorFlow "
                             "trackable")
        self._tracked.append(resource)

    def add_endpoint(self, name, fn, input_signature):
        """Traces `fn` for `input_signature` and adds it as signature `name`.

        Returns:
            The `ConcreteFunction`.

        Raises:
            ValueError: `name` is taken.
        """
        if name in self._functions:
            raise ValueError(f"Endpoint name {name!r} is already taken.")
        function = tf.function(fn, input_signature=input_signature, autograph=False)
        self._functions[name] = function.get_concrete_function()
        return self._functions[name]

    def _variables(self):
        """The tracked layers' variables in their order, then the other variables the
        endpoints use (the tracked objects' in their order, the rest by name)."""
        ordered, seen = [], set()

        def add(variable):
            # The tf.Variable behind a Keras variable: the one a traced function captures.
            value = getattr(variable, "value", None)
            variable = value if isinstance(value, tf.Variable) else variable
            if id(variable) not in seen:
                seen.add(id(variable))
                ordered.append(variable)

        for resource in self._tracked:
            if isinstance(resource, keras.layers.Layer):
                for variable in resource.variables:
                    add(variable)
        used = [v for function in self._functions.values() for v in function.variables]
        handles = {id(v.handle) for v in used}
        for resource in self._tracked:
            for variable in getattr(resource, "variables", None) or ():
                if id(getattr(variable, "handle", None)) in handles:
                    add(variable)
        for variable in sorted(used, key=lambda v: v.name):
            add(variable)
        return ordered

    def _resources(self):
        """Lookup tables and other non-variable resources among the tracked objects."""
        found = []
        for resource in self._tracked:
            try:
                descendants = tf.train.TrackableView(resource).descendants()
            except TypeError:  # an object whose children cannot be listed: Keras skips it too
                continue
            found += [d for d in descendants
                      if isinstance(d, tf.saved_model.experimental.TrackableResource)]
        return found

    def write_out(self, filepath, options=None, verbose=False):
        """Writes the SavedModel to `filepath` (`verbose` is Keras' argument, unused)."""
        del verbose
        if not self._functions:
            raise ValueError("No endpoints have been set yet. Call add_endpoint().")
        root = tf.__internal__.tracking.AutoTrackable()
        variables = self._variables()
        root.variables = variables
        root.trainable_variables = [v for v in variables if v.trainable]
        root.non_trainable_variables = [v for v in variables if not v.trainable]
        root._misc_assets = self._resources()  # Keras' name for them
        for name, function in self._functions.items():
            setattr(root, name, function)
        signatures = dict(self._functions)
        signatures.setdefault("serving_default", next(iter(self._functions.values())))
        tf.saved_model.save(root, filepath, signatures=signatures, options=options)


def build_export_archive(signatures):
    """Builds the `SignatureArchive` with the serving signatures.

    Args:
        signatures: an `AdaptationSignatures`.

    Returns:
        A `SignatureArchive`, ready for `write_out`.
    """
    archive = SignatureArchive()
    archive.track(signatures.model)
    if signatures.algorithm.saved_variables:
        archive.track(signatures.algorithm.state)
    dtype, label_dtype = signatures.dtype, signatures.label_dtype
    archive.add_endpoint("serving_default", signatures.serve,
                         [tf.TensorSpec(None, dtype, name="x")])
    support = [tf.TensorSpec(None, dtype, name="support_x"),
               tf.TensorSpec(None, label_dtype, name="support_y")]
    query = [tf.TensorSpec(None, dtype, name="query_x")]
    archive.add_endpoint("adapt", signatures.adapt, support + query)
    archive.add_endpoint("adapt_custom", signatures.adapt_custom, support + query + [
        # Scalars, declared of any shape so that a wrong one gets the check's message.
        tf.TensorSpec(None, tf.int32, name="inner_steps"),
        tf.TensorSpec(None, tf.float32, name="inner_lr")])
    archive.add_endpoint("adapted_weights", signatures.adapted_weights, support)
    archive.add_endpoint("adapt_tasks", signatures.adapt_tasks, support + query)
    archive.add_endpoint("adapt_tasks_custom", signatures.adapt_tasks_custom, support + query + [
        tf.TensorSpec(None, tf.int32, name="inner_steps"),
        tf.TensorSpec(None, tf.float32, name="inner_lr")])
    if signatures.image_format is not None:
        archive.add_endpoint("decode_images", signatures.decode_images,
                             [tf.TensorSpec(None, tf.string, name="images")])
        archive.add_endpoint("adapt_images", signatures.adapt_images, [
            tf.TensorSpec(None, tf.string, name="support_images"),
            tf.TensorSpec(None, label_dtype, name="support_y"),
            tf.TensorSpec(None, tf.string, name="query_images")])
    return archive


# -- writing a version --------------------------------------------------------------------------


def check_finite_parameters(experiment):
    """Raises `ValueError` naming every variable with NaN or infinite values.

    A run that diverged must not be served: its predictions would all be NaN.
    """
    variables = list(experiment.model.weights) + list(experiment.algorithm.saved_variables)
    bad = [getattr(v, "path", v.name) for v in variables
           if tf.as_dtype(v.dtype).is_floating and not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise ValueError(f"refusing to export: NaN or infinite values in {', '.join(bad)} "
                         "(the run diverged; export an earlier checkpoint: the export CLI's "
                         "--checkpoint, or weights a Keras ModelCheckpoint saved)")


def _exchange(a, b):
    """Atomically swaps two local directories (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns:
        Whether it did; false where the system or the file system cannot.
    """
    if not sys.platform.startswith("linux") or "://" in a or "://" in b:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def _swap_in(new, path):
    """Puts the complete version at `new` in place of `path`; a complete version stays at `path`.

    Where the file system can swap atomically, `path` holds the old version
    and then the new one, never nothing. Elsewhere the old version is renamed
    aside (`<path>.old`), the new one renamed in, and the old one deleted: a
    crash between the two renames leaves both complete versions on disk
    (`<path>.old` and `<path>.tmp`).
    """
    if not tf.io.gfile.exists(path):
        tf.io.gfile.rename(new, path)
        return
    if _exchange(new, path):
        tf.io.gfile.rmtree(new)  # now the old version
        return
    old = path + ".old"
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
    tf.io.gfile.rename(path, old)
    tf.io.gfile.rename(new, path)
    tf.io.gfile.rmtree(old)


def export(experiment, export_dir, version, num_eval_steps, inner_lr=None, overwrite=False,
           limits=None, image_format="auto", data_fingerprint=None, outputs_probabilities=None):
    """Writes the SavedModel to `<export_dir>/<version>/` (TF Serving's layout).

    The run's config, the limits and the signatures are written to
    `<version>/assets.extra/tf_maml_config.json`. The version is written
    beside its final place (`<version>.tmp`, which TF Serving ignores) and
    renamed into place once complete; with `overwrite`, the previous version
    stays in place until the new one replaces it.

    Args:
        experiment: the restored run (`tf_maml.experiment.Experiment`; its
            task family need not be loaded).
        export_dir: the model's base path for TF Serving.
        version: positive integer version.
        num_eval_steps: inner steps of the `adapt` signature.
        inner_lr: scalar step size of `adapt`, or `None` for the algorithm's
            own rates (learned ones included).
        overwrite: replace an existing version.
        limits: `ServingLimits`, or a dict of some of its fields replacing the
            dataset's defaults (`DEFAULT_LIMITS`), or `None` for the defaults.
        image_format: `ImageFormat`, `None` (no image signatures) or "auto"
            (the dataset's, see `image_format_for`).
        data_fingerprint: the run's data record (`tasks.data_fingerprint`; the
            export CLI passes the run's `data_fingerprint.json`), written to
            `assets.extra/tf_maml_data_fingerprint.json` so that evaluating the
            export (`reporting.evaluate_export`) refuses other data.
        outputs_probabilities: see `AdaptationSignatures` (`None`: read from
            the model).

    Returns:
        The version's path.

    Meta-RL runs (`config.is_rl`) are exported as a policy by
    `tf_maml.rl.serving.export_policy` (signatures `serving_default`, `adapt`,
    `adapt_custom`; `adapt` takes one policy-gradient step, so
    `num_eval_steps` is not used; `limits` are `PolicyServingLimits`;
    `image_format` does not apply).

    Raises:
        ValueError: bad version or limits (limits below the run's own tasks'
            sizes among them), non-finite meta-parameters, the version exists
            and `overwrite` is false.
    """
    config = experiment.config
    if config.is_rl:
        from tf_maml.rl import serving as rl_serving  # noqa: PLC0415 -- only RL runs need it
        return rl_serving.export_policy(experiment, export_dir, version, inner_lr, overwrite,
                                        limits)
    version = check_version(version)
    if inner_lr is not None:
        try:
            value = (None if isinstance(inner_lr, (bool, np.bool_, str, bytes))
                     else float(inner_lr))
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"inner_lr must be a finite number >= 0 (or None: the "
                             f"algorithm's rates), got {inner_lr!r}")
        inner_lr = value  # (a float: numpy's is not JSON)
    if not config.transductive or config.transductive_support:
        logging.warning(
            "The run's evaluation protocol is %s, but the exported adapt signatures predict a "
            "request's query set as one batch (the transductive protocol): a served model "
            "scores as `evaluate --transductive --notransductive_support` does",
            "non-transductive" if not config.transductive else "transductive with the "
            "support set in the query's batch")
    defaults = (DEFAULT_LIMITS.get(config.dataset) or default_limits(experiment.spec))
    limits = limits_from(defaults, limits)
    if config.dataset != "custom":
        # The run's own evaluation tasks must fit through the signatures.
        per_task = config.n_way if experiment.spec.is_classification else 1
        for name, own in (("max_support_examples", per_task * config.k_shot),
                          ("max_query_examples", per_task * config.k_query)):
            if getattr(limits, name) < own:
                raise ValueError(f"{name} ({getattr(limits, name)}) is below the {own} examples "
                                 f"of the run's own tasks: raise it (--{name})")
    if image_format == "auto":
        image_format = image_format_for(config.dataset, experiment.spec.input_shape,
                                        config.omniglot_resize_filter)
    path = version_path(export_dir, version, overwrite)
    dilated = functional.dilated_convolution_layers(experiment.model)
    if dilated:
        logging.warning(
            "Layers %s have dilation rates above 1: TensorFlow's CPU kernels differentiate "
            "them only with oneDNN on, so this export adapts only where oneDNN is on (or on a "
            "GPU); on a CPU without it (a TF Serving build without oneDNN, "
            "TF_ENABLE_ONEDNN_OPTS=0) every adapt signature fails. Use dilation_rate=1 to "
            "serve anywhere", ", ".join(dilated))
    check_finite_parameters(experiment)
    algorithm_class = type(experiment.algorithm)
    if algorithm_class is not algorithms_lib.ALGORITHMS.get(config.algorithm):
        # The SavedModel serves it; the recorded config names another (restore builds by name).
        logging.warning("Exporting a %s.%s, which is not the %r algorithm that the config "
                        "records: the SavedModel's signatures are the class's, but a run "
                        "restored from the config would build %r", algorithm_class.__module__,
                        algorithm_class.__qualname__, config.algorithm, config.algorithm)
    signatures = AdaptationSignatures(experiment.algorithm, experiment.spec, num_eval_steps,
                                      inner_lr, limits, image_format, outputs_probabilities)
    with functional.first_derivatives_only():  # nothing is differentiated twice in serving
        archive = build_export_archive(signatures)
    recorded = config_lib.as_stored(config).to_dict()
    if config.dataset == "custom":
        # Tasks given in code (the Keras face): the config's N-way K-shot fields are its
        # defaults, not the tasks' shape; leave them out rather than record a wrong one.
        for name in CUSTOM_UNRECORDED_FIELDS:
            recorded.pop(name, None)
    record = {
        **recorded, "export_num_eval_steps": num_eval_steps,
        "export_inner_lr": inner_lr, "export_limits": limits.to_dict(),
        "export_algorithm_class": f"{algorithm_class.__module__}.{algorithm_class.__qualname__}",
        # Reptile: support examples per inner step of adapt (None: other algorithms).
        "export_eval_inner_batch_size": getattr(experiment.algorithm, "eval_inner_batch_size",
                                                None),
        "export_image_format": image_format.to_dict() if image_format else None,
        "export_outputs_probabilities": signatures.outputs_probabilities,
        "export_signatures": list(signatures.signature_names)}
    with functional.first_derivatives_only():  # (the save does not retrace the signatures)
        return write_version(archive, path, record, {DATA_FINGERPRINT_ASSET: data_fingerprint}
                             if data_fingerprint else None, overwrite=overwrite)


def check_version(version):
    """The version as an int; `ValueError` unless it is an integer in [1, 2**63)."""
    if (not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 1
            or version >= 2**63):
        raise ValueError(f"version must be a positive integer below 2**63 (TF Serving serves "
                         f"only numeric version names and reads them as int64; this tool "
                         f"numbers them from 1), got {version!r}")
    return int(version)


def version_path(export_dir, version, overwrite):
    """`<export_dir>/<version>`; `ValueError` if it exists and not `overwrite`, and
    `NotADirectoryError` or `PermissionError` where it cannot be written (checked before
    any signature is built)."""
    from tf_maml import experiment  # noqa: PLC0415 -- experiment imports this module's users
    experiment.check_writable(export_dir, "export_dir")
    path = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass another version (--version) or "
                         "overwrite=True (--overwrite)")
    return path


# Held while a version is written (`write_version`); not a number, so TF Serving ignores it.
EXPORT_LOCK_NAME = ".tf_maml_export.lock"


def write_version(archive, path, record, extra_records=None, overwrite=False):
    """Writes `archive` and `record` (`assets.extra/tf_maml_config.json`) to `path`, atomically.

    `extra_records` (file name -> JSON value) go beside it in `assets.extra`.

    The version is written to `<path>.tmp` and swapped into place once
    complete (`_swap_in`), holding the export directory's lock file
    (`EXPORT_LOCK_NAME`, which TF Serving ignores): two exports into one
    directory take turns, and the second finds the first's version.

    Returns:
        `path`.

    Raises:
        ValueError: `path` exists (written meanwhile by another export) and
            not `overwrite`.
    """
    export_dir = os.path.dirname(path)
    tf.io.gfile.makedirs(export_dir)
    with files.exclusive_lock(os.path.join(export_dir, EXPORT_LOCK_NAME),
                              f"Waiting for another export into {export_dir} to finish"):
        if tf.io.gfile.exists(path) and not overwrite:
            raise ValueError(f"{path} already exists: another export wrote it while this one "
                             "was being built; pass another version (--version) or "
                             "overwrite=True (--overwrite)")
        tmp = path + ".tmp"
        if tf.io.gfile.exists(tmp):  # left by an export that was killed
            tf.io.gfile.rmtree(tmp)
        archive.write_out(tmp, verbose=False)
        extra = os.path.join(tmp, "assets.extra")
        tf.io.gfile.makedirs(extra)
        with tf.io.gfile.GFile(os.path.join(extra, CONFIG_ASSET), "w") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True))
        for name, value in (extra_records or {}).items():
            with tf.io.gfile.GFile(os.path.join(extra, name), "w") as f:
                f.write(json.dumps(value, indent=1))
        _swap_in(tmp, path)  # TF Serving never sees a half-written version, nor none
    return path
