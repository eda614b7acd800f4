"""The Keras face's answers to user mistakes: one-line `ValueError`s, never NaN or a graph trace.

Out-of-range labels, shapes that do not fit the model or each other, and a
task function that fails late in training; and the export of a subclassed
model, whose shapes only the task family knows.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_maml
from tf_maml.keras_face import Episodes, MetaLearner


def _learner(model=None):
    keras.utils.set_random_seed(0)
    learner = MetaLearner(model or keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                          inner_lr=0.1)
    learner.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    return learner


def _episodes(*labels, features=8, as_tuples=False):
    """A dataset of meta-batches of 4 tasks, one per row of `labels` (support = query labels)."""
    rng = np.random.default_rng(0)
    elements = []
    for row in labels:
        y = np.tile(np.asarray(row, np.int32), (4, 1))
        x = rng.random((2, 4, len(row), features), np.float32)
        elements.append((x[0], y, x[1], y) if as_tuples else
                        {"support_x": x[0], "support_y": y, "query_x": x[1], "query_y": y})
    dataset = tf.data.Dataset.from_tensors(elements[0])
    for element in elements[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(element))
    return dataset


def _one_line(error_info, pattern):
    message = str(error_info.value)
    assert "\n" not in message, message
    assert error_info.match(pattern)


def test_out_of_range_labels_fail_fit_and_evaluate_in_one_line():
    learner = _learner()
    history = learner.fit(_episodes([0, 1, 2], [2, 1, 0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])  # the check lets valid labels through
    for labels, got in (([1, 2, 3], 3), ([-1, 0, 1], -1)):
        with pytest.raises(ValueError) as e:
            learner.fit(_episodes(labels), epochs=1, verbose=0)
        _one_line(e, rf"^support_y labels must be in \[0, 3\), got {got}$")
    # A bad meta-batch after good ones (checked as each is read), as tuples.
    with pytest.raises(ValueError) as e:
        learner.fit(_episodes([0, 1, 2], [0, 1, 2], [0, 5, 1], as_tuples=True), epochs=1,
                    verbose=0)
    _one_line(e, r"^support_y labels must be in \[0, 3\), got 5$")
    with pytest.raises(ValueError) as e:
        learner.evaluate(_episodes([0, 1, 2], [0, 3, 1]), verbose=0)
    _one_line(e, r"^support_y labels must be in \[0, 3\), got 3$")
    # The failed runs did not train to NaN.
    assert all(np.isfinite(w).all() for w in learner.model.get_weights())


def test_adapt_and_predict_checks_labels_and_shapes_eagerly():
    learner = _learner()
    rng = np.random.default_rng(0)
    sx, labels = rng.random((3, 8), np.float32), np.array([0, 1, 2])
    assert learner.adapt_and_predict(sx, labels, sx).shape == (3, 3)
    cases = [
        ((sx, np.array([1, 2, 3]), sx), r"support_y labels must be in \[0, 3\), got 3"),
        ((sx, np.array([-1, 0, 1]), sx), r"support_y labels must be in \[0, 3\), got -1"),
        ((rng.random((3, 7), np.float32), labels, sx),
         r"support_x must hold examples of the model's input shape \(8,\), got support_x of "
         r"shape \(3, 7\)"),
        ((sx, np.array([0, 1]), sx),
         r"support_y must hold one label per support_x example, got support_x of shape "
         r"\(3, 8\) and support_y of shape \(2,\)"),
        ((sx, labels, rng.random((3, 9), np.float32)),
         r"query_x must hold examples of the model's input shape \(8,\), got query_x of shape "
         r"\(3, 9\)"),
        ((sx, np.eye(3, dtype=np.float32), sx),
         r"support_y must hold one integer class label per example, got support_y of shape "
         r"\(3, 3\)"),
        ((np.stack([sx, sx]), np.stack([labels, labels]), np.stack([sx, sx, sx])),
         r"support_x and query_x must hold the same tasks, got 2 and 3 tasks"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError) as e:
            learner.adapt_and_predict(*args)
        _one_line(e, "^" + pattern + "$")


def test_shapes_that_do_not_fit_the_model_are_refused_before_training():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (120, 20, 20, 3), dtype=np.uint8)
    tasks = tf_maml.tasks.array_tasks(images, np.arange(120) % 20, n_way=3, k_shot=1, k_query=2)
    for model, shape in ((tf_maml.models.conv4(3, input_shape=(28, 28, 1), filters=4),
                          r"\(28, 28, 1\)"),
                         (keras.Sequential([keras.Input((1200,)), keras.layers.Dense(3)]),
                          r"\(1200,\)")):
        with pytest.raises(ValueError) as e:
            _learner(model).fit(Episodes(tasks, 2), epochs=1, steps_per_epoch=1, verbose=0)
        _one_line(e, rf"^the model takes inputs of shape {shape} but the tasks' inputs are "
                     r"\(20, 20, 3\)")
    learner = _learner()
    with pytest.raises(ValueError) as e:
        learner.fit(_episodes([0, 1, 2], features=7), epochs=1, verbose=0)
    _one_line(e, r"^support_x must hold examples of the model's input shape \(8,\), got "
                 r"support_x of shape \(4, 3, 7\)$")
    bad = _episodes([0, 1, 2]).map(lambda e: {**e, "query_y": e["query_y"][:, :2]})
    with pytest.raises(ValueError) as e:
        learner.evaluate(bad, verbose=0)
    _one_line(e, r"^query_y must hold one label per query_x example")


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_a_regression_loss_on_classification_tasks_fails_in_one_line(loss):
    """A user trial: `compile(loss="mse")` on a classification family failed deep in the
    step ("Dimensions must be equal, but are 4 and 2 for '{{node sub}}'")."""
    rng = np.random.default_rng(0)
    tasks = tf_maml.tasks.array_tasks(rng.random((120, 8), np.float32), np.arange(120) % 20,
                                      n_way=3, k_shot=1, k_query=2)
    learner = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                          inner_lr=0.1)
    learner.compile(optimizer="adam", loss=loss)
    with pytest.raises(ValueError) as e:
        learner.fit(Episodes(tasks, 2), epochs=1, steps_per_epoch=1, verbose=0)
    _one_line(e, r"^loss mean_\w+_error compares predictions with targets of their shape, but "
                 r"the tasks are classification .*'sparse_categorical_crossentropy'$")


def test_a_loss_returning_a_scalar_fails_in_one_line():
    """A user trial: a custom loss reducing to a scalar failed deep in the step ("Dimension
    size must be evenly divisible by 4 but is 1 for '{{node Reshape_6}}'")."""
    learner = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                          inner_lr=0.1)

    def mean_cross_entropy(y_true, y_pred):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True))

    learner.compile(optimizer="adam", loss=mean_cross_entropy)
    with pytest.raises(ValueError) as e:
        learner.fit(_episodes([0, 1, 2]), epochs=1, verbose=0)
    _one_line(e, r"^the loss 'mean_cross_entropy' returned a scalar: MetaLearner needs "
                 r"per-example losses")


