"""Export: the SavedModel's signatures equal the in-process model, in every loader, on the wire."""

import base64
import concurrent.futures
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_maml import config as config_lib
from tf_maml import experiment as experiment_lib
from tf_maml import evaluation, files, reporting, serving, trainer
from tf_maml.tasks import ImageClassTasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32, same kernels; reordering only
BIG_REQUEST_ROWS = 1_200_000  # sine rows: 4.8 MB of float32, in the request and in the answer
CLASSIFIER_LIMITS = serving.ServingLimits(max_support_examples=20, max_query_examples=30,
                                          max_inner_steps=10, max_tasks=4)


def _client():
    spec = importlib.util.spec_from_file_location("client", os.path.join(ROOT, "export", "client.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("sine_run"))
    config = config_lib.Config(num_iterations=300, log_every=100, checkpoint_every=300,
                               validate_every=0, num_eval_steps=5)
    experiment, step = trainer.train(config, model_dir)
    # Room for a >4 MiB request (gRPC's default message limit) in serving_default.
    path = serving.export(experiment, str(tmp_path_factory.mktemp("serving")), step,
                          config.num_eval_steps, config.inner_lr,
                          limits={"max_query_examples": BIG_REQUEST_ROWS})
    return experiment, model_dir, path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 6, 12, 12, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, n_way=3, k_shot=2, k_query=2)
    config = config_lib.Config(dataset="omniglot", n_way=3, k_shot=2, k_query=2, inner_lr=0.4,
                               num_eval_steps=3)
    experiment = experiment_lib.build_experiment(config, tasks)
    path = serving.export(experiment, str(tmp_path_factory.mktemp("serving")), 1, 3, 0.4,
                          limits=CLASSIFIER_LIMITS)
    return experiment, path


def _task(experiment, seed=0):
    episode = experiment.tasks.sample(tf.constant([seed, 7], tf.int64), 1, "test")
    return {"support_x": episode.support_x[0].numpy(), "support_y": episode.support_y[0].numpy(),
            "query_x": episode.query_x[0].numpy()}, episode


def _in_process(experiment, episode, steps, inner_lr):
    _, predictions = evaluation.adaptation_curve(
        experiment.algorithm, experiment.algorithm.meta_variables, episode, experiment.metric_fn,
        steps, inner_lr)
    return [p[0].numpy() for p in predictions]


LOAD_SCRIPT = """
import json, sys
# TensorFlow imports Keras when present; here Keras and tf_maml cannot be imported at all.
for name in ("keras", "tf_keras", "tf_maml"):
    sys.modules[name] = None
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
out = {}
for name in ("serving_default", "adapt", "adapt_custom", "adapted_weights"):
    sig = model.signatures[name]
    args = {k: tf.constant(v) for k, v in inputs.items() if k in sig.structured_input_signature[1]}
    if name == "serving_default":
        args = {"x": tf.constant(inputs["query_x"])}
    for key, value in sig(**args).items():
        out[name + "/" + key] = value.numpy()
np.savez(sys.argv[3], **out)
# What loading and running the model imported (the test asserts: no Keras, no tf_maml).
print(json.dumps(sorted(name for name, module in sys.modules.items() if module is not None)))
"""


@pytest.mark.parametrize("kind", ["sine", "classifier"])
def test_fresh_process_load_matches_in_process_model(kind, sine_run, classifier, tmp_path):
    experiment, path = (sine_run[0], sine_run[2]) if kind == "sine" else classifier
    steps, inner_lr = (5, 0.01) if kind == "sine" else (3, 0.4)
    inputs, episode = _task(experiment)
    np.savez(tmp_path / "in.npz", **inputs, inner_steps=np.int32(2), inner_lr=np.float32(inner_lr))
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    # A process that cannot import tf_maml or Keras.
    result = subprocess.run([sys.executable, str(script), path, str(tmp_path / "in.npz"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "tensorflow" in modules
    assert not [m for m in modules if m == "keras" or m.startswith(("keras.", "tf_maml"))], (
        [m for m in modules if m.startswith(("keras", "tf_maml"))][:10])
    out = dict(np.load(tmp_path / "out.npz"))
    expected = _in_process(experiment, episode, steps, inner_lr)
    np.testing.assert_allclose(out["serving_default/predictions"], expected[0], **TOLERANCE)
    np.testing.assert_allclose(out["adapt/predictions"], expected[steps], **TOLERANCE)
    np.testing.assert_allclose(out["adapt_custom/predictions"], expected[2], **TOLERANCE)
    assert not np.allclose(expected[0], expected[steps])  # adaptation changed something
    # adapted_weights: the in-process adaptation's weights, one output per model weight.
    algorithm = experiment.algorithm
    params = algorithm.meta_variables
    adapted, _ = algorithm.adapt(params, episode.support_x, episode.support_y, steps,
                                 inner_lr=inner_lr)
    weights = algorithm.full_weights(params, adapted, steps)
    names = serving._weight_names(experiment.model)
    assert sorted(k for k in out if k.startswith("adapted_weights/")) == sorted(
        f"adapted_weights/{name}" for name in names)
    for name, weight in zip(names, weights):
        np.testing.assert_allclose(out[f"adapted_weights/{name}"], weight[0].numpy(), **TOLERANCE)
    if kind == "classifier":
        np.testing.assert_allclose(out["adapt/probabilities"],
                                   tf.nn.softmax(expected[steps]).numpy(), **TOLERANCE)


ONEDNN_OFF_SCRIPT = """
import sys, numpy as np, tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
assert not _pywrap_util_port.IsMklEnabled(), "oneDNN is on"
model = tf.saved_model.load(sys.argv[1])
tasks = dict(np.load(sys.argv[2]))
out = {}
for suffix in ("", "_custom"):
    many, one = model.signatures["adapt_tasks" + suffix], model.signatures["adapt" + suffix]
    names = many.structured_input_signature[1]
    inputs = {k: v for k, v in tasks.items() if k in names}
    out["tasks" + suffix] = many(**{k: tf.constant(v) for k, v in inputs.items()})[
        "predictions"].numpy()
    out["each" + suffix] = np.stack([one(**{k: tf.constant(v[i]) for k, v in inputs.items()})[
        "predictions"].numpy() for i in range(len(tasks["support_x"]))])
np.savez(sys.argv[3], **out)
"""


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_task_major_signatures_answer_where_onednn_is_off(algorithm, tmp_path):
    """A conv model's adapt_tasks and adapt_tasks_custom answer several tasks in a process
    with oneDNN off (TF Serving, a CPU without AVX-512), which has no gradients of grouped
    convolutions: MAML's tasks one at a time, ANIL's body (forward only) batched; each task
    as adapt and adapt_custom answer it alone."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (8, 6, 12, 12, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, n_way=3, k_shot=2, k_query=2)
    config = config_lib.Config(dataset="omniglot", n_way=3, k_shot=2, k_query=2, inner_lr=0.4,
                               num_eval_steps=3, algorithm=algorithm)
    experiment = experiment_lib.build_experiment(config, tasks)
    assert experiment.algorithm.adapts_through_grouped_convolutions == (algorithm == "maml")
    path = serving.export(experiment, str(tmp_path / "serving"), 1, 3, 0.4,
                          limits=CLASSIFIER_LIMITS, image_format=None)
    episode = tasks.sample(tf.constant([3, 7], tf.int64), 3, "test")
    np.savez(tmp_path / "tasks.npz", **{k: getattr(episode, k).numpy()
                                        for k in ("support_x", "support_y", "query_x")},
             inner_steps=np.int32([2, 0, 4]), inner_lr=np.float32([0.4, 0.3, 0.2]))
    script = tmp_path / "load.py"
    script.write_text(ONEDNN_OFF_SCRIPT)
    result = subprocess.run([sys.executable, str(script), path, str(tmp_path / "tasks.npz"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                     TF_ENABLE_ONEDNN_OPTS="0"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(np.load(tmp_path / "out.npz"))
    for suffix in ("", "_custom"):
        np.testing.assert_allclose(out["tasks" + suffix], out["each" + suffix], **TOLERANCE)
    # The per-task step counts were honoured: task 1 (0 steps) is not adapt_tasks' 3 steps.
    assert not np.allclose(out["tasks_custom"][1], out["tasks"][1])


def test_a_forward_of_ones_own_on_a_conv_model_is_answered_task_by_task():
    """A forward not made by make_forward says nothing of grouped convolutions: a model with
    convolution layers of any kind is then assumed to have them (one task at a time is right
    everywhere)."""
    import keras
    from tf_maml import algorithms, functional, losses
    conv = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
                             keras.layers.Flatten(), keras.layers.Dense(2)])
    separable = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.SeparableConv2D(2, 3),
                                  keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    for model, expected in ((conv, True), (separable, True), (dense, False)):
        made = functional.make_forward(model)

        def own(weights, x, training=True, seed=None, made=made):
            return made(weights, x, training, seed)

        algorithm = algorithms.MAML(model, own, losses.mean_squared_error, 0.1, 1)
        assert algorithm.adapts_through_grouped_convolutions is expected
        assert algorithms.MAML(model, made, losses.mean_squared_error, 0.1, 1
                               ).adapts_through_grouped_convolutions is (
                                   expected and made.vectorized)


DILATED_SCRIPT = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
rng = np.random.default_rng(0)
try:
    model.signatures["adapt"](support_x=rng.uniform(0, 1, (3, 12, 12, 1)).astype(np.float32),
                              support_y=np.arange(3, dtype=np.int32),
                              query_x=rng.uniform(0, 1, (2, 12, 12, 1)).astype(np.float32))
    print("adapted")
except tf.errors.OpError as e:
    print("failed:", e.message)
"""


def test_a_dilated_conv_models_export_warns_it_adapts_only_with_onednn(tmp_path, caplog):
    """TensorFlow's CPU kernels differentiate dilated convolutions only with oneDNN on (not
    a grouping matter: one task fails too); the export says so, naming the layers."""
    import keras
    import tf_maml
    layers = keras.layers
    model = keras.Sequential([keras.Input((12, 12, 1)),
                              layers.Conv2D(4, 3, dilation_rate=2, name="dilated"),
                              layers.Flatten(), layers.Dense(3)])
    learner = tf_maml.MetaLearner(model, inner_lr=0.4, num_inner_steps=1, num_eval_steps=2)
    learner.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with caplog.at_level("WARNING"):
        path = learner.export(str(tmp_path / "dilated"))
    warnings = [r.getMessage() for r in caplog.records if "dilation" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("Layers dilated have dilation rates "
                                                         "above 1"), warnings
    script = tmp_path / "load.py"
    script.write_text(DILATED_SCRIPT)
    answers = {}
    for onednn in ("0", "1"):
        result = subprocess.run([sys.executable, str(script), path], capture_output=True,
                                text=True, timeout=300, env=dict(
                                    os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                    TF_ENABLE_ONEDNN_OPTS=onednn))
        assert result.returncode == 0, result.stderr[-2000:]
        answers[onednn] = result.stdout
    assert "dilation rates larger than 1" in answers["0"], answers
    assert answers["1"].strip() == "adapted", answers
    # A model without dilation exports without the warning.
    caplog.clear()
    plain = keras.Sequential([keras.Input((12, 12, 1)), layers.Conv2D(4, 3), layers.Flatten(),
                              layers.Dense(3)])
    learner = tf_maml.MetaLearner(plain, inner_lr=0.4, num_inner_steps=1, num_eval_steps=2)
    learner.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with caplog.at_level("WARNING"):
        learner.export(str(tmp_path / "plain"))
    assert not [r for r in caplog.records if "dilation" in r.getMessage()]


def test_tf1_session_loader_and_saved_model_cli(sine_run, tmp_path):
    experiment, _, path = sine_run
    inputs, episode = _task(experiment, seed=3)
    expected = _in_process(experiment, episode, 5, 0.01)[5]
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta_graph.signature_def["adapt"]
        feed = {signature.inputs[k].name: v for k, v in inputs.items()}
        got = session.run(signature.outputs["predictions"].name, feed)
    np.testing.assert_allclose(got, expected, **TOLERANCE)

    for name, value in inputs.items():
        np.save(tmp_path / f"{name}.npy", value)
    arguments = ";".join(f"{name}={tmp_path / name}.npy" for name in inputs)
    result = subprocess.run(
        ["saved_model_cli", "run", "--dir", path, "--tag_set", "serve", "--signature_def",
         "adapt", "--inputs", arguments, "--outdir", str(tmp_path / "cli")],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "predictions.npy"), expected, **TOLERANCE)


def test_loading_an_export_warns_of_no_unsaved_custom_gradients(classifier, caplog):
    """The batch norm's closed-form second derivative (a custom gradient of a custom
    gradient, which a SavedModel cannot keep) is left out of exports: they differentiate
    once, and loading one printed a warning per function that used it."""
    _, path = classifier
    with caplog.at_level("WARNING"):
        model = tf.saved_model.load(path)
    assert [r for r in caplog.records if "custom gradients" in r.getMessage()] == []
    library = model.signatures["adapt"].graph.as_graph_def().library.function
    assert any(node.op == "FusedBatchNormGradV3" for f in library for node in f.node_def)


def test_each_signature_is_traced_once_and_the_root_keeps_the_variables(classifier, tmp_path):
    """Keras' ExportArchive traced every endpoint twice (once more inside the save, whose
    context is part of tf.function's cache key), doubling an export's time: ours traces once.
    The loaded root lists the model's and the algorithm's variables, as Keras' did."""
    experiment, _ = classifier
    traces = []
    originals = {name: getattr(serving.AdaptationSignatures, name)
                 for name in ("serve", "adapt", "adapt_custom", "adapt_tasks")}

    def counting(name):
        def method(self, *args):
            traces.append(name)
            return originals[name](self, *args)
        return method

    with mock.patch.multiple(serving.AdaptationSignatures,
                             **{name: counting(name) for name in originals}):
        path = serving.export(experiment, str(tmp_path), 1, 3, 0.4, limits=CLASSIFIER_LIMITS)
    assert sorted(traces) == sorted(originals)
    loaded = tf.saved_model.load(path)
    # The model's variables first, in its order (as Keras' archive listed them).
    names = [v.path for v in experiment.model.variables]
    assert [v.name.split(":")[0] for v in loaded.variables][:len(names)] == names
    assert len(loaded.variables) == len(loaded.trainable_variables) + len(
        loaded.non_trainable_variables)
    inputs, _ = _task(experiment)
    np.testing.assert_allclose(
        loaded.adapt(**{k: tf.constant(v) for k, v in inputs.items()})["predictions"],
        loaded.signatures["adapt"](**{k: tf.constant(v) for k, v in inputs.items()})[
            "predictions"], **TOLERANCE)


def test_signature_archive_keeps_tracked_tables_and_unused_variables(tmp_path):
    """What Keras' ExportArchive kept, SignatureArchive keeps: a lookup table an endpoint
    reads, a layer's variables no endpoint uses (dropout's seed state), the layer's order;
    an unbuilt layer is refused in one line."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.Dropout(0.5)])
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(["a", "b"]), tf.constant([1, 2], tf.int64)), default_value=-1)

    class Lookup(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = table

    archive = serving.SignatureArchive()
    archive.track(model)
    archive.track(Lookup())
    archive.add_endpoint("serving_default", lambda x: {"y": model(x)},
                         [tf.TensorSpec([None, 3], tf.float32, name="x")])
    archive.add_endpoint("lookup", lambda keys: {"ids": table.lookup(keys)},
                         [tf.TensorSpec(None, tf.string, name="keys")])
    archive.write_out(str(tmp_path / "1"))
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    ids = loaded.signatures["lookup"](keys=tf.constant(["b", "z", "a"]))["ids"]
    np.testing.assert_array_equal(ids, [2, -1, 1])
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(loaded.signatures["serving_default"](x=x)["y"], model(x))
    assert [v.name.split(":")[0] for v in loaded.variables] == [v.path for v in model.variables]
    with pytest.raises(ValueError, match="not built yet"):
        serving.SignatureArchive().track(keras.layers.Dense(2))


def test_bad_requests_fail_clearly_and_the_next_request_works(classifier):
    experiment, path = classifier
    model = tf.saved_model.load(path)
    adapt, custom = model.signatures["adapt"], model.signatures["adapt_custom"]
    tasks, tasks_custom = model.signatures["adapt_tasks"], model.signatures["adapt_tasks_custom"]
    good, _ = _task(experiment)
    good = {k: tf.constant(v) for k, v in good.items()}
    good_tasks = {k: tf.stack([v, v]) for k, v in good.items()}
    before = adapt(**good)["predictions"].numpy()
    limits = CLASSIFIER_LIMITS
    bad_requests = [
        (adapt, {"support_x": good["support_x"][..., 0]}, "support_x must have shape"),
        (adapt, {"support_x": tf.zeros([6, 12, 11, 1])}, "support_x must have shape"),
        (adapt, {"query_x": tf.zeros([0, 12, 12, 1])}, "query_x must not be empty"),
        (adapt, {"support_x": good["support_x"][:0], "support_y": good["support_y"][:0]},
         "support_x must not be empty"),
        (adapt, {"support_y": good["support_y"] + 3}, "labels must be in \\[0, 3\\)"),
        (adapt, {"support_y": good["support_y"][:2]}, "one label per support_x example"),
        # A column of labels gets the friendly message, not TF's shape error.
        (adapt, {"support_y": good["support_y"][:, None]},
         "support_y must be \\[num_examples\\] integer labels"),
        (adapt, {"support_x": good["support_x"] * np.nan}, "NaN or infinite"),
        # The export's limits (recorded in assets.extra).
        (adapt, {"support_x": tf.zeros([limits.max_support_examples + 1, 12, 12, 1]),
                 "support_y": tf.zeros([limits.max_support_examples + 1], tf.int32)},
         "support_x has too many examples: this export accepts at most 20 "
         "\\(max_support_examples\\)"),
        (adapt, {"query_x": tf.zeros([limits.max_query_examples + 1, 12, 12, 1])},
         "query_x has too many examples: this export accepts at most 30"),
        (custom, {"inner_steps": tf.constant(limits.max_inner_steps + 1),
                  "inner_lr": tf.constant(0.1)},
         "inner_steps must be in \\[0, 10\\] \\(max_inner_steps\\)"),
        (custom, {"inner_steps": tf.constant(1), "inner_lr": tf.constant(-1.0)},
         "inner_lr must be finite and >= 0"),
        # One task's step count and size are scalars: a list of one names the input.
        (custom, {"inner_steps": tf.constant([1]), "inner_lr": tf.constant(0.1)},
         "inner_steps must be a scalar \\(adapt_custom adapts one task.*got shape.*\\[1\\]"),
        (custom, {"inner_steps": tf.constant(1), "inner_lr": tf.constant([[0.1]])},
         "inner_lr must be a scalar .*got shape.*\\[1 1\\]"),
        # A step size that makes the adaptation diverge: an error, not NaN with status OK.
        (custom, {"inner_steps": tf.constant(3), "inner_lr": tf.constant(3e38)},
         "the adaptation diverged: predictions are not finite \\(inputs far from the scale of "
         "the training data, or a step size too large for them\\?\\)"),
        (tasks, {**{k: tf.concat([v] * 3, 0) for k, v in good_tasks.items()}},
         "support_x has too many tasks: this export accepts at most 4"),
        (tasks, {"query_x": good_tasks["query_x"][:1]},
         "query_x must have as many tasks as support_x"),
        (tasks, {"support_y": good_tasks["support_y"][..., None]},
         "support_y must be \\[num_tasks, num_examples\\] integer labels"),
        (tasks_custom, {"inner_steps": tf.constant([1, 1, 1]), "inner_lr": tf.constant([.1, .1])},
         "inner_steps must have one value per task"),
        (tasks_custom, {"inner_steps": tf.constant([1, 11]), "inner_lr": tf.constant([.1, .1])},
         "inner_steps must be in \\[0, 10\\]"),
        (tasks_custom, {"inner_steps": tf.constant([3, 3]), "inner_lr": tf.constant([.1, 3e38])},
         "the adaptation diverged: predictions are not finite.*in tasks.*\\[1\\]"),
    ]
    defaults = {custom: {"inner_steps": tf.constant(1), "inner_lr": tf.constant(0.4)},
                tasks: good_tasks,
                tasks_custom: {**good_tasks, "inner_steps": tf.constant([1, 1]),
                               "inner_lr": tf.constant([0.4, 0.4])}}
    for signature, change, message in bad_requests:
        request = {**good, **defaults.get(signature, {}), **change}
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(**request)
        # The server keeps serving: a good request still gets the answer it got before.
        np.testing.assert_array_equal(adapt(**good)["predictions"].numpy(), before)


def test_concurrent_requests_do_not_interfere(sine_run):
    experiment, _, path = sine_run
    adapt = tf.saved_model.load(path).signatures["adapt"]
    requests = [{k: tf.constant(v) for k, v in _task(experiment, seed)[0].items()}
                for seed in range(8)]
    sequential = [adapt(**r)["predictions"].numpy() for r in requests]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_results = list(pool.map(lambda r: adapt(**r)["predictions"].numpy(),
                                           requests * 3))
    for i, got in enumerate(concurrent_results):
        np.testing.assert_array_equal(got, sequential[i % 8])


def test_graph_has_no_python_or_must_compile_ops(sine_run, classifier):
    from tensorflow.core.protobuf import saved_model_pb2
    for path in (sine_run[2], classifier[1]):
        saved = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
        graph = saved.meta_graphs[0].graph_def
        nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
        assert not {n.op for n in nodes} & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
        for fn in graph.library.function:
            assert not fn.attr["_XlaMustCompile"].b


def _fake_grpc_server(path):
    """A PredictionService on loopback that answers from the SavedModel (TF Serving's protocol)."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    model = tf.saved_model.load(path)

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            try:
                outputs = model.signatures[request.model_spec.signature_name](**inputs)
            except tf.errors.InvalidArgumentError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
            response = predict_pb2.PredictResponse()
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    # TF Serving's server accepts and sends messages up to 2 GiB - 1 (SetMaxMessageSize(kint32max)).
    limit = 2**31 - 1
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2),
                         options=[("grpc.max_send_message_length", limit),
                                  ("grpc.max_receive_message_length", limit)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _from_json(value):
    """TF Serving's JSON values: {"b64": ...} is binary."""
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _fake_rest_server(path):
    """TF Serving's REST :predict on loopback (columnar and row formats), from the SavedModel."""
    model = tf.saved_model.load(path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            signature = model.signatures[body["signature_name"]]
            specs = signature.structured_input_signature[1]
            try:
                if "instances" in body:  # rows: one instance per entry of the first axis
                    rows = body["instances"]
                    columns = {k: [_from_json(row[k]) for row in rows] for k in rows[0]}
                else:
                    columns = {k: _from_json(v) for k, v in body["inputs"].items()}
                inputs = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in columns.items()}
                outputs = {k: v.numpy().tolist() for k, v in signature(**inputs).items()}
                if "instances" in body:
                    payload = {"predictions": [{k: v[i] for k, v in outputs.items()}
                                               for i in range(len(body["instances"]))]}
                else:
                    payload = {"outputs": outputs}
                status = 200
            except tf.errors.InvalidArgumentError as e:
                payload, status = {"error": e.message}, 400
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_client_requests_over_grpc_and_rest(classifier):
    client = _client()
    experiment, path = classifier
    inputs, episode = _task(experiment, seed=5)
    expected = _in_process(experiment, episode, 3, 0.4)[3]

    request = client.grpc_request("omniglot", "adapt", inputs)
    assert request.inputs["support_y"].dtype == tf.int32.as_datatype_enum
    server, port = _fake_grpc_server(path)
    try:
        got = client.grpc_predict(f"127.0.0.1:{port}", request)
        np.testing.assert_allclose(got["predictions"], expected, **TOLERANCE)
        import grpc
        bad = client.grpc_request("omniglot", "adapt", {**inputs, "support_y": inputs["support_y"] + 9})
        with pytest.raises(grpc.RpcError, match="labels must be in"):
            client.grpc_predict(f"127.0.0.1:{port}", bad)
    finally:
        server.stop(None)

    body = json.loads(client.rest_body("adapt", inputs))
    assert set(body) == {"signature_name", "inputs"}  # columnar, not "instances"
    assert np.array(body["inputs"]["support_x"]).shape == inputs["support_x"].shape
    server = _fake_rest_server(path)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = client.rest_predict(url, "omniglot", "adapt", inputs)
        np.testing.assert_allclose(got["predictions"], expected, **TOLERANCE)
        got = client.rest_predict(url, "omniglot", "adapt_custom",
                                  {**inputs, "inner_steps": 3, "inner_lr": 0.4})
        np.testing.assert_allclose(got["predictions"], expected, **TOLERANCE)
        # JSON cannot carry the shape of an empty array: [] arrives as shape [0].
        with pytest.raises(RuntimeError, match="query_x must have shape"):
            client.rest_predict(url, "omniglot", "adapt", {**inputs, "query_x": inputs["query_x"][:0]})

        # Task-major: REST's row format, one instance per task, each task's own steps and rate.
        other, _ = _task(experiment, seed=6)
        tasks = {k: np.stack([inputs[k], other[k]]) for k in inputs}
        custom = {**tasks, "inner_steps": np.array([3, 1], np.int32),
                  "inner_lr": np.array([0.4, 0.2], np.float32)}
        assert "instances" in json.loads(client.rest_body("adapt_tasks_custom", custom, rows=True))
        got = client.rest_predict(url, "omniglot", "adapt_tasks_custom", custom, rows=True)
        one_task = tf.saved_model.load(path).signatures["adapt_custom"]
        for i, (steps, lr) in enumerate([(3, 0.4), (1, 0.2)]):
            alone = one_task(**{k: tf.constant(v[i]) for k, v in tasks.items()},
                             inner_steps=tf.constant(steps), inner_lr=tf.constant(lr))
            for name in ("predictions", "probabilities"):
                np.testing.assert_allclose(got[name][i], alone[name].numpy(), **TOLERANCE)
        np.testing.assert_allclose(got["predictions"][0], expected, **TOLERANCE)

        # Encoded images ({"b64": ...} in JSON) through adapt_images: Omniglot's convention
        # (dark ink on a light page) is inverted as in training, giving back the arrays.
        pngs = {name: [tf.io.encode_png(tf.cast(255 - tf.round(image * 255), tf.uint8)).numpy()
                       for image in inputs[name]] for name in ("support_x", "query_x")}
        got = client.rest_predict(url, "omniglot", "adapt_images", {
            "support_images": pngs["support_x"], "support_y": inputs["support_y"],
            "query_images": pngs["query_x"]})
        np.testing.assert_allclose(got["predictions"], expected, **TOLERANCE)
    finally:
        server.shutdown()


def test_grpc_client_sends_and_receives_messages_over_4_mib(sine_run):
    """gRPC's default limit is 4 MiB; TF Serving takes 2 GiB; the client's channel must too."""
    import grpc
    client = _client()
    _, _, path = sine_run
    x = np.linspace(-5, 5, BIG_REQUEST_ROWS, dtype=np.float32)[:, None]
    request = client.grpc_request("sine", "serving_default", {"x": x})
    assert request.ByteSize() > 4 * 2**20
    server, port = _fake_grpc_server(path)
    try:
        got = client.grpc_predict(f"127.0.0.1:{port}", request, timeout=120)
        assert got["predictions"].shape == (BIG_REQUEST_ROWS, 1)  # a >4 MiB answer, too
        expected = tf.saved_model.load(path).signatures["serving_default"](
            x=tf.constant(x[:1000]))["predictions"].numpy()
        np.testing.assert_allclose(got["predictions"][:1000], expected, **TOLERANCE)
        # With gRPC's default limit the same call fails: the test exercises the limit.
        with pytest.raises(grpc.RpcError, match="RESOURCE_EXHAUSTED|larger than max"):
            client.grpc_predict(f"127.0.0.1:{port}", request, timeout=120,
                                max_message_bytes=4 * 2**20)
    finally:
        server.stop(None)


def test_an_algorithm_of_ones_own_exports_and_says_the_config_names_another(tmp_path):
    """A user trial: a MAML subclass exported as "algorithm": "maml", with no word that a
    restore from the recorded config would rebuild plain MAML."""
    from tf_maml import algorithms  # noqa: PLC0415

    class HalvedRate(algorithms.MAML):
        def inner_update(self, meta_params, inner_lr=None):
            rate = self.inner_lr if inner_lr is None else inner_lr
            return super().inner_update(meta_params, 0.5 * rate)

    config = config_lib.Config(num_eval_steps=2)
    experiment = experiment_lib.build_experiment(config)
    experiment.algorithm = HalvedRate(experiment.model, experiment.forward, experiment.loss_fn,
                                      config.inner_lr, config.num_inner_steps)
    with mock.patch.object(serving.logging, "warning") as warning:
        path = serving.export(experiment, str(tmp_path), 1, 2)
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert "HalvedRate, which is not the 'maml' algorithm that the config records" in message
    recorded = json.load(open(os.path.join(path, "assets.extra", serving.CONFIG_ASSET)))
    assert recorded["export_algorithm_class"].endswith("HalvedRate")
    # The SavedModel serves the class's adaptation.
    episode = experiment.tasks.sample(tf.constant([0, 1], tf.int64), 1)
    loaded = tf.saved_model.load(path).signatures["adapt"]
    served = loaded(support_x=episode.support_x[0], support_y=episode.support_y[0],
                    query_x=episode.query_x[0])["predictions"]
    params = experiment.algorithm.meta_variables
    adapted, _ = experiment.algorithm.adapt(params, episode.support_x, episode.support_y, 2)
    expected = experiment.algorithm.predict(params, adapted, episode.query_x, 2)[0]
    np.testing.assert_allclose(served.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_export_cli_records_reptiles_eval_inner_batch_size_as_the_signatures(tmp_path):
    """The flag changes adapt (and is recorded as export_*), never the run's recorded config."""
    model_dir = str(tmp_path / "run")
    trainer.train(config_lib.Config(algorithm="reptile", inner_batch_size=5, num_iterations=2,
                                    meta_batch_size=2, validate_every=0), model_dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "tf_maml.export", f"--model_dir={model_dir}",
         f"--export_dir={tmp_path / 'serving'}", "--eval_inner_batch_size=3"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    recorded = json.load(open(tmp_path / "serving" / "2" / "assets.extra" / serving.CONFIG_ASSET))
    assert (recorded["eval_inner_batch_size"], recorded["export_eval_inner_batch_size"]) == (-1, 3)
    with open(os.path.join(model_dir, config_lib.CONFIG_FILENAME)) as f:
        assert json.load(f)["eval_inner_batch_size"] == -1


def test_evaluate_export_reproduces_the_runs_evaluation(sine_run, tmp_path):
    """An export evaluated through its signatures gives the run's own evaluation figures
    (same tasks; before adaptation and after the export's steps), also when requests are
    split by max_tasks, and from the command line."""
    experiment, model_dir, path = sine_run
    reporting.evaluate_and_report(model_dir, output_dir=str(tmp_path / "run"), num_eval_tasks=40)
    run = json.load(open(tmp_path / "run" / "eval_results.json"))["results"]["MAML"]
    exported = reporting.evaluate_export(os.path.dirname(path), num_eval_tasks=40)
    assert exported["steps"] == [0, 5] and exported["num_tasks"] == 40
    np.testing.assert_allclose(exported["mean"], [run["mean"][0], run["mean"][5]], rtol=1e-4)
    np.testing.assert_allclose(exported["ci95"], [run["ci95"][0], run["ci95"][5]], rtol=1e-3)
    assert exported["mean"][1] < 0.9 * exported["mean"][0]  # it adapts
    small = serving.export(experiment, str(tmp_path / "small"), 1, 5, experiment.config.inner_lr,
                           limits={"max_tasks": 3})
    np.testing.assert_allclose(reporting.evaluate_export(small, num_eval_tasks=40)["mean"],
                               exported["mean"], rtol=1e-5)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "tf_maml.evaluate", f"--saved_model={small}",
                             "--num_eval_tasks=40", f"--output_dir={tmp_path / 'cli'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"    5 | {exported['mean'][1]:.4f}" in result.stdout, result.stdout
    written = json.load(open(tmp_path / "cli" / "eval_results.json"))
    np.testing.assert_allclose(written["results"]["export"]["mean"], exported["mean"], rtol=1e-5)
    # An adaptation that diverges is the signature's one-line refusal, not NaN figures.
    wild = serving.export(experiment, str(tmp_path / "wild"), 1, 5, 1e12)
    with pytest.raises(ValueError, match=r"refused the meta-test tasks: the adaptation "
                                         r"diverged: .*; in tasks 0 1 2 3$"):
        reporting.evaluate_export(wild, num_eval_tasks=4)
    # The protocol is the export's; a run's directory is not an export, nor the reverse.
    with pytest.raises(ValueError, match="only num_eval_tasks, data_dir, cache_dir"):
        reporting.evaluate_export(path, inner_lr=0.1)
    with pytest.raises(FileNotFoundError, match="--saved_model must be an export"):
        reporting.evaluate_export(model_dir)
    with pytest.raises(FileNotFoundError, match="this is an export of tf_maml.export"):
        reporting.evaluate_and_report(os.path.dirname(path))


def test_ctrl_c_during_an_export_is_one_line_and_leaves_no_partial_version(sine_run, tmp_path):
    """Ctrl-C during `tf_maml.export` printed a 30-frame traceback and died by the signal."""
    _, model_dir, _ = sine_run
    # Ctrl-C as the written version is about to be renamed into place.
    script = ("import runpy, sys\nfrom tf_maml import serving\n"
              "def interrupted(*args): raise KeyboardInterrupt\n"
              "serving._swap_in = interrupted\n"
              f"sys.argv = ['export', '--model_dir={model_dir}', '--export_dir={tmp_path}']\n"
              "runpy.run_module('tf_maml.export', run_name='__main__')\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("Interrupted; the export did not finish. A version appears in --export_dir only "
            "when complete") in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["300.tmp"]  # TF Serving loads numbered ones only
    again = subprocess.run([sys.executable, "-m", "tf_maml.export", f"--model_dir={model_dir}",
                            f"--export_dir={tmp_path}"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["300"]


def test_an_export_finding_its_version_written_meanwhile_refuses_to_replace_it(sine_run,
                                                                               tmp_path):
    """Two exports to one version: both said "exported", and the second silently replaced
    the first's (or they deleted each other's files in the shared `<version>.tmp`)."""
    experiment, _, _ = sine_run
    build = serving.build_export_archive
    marker = tmp_path / "7" / "written_by_the_other_export"

    def built_while_another_export_finished(signatures):
        archive = build(signatures)
        marker.parent.mkdir()
        marker.write_text("")
        return archive

    with mock.patch.object(serving, "build_export_archive", built_while_another_export_finished):
        with pytest.raises(ValueError, match=r"7 already exists: another export wrote it while "
                                             r"this one was being built"):
            serving.export(experiment, str(tmp_path), 7, 2)
    assert marker.exists() and sorted(os.listdir(tmp_path)) == ["7"]  # (no lock file left)
    marker.unlink()
    marker.parent.rmdir()
    with mock.patch.object(serving, "build_export_archive", built_while_another_export_finished):
        serving.export(experiment, str(tmp_path), 7, 2, overwrite=True)
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["7"]


def test_the_export_lock_makes_a_second_process_wait(tmp_path):
    """The lock an export holds in its export_dir while it writes a version."""
    lock = str(tmp_path / serving.EXPORT_LOCK_NAME)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom tf_maml import files\n"
         f"with files.exclusive_lock({lock!r}):\n"
         "    print('locked', flush=True)\n    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        entered = threading.Event()

        def enter():
            with files.exclusive_lock(lock, "waiting"):
                entered.set()

        waiter = threading.Thread(target=enter)
        waiter.start()
        assert not entered.wait(1.0)  # held by the other process
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert entered.wait(30)
        waiter.join()
        assert not os.path.exists(lock)  # each holder removes it as it leaves
    finally:
        holder.kill()
        holder.wait()


def test_an_interrupted_evaluation_says_which_results_it_had_written(sine_run, tmp_path):
    """It said "no results were written" beside the eval_results.json it had written."""
    _, model_dir, _ = sine_run
    (tmp_path / "sine_fit.png").write_bytes(b"an earlier evaluation's")
    os.utime(tmp_path / "sine_fit.png", (0, 0))
    script = ("import os, runpy, sys\nfrom tf_maml import reporting\n"
              "def interrupted(model_dir, output_dir, **kwargs):\n"
              "    open(os.path.join(output_dir, 'eval_results.json'), 'w').close()\n"
              "    raise KeyboardInterrupt\n"
              "reporting.evaluate_and_report = interrupted\n"
              f"sys.argv = ['evaluate', '--model_dir={model_dir}', '--output_dir={tmp_path}']\n"
              "runpy.run_module('tf_maml.evaluate', run_name='__main__')\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (f"Interrupted; the evaluation was not finished. It had written eval_results.json "
            f"in {tmp_path}; any other results there are from an earlier evaluation. Rerun to "
            f"evaluate again.") in result.stderr, result.stderr[-3000:]
    # An unset variable as --output_dir: "" fell back to --model_dir, where another
    # protocol's results replaced the run's own.
    results = os.path.join(model_dir, reporting.RESULTS_FILENAME)
    kept = os.stat(results).st_mtime_ns if os.path.exists(results) else None
    empty = subprocess.run([sys.executable, "-m", "tf_maml.evaluate", f"--model_dir={model_dir}",
                            "--num_eval_tasks=3", "--output_dir="], capture_output=True,
                           text=True, env=env, timeout=300)
    assert empty.returncode == 1, empty.stderr[-3000:]
    assert empty.stderr.strip().splitlines()[-1] == (
        "error: --output_dir is empty (an unset variable?): give a directory")
    assert (os.stat(results).st_mtime_ns if os.path.exists(results) else None) == kept
    with pytest.raises(ValueError, match=r"^--output_dir is empty"):
        reporting.evaluate_and_report(model_dir, output_dir="")


def test_export_cli_writes_a_versioned_model(sine_run, tmp_path):
    _, model_dir, _ = sine_run
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "tf_maml.export", f"--model_dir={model_dir}",
               f"--export_dir={tmp_path}", "--max_support_examples=12", "--max_tasks=3"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "300" / "saved_model.pb")
    recorded = json.load(open(tmp_path / "300" / "assets.extra" / serving.CONFIG_ASSET))
    assert recorded["num_iterations"] == 300 and recorded["export_num_eval_steps"] == 5
    # The dataset's default limits, with the flags' replacements.
    assert recorded["export_limits"] == {**serving.DEFAULT_LIMITS["sine"].to_dict(),
                                         "max_support_examples": 12, "max_tasks": 3}
    assert set(recorded["export_signatures"]) == set(serving.SIGNATURES)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    # The signature's own step size and steps are recorded as export_*; the recorded config
    # stays the run's (it said inner_lr 0.02, as if the run had been trained with it).
    other = subprocess.run(command + ["--version=301", "--inner_lr=0.02", "--num_eval_steps=2"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 0, other.stderr
    assert "adapt: 2 steps with 0.02" in other.stdout
    recorded = json.load(open(tmp_path / "301" / "assets.extra" / serving.CONFIG_ASSET))
    assert (recorded["inner_lr"], recorded["num_eval_steps"]) == (0.01, 5)
    assert (recorded["export_inner_lr"], recorded["export_num_eval_steps"]) == (0.02, 2)
    bad = subprocess.run(command + ["--version=302", "--inner_lr=1e-50"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "inner_lr" in bad.stderr and "Traceback" not in bad.stderr
    # Limits that would refuse the run's own tasks (K = 10 support examples) are refused.
    small = subprocess.run(command[:-2] + ["--max_support_examples=7", "--version=1"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert small.returncode == 1 and small.stderr.strip().splitlines()[-1] == (
        "error: max_support_examples (7) is below the 10 examples of the run's own tasks: "
        "raise it (--max_support_examples)")
    # Version 0 is refused (versions number from 1), not replaced by the step.
    zero = subprocess.run(command + ["--version=0"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert zero.returncode == 1 and "--version must be a positive integer" in zero.stderr
    assert "Traceback" not in zero.stderr and sorted(os.listdir(tmp_path)) == ["300", "301"]


ALGORITHM_EXPORT_SCRIPT = """
import json, sys, numpy as np, tensorflow as tf
inputs = dict(np.load(sys.argv[2]))
tasks = dict(np.load(sys.argv[3]))
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = tf.saved_model.load(path)
    for signature in ("serving_default", "adapt", "adapt_custom", "adapted_weights",
                      "adapt_tasks_custom"):
        sig = model.signatures[signature]
        names = sig.structured_input_signature[1]
        source = tasks if signature == "adapt_tasks_custom" else inputs
        args = {k: tf.constant(v) for k, v in source.items() if k in names}
        if signature == "serving_default":
            args = {"x": tf.constant(inputs["query_x"])}
        for key, value in sig(**args).items():
            out[f"{name}/{signature}/{key}"] = value.numpy()
np.savez(sys.argv[4], **out)
"""


@pytest.mark.parametrize("algorithms",
                         [("maml", "anil", "metasgd", "mamlpp"),
                          ("maml", "reptile", "reptile_carried", "reptile_minibatch")],
                         ids=["learned_rates_head_batch_norm", "reptile"])
def test_every_algorithm_exports_its_own_adaptation(algorithms, tmp_path):
    """Learned rates, per-step batch norm, head-only and Adam adaptation all survive export
    (in two groups, each beside MAML, that run in parallel under pytest-xdist)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 6, 12, 12, 1), dtype=np.uint8)
    tasks = ImageClassTasks({"train": images, "test": images}, n_way=3, k_shot=2, k_query=2)
    settings = {"maml": {}, "anil": {}, "metasgd": {},
                "mamlpp": dict(num_inner_steps=3),
                "reptile": dict(inner_optimizer="adam", inner_lr=0.01),
                "reptile_carried": dict(algorithm="reptile", inner_optimizer="adam",
                                        inner_lr=0.01, carry_inner_state=True),
                # Mini-batches of 4 of the 6 support examples: batches that run on into the
                # next shuffled pass, the export cutting a request's set as evaluation does.
                "reptile_minibatch": dict(algorithm="reptile", inner_optimizer="sgd",
                                          inner_lr=0.3, inner_batch_size=6,
                                          eval_inner_batch_size=4)}
    experiments, paths = {}, {}
    for name in algorithms:
        extra = settings[name]
        values = dict(dataset="omniglot", n_way=3, k_shot=2, k_query=2, inner_lr=0.4,
                      num_eval_steps=3, algorithm=name.split("_")[0])
        config = config_lib.Config(**{**values, **extra})
        experiment = experiment_lib.build_experiment(config, tasks)
        # Learned meta-parameters that differ from their initial values and per element.
        for variable in experiment.algorithm.extra_variables:
            variable.assign(variable * rng.uniform(0.5, 1.5, size=variable.shape))
        # A carried Adam state as training leaves it (second moments, step count).
        if experiment.algorithm.state_variables:
            *moments, count = experiment.algorithm.state_variables
            for variable in moments:
                variable.assign(rng.uniform(1e-4, 1e-2, size=variable.shape))
            count.assign(250.0)
        experiments[name] = experiment
        paths[name] = serving.export(experiment, str(tmp_path / name), 1, 3, image_format=None)
    inputs, episode = _task(experiments["maml"], seed=4)
    np.savez(tmp_path / "in.npz", **inputs, inner_steps=np.int32(2), inner_lr=np.float32(0.3))
    # Three tasks in one adapt_tasks_custom request, each with its own steps and rate.
    tasks_episode = experiments["maml"].tasks.sample(tf.constant([9, 7], tf.int64), 3, "test")
    task_steps, task_rates = [3, 0, 2], [0.3, 0.3, 0.3]  # per-task rates: test_serving_limits
    np.savez(tmp_path / "tasks.npz", **{k: getattr(tasks_episode, k).numpy()
                                        for k in ("support_x", "support_y", "query_x")},
             inner_steps=np.int32(task_steps), inner_lr=np.float32(task_rates))
    script = tmp_path / "load.py"
    script.write_text(ALGORITHM_EXPORT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), json.dumps(paths),
                             str(tmp_path / "in.npz"), str(tmp_path / "tasks.npz"),
                             str(tmp_path / "out.npz")],
                            capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert result.returncode == 0, result.stderr
    out = dict(np.load(tmp_path / "out.npz"))
    adapted_predictions = {}
    for name, experiment in experiments.items():
        algorithm = experiment.algorithm
        params = algorithm.meta_variables
        _, own = evaluation.adaptation_curve(algorithm, params, episode, experiment.metric_fn, 3)
        _, custom = evaluation.adaptation_curve(algorithm, params, episode, experiment.metric_fn,
                                                2, inner_lr=0.3)
        np.testing.assert_allclose(out[f"{name}/serving_default/predictions"], own[0][0].numpy(),
                                   **TOLERANCE)
        np.testing.assert_allclose(out[f"{name}/adapt/predictions"], own[3][0].numpy(),
                                   **TOLERANCE)
        np.testing.assert_allclose(out[f"{name}/adapt_custom/predictions"],
                                   custom[2][0].numpy(), **TOLERANCE)
        adapted, _ = algorithm.adapt(params, episode.support_x, episode.support_y, 3)
        weights = algorithm.full_weights(params, adapted, 3)
        exported = sorted(k for k in out if k.startswith(f"{name}/adapted_weights/"))
        assert len(exported) == len(weights)
        names = serving._weight_names(experiment.model)
        for weight_name, weight in zip(names, weights):
            np.testing.assert_allclose(out[f"{name}/adapted_weights/{weight_name}"],
                                       weight[0].numpy(), **TOLERANCE)
        assert not np.allclose(own[0][0].numpy(), own[3][0].numpy())
        adapted_predictions[name] = own[3][0].numpy()
        # Per-task step counts: each task as its own adaptation (MAML++'s per-step batch
        # norm read at each task's own step), of that task alone as the export answers a
        # conv model's tasks (one at a time: test_task_major_signatures_answer_where_...).
        for i, steps in enumerate(task_steps):
            one_task = type(tasks_episode)(*(value[i:i + 1] for value in tasks_episode))
            _, curve = evaluation.adaptation_curve(algorithm, params, one_task,
                                                   experiment.metric_fn, 3, inner_lr=0.3)
            np.testing.assert_allclose(out[f"{name}/adapt_tasks_custom/predictions"][i],
                                       curve[steps][0].numpy(), **TOLERANCE)
    # The algorithms really adapt differently (learned rates, head only, Adam, carried Adam).
    assert sorted(adapted_predictions) == sorted(algorithms)
    if "reptile_carried" in algorithms:
        assert not np.allclose(adapted_predictions["reptile_carried"],
                               adapted_predictions["reptile"])
    others = set(algorithms) & {"anil", "metasgd", "mamlpp", "reptile"}
    assert others, algorithms
    for name in others:
        assert not np.allclose(adapted_predictions[name], adapted_predictions["maml"]), name
