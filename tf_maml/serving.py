"""Exports a meta-initialization as a SavedModel whose signatures adapt per request.

Signatures (one task per request; no task axis in the inputs):

* `serving_default`: `x` -> `predictions` with the meta-initialization.
* `adapt`: `support_x`, `support_y`, `query_x` -> `predictions` for the query
  set after `num_eval_steps` inner steps of size `inner_lr` (the training run's
  values) on the support set; classification also returns `probabilities`.
* `adapt_custom`: the same plus scalar inputs `inner_steps` (int32) and
  `inner_lr` (float32).
* `adapted_weights`: `support_x`, `support_y` -> the adapted weights, one
  output per model weight (named after the variable).

Every request is stateless: weights are adapted as tensors inside the graph,
never assigned, so concurrent requests cannot see each other's adaptation.
Batch sizes are dynamic; the input shape and (for classification) the number
of classes N are fixed by the model. Malformed requests fail with
INVALID_ARGUMENT and a message naming the input, and leave nothing behind.

With batch normalization using per-task batch statistics (the paper's
behaviour), predictions for a query example depend on the other examples in
the same query batch: send a task's whole query set in one request.

The graph uses only standard TensorFlow ops (no `py_function`, no XLA), so TF
Serving's C++ runtime runs it.
"""

import json
import os
import re

import keras
import tensorflow as tf

__all__ = ["AdaptationSignatures", "build_export_archive", "export", "MAX_INNER_STEPS",
           "SIGNATURES"]

SIGNATURES = ("serving_default", "adapt", "adapt_custom", "adapted_weights")
MAX_INNER_STEPS = 1000
CONFIG_ASSET = "tf_maml_config.json"


def _check(condition, message, data=()):
    return tf.debugging.Assert(condition, [message, *data], summarize=16)


def _shape_is(x, shape):
    """Whether `x` is `[n, *shape]`; evaluates without error for any rank.

    (Graph optimizations may run both branches of a `tf.cond`, so the
    comparison is made on vectors padded to a fixed length instead.)
    """
    k = len(shape)
    padded = tf.concat([tf.shape(x)[1:], tf.fill([k + 1], -1)], 0)[:k + 1]
    return tf.logical_and(tf.rank(x) > 0, tf.reduce_all(tf.equal(padded, [*shape, -1])))


def _validated_inputs(name, x, shape):
    """Asserts `x` is `[n >= 1, *shape]` with finite values; returns it with static shape."""
    expected = "[num_examples" + "".join(f", {d}" for d in shape) + "]"
    checks = [_check(_shape_is(x, shape), f"{name} must have shape {expected}; got shape",
                     [tf.shape(x)])]
    with tf.control_dependencies(checks):
        checks.append(_check(tf.size(x) > 0, f"{name} must not be empty"))
        checks.append(_check(tf.reduce_all(tf.math.is_finite(x)),
                             f"{name} has NaN or infinite values"))
    with tf.control_dependencies(checks):
        return tf.ensure_shape(tf.identity(x), [None, *shape])


def _validated_labels(y, num_examples, classification, output_size):
    if classification:
        expected = f"[num_examples] integer labels in [0, {output_size})"
        checks = [_check(tf.equal(tf.rank(y), 1), f"support_y must be {expected}; got shape",
                         [tf.shape(y)])]
        with tf.control_dependencies(checks):
            count = tf.concat([tf.shape(y), [-1]], 0)[0]
            checks.append(_check(tf.equal(count, num_examples),
                                 "support_y must have one label per support_x example; got",
                                 [count, num_examples]))
            checks.append(_check(tf.reduce_all((y >= 0) & (y < output_size)),
                                 f"support_y labels must be in [0, {output_size}); got", [y]))
        with tf.control_dependencies(checks):
            return tf.ensure_shape(tf.identity(y), [None])
    y = _validated_inputs("support_y", y, [output_size])
    with tf.control_dependencies([_check(tf.equal(tf.shape(y)[0], num_examples),
                                         "support_y must have one row per support_x example")]):
        return tf.identity(y)


def _weight_names(model):
    names, seen = [], set()
    for variable in model.trainable_variables:
        name = re.sub(r"[^A-Za-z0-9_]", "_", variable.path)
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names