def test_regression_targets_not_of_the_outputs_shape_fail_in_one_line():
    """Keras' elementwise losses compare targets with outputs value by value; other shapes
    used to fail deep in the loss ("Dimensions must be equal", "unknown rank")."""
    rng = np.random.default_rng(0)
    for outputs, targets, pattern in (
            (2, (), r"^support_y must hold targets of the model's output shape \(2,\) per "
                    r"example, got support_y of shape \(4, 5\)$"),
            (2, (3,), r"^support_y must hold targets of the model's output shape \(2,\) per "
                      r"example, got support_y of shape \(4, 5, 3\)$"),
            (3, (1,), r"^support_y must hold .* \(3,\) per example, got support_y of shape "
                      r"\(4, 5, 1\)$")):
        learner = MetaLearner(keras.Sequential([keras.Input((3,)), keras.layers.Dense(outputs)]),
                              inner_lr=0.01)
        learner.compile(optimizer="sgd", loss="mse")
        x = rng.normal(size=(4, 5, 3)).astype(np.float32)
        y = rng.normal(size=(4, 5, *targets)).astype(np.float32)
        data = tf.data.Dataset.from_tensors({"support_x": x, "support_y": y, "query_x": x,
                                             "query_y": y})
        with pytest.raises(ValueError) as e:
            learner.fit(data, epochs=1, verbose=0)
        _one_line(e, pattern)
        # The right shape trains.
        y = rng.normal(size=(4, 5, outputs)).astype(np.float32)
        history = learner.fit(tf.data.Dataset.from_tensors(
            {"support_x": x, "support_y": y, "query_x": x, "query_y": y}), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
    # One output: its axis may be left out (as adapt_and_predict allows); the same loss.
    learner = MetaLearner(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                          inner_lr=0.01)
    learner.compile(optimizer="sgd", loss="mse")
    y = rng.normal(size=(4, 5, 1)).astype(np.float32)
    losses = [learner.evaluate(tf.data.Dataset.from_tensors(
        {"support_x": x, "support_y": t, "query_x": x, "query_y": t}), verbose=0)
        for t in (y, y[..., 0])]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@keras.saving.register_keras_serializable(package="tf_maml_tests")
class SubclassedModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(self.flatten(x)))


