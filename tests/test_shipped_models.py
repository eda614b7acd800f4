"""The SavedModels shipped in export/models/ load without tf_maml and adapt as promised.

`export/models/models.json` lists each shipped model with the commands that made it and its
meta-test figure; every listed model must be there, and every model there must be listed.
Omniglot models are checked on the real archives' held-out characters (TF_MAML_OMNIGLOT_DIR,
which .ci/run sets; conftest.py's `omniglot_characters`): skipped when it is unset, failed when
it is set but the files are missing.
"""

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_maml import reporting
from tf_maml.tasks import ImageClassTasks, SineTasks, omniglot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "export", "models")
MANIFEST = json.load(open(os.path.join(MODELS, "models.json")))


def _path(name):
    return os.path.join(MODELS, name, str(MANIFEST[name]["version"]))


def _config(name):
    """The model's saved config, or None when its folder is missing (the manifest test says so)."""
    path = os.path.join(_path(name), "assets.extra", "tf_maml_config.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def _names(dataset):
    return [name for name in sorted(MANIFEST) if (_config(name) or {}).get("dataset") == dataset]


def test_manifest_lists_exactly_the_shipped_models():
    shipped = {os.path.basename(os.path.dirname(os.path.dirname(p)))
               for p in glob.glob(os.path.join(MODELS, "*", "*", "saved_model.pb"))}
    assert shipped == set(MANIFEST)
    for name, entry in MANIFEST.items():
        assert os.path.isfile(os.path.join(_path(name), "saved_model.pb")), name
        assert any("tf_maml.export" in command for command in entry["made_with"]), name
        assert _config(name)["num_eval_steps"] == entry["meta_test"]["inner_steps"], name


def test_tf_serving_config_points_at_shipped_models():
    # export/README.md mounts export/models/ at /models and serves export/models.config.
    text = open(os.path.join(ROOT, "export", "models.config")).read()
    base_paths = [line.split('"')[1] for line in text.splitlines()
                  if line.strip().startswith("base_path:")]
    # Every shipped model is served.
    assert sorted(path[len("/models/"):] for path in base_paths) == sorted(MANIFEST)
    for base_path in base_paths:
        assert base_path.startswith("/models/"), base_path
        name = base_path[len("/models/"):]
        assert name in MANIFEST, f"{base_path}: not a shipped model"
        assert os.path.isfile(os.path.join(_path(name), "saved_model.pb")), base_path


@pytest.mark.parametrize("name", _names("sine"))
def test_shipped_sine_model_adapts_to_new_sine_tasks(name):
    config = _config(name)
    model = tf.saved_model.load(_path(name))
    adapt, serve = model.signatures["adapt"], model.signatures["serving_default"]
    tasks = SineTasks(k_shot=config["k_shot"], k_query=100)
    before, after = [], []
    for seed in range(20):
        e = tasks.sample(tf.constant([123, seed], tf.int64), 1, "test")
        predictions = adapt(support_x=e.support_x[0], support_y=e.support_y[0],
                            query_x=e.query_x[0])["predictions"].numpy()
        after.append(np.mean((predictions - e.query_y[0].numpy()) ** 2))
        unadapted = serve(x=e.query_x[0])["predictions"].numpy()
        before.append(np.mean((unadapted - e.query_y[0].numpy()) ** 2))
    # The manifest's figure (MSE about 0.11 after 10 steps, 3.1 before), with room for the
    # 20 tasks' sampling error.
    figure = MANIFEST[name]["meta_test"]["mean"]
    assert np.mean(after) < 4 * figure and np.mean(before) > 1.0, (np.mean(after), np.mean(before))


@pytest.mark.parametrize("name", _names("omniglot"))
def test_shipped_omniglot_model_classifies_held_out_characters(name, omniglot_characters):
    """96 tasks of the run's own held-out characters, through `adapt_tasks`, 5 queries a class."""
    config = _config(name)
    images, background = omniglot_characters
    train, test = omniglot.split_characters(background, config["omniglot_split"],
                                            config["split_seed"])
    tasks = ImageClassTasks({"train": images[train], "test": images[test]}, config["n_way"],
                            config["k_shot"], 5, rotate_train=False, name="omniglot")
    adapt_tasks = tf.saved_model.load(_path(name)).signatures["adapt_tasks"]
    correct = []
    per_request = min(config["export_limits"]["max_tasks"], 96)
    for batch in range(96 // per_request):
        e = tasks.sample(tf.constant([7, batch], tf.int64), per_request, "test")
        predictions = adapt_tasks(support_x=e.support_x, support_y=e.support_y,
                                  query_x=e.query_x)["predictions"]
        correct.append((tf.argmax(predictions, -1, output_type=tf.int32) == e.query_y).numpy())
    accuracy = np.mean(correct)
    figure = MANIFEST[name]["meta_test"]["mean"]
    # 96 tasks: a 95% interval of about 1-2 points around the 600-task figure.
    assert accuracy >= figure - 0.04, (name, accuracy, figure)


ONEDNN_OFF_SCRIPT = """
import json, sys, numpy as np, tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
assert not _pywrap_util_port.IsMklEnabled(), "oneDNN is on"
config = json.loads(sys.argv[2])
model = tf.saved_model.load(sys.argv[1])
rng = np.random.default_rng(0)
n, k = config["n_way"], config["k_shot"]
tasks = {"support_x": rng.uniform(0, 1, (2, n * k, 28, 28, 1)).astype(np.float32),
         "support_y": np.tile(np.repeat(np.arange(n, dtype=np.int32), k), (2, 1)),
         "query_x": rng.uniform(0, 1, (2, n, 28, 28, 1)).astype(np.float32)}
together = model.signatures["adapt_tasks"](**tasks)["predictions"].numpy()
for i in range(2):
    alone = model.signatures["adapt"](**{key: v[i] for key, v in tasks.items()})["predictions"]
    np.testing.assert_allclose(together[i], alone.numpy(), rtol=1e-5, atol=1e-5)
custom = model.signatures["adapt_tasks_custom"](**tasks, inner_steps=np.int32([1, 0]),
                                                inner_lr=np.float32([0.1, 0.1]))["predictions"]
for i in range(2):
    alone = model.signatures["adapt_custom"](**{key: v[i] for key, v in tasks.items()},
                                             inner_steps=np.int32([1, 0][i]),
                                             inner_lr=np.float32(0.1))["predictions"]
    np.testing.assert_allclose(custom[i].numpy(), alone.numpy(), rtol=1e-5, atol=1e-5)
"""


@pytest.mark.parametrize("name", _names("omniglot"))
def test_shipped_omniglot_models_answer_several_tasks_with_onednn_off(name, tmp_path):
    """TF Serving, or a loader on a CPU without AVX-512, may run without oneDNN, which alone
    has gradients of grouped convolutions: `adapt_tasks` (`adapt_tasks_custom`) answers each task
    as `adapt` (`adapt_custom`) does."""
    script = tmp_path / "load.py"
    script.write_text(ONEDNN_OFF_SCRIPT)
    result = subprocess.run([sys.executable, str(script), _path(name), json.dumps(_config(name))],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                     TF_ENABLE_ONEDNN_OPTS="0"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("name", _names("omniglot"))
def test_shipped_image_models_decode_with_todays_code(name):
    """The shipped exports decode as the code does now: a JPEG turned by its EXIF
    orientation (6: shown turned 90 degrees clockwise)."""
    from PIL import Image
    pixels = np.full((28, 28), 255, np.uint8)
    pixels[4:9, 3:20] = 0
    pixels[9:24, 15:19] = 0

    def jpeg(orientation):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif.tobytes())
        return out.getvalue()

    decode = tf.saved_model.load(_path(name)).signatures["decode_images"]
    upright, turned = decode(images=tf.constant([jpeg(1), jpeg(6)]))["x"].numpy()[..., 0]
    assert upright.max() > 0.5
    np.testing.assert_array_equal(turned, np.rot90(upright, -1))


@pytest.mark.parametrize("name", _names("sine"))
def test_shipped_sine_model_reproduces_its_figure_through_evaluate_export(name):
    """`evaluate --saved_model` on the manifest's 600 tasks gives the manifest's figure."""
    entry = MANIFEST[name]["meta_test"]
    result = reporting.evaluate_export(_path(name), num_eval_tasks=entry["tasks"])
    assert result["steps"][-1] == entry["inner_steps"]
    assert round(result["mean"][-1], 3) == entry["mean"], result
    assert round(result["ci95"][-1], 3) == entry["ci95"], result
