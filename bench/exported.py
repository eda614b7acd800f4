"""An exported untrained model of a benchmark workload, loaded from disk, and one request.

`bench/serving_latency.py` times its `adapt` signature and `bench/profile_ops.py`
profiles it; latency does not depend on the weights.
"""

import contextlib
import tempfile


@contextlib.contextmanager
def exported_adapt(n_way, k_shot, k_query, inner_lr, num_eval_steps):
    """Exports a workload's model, loads it, and yields `(adapt, request)`.

    Args:
        n_way: classes of an Omniglot task, or None for sine.
        k_shot, k_query: examples per class (points for sine) in each set.
        inner_lr: inner step size.
        num_eval_steps: inner steps of the `adapt` signature.

    Yields:
        `(adapt, request)`: the loaded `adapt` signature and the keyword
        arguments of one request (one task). The export is deleted afterwards.
    """
    import numpy as np
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import tensorflow as tf

    from tf_maml import config as config_lib
    from tf_maml import experiment as experiment_lib
    from tf_maml import serving
    from tf_maml.tasks import ImageClassTasks

    tasks = None
    if n_way is not None:
        images = np.random.default_rng(0).integers(0, 255, (n_way + 1, 20, 28, 28, 1), np.uint8)
        tasks = ImageClassTasks({"train": images, "test": images}, n_way, k_shot, k_query)
    config = config_lib.Config(dataset="omniglot" if n_way else "sine", n_way=n_way or 5,
                               k_shot=k_shot, k_query=k_query, inner_lr=inner_lr)
    experiment = experiment_lib.build_experiment(config, tasks)
    with tempfile.TemporaryDirectory() as export_dir:
        path = serving.export(experiment, export_dir, 1, num_eval_steps, inner_lr)
        adapt = tf.saved_model.load(path).signatures["adapt"]
        episode = experiment.tasks.sample(tf.constant([0, 0], tf.int64), 1, "test")
        yield adapt, {"support_x": episode.support_x[0], "support_y": episode.support_y[0],
                      "query_x": episode.query_x[0]}