def test_subclassed_model_exports_after_fit(tmp_path):
    rng = np.random.default_rng(0)
    tasks = tf_maml.tasks.array_tasks(rng.random((300, 6, 4), np.float32), np.arange(300) % 30,
                                      n_way=3, k_shot=2, k_query=2)
    model = SubclassedModel()
    model(np.zeros((1, 6, 4), np.float32))
    learner = _learner(model)
    learner.fit(Episodes(tasks, 4), epochs=1, steps_per_epoch=2, verbose=0)
    task = tasks.sample(tf_maml.tasks.step_seed(7, 0, tf_maml.tasks.TEST), 1, "test")
    expected = learner.adapt_and_predict(task.support_x[0], task.support_y[0], task.query_x[0])
    learner.save(str(tmp_path / "learner.keras"))
    loaded = keras.models.load_model(str(tmp_path / "learner.keras"))
    for each, name in ((learner, "fitted"), (loaded, "loaded")):
        served = tf.saved_model.load(each.export(str(tmp_path / name)))
        answer = served.signatures["adapt"](support_x=task.support_x[0],
                                            support_y=task.support_y[0],
                                            query_x=task.query_x[0])["predictions"]
        np.testing.assert_allclose(answer, expected, atol=1e-5)


def test_export_after_fit_on_a_dataset_knows_the_kind_from_the_loss(tmp_path):
    """A sparse categorical loss says the model classifies (before: export asked for
    is_classification after fit on a dataset); a custom loss still has to say."""
    learner = _learner()
    learner.fit(_episodes([0, 1, 2], [2, 1, 0]), epochs=1, verbose=0)
    x = np.random.default_rng(3).random((3, 8), np.float32)
    expected = learner.adapt_and_predict(x, np.array([2, 0, 1]), x)
    served = tf.saved_model.load(learner.export(str(tmp_path / "export")))
    answer = served.signatures["adapt"](support_x=x, support_y=np.array([2, 0, 1], np.int32),
                                        query_x=x)["predictions"]
    np.testing.assert_allclose(answer, expected, atol=1e-5)
    custom = _learner()
    custom.compile(optimizer="adam", loss=lambda y, p: (
        keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)))
    custom.fit(_episodes([0, 1, 2]), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"^say whether the model classifies"):
        custom.export(str(tmp_path / "custom"))


def test_subclassed_model_adapts_after_fit_on_a_dataset():
    """Its input shape is learned from the dataset's episodes, as from a task family (before:
    "the model's input shape is unknown" after fitting on it)."""
    rng = np.random.default_rng(0)
    tasks = tf_maml.tasks.array_tasks(rng.random((300, 6, 4), np.float32), np.arange(300) % 30,
                                      n_way=3, k_shot=2, k_query=2)
    episode = tasks.sample(tf_maml.tasks.step_seed(7, 0, tf_maml.tasks.TRAIN), 4)
    model = SubclassedModel()
    model(np.zeros((1, 6, 4), np.float32))
    learner = _learner(model)
    learner.fit(tf.data.Dataset.from_tensors(episode), epochs=1, verbose=0)
    predictions = learner.adapt_and_predict(episode.support_x[0], episode.support_y[0],
                                            episode.query_x[0])
    assert predictions.shape == (6, 3) and np.isfinite(predictions).all()
    # It adapted: the support loss after the inner steps is below the meta-initialization's.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    support_x, support_y = episode.support_x[0], episode.support_y[0]
    before = float(loss(support_y, learner(support_x)))
    after = float(loss(support_y, learner.adapt_and_predict(support_x, support_y, support_x)))
    assert after < before - 1e-3, (before, after)
    with pytest.raises(ValueError) as e:
        learner.adapt_and_predict(episode.support_x[0, :, :5], episode.support_y[0],
                                  episode.query_x[0, :, :5])
    _one_line(e, r"support_x must hold examples of the model's input shape \(6, 4\)")


def _line(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (20, 1))
    return x, rng.normal() * x


def _short_after_seed_0(seed):
    x, y = _line(seed)
    return (x, y) if seed == 0 else (x[:3], y[:3])


def _raises_after_seed_0(seed):
    if seed:
        raise RuntimeError(f"my data source failed\nfor seed {seed}")
    return _line(seed)


def _nan_after_seed_0(seed):
    x, y = _line(seed)
    return (x, y) if seed == 0 else (x, y * np.nan)


def _overflows_after_seed_0(seed):  # finite in float64, infinite in float32
    x, y = _line(seed)
    return (x, y) if seed == 0 else (x * 1e300, y)


@pytest.mark.parametrize("function,pattern", [
    (_short_after_seed_0,
     r"^_short_after_seed_0\(\d+\) returned 3 rows, fewer than k_shot \+ k_query = 15$"),
    (_raises_after_seed_0,
     r"^_raises_after_seed_0\(\d+\) raised RuntimeError: my data source failed for seed \d+$"),
    (_nan_after_seed_0,
     r"^_nan_after_seed_0\(\d+\) returned y with NaN or infinite values \(in float32\)$"),
    (_overflows_after_seed_0,
     r"^_overflows_after_seed_0\(\d+\) returned x with NaN or infinite values"),
])
def test_a_task_function_failing_in_training_fails_fit_in_one_line(function, pattern):
    tasks = tf_maml.tasks.FunctionTasks(function, k_shot=5, k_query=10)
    learner = MetaLearner(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]),
                          inner_lr=0.01)
    learner.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError) as e:
        learner.fit(Episodes(tasks, 4), epochs=1, steps_per_epoch=3, verbose=0)
    _one_line(e, pattern)
    with pytest.raises(ValueError) as e:
        learner.evaluate_tasks(tasks, num_tasks=4)
    _one_line(e, pattern)


