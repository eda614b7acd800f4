"""User mistakes in the library API fail with one line that names the mistake.

Each case is what a user would plausibly write; before these checks each one failed deep
inside TensorFlow (or, marked "silently", gave a wrong result without any error).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_maml
from tf_maml import core, functional, losses, models, rl, serving, tasks


def _regression():
    model = models.mlp(hidden_sizes=(8,))
    return model, tf_maml.MAML(model, functional.make_forward(model), losses.mean_squared_error,
                               inner_lr=0.01, num_inner_steps=1)


def _sine(num_tasks=2, k=5):
    x = np.random.default_rng(0).uniform(-5, 5, (num_tasks, k, 1)).astype(np.float32)
    return x, np.sin(x)


def test_regression_targets_without_the_output_axis_are_refused():
    _, algorithm = _regression()
    x, y = _sine(num_tasks=5, k=5)  # [5, 5] targets would broadcast to [5, 5, 5] silently
    with pytest.raises(ValueError, match=r"y\[\.\.\., None\]"):
        algorithm.meta_step(tasks.Episode(x, y[..., 0], x, y[..., 0]))
    loss, _, _ = algorithm.meta_step(tasks.Episode(x, y, x, y))
    assert np.isfinite(float(loss))


def test_one_hot_labels_and_mismatched_sets_are_refused():
    model = models.mlp(input_shape=(4,), output_size=2, hidden_sizes=(8,))
    algorithm = tf_maml.MAML(model, functional.make_forward(model),
                             losses.sparse_softmax_cross_entropy, inner_lr=0.1, num_inner_steps=1)
    x = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    y = np.array([[0, 1, 0, 1]] * 2)
    with pytest.raises(ValueError, match="one-hot labels"):
        algorithm.meta_step(tasks.Episode(x, np.eye(2)[y], x, np.eye(2)[y]))
    with pytest.raises(ValueError, match="support set has 2 tasks and the query set 1"):
        algorithm.meta_step(tasks.Episode(x, y, x[:1], y[:1]))
    with pytest.raises(ValueError, match="support set: inputs of shape .* differ in tasks or "
                                         "examples"):
        algorithm.adapt(algorithm.meta_variables, x, y[:, :3], 1)
    with pytest.raises(ValueError, match="one-hot labels"):
        losses.accuracy(np.eye(2)[y], tf.zeros([2, 4, 2]))


def test_model_variables_instead_of_task_batched_weights_point_at_broadcast_to_tasks():
    model, _ = _regression()
    x, y = _sine()
    loss = core.supervised_loss(functional.make_forward(model), losses.mean_squared_error, x, y)
    with pytest.raises(ValueError, match="broadcast_to_tasks"):
        core.adapt(loss, model.trainable_variables, 1, core.SGD(0.01))
    adapted, _ = core.adapt(loss, core.broadcast_to_tasks(model.trainable_variables, 2), 1,
                            core.SGD(0.01))
    assert adapted[0].shape[0] == 2


@pytest.mark.parametrize("seed", [0, 3.5, [1, 2, 3], np.float32([1, 2]), "a"])
def test_a_seed_that_is_not_two_integers_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be two integers"):
        tasks.SineTasks().sample(seed, 4)


def test_two_integer_seeds_of_any_integer_kind_sample_the_same_tasks():
    reference = tasks.SineTasks().sample(tf.constant([1, 2], tf.int64), 3)
    for seed in ([1, 2], (1, 2), np.int32([1, 2]), tf.constant([1, 2], tf.int32)):
        np.testing.assert_array_equal(tasks.SineTasks().sample(seed, 3).support_x,
                                      reference.support_x)


@pytest.mark.parametrize("family, sizes", [
    ("sine", dict(k_shot=2.5)), ("sine", dict(k_query=0)),
    ("images", dict(n_way=0)), ("images", dict(k_shot=-1)), ("images", dict(k_query=True)),
])
def test_task_family_sizes_must_be_positive_integers(family, sizes):
    with pytest.raises(ValueError, match="must be a positive integer"):
        if family == "sine":
            tasks.SineTasks(**sizes)
        else:
            images = np.zeros([6, 6, 28, 28, 1], np.uint8)
            tasks.ImageClassTasks({"train": images[:3], "test": images[3:]},
                                  **{"n_way": 2, "k_shot": 1, "k_query": 1, **sizes})


def test_sample_refuses_a_zero_meta_batch():
    with pytest.raises(ValueError, match="meta_batch_size must be a positive integer"):
        tasks.SineTasks().sample([0, 0], 0)


def _two_outputs(seed):
    x = np.random.default_rng(seed).uniform(-1, 1, (20, 1))
    return x, np.concatenate([x, -x], 1)


def test_meta_learner_refuses_tasks_whose_targets_are_not_the_model_outputs():
    learner = tf_maml.MetaLearner(models.mlp(hidden_sizes=(8,)), inner_lr=0.01)
    learner.compile(optimizer="adam", loss="mse")
    two = tasks.FunctionTasks(_two_outputs, k_shot=5, k_query=5)
    # Silently, before: the loss broadcast [N, 1] predictions against [N, 2] targets.
    with pytest.raises(ValueError, match="targets have 2: give the model output_size=2"):
        learner.fit(tf_maml.Episodes(two, 2), epochs=1, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="output_size=2"):
        learner.evaluate_tasks(two, num_tasks=4, num_steps=1)


def test_meta_learner_evaluate_tasks_checks_its_arguments():
    uncompiled = tf_maml.MetaLearner(models.mlp(hidden_sizes=(8,)), inner_lr=0.01)
    with pytest.raises(ValueError, match="compile the MetaLearner first"):
        uncompiled.evaluate_tasks(tasks.SineTasks(), num_tasks=4, num_steps=1)
    with pytest.raises(ValueError, match="compile the MetaLearner first"):
        uncompiled.adapt_and_predict(np.zeros([5, 1]), np.zeros([5, 1]), np.zeros([3, 1]))
    learner = tf_maml.MetaLearner(models.mlp(hidden_sizes=(8,)), inner_lr=0.01)
    learner.compile(optimizer="adam", loss="mse")
    images = np.zeros([6, 6, 28, 28, 1], np.uint8)
    image_tasks = tasks.ImageClassTasks({"train": images[:3], "test": images[3:]}, 2, 1, 1)
    with pytest.raises(ValueError, match=r"inputs of shape \(1,\) but the tasks' inputs are"):
        learner.evaluate_tasks(image_tasks, num_tasks=2, num_steps=1)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        learner.evaluate_tasks(tasks.SineTasks(), num_tasks=0, num_steps=1)
    with pytest.raises(ValueError, match="task family"):
        learner.evaluate_tasks(np.zeros([3, 1]), num_tasks=2)
    # An Episodes is read as its task family.
    wrapped = learner.evaluate_tasks(tf_maml.Episodes(tasks.SineTasks(), 4), num_tasks=4,
                                     num_steps=1, seed=3)
    plain = learner.evaluate_tasks(tasks.SineTasks(), num_tasks=4, num_steps=1, seed=3)
    assert wrapped == plain


def test_uint8_images_in_a_dataset_are_scaled_like_everywhere_else():
    """fit/evaluate on a dataset of uint8 episodes see [0, 1] images, as the task families,
    adapt_and_predict and the exported signatures do (before: raw 0..255, silently)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (2, 4, 6, 6, 1)).astype(np.uint8)
    labels = np.array([[0, 1, 0, 1]] * 2, np.int32)

    # No batch norm: it would cancel the scale of the inputs.
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    learner = tf_maml.MetaLearner(model, inner_lr=0.1, num_inner_steps=1)
    learner.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    results = [learner.evaluate(tf.data.Dataset.from_tensors(tasks.Episode(x, labels, x, labels)),
                                verbose=0, return_dict=True)["loss"]
               for x in (raw, raw.astype(np.float32) / 255)]
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_a_policy_built_for_another_environment_is_refused():
    env = rl.Navigation2D(horizon=3)
    with pytest.raises(ValueError, match="observations of size 2 but GoalObserved's are 4"):
        rl.MAMLRL(rl.GoalObserved(env), rl.gaussian_mlp_policy(2, 2, hidden=(8,)))
    with pytest.raises(ValueError, match="outputs 3 action values but Navigation2D takes 2"):
        rl.MAMLRL(env, rl.gaussian_mlp_policy(2, 3, hidden=(8,)))
    algorithm = rl.MAMLRL(env, rl.gaussian_mlp_policy(2, 2, hidden=(8,)), meta_batch_size=2,
                          fast_batch_size=2)
    with pytest.raises(ValueError, match=r"tasks must be \[num_tasks, 2\] for Navigation2D"):
        algorithm.evaluate(tasks=np.zeros([3]), num_steps=0)