class AdaptationSignatures:
    """The serving signatures as plain, testable methods over one task's tensors.

    Built from the algorithm (which holds the model, its forward, its loss and
    any learned meta-parameters) and the input/label spec; nothing here knows
    the data pipeline. `build_export_archive` registers each method as a
    signature.

    Args:
        algorithm: a `tf_maml.algorithms` algorithm whose variables hold the
            meta-parameters to export.
        spec: the task family's `TaskSpec` (input shape, output size,
            classification).
        num_eval_steps: inner steps of `adapt` and `adapted_weights`.
        inner_lr: a scalar step size for `adapt` replacing the algorithm's own
            rates, or `None` to use the algorithm's (learned rates included).

    Example:

    ```python
    signatures = AdaptationSignatures(experiment.algorithm, experiment.spec, 10, None)
    out = signatures.adapt(support_x, support_y, query_x)["predictions"]
    ```
    """

    def __init__(self, algorithm, spec, num_eval_steps, inner_lr=None):
        self.algorithm = algorithm
        self.model = algorithm.model
        self.classification = spec.is_classification
        self.input_shape = list(spec.input_shape)
        self.output_size = spec.output_size
        self.num_eval_steps = num_eval_steps
        self.inner_lr = inner_lr
        self.dtype = self.model.trainable_variables[0].dtype
        self.label_dtype = tf.int32 if self.classification else self.dtype
        self.weight_names = _weight_names(self.model)

    @property
    def meta_params(self):
        return self.algorithm.meta_variables

    def _outputs(self, predictions):
        result = {"predictions": predictions}
        if self.classification:
            result["probabilities"] = tf.nn.softmax(predictions)
        return result

    def _adapted(self, support_x, support_y, steps, lr):
        support_x = _validated_inputs("support_x", support_x, self.input_shape)
        support_y = _validated_labels(support_y, tf.shape(support_x)[0], self.classification,
                                      self.output_size)
        adapted, _ = self.algorithm.adapt(self.meta_params, support_x[None], support_y[None],
                                          steps, first_order=True, inner_lr=lr)
        return adapted

    def _predict(self, adapted, query_x, step):
        query_x = _validated_inputs("query_x", query_x, self.input_shape)
        return self.algorithm.predict(self.meta_params, adapted, query_x[None], step)[0]

    def serve(self, x):
        """`x` `[n, *input_shape]` -> predictions of the meta-initialization."""
        initial = self.algorithm.initial_weights(self.meta_params, 1)
        return self._outputs(self._predict(initial, x, 0))

    def adapt(self, support_x, support_y, query_x):
        """Adapts to one support set with the export's protocol; predicts the query set."""
        adapted = self._adapted(support_x, support_y, self.num_eval_steps, self.inner_lr)
        return self._outputs(self._predict(adapted, query_x, self.num_eval_steps))

    def adapt_custom(self, support_x, support_y, query_x, inner_steps, inner_lr):
        """`adapt` with the request's step count and scalar step size (plain SGD)."""
        checks = [
            _check((inner_steps >= 0) & (inner_steps <= MAX_INNER_STEPS),
                   f"inner_steps must be in [0, {MAX_INNER_STEPS}]; got", [inner_steps]),
            _check(tf.math.is_finite(inner_lr) & (inner_lr >= 0),
                   "inner_lr must be finite and >= 0; got", [inner_lr]),
        ]
        with tf.control_dependencies(checks):
            steps = tf.identity(inner_steps)
        adapted = self._adapted(support_x, support_y, steps, tf.cast(inner_lr, self.dtype))
        return self._outputs(self._predict(adapted, query_x, steps))

    def adapted_weights(self, support_x, support_y):
        """The model's weights after `adapt`'s adaptation, one output per weight."""
        adapted = self._adapted(support_x, support_y, self.num_eval_steps, self.inner_lr)
        weights = self.algorithm.full_weights(self.meta_params, adapted, self.num_eval_steps)
        return {name: w[0] for name, w in zip(self.weight_names, weights)}


def build_export_archive(signatures):
    """Builds the `keras.export.ExportArchive` with the serving signatures.

    Args:
        signatures: an `AdaptationSignatures`.

    Returns:
        A `keras.export.ExportArchive`, ready for `write_out`.
    """
    archive = keras.export.ExportArchive()
    archive.track(signatures.model)
    if signatures.algorithm.extra_variables:
        archive.track(signatures.algorithm.state)
    dtype, label_dtype = signatures.dtype, signatures.label_dtype
    archive.add_endpoint("serving_default", signatures.serve,
                         [tf.TensorSpec(None, dtype, name="x")])
    support = [tf.TensorSpec(None, dtype, name="support_x"),
               tf.TensorSpec(None, label_dtype, name="support_y")]
    query = [tf.TensorSpec(None, dtype, name="query_x")]
    archive.add_endpoint("adapt", signatures.adapt, support + query)
    archive.add_endpoint("adapt_custom", signatures.adapt_custom, support + query + [
        tf.TensorSpec([], tf.int32, name="inner_steps"),
        tf.TensorSpec([], tf.float32, name="inner_lr")])
    archive.add_endpoint("adapted_weights", signatures.adapted_weights, support)
    return archive


def export(experiment, export_dir, version, num_eval_steps, inner_lr=None, overwrite=False):
    """Writes the SavedModel to `<export_dir>/<version>/` (TF Serving's layout).

    The run's config is written to `<version>/assets.extra/tf_maml_config.json`.

    Args:
        experiment: the restored run (`tf_maml.experiment.Experiment`; its
            task family need not be loaded).
        export_dir: the model's base path for TF Serving.
        version: positive integer version.
        num_eval_steps: inner steps of the `adapt` signature.
        inner_lr: scalar step size of `adapt`, or `None` for the algorithm's
            own rates (learned ones included).
        overwrite: replace an existing version.

    Returns:
        The version's path.

    Raises:
        ValueError: bad version, or the version exists and `overwrite` is false.
    """
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    path = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(path):
        if not overwrite:
            raise ValueError(f"{path} already exists; pass another version or overwrite")
        tf.io.gfile.rmtree(path)
    archive = build_export_archive(AdaptationSignatures(experiment.algorithm, experiment.spec,
                                                        num_eval_steps, inner_lr))
    tmp = path + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    archive.write_out(tmp, verbose=False)
    extra = os.path.join(tmp, "assets.extra")
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, CONFIG_ASSET), "w") as f:
        f.write(json.dumps({**experiment.config.to_dict(), "export_num_eval_steps": num_eval_steps,
                            "export_inner_lr": inner_lr}, indent=2, sort_keys=True))
    tf.io.gfile.rename(tmp, path)  # TF Serving never sees a half-written version
    return path