def test_a_subclassed_model_with_too_few_outputs_is_refused_before_training():
    """Its output size is known only from a call: the learner makes one before training."""
    rng = np.random.default_rng(0)
    tasks = tf_maml.tasks.array_tasks(rng.random((300, 6, 4), np.float32), np.arange(300) % 30,
                                      n_way=5, k_shot=1, k_query=1)
    model = SubclassedModel()
    model(np.zeros((1, 6, 4), np.float32))
    learner = _learner(model)  # 3 outputs, 5-way tasks
    with pytest.raises(ValueError) as e:
        learner.fit(Episodes(tasks, 4), epochs=1, steps_per_epoch=2, verbose=0)
    _one_line(e, r"the model outputs 3 values but the tasks are 5-way")


def test_valid_sparse_labels_are_not_refused():
    """Per-position labels of a sequence model, and labels a loss ignores (`ignore_class`)."""
    keras.utils.set_random_seed(0)
    sequence = keras.Sequential([keras.Input((5, 4)), keras.layers.Dense(3)])  # [batch, 5, 3]
    learner = MetaLearner(sequence, inner_lr=0.1)
    learner.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((6, 5, 4), np.float32), rng.integers(0, 3, (6, 5))
    predictions = learner.adapt_and_predict(x, y, x)
    assert predictions.shape == (6, 5, 3) and np.isfinite(predictions).all()
    ignoring = _learner()
    ignoring.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1))
    history = ignoring.fit(_episodes([0, -1, 2], [2, 1, -1]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError) as e:
        ignoring.fit(_episodes([0, -2, 2]), epochs=1, verbose=0)
    _one_line(e, r"^support_y labels must be in \[0, 3\), got -2$")


def _one_task_episodes():
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 8), np.float32), np.array([0, 1, 2, 0, 1], np.int32)
    return tf.data.Dataset.from_tensors({"support_x": x, "support_y": y, "query_x": x,
                                         "query_y": y})


def _categorical_learner():
    learner = _learner()
    learner.compile(optimizer="adam",
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return learner


def _dict_output_model():
    inputs = keras.Input((8,))
    return keras.Model(inputs, {"logits": keras.layers.Dense(3)(inputs)})


def _regression_learner():
    learner = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]),
                          inner_lr=0.1)
    learner.compile(optimizer="adam", loss="mse")
    return learner


def _two_output_model():
    inputs = keras.Input((8,))
    return keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)])


class _TupleModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.head, self.other = keras.layers.Dense(3), keras.layers.Dense(1)

    def call(self, x):
        return self.head(x), self.other(x)


def _built_tuple_model():
    model = _TupleModel()
    model(np.zeros((1, 8), np.float32))
    return model


def _renamed_query_y(element):
    element = dict(element)
    element["query_labels"] = element.pop("query_y")
    return element


def _nan_in_query_x(element):
    return {**element, "query_x": element["query_x"] * np.nan}


def _no_support(element):
    return {**element, "support_x": element["support_x"][:, :0],
            "support_y": element["support_y"][:, :0]}


def _no_query(element):
    return {**element, "query_x": element["query_x"][:, :0],
            "query_y": element["query_y"][:, :0]}


def _empty_support_of_unknown_size(empty="support"):
    """A dataset whose example axis is unknown until it runs: the check runs in tf.data."""
    x = np.random.default_rng(0).random((4, 3, 8), np.float32)
    y = np.tile(np.arange(3, dtype=np.int32), (4, 1))
    element = {"support_x": x, "support_y": y, "query_x": x, "query_y": y}
    element.update({f"{empty}_x": x[:, :0], f"{empty}_y": y[:, :0]})
    spec = {"support_x": tf.TensorSpec([4, None, 8], tf.float32),
            "support_y": tf.TensorSpec([4, None], tf.int32),
            "query_x": tf.TensorSpec([4, None, 8], tf.float32),
            "query_y": tf.TensorSpec([4, None], tf.int32)}
    return tf.data.Dataset.from_generator(lambda: iter([element]), output_signature=spec)


_X = np.random.default_rng(1).random((3, 8), np.float32)


def _frozen_after_wrapping():
    learner = _learner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                                         keras.layers.Dense(3)]))
    learner.model.layers[0].trainable = False
    return learner


