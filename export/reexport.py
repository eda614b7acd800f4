"""Exports a shipped SavedModel (Omniglot or sine) again with the current code, from its own
variables.

For a model whose run's checkpoints were not kept: the variables of the old SavedModel are
restored by name into the experiment its recorded config builds, `tf_maml.serving.export`
writes the same version under NEW_BASE, and every signature of the new export must answer
as the old one did on held-out tasks (Omniglot: of the real archives, and its PNGs through
the image signatures; sine: generated), else it fails.

    python export/reexport.py OLD_VERSION_DIR NEW_BASE [OMNIGLOT_DIR]
    python export/reexport.py export/models/omniglot_5way_1shot_maml/16000 /tmp/maml \
        ../shared/data/omniglot
"""
import json
import os
import sys
import zipfile

import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
import keras
import numpy as np
import tensorflow as tf

from tf_maml import config as config_lib, experiment as experiment_lib, serving
from tf_maml.tasks import ImageClassTasks, omniglot



def fail(message):
    sys.exit(f"reexport: {message}")


old_path, new_base = sys.argv[1], sys.argv[2]
data_dir = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/omniglot"
version = int(os.path.basename(old_path.rstrip("/")))
record = json.load(open(os.path.join(old_path, "assets.extra", "tf_maml_config.json")))
config = config_lib.Config.from_dict({k: v for k, v in record.items()
                                      if not k.startswith("export_")})
# The held-out tasks the two exports must answer alike (read first: no data, nothing written).
if config.dataset == "omniglot":
    images, background = omniglot.load_characters(data_dir, os.path.expanduser(config.cache_dir))
    train, test = omniglot.split_characters(background, config.omniglot_split, config.split_seed)
    tasks = ImageClassTasks({"train": images[train], "test": images[test]}, config.n_way,
                            config.k_shot, 5, rotate_train=False, name="omniglot")
elif config.dataset == "sine":
    tasks = experiment_lib.build_experiment(config).tasks  # generated: no data
    keras.backend.clear_session()  # the model below gets the export's layer names again
else:
    fail(f"{old_path} is a {config.dataset} export; this script checks Omniglot and sine "
         "exports only")

# The old export's variables, by name, into the experiment its config builds. Keras' export
# archive lists the model's variables in `variables` and every variable its signatures use
# (learned rates included) in `_all_variables`.
experiment = experiment_lib.build_experiment(config, load_tasks=False)
old = tf.saved_model.load(old_path)
saved = {v.name: v for v in list(old.variables) + list(getattr(old, "_all_variables", []))}
restored = set()
for variable in list(experiment.model.variables) + list(experiment.algorithm.saved_variables):
    # Keras variables by their path; the algorithm's own (tf.Variable) by name.
    name = (getattr(variable, "path", None) or variable.name.split(":")[0]) + ":0"
    if name not in saved or tuple(saved[name].shape) != tuple(variable.shape):
        fail(f"{old_path} has no variable {name} of shape {tuple(variable.shape)}")
    variable.assign(saved[name].numpy())
    restored.add(name)
if set(saved) - restored:
    fail(f"variables of {old_path} with no place in the rebuilt model: "
         f"{sorted(set(saved) - restored)}")
print("restored", len(restored), "variables")
fingerprint_path = os.path.join(old_path, "assets.extra", serving.DATA_FINGERPRINT_ASSET)
fingerprint = (json.load(open(fingerprint_path)) if os.path.exists(fingerprint_path)
               else None)  # the run's data record, kept
new = serving.export(experiment, new_base, version, record["export_num_eval_steps"],
                     inner_lr=record["export_inner_lr"], limits=record["export_limits"],
                     overwrite=True, data_fingerprint=fingerprint)
print("exported", new)

# Every signature answers as the old export did, on held-out tasks of the real archives.
fresh = tf.saved_model.load(new)
e = tasks.sample(tf.constant([3, 1], tf.int64), 4, "test")
one = dict(support_x=e.support_x[0], support_y=e.support_y[0], query_x=e.query_x[0])
many = dict(support_x=e.support_x, support_y=e.support_y, query_x=e.query_x)
pngs = [b""] * 2 * config.n_way  # sine exports have no image signatures
if config.dataset == "omniglot":
    with zipfile.ZipFile(os.path.join(data_dir, "images_evaluation.zip")) as archive:
        names = [n for n in sorted(archive.namelist()) if n.endswith(".png")]
        pngs = [archive.read(n) for n in names[:2 * config.n_way]]
checks = {
    "serving_default": dict(x=e.query_x[0]),
    "adapt": one,
    "adapt_custom": dict(one, inner_steps=tf.constant(2), inner_lr=tf.constant(0.3)),
    "adapted_weights": dict(support_x=e.support_x[0], support_y=e.support_y[0]),
    "adapt_tasks": many,
    "adapt_tasks_custom": dict(many, inner_steps=tf.constant([2, 0, 1, 3]),
                               inner_lr=tf.constant([0.3, 0.3, 0.1, 0.2])),
    "decode_images": dict(images=tf.constant(pngs)),
    "adapt_images": dict(support_images=tf.constant(pngs[:config.n_way]),
                         support_y=tf.range(config.n_way),
                         query_images=tf.constant(pngs[config.n_way:])),
}
for name, arguments in checks.items():
    if name not in old.signatures:
        continue
    a, b = old.signatures[name](**arguments), fresh.signatures[name](**arguments)
    if set(a) != set(b):
        fail(f"{name} answers {sorted(b)}, the old export {sorted(a)}")
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}/{key}")
print("every signature answers as before; signatures:", sorted(fresh.signatures))