def test_labels_with_a_trailing_axis_of_one_are_read_as_class_indices():
    """As Keras' sparse losses read them (before: accuracy broadcast to [T, N, N], silently)."""
    logits = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 3)), tf.float32)
    labels = np.array([[0, 1, 2, 0], [2, 2, 1, 0]])
    for fn in (losses.accuracy, losses.sparse_softmax_cross_entropy):
        np.testing.assert_array_equal(fn(labels[..., None], logits), fn(labels, logits))


def test_the_checks_pass_what_was_valid_before():
    """Numpy predictions in the metrics, a seed of unknown rank in a graph, and a regression
    model whose custom loss reads more outputs than the targets have."""
    labels = np.array([[0, 1, 1]])
    logits = np.array([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]], np.float32)
    np.testing.assert_allclose(losses.accuracy(labels, logits), [2 / 3])
    np.testing.assert_allclose(losses.mean_squared_error(np.zeros([1, 2, 1]),
                                                         np.ones([1, 2, 1], np.float32)), [1.0])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64)])
    def sample(seed):
        return tasks.SineTasks().sample(seed, 2).support_x

    assert sample(tf.constant([1, 2], tf.int64)).shape == (2, 10, 1)

    def gaussian_nll(y_true, y_pred):  # the model outputs a mean and a log-variance
        mean, log_var = y_pred[..., :1], y_pred[..., 1:]
        return tf.reduce_mean(0.5 * (log_var + (y_true - mean) ** 2 / tf.exp(log_var)), -1)

    learner = tf_maml.MetaLearner(models.mlp(output_size=2, hidden_sizes=(8,)), inner_lr=0.01)
    learner.compile(optimizer="adam", loss=gaussian_nll)
    history = learner.fit(tf_maml.Episodes(tasks.SineTasks(), 2), epochs=1, steps_per_epoch=2,
                          verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_meta_learner_predict_scales_uint8_inputs():
    learner = tf_maml.MetaLearner(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                                  inner_lr=0.01)
    learner.compile(optimizer="sgd", loss="mse")
    raw = np.array([[255, 51]], np.uint8)
    np.testing.assert_allclose(learner.predict(raw, verbose=0),
                               learner.predict(raw.astype(np.float32) / 255, verbose=0),
                               rtol=1e-6)


def test_a_model_that_declares_integer_inputs_gets_them_unscaled(tmp_path):
    """`keras.Input(dtype="uint8")` + `Rescaling(1/255)` (Keras' idiom for raw pixels) used to
    get pixels already scaled to [0, 1], cast back to uint8 (0 or 1): predictions on nearly
    blank images, silently. The exported image signatures give it raw pixels too. Token ids
    reach an Embedding as they are."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1), dtype="uint8"),
                              keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    learner = tf_maml.MetaLearner(model, inner_lr=0.1, num_inner_steps=1)
    learner.compile(optimizer="sgd",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    raw = np.random.default_rng(0).integers(0, 256, (2, 6, 4, 4, 1)).astype(np.uint8)
    labels = np.array([[0, 1, 2] * 2] * 2, np.int32)
    np.testing.assert_allclose(learner.predict(raw[0], verbose=0), model(raw[0]).numpy(),
                               rtol=1e-5, atol=1e-6)
    # Adaptation sees the same pixels as the model's own forward: its adapted predictions
    # equal those of a float model with the rescaling taken out.
    float_model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(3)])
    float_model.set_weights(model.get_weights())
    float_learner = tf_maml.MetaLearner(float_model, inner_lr=0.1, num_inner_steps=1)
    float_learner.compile(optimizer="sgd",
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(
        learner.adapt_and_predict(raw, labels, raw),
        float_learner.adapt_and_predict(raw.astype(np.float32) / 255, labels,
                                        raw.astype(np.float32) / 255), rtol=1e-5, atol=1e-5)
    history = learner.fit(tf.data.Dataset.from_tensors(tasks.Episode(raw, labels, raw, labels)),
                          epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    expected = learner.adapt_and_predict(raw[0], labels[0], raw[0])
    served = tf.saved_model.load(learner.export(
        str(tmp_path / "export"), is_classification=True,
        image_format=serving.ImageFormat(channels=1, invert=False)))
    pngs = tf.stack([tf.io.encode_png(image) for image in raw[0]])
    answer = served.signatures["adapt_images"](support_images=pngs, support_y=labels[0],
                                               query_images=pngs)["predictions"]
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    # The tensor signatures take the pixels as float32 whole numbers; images scaled to
    # [0, 1] (which adapt_and_predict refuses) were served silently, cast to 0s and 1s.
    pixels = dict(support_x=raw[0].astype(np.float32), support_y=labels[0])
    answer = served.signatures["adapt"](**pixels, query_x=pixels["support_x"])["predictions"]
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    for bad in (raw[0] / 255, raw[0] + 300.0):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"support_x must hold whole "
                           r"numbers in \[0, 255\]: the model takes uint8 inputs"):
            served.signatures["adapt"](support_x=bad.astype(np.float32), support_y=labels[0],
                                       query_x=pixels["support_x"])

    ids = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(300, 4),
                            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    id_learner = tf_maml.MetaLearner(ids, inner_lr=0.1)
    id_learner.compile(optimizer="sgd", loss="mse")
    tokens = np.array([[3, 299, 7, 0, 255]], np.int32)
    np.testing.assert_allclose(id_learner.predict(tokens, verbose=0), ids(tokens).numpy(),
                               rtol=1e-6)
    # uint8 ids are ids too, not pixels to scale to [0, 1].
    small = np.array([[3, 200, 7, 0, 255]], np.uint8)
    np.testing.assert_allclose(id_learner.predict(small, verbose=0),
                               ids(small.astype(np.int32)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("model_kind", ["dense_softmax", "softmax_layer", "ops_softmax",
                                        "subclassed", "subclassed_logits"])
def test_a_softmax_models_exported_probabilities_are_its_outputs(tmp_path, model_kind):
    """A model that ends in a softmax outputs probabilities: `probabilities` softmaxed them
    a second time, pulled towards uniform (0.31/0.37/0.32 for 0.26/0.44/0.30). A model of
    logits still gets their softmax."""
    keras.utils.set_random_seed(0)
    logits = model_kind == "subclassed_logits"
    if model_kind.startswith("subclassed"):  # no layer graph: the loss's from_logits says it
        class Softmaxed(keras.Model):
            def __init__(self):
                super().__init__()
                self.dense = keras.layers.Dense(3, activation=None if logits else "softmax")

            def call(self, x):
                return self.dense(x)

        model = Softmaxed()
        model(np.zeros((1, 4), np.float32))
    else:
        inputs = keras.Input((4,))
        outputs = {"dense_softmax": lambda: keras.layers.Dense(3, activation="softmax")(inputs),
                   "softmax_layer": lambda: keras.layers.Softmax()(keras.layers.Dense(3)(inputs)),
                   "ops_softmax": lambda: keras.ops.softmax(keras.layers.Dense(3)(inputs)),
                   }[model_kind]()
        model = keras.Model(inputs, outputs)
    learner = tf_maml.MetaLearner(model, inner_lr=0.5)
    learner.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=logits))
    support_x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    support_y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    expected = learner.adapt_and_predict(support_x, support_y, support_x[:2])
    probabilities = tf.nn.softmax(expected).numpy() if logits else expected
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    served = tf.saved_model.load(learner.export(str(tmp_path / "export"),
                                                is_classification=True))
    out = served.signatures["adapt"](support_x=support_x, support_y=support_y,
                                     query_x=support_x[:2])
    np.testing.assert_allclose(out["predictions"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
    initial = served.signatures["serving_default"](x=support_x[:2])
    outputs = model(support_x[:2])
    np.testing.assert_allclose(initial["probabilities"],
                               tf.nn.softmax(outputs) if logits else outputs, rtol=1e-5,
                               atol=1e-6)


def test_an_integer_input_model_gets_a_task_familys_images_as_pixels():
    """Task families scale uint8 images to [0, 1]; a model declaring `keras.Input(dtype=
    "uint8")` with its own `Rescaling` used to get them cast back to uint8: all zeros, in
    `fit`, `evaluate_tasks` and `adapt_and_predict`, at chance accuracy, silently. It now
    trains and evaluates exactly as the same model taking floats without the rescaling. Float
    inputs that are not whole numbers are refused for it in one line."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 4, 4, 1), dtype=np.uint8)
    y = np.repeat(np.arange(20), 6)
    family = tasks.array_tasks(x, y, n_way=3, k_shot=1, k_query=2)
    assert family.scales_uint8_inputs

    def learner(dtype):
        keras.utils.set_random_seed(0)
        layers = [keras.Input((4, 4, 1), dtype=dtype)]
        layers += [keras.layers.Rescaling(1 / 255)] if dtype == "uint8" else []
        model = keras.Sequential(layers + [keras.layers.Flatten(), keras.layers.Dense(3)])
        meta = tf_maml.MetaLearner(model, inner_lr=0.5, num_inner_steps=1)
        meta.compile(optimizer=keras.optimizers.SGD(0.1),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        meta.fit(tf_maml.Episodes(family, 4), epochs=1, steps_per_epoch=3, verbose=0)
        return meta

    raw, scaled = learner("uint8"), learner("float32")
    for a, b in zip(raw.model.get_weights(), scaled.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    curves = [m.evaluate_tasks(family, num_tasks=8)["mean"] for m in (raw, scaled)]
    np.testing.assert_allclose(curves[0], curves[1], atol=1e-6)
    episode = family.sample(tasks.step_seed(0, 0, tasks.TEST), 1, "test")
    with pytest.raises(ValueError, match="^the model takes uint8 inputs but got non-integer"):
        raw.adapt_and_predict(episode.support_x[0], episode.support_y[0], episode.query_x[0])


def test_float_class_ids_are_checked_like_integer_ones():
    """Float labels used to skip the range check: out-of-range ones trained to NaN weights,
    fractional ones were truncated, silently."""
    learner = tf_maml.MetaLearner(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)]),
                                  inner_lr=0.1)
    learner.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    sx = np.random.default_rng(0).random((2, 4, 3), np.float32)
    for labels, got in (([0, 1, 2, 7], "7"), ([0, 1.5, 2, 3], "1.5")):
        y = np.tile(np.float32(labels), (2, 1))
        with pytest.raises(ValueError, match=rf"^support_y labels must be whole numbers in "
                                             rf"\[0, 4\), got {got}$"):
            learner.fit(tf.data.Dataset.from_tensors(tasks.Episode(sx, y, sx, y)), verbose=0)
        with pytest.raises(ValueError, match="must be whole numbers"):
            learner.adapt_and_predict(sx[0], y[0], sx[0])
    good = np.tile(np.float32([0, 1, 2, 3]), (2, 1))
    history = learner.fit(tf.data.Dataset.from_tensors(tasks.Episode(sx, good, sx, good)),
                          verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("name", ["poisson", "kl_divergence", "binary_crossentropy"])
def test_a_loss_named_by_a_string_gets_targets_as_keras_compile_gives_them(name):
    """`compile(loss="poisson")` with targets `[tasks, k]` for a one-output model broadcast
    `[N]` against `[N, 1]` (a different loss, silently; binary cross-entropy crashed); Keras
    expands the targets for losses named by strings or given as functions. Now both target
    forms give the loss of the Keras class."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 5, 3), np.float32)
    y = rng.integers(0, 2, (2, 5)).astype(np.float32)
    class_loss = {"poisson": keras.losses.Poisson(), "kl_divergence": keras.losses.KLDivergence(),
                  "binary_crossentropy": keras.losses.BinaryCrossentropy()}[name]
    values = []
    for loss, targets in ((name, y), (name, y[..., None]), (keras.losses.get(name), y),
                          (class_loss, y)):
        learner = tf_maml.MetaLearner(
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")]),
            inner_lr=0.1)
        learner.model.set_weights([np.full((3, 1), 0.3, np.float32), np.zeros(1, np.float32)])
        learner.compile(optimizer="sgd", loss=loss)
        predictions = tf.reshape(learner.model(x.reshape(10, 3)), [2, 5, 1])
        values.append(learner._task_loss(tf.constant(targets), predictions).numpy())
    expected = [class_loss(y[t][:, None], learner.model(x[t])).numpy() for t in range(2)]
    assert not np.allclose(expected[0], expected[1])
    for value in values:
        np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_mlp_on_images_is_refused_and_trace_time_errors_keep_their_own_line():
    """`--model=mlp` on Omniglot used to fail inside the traced step as "error: in user
    code:", the one line the CLI showed, after writing the run's files."""
    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    with pytest.raises(ValueError, match=r"^model mlp takes feature vectors; the omniglot "
                                         r"inputs have shape \(28, 28, 1\)"):
        models.build(config_lib.Config(dataset="omniglot", model="mlp"), (28, 28, 1), 5)
    traced = ValueError('in user code:\n\n    File "step.py", line 3, in step  *\n        '
                        'loss(y, p)\n\n    ValueError: labels must be integer class indices\n')
    assert experiment_lib.error_text(traced) == (
        "ValueError: labels must be integer class indices")


def test_an_export_given_as_a_run_directory_is_named(tmp_path):
    """A user trial: `evaluate --model_dir=export/models/...` said only "holds no config.json"."""
    from tf_maml import config as config_lib
    version = tmp_path / "export" / "7"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    for path in (tmp_path / "export", version):
        with pytest.raises(FileNotFoundError, match="this is an export of tf_maml.export"):
            config_lib.load(str(path))
    with pytest.raises(FileNotFoundError) as plain:
        config_lib.load(str(tmp_path))
    assert "export" not in str(plain.value).replace(str(tmp_path), "")


# A researcher's trial of the library API (2026-12-04): each of these was a wrong result, a
# NaN, or a trace from deep inside TensorFlow.

def _sine_episode(num_tasks=3):
    return tasks.SineTasks(k_shot=5, k_query=5).sample(tf.constant([0, 1], tf.int64), num_tasks)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_inner_adam_steps_16_bit_weights_as_float32_would(dtype):
    """float16 turned epsilon into 0 (a zero gradient gave 0/0 = NaN); bfloat16 turned beta_2
    into 1 (a step size of 0: the weights never moved)."""
    def loss(weights, step):
        return tf.reduce_sum(tf.cast(weights[0][:, :1], tf.float32) ** 2, axis=1)

    start = [[1.0, 2.0]]
    adapted, _ = core.adapt(loss, [tf.constant(start, dtype)], 2, core.Adam(0.1))
    reference, _ = core.adapt(loss, [tf.constant(start, tf.float32)], 2, core.Adam(0.1))
    assert adapted[0].dtype == dtype
    np.testing.assert_allclose(tf.cast(adapted[0], tf.float32), reference[0], atol=1e-2)
    assert float(adapted[0][0, 0]) < 0.95 and float(adapted[0][0, 1]) == 2.0


def test_inner_adam_steps_weights_of_mixed_dtypes_each_in_its_own():
    def loss(weights, step):
        return (tf.reduce_sum(weights[0] ** 2, axis=1)
                + tf.cast(tf.reduce_sum(weights[1] ** 2, axis=1), tf.float32))

    weights = [tf.constant([[1.0, -2.0]], tf.float32), tf.constant([[3.0]], tf.float64)]
    adapted, _ = core.adapt(loss, weights, 3, core.Adam(0.1, beta_1=0.9))
    alone = [core.adapt(lambda w, s: tf.reduce_sum(tf.cast(w[0], tf.float64) ** 2, axis=1),
                        [w], 3, core.Adam(0.1, beta_1=0.9))[0][0] for w in weights]
    for got, want in zip(adapted, alone):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_reptile_meta_steps_a_mixed_precision_model():
    """Its support loss (float16) times the task scale (float32) failed in Mul."""
    model = models.mlp(hidden_sizes=(8,), dtype="mixed_float16")
    reptile = tf_maml.Reptile(model, functional.make_forward(model), losses.mean_squared_error,
                              0.01, 2)
    loss, grads, _ = reptile.meta_step(_sine_episode())
    assert np.isfinite(float(loss)) and all(np.isfinite(g.numpy()).all() for g in grads)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


@pytest.mark.parametrize("call,pattern", [
    (lambda: core.adapt(lambda w, s: tf.reduce_sum(w[0], axis=1),
                        core.broadcast_to_tasks([tf.ones([2, 1])], 3)[0], 1, core.SGD(0.1)),
     r"^weights must be a list of task-batched tensors, got a \w+"),
    (lambda: core.adapt(lambda w, s: tf.reduce_sum(w[0], axis=[1, 2]) + tf.reduce_sum(w[1]),
                        [tf.ones([3, 2, 1]), tf.ones([1, 1])], 1, core.SGD(0.1)),
     r"^weights must share their leading task axis: weight 0 has 3 tasks, weight 1 has 1"),
    (lambda: core.adapt(lambda w, s: None, [tf.ones([3, 2])], 1, core.SGD(0.1)),
     r"^task_loss must return a tensor of one loss per task, shape \[num_tasks\]; it returned "
     r"NoneType$"),
    (lambda: core.meta_gradients(lambda p: tf.reduce_sum(p[0] ** 2), [tf.ones([2, 1])]),
     r"^the meta-objective must return a pair \(scalar_loss, aux\)"),
    (lambda: _metasgd().adapt(_metasgd().model.trainable_variables, *_support(), 1),
     r"^meta_params must be MetaSGD's meta_variables, 4 tensors \(the model's 2 weights, then "
     r"2 learned ones\), got 2: pass algorithm.meta_variables"),
    (lambda: tf_maml.MAMLPlusPlus(_bn_model(), functional.make_forward(_bn_model()),
                                  losses.mean_squared_error, 0.01, 2, iterations_per_epoch=0),
     r"^MAML\+\+'s iterations_per_epoch must be an integer >= 1, got 0$"),
    (lambda: tf_maml.MAMLPlusPlus(_bn_model(), functional.make_forward(_bn_model()),
                                  losses.mean_squared_error, 0.01, 2).make_optimizer(0.0, 10),
     r"^meta_lr must be a finite number > 0, got 0\.0$"),
])
def test_library_api_mistakes_found_by_a_researchers_trial(call, pattern):
    with pytest.raises(ValueError) as e:
        call()
    assert "\n" not in str(e.value) and e.match(pattern)


def _metasgd():
    model = models.mlp(hidden_sizes=(), dtype="float64")
    return tf_maml.MetaSGD(model, functional.make_forward(model), losses.mean_squared_error,
                           tf.constant(0.1), 1)  # a float32 rate for a float64 model


def _support():
    episode = _sine_episode()
    return tf.cast(episode.support_x, tf.float64), tf.cast(episode.support_y, tf.float64)


def _bn_model():
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(4),
                             keras.layers.BatchNormalization(), keras.layers.Dense(1)])


def test_mamlpp_predict_with_the_models_own_variables_is_refused():
    """Without its per-step batch-norm copies it used the model's own (never trained) ones,
    silently: query MSE 6.60 instead of 5.90 in the trial."""
    model = _bn_model()
    mamlpp = tf_maml.MAMLPlusPlus(model, functional.make_forward(model),
                                  losses.mean_squared_error, 0.01, 2)
    episode = _sine_episode()
    adapted, _ = mamlpp.adapt(mamlpp.meta_variables, episode.support_x, episode.support_y, 2)
    mamlpp.predict(mamlpp.meta_variables, adapted, episode.query_x, 2)
    with pytest.raises(ValueError, match=r"^meta_params must be MAMLPlusPlus's meta_variables"):
        mamlpp.predict(model.trainable_variables, adapted, episode.query_x, 2)