def _hits(y_true, y_pred):  # per example, [tasks, queries]: not a per-task metric
    return tf.cast(tf.equal(tf.cast(y_true, tf.int64), tf.argmax(y_pred, -1)), tf.float32)


def _string_input_model():
    inputs = keras.Input((3,), dtype="string")
    ids = keras.layers.StringLookup(vocabulary=list("abcdef"))(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(8, 4)(ids))
    return keras.Model(inputs, keras.layers.Dense(2)(pooled))


def _tasks(features=None):
    """3-way 1-shot tasks over 30 classes of 8 features (`features` replaces them)."""
    x = np.random.default_rng(2).random((60, 8), np.float32) if features is None else features
    return tf_maml.tasks.array_tasks(x, np.arange(60) % 30, n_way=3, k_shot=1, k_query=1)


def _with_a_nan():
    x = np.random.default_rng(2).random((60, 8), np.float32)
    x[7, 3] = np.nan
    return _tasks(x)


@pytest.mark.parametrize("call,pattern", [
    (lambda: _learner().fit(_episodes([0, 1, 2]).take(0), verbose=0),
     r"^the dataset is empty: it holds no meta-batch$"),
    (lambda: _learner().evaluate(_episodes([0, 1, 2]).take(0), verbose=0),
     r"^the dataset is empty"),
    (lambda: _learner().fit(_one_task_episodes(), verbose=0),
     r"^support_x of shape \(5, 8\) looks like one task's examples: a meta-batch has a leading "
     r"task axis, \[tasks, examples, 8\]"),
    (lambda: _learner().fit(Episodes(_tasks(), 2), epochs=2, verbose=0),
     r"^fit over Episodes \(or a task family\) needs steps_per_epoch"),
    (lambda: _learner().fit(_episodes([0, 1, 2]), class_weight={0: 2.0}, verbose=0),
     r"^MetaLearner.fit does not take class_weight"),
    (lambda: _learner().fit(Episodes(_tasks(), 2), steps_per_epoch=1, batch_size=4, verbose=0),
     r"^MetaLearner.fit does not take batch_size: a meta-batch holds Episodes"),
    (lambda: _learner().predict(_tasks(), verbose=0),
     r"^predict takes model inputs, a dataset of Episode meta-batches, or Episodes \(on one "
     r"device\) for adapted query predictions; for a bare task family use Episodes\(tasks, "),
    (lambda: MetaLearner(_dict_output_model()),
     r"^MetaLearner needs a model that returns a single tensor; model '\w+' returns a dict "
     r"of one output\. Wrap it in a model that returns the tensor to adapt"),
    (lambda: MetaLearner(_two_output_model()),
     r"^MetaLearner needs a model that returns a single tensor; model '\w+' returns a list "
     r"of 2 outputs\."),
    (lambda: _learner(_built_tuple_model()).fit(_episodes([0, 1, 2]), verbose=0),
     r"^MetaLearner needs a model that returns a single tensor; model '\w+' returns a tuple "
     r"of 2 outputs\."),
    (lambda: _learner().fit(_episodes([0, 1, 2]).map(_renamed_query_y), verbose=0),
     r"^MetaLearner expects meta-batches with the keys support_x, support_y, query_x, "
     r"query_y; the dict lacks query_y and has query_labels$"),
    (lambda: _learner().fit(_episodes([0, 1, 2]).map(_nan_in_query_x), verbose=0),
     r"^query_x holds NaN or infinite values \(in a meta-batch of the dataset\)$"),
    (lambda: _learner().fit(_episodes([0, 1, 2]).map(_no_support), verbose=0),
     r"^the support set is empty: adaptation needs at least one example$"),
    (lambda: _learner().fit(_empty_support_of_unknown_size(), verbose=0),
     r"^a meta-batch has empty support sets"),
    # An empty query set trained on a NaN meta-loss ("diverged: lower inner_lr") or failed in
    # the batch norm's kernel.
    (lambda: _learner().fit(_episodes([0, 1, 2]).map(_no_query), verbose=0),
     r"^the query set is empty: give at least one query example per task"),
    (lambda: _learner().fit(_empty_support_of_unknown_size("query"), verbose=0),
     r"^a meta-batch has empty query sets \(query_x of shape \[tasks, 0, \.\.\.\]\): the "
     r"meta-loss needs at least one query example per task$"),
    (lambda: _learner().adapt_and_predict(_X, np.arange(3), _X[:0]),
     r"^the query set is empty"),
    (lambda: _learner().adapt_and_predict(_X, np.arange(3), np.full_like(_X, np.inf)),
     r"^query_x holds NaN or infinite values$"),
    (lambda: _learner().adapt_and_predict(_X, np.arange(3), _X, inner_lr=-1.0),
     r"^inner_lr must be a finite number >= 0, got -1\.0$"),
    # (export: raised from deep in tracing, as "SGD's inner_lr ...")
    (lambda: _learner().export("never_written", inner_lr=-1.0),
     r"^inner_lr must be a finite number >= 0 \(or None: the algorithm's rates\), got -1\.0$"),
    (lambda: _regression_learner().adapt_and_predict(_X, np.ones((3, 1), np.float32), _X,
                                                     inner_lr=1e10, num_steps=5),
     r"^the adaptation diverged: predictions are not finite \(inputs far from the scale of "
     r"the training data, or a step size too large for them\?\)$"),
    (lambda: _categorical_learner().fit(_episodes([0, 1, 2]), verbose=0),
     r"^support_y holds integer class ids but categorical_crossentropy takes one-hot labels"),
    (lambda: _categorical_learner().fit(Episodes(_tasks(), 2), steps_per_epoch=1, verbose=0),
     r"^the task family holds integer class ids but"),
    (lambda: _learner().adapt_and_predict(_X, np.array(["a", "b", "c"]), _X),
     r"^support_y must hold numbers \(integer class ids or regression targets\), got string$"),
    (lambda: _learner().adapt_and_predict(_X, np.arange(3), _X, num_steps=2.5),
     r"^num_steps must be an integer >= 0, got 2\.5$"),
    (lambda: _learner().adapt_and_predict(_X[:0], np.arange(0), _X),
     r"^the support set is empty"),
    (_with_a_nan, r"^arrays: class \d+ of the \w+ split holds NaN or infinite values$"),
    # A user's trial: an IndexError deep in the algorithm (fit said it in one line already).
    (lambda: _frozen_after_wrapping().adapt_and_predict(_X, np.arange(3), _X),
     r"^the model has 2 trainable weights now but had 4 when the MetaLearner was built"),
    (lambda: _frozen_after_wrapping().export("never_written"),
     r"^the model has 2 trainable weights now but had 4"),
    (lambda: _frozen_after_wrapping().evaluate_tasks(_tasks(), num_tasks=2),
     r"^the model has 2 trainable weights now but had 4"),
    # numpy's TypeError / AxisError after the whole evaluation had run.
    (lambda: _learner().evaluate_tasks(_tasks(), num_tasks=2, metric=_hits),
     r"^metric _hits must return one value per task, shape \[num_tasks\] \(here 2\), got "
     r"shape \[2, 3\]; it takes y_true and y_pred of shape \[num_tasks, num_query, \.\.\.\]"),
    (lambda: _learner().evaluate_tasks(_tasks(), num_tasks=2,
                                       metric=lambda t, p: tf.reduce_mean(_hits(t, p))),
     r"^metric <lambda> must return one value per task, shape \[num_tasks\] \(here 2\), got "
     r"shape \[\]"),
    (lambda: _learner().evaluate_tasks(_tasks(), num_tasks=2, metric=3),
     r"^metric must be 'accuracy', 'mse' or a function, got 3$"),
    # TypeError: '>' not supported between instances of 'int' and 'str'.
    (lambda: MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                         num_inner_steps="2"),
     r"^num_inner_steps must be a non-negative integer, got '2'$"),
    (lambda: MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                         num_inner_steps=None),
     r"^num_inner_steps must be a non-negative integer, got None$"),
    # UnimplementedError "Cast string to float is not supported" at the first adaptation.
    (lambda: MetaLearner(_string_input_model()),
     r"^model '\w+' takes string inputs, but adaptation needs numbers: do the lookup "
     r"\(StringLookup, TextVectorization\) in the input pipeline"),
])
def test_user_mistakes_found_by_the_audit_fail_in_one_line(call, pattern):
    """Each of these used to end in a bare StopIteration, a Keras format error, a graph trace,
    an epoch that never ended, or NaN training."""
    with pytest.raises(ValueError) as e:
        call()
    _one_line(e, pattern)


