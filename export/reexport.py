"""Exports a shipped Omniglot SavedModel again with the current code, from its own variables.

For a model whose run's checkpoints were not kept: the variables of the old SavedModel are
restored by name into the experiment its recorded config builds, `tf_maml.serving.export`
writes the same version under NEW_BASE, and every tensor signature of the new export must
answer as the old one did on held-out tasks of the real archives (else it fails).

    python export/reexport.py OLD_VERSION_DIR NEW_BASE [OMNIGLOT_DIR]
    python export/reexport.py export/models/omniglot_5way_1shot_maml/16000 /tmp/reexported/maml ../shared/data/omniglot
"""
import json
import os
import sys

import numpy as np
import tensorflow as tf

from tf_maml import config as config_lib, experiment as experiment_lib, serving
from tf_maml.tasks import ImageClassTasks, omniglot

old_path, new_base = sys.argv[1], sys.argv[2]
version = int(os.path.basename(old_path.rstrip("/")))
record = json.load(open(os.path.join(old_path, "assets.extra", "tf_maml_config.json")))
fields = {k: v for k, v in record.items() if not k.startswith("export_")}
config = config_lib.Config.from_dict(fields)
exp = experiment_lib.build_experiment(config, load_tasks=False)
old = tf.saved_model.load(old_path)
saved = {v.name: v for v in list(old.variables) + list(old._all_variables)}
targets = list(exp.model.variables) + list(exp.algorithm.saved_variables)
done = set()
for v in targets:
    name = (v.path if hasattr(v, "path") else v.name.split(":")[0]) + ":0"
    src = saved[name]
    assert tuple(src.shape) == tuple(v.shape), (name, src.shape, v.shape)
    v.assign(src.numpy()); done.add(name)
missing = set(saved) - done
assert not missing, missing
print("restored", len(done), "variables")
limits = record["export_limits"]
new = serving.export(exp, new_base, version, record["export_num_eval_steps"],
                     inner_lr=record["export_inner_lr"], limits=limits, overwrite=True)
print("exported", new)
# Every signature answers as the old export did, on real held-out tasks.
data_dir = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/omniglot"
images, background = omniglot.load_characters(data_dir, os.path.expanduser(config.cache_dir))
train, test = omniglot.split_characters(background, config.omniglot_split, config.split_seed)
tasks = ImageClassTasks({"train": images[train], "test": images[test]}, config.n_way, config.k_shot, 5,
                        rotate_train=False, name="omniglot")
e = tasks.sample(tf.constant([3, 1], tf.int64), 4, "test")
fresh = tf.saved_model.load(new)
args = dict(support_x=e.support_x[0], support_y=e.support_y[0], query_x=e.query_x[0])
checks = {
    "serving_default": dict(x=e.query_x[0]),
    "adapt": args,
    "adapt_custom": dict(args, inner_steps=tf.constant(2), inner_lr=tf.constant(0.3)),
    "adapted_weights": dict(support_x=e.support_x[0], support_y=e.support_y[0]),
    "adapt_tasks": dict(support_x=e.support_x, support_y=e.support_y, query_x=e.query_x),
}
for name, kw in checks.items():
    a, b = old.signatures[name](**kw), fresh.signatures[name](**kw)
    assert set(a) == set(b), (name, set(a), set(b))
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{name}/{key}")
print("all signatures equal; new signatures:", sorted(fresh.signatures))
