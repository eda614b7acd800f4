"""The SavedModels shipped in export/models/ load without tf_maml and adapt as promised."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_maml.tasks import SineTasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINE = sorted(glob.glob(os.path.join(ROOT, "export", "models", "sine_maml", "*")))


@pytest.mark.skipif(not SINE, reason="no shipped sine model")
def test_shipped_sine_model_adapts_to_new_sine_tasks():
    path = SINE[-1]
    config = json.load(open(os.path.join(path, "assets.extra", "tf_maml_config.json")))
    assert config["dataset"] == "sine" and config["algorithm"] == "maml"
    model = tf.saved_model.load(path)
    adapt, serve = model.signatures["adapt"], model.signatures["serving_default"]
    tasks = SineTasks(k_shot=10, k_query=100)
    before, after = [], []
    for seed in range(20):
        e = tasks.sample(tf.constant([123, seed], tf.int64), 1, "test")
        predictions = adapt(support_x=e.support_x[0], support_y=e.support_y[0],
                            query_x=e.query_x[0])["predictions"].numpy()
        after.append(np.mean((predictions - e.query_y[0].numpy()) ** 2))
        unadapted = serve(x=e.query_x[0])["predictions"].numpy()
        before.append(np.mean((unadapted - e.query_y[0].numpy()) ** 2))
    # The README's figure: MSE about 0.11 after 10 steps from K=10 points, 3.1 before.
    assert np.mean(after) < 0.4 and np.mean(before) > 1.0, (np.mean(after), np.mean(before))