def test_one_episode_of_arrays_is_a_meta_batch():
    """An `Episode` of arrays as `validation_data` (or `x`) is one meta-batch, and `predict`
    over a dataset of episodes gives their adapted query predictions."""
    learner = _learner()
    element = next(iter(_episodes([0, 1, 2])))
    episode = tf_maml.tasks.Episode(*[element[k].numpy() for k in tf_maml.tasks.Episode._fields])
    history = learner.fit(_episodes([0, 1, 2]), validation_data=episode, verbose=0)
    assert np.isfinite(history.history["val_loss"]).all()
    predictions = learner.predict(tf.data.Dataset.from_tensors(episode), verbose=0)
    np.testing.assert_allclose(predictions, learner.adapt_and_predict(
        episode.support_x, episode.support_y, episode.query_x), rtol=1e-5, atol=1e-6)


def test_calling_the_learner_scales_uint8_images_as_predict_does():
    learner = _learner(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]))
    raw = np.array([[255, 51]], np.uint8)
    np.testing.assert_allclose(learner(raw), learner.predict(raw, verbose=0), rtol=1e-6)
    np.testing.assert_allclose(learner(raw), learner(raw.astype(np.float32) / 255), rtol=1e-6)


def test_layers_random_in_training_are_named_in_a_warning(caplog):
    """Augmentation layers stay active in adaptation and in the exported signatures (the
    library calls the model in training mode): RandomFlip flipped served query images,
    silently."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.RandomFlip(name="flip"),
                              keras.layers.GaussianNoise(0.1, name="noise"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    MetaLearner(model)
    assert "layer(s) flip (RandomFlip), noise (GaussianNoise) of model" in caplog.text
    assert "Data augmentation belongs in the input pipeline" in caplog.text
    caplog.clear()
    _learner()
    assert "random numbers" not in caplog.text
    # Dropout alone: named, without the advice on augmentation.
    MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dropout(0.1, name="drop"),
                                  keras.layers.Dense(3)]))
    assert "layer(s) drop (Dropout) of model" in caplog.text
    assert "augmentation" not in caplog.text
    # Keras gives every recurrent cell a seed generator; without dropout it never draws
    # (the warning named GRUCell, with the augmentation advice, on a deterministic model).
    caplog.clear()
    reshaped = [keras.Input((8,)), keras.layers.Reshape((4, 2))]
    MetaLearner(keras.Sequential(reshaped + [keras.layers.GRU(4), keras.layers.Dense(3)]))
    assert "random numbers" not in caplog.text
    MetaLearner(keras.Sequential(reshaped + [keras.layers.LSTM(4, recurrent_dropout=0.2),
                                             keras.layers.Dense(3)]))
    assert "(LSTMCell) of model" in caplog.text
    assert "augmentation" not in caplog.text


def test_numpy_scalars_are_numbers_for_the_learner():
    """A sweep over np.logspace / np.arange: np.float32(0.1) was "not a positive number"."""
    learner = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                          inner_lr=np.float32(0.1), num_inner_steps=np.int64(2),
                          first_order=np.bool_(True), num_eval_steps=np.array(3))
    config = learner.meta_config
    assert (config.inner_lr, config.num_inner_steps, config.num_eval_steps) == (0.1, 2, 3)
    assert type(config.num_inner_steps) is int and type(config.first_order) is bool
    assert type(config.num_eval_steps) is int
    json.dumps(config.to_dict())  # numpy scalars are not JSON


class _NoiseWithZeroDropout(keras.layers.Layer):
    """Draws noise from its own seed generator; its `dropout` attribute says nothing."""

    def __init__(self):
        super().__init__()
        self.dropout = 0.0
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, x, training=False):
        return x + keras.random.normal(keras.ops.shape(x), seed=self.seed_generator)


def test_only_recurrent_cells_without_dropout_are_exempt_from_the_random_layer_check():
    """A zero `dropout` attribute exempts Keras' recurrent cells only: a noise layer with one
    would have passed as deterministic, and recompute_inner_steps would re-draw its noise."""
    model = keras.Sequential([keras.Input((8,)), _NoiseWithZeroDropout(), keras.layers.Dense(3)])
    assert tf_maml.functional.has_random_layers(model)
    with pytest.raises(ValueError, match="recompute"):
        tf_maml.MAML(model, tf_maml.functional.make_forward(model),
                     tf_maml.losses.mean_squared_error, 0.1, 1, recompute_inner_steps=True)


class _Pooled(keras.Model):
    """Shape-agnostic: global pooling over a sequence of any length."""

    def __init__(self):
        super().__init__()
        self.pool = keras.layers.GlobalAveragePooling1D()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(self.pool(x))


def test_a_subclassed_model_built_on_a_dummy_batch_takes_its_tasks_shape():
    """The batch a subclassed model was first called on is a last resort for its input shape:
    a pooling model built on length 5 must still train on tasks of length 20."""
    model = _Pooled()
    model(np.zeros((1, 5, 4), np.float32))
    learner = _learner(model)
    x = np.random.default_rng(3).random((60, 20, 4), np.float32)
    tasks = tf_maml.tasks.array_tasks(x, np.arange(60) % 30, n_way=3, k_shot=1, k_query=1)
    learner.fit(Episodes(tasks, 2), steps_per_epoch=1, verbose=0)
    assert np.isfinite(learner.evaluate_tasks(tasks, num_tasks=2)["mean"]).all()
    assert learner.adapt_and_predict(x[:3], np.arange(3), x[:2]).shape == (2, 3)
    # Never fitted: the request's examples of the built shape adapt.
    fresh = _Pooled()
    fresh(np.zeros((1, 5, 4), np.float32))
    assert _learner(fresh).adapt_and_predict(x[:3, :5], np.arange(3), x[:2, :5]).shape == (2, 3)


def test_a_boolean_input_model_is_not_refused_as_strings_are():
    inputs = keras.Input((4,), dtype="bool")
    floats = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inputs)
    MetaLearner(keras.Model(inputs, keras.layers.Dense(3)(floats)))


def test_a_legacy_h5_path_is_refused_before_anything_is_written(tmp_path):
    """Keras wrote .h5 with a deprecation warning; loading it failed ("Unknown layer")."""
    path = str(tmp_path / "learner.h5")
    with pytest.raises(ValueError) as e:
        _learner().save(path)
    _one_line(e, r"^MetaLearner.save\('.*learner.h5'\): a MetaLearner saves to the .keras "
                 r"format only \(Keras' legacy .h5 format writes it but cannot load it back\)")
    assert not list(tmp_path.iterdir())


def test_a_logits_model_compiled_with_a_loss_on_probabilities_is_warned_about(caplog):
    """`loss="sparse_categorical_crossentropy"` on a model ending in a linear layer trained
    on the wrong loss, and the export served its logits as `probabilities`, silently."""
    def fitted(model, loss):
        learner = MetaLearner(model, inner_lr=0.1)
        learner.compile(optimizer="adam", loss=loss)
        caplog.clear()
        learner.fit(_episodes([0, 1, 2]), epochs=1, verbose=0)
        learner.fit(_episodes([0, 1, 2]), epochs=1, verbose=0)
        return caplog.text.count("the model's last layer has a linear activation")

    def dense(**kwargs):
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, **kwargs)])

    warned = fitted(dense(), "sparse_categorical_crossentropy")
    assert warned == 1  # once per learner
    assert "from_logits=True" in caplog.text
    assert fitted(dense(), keras.losses.SparseCategoricalCrossentropy(from_logits=False)) == 1
    # Losses that fit the model's output are not warned about.
    assert fitted(dense(), keras.losses.SparseCategoricalCrossentropy(from_logits=True)) == 0
    assert fitted(dense(activation="softmax"), "sparse_categorical_crossentropy") == 0
    assert fitted(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3),
                                    keras.layers.Softmax()]),
                  "sparse_categorical_crossentropy") == 0


def test_predict_over_episodes_gives_their_adapted_query_predictions():
    """The README's "predict over Episodes": it was refused, pointing at "a dataset of
    Episodes" to a user who had passed Episodes."""
    learner = _learner()
    episodes = Episodes(_tasks(), 2, split="test", num_batches=3, seed=4)
    predictions = learner.predict(episodes, verbose=0)
    assert predictions.shape == (6, 3, 3)
    want = [learner.adapt_and_predict(b.support_x, b.support_y, b.query_x)
            for b in (episodes.sample(i) for i in range(3))]
    np.testing.assert_allclose(predictions, np.concatenate(want), rtol=1e-5, atol=1e-6)
    # Adapted: not the meta-initialization's predictions.
    unadapted = [learner.adapt_and_predict(b.support_x, b.support_y, b.query_x, num_steps=0)
                 for b in (episodes.sample(i) for i in range(3))]
    assert not np.allclose(predictions, np.concatenate(unadapted), atol=1e-4)


def test_backup_and_restore_refuses_the_backup_of_another_learner(tmp_path):
    """A rerun with another algorithm or rate went on from the old run's backup silently
    (and another head size failed inside Keras' loader)."""
    backup = str(tmp_path / "backup")

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("crashed")

    def fit(learner, crash=False, directory=backup):
        callbacks = [keras.callbacks.BackupAndRestore(directory)] + ([Crash()] if crash else [])
        return learner.fit(Episodes(_tasks(), 2), epochs=2, steps_per_epoch=2, verbose=0,
                           callbacks=callbacks)

    with pytest.raises(RuntimeError, match="crashed"):
        fit(_learner(), crash=True)  # the backup of epoch 0 is written, then the crash
    anil = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                       algorithm="anil", inner_lr=0.05)
    wider = MetaLearner(keras.Sequential([keras.Input((8,)), keras.layers.Dense(5),
                                          keras.layers.Dense(3)]), inner_lr=0.1)
    for learner, changed in ((anil, r"inner_lr: 0.1 -> 0.05; algorithm: 'maml' -> 'anil'"),
                             (wider, r"the model's weights: 2 tensors of shapes \[\[8, 3\], "
                                     r"\[3\]\] -> 4 of \[\[8, 5\], \[5\], \[5, 3\], \[3\]\]")):
        learner.compile(optimizer="adam",
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        with pytest.raises(ValueError) as e:
            fit(learner, directory=tmp_path / "backup")  # a pathlib.Path was not checked
        _one_line(e, rf"^BackupAndRestore's directory {backup} holds the backup of a learner "
                     rf"with another configuration \({changed}\)\. Use another backup")
    # The same learner resumes: only the epoch left runs.
    history = fit(_learner())
    assert len(history.history["loss"]) == 1
