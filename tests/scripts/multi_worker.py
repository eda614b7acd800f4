"""One worker of a multi-worker run (TF_CONFIG set by the caller); saves its final weights.

usage: multi_worker.py MODEL_DIR NUM_ITERATIONS OUT.npz [STRATEGY]

Also writes OUT.npz.json: whether this worker was the chief, its process id, its
task as `compat.cluster_resolver` reports it, the directory
`distribute.worker_dir` gave it to write into (and whether that still exists), and
the step its training started (or resumed) from.
"""

import json
import os
import sys
import tempfile

import numpy as np

from tf_maml import compat, distribute, tasks, trainer
from tf_maml import config as config_lib

model_dir, num_iterations, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
strategy_name = sys.argv[4] if len(sys.argv) > 4 else "multi_worker"
seen = {"strategies": [], "worker_dirs": [], "start_steps": []}
make_strategy, worker_dir = distribute.make_strategy, distribute.worker_dir
episode_dataset = tasks.episode_dataset


def spy_make_strategy(name):
    strategy = make_strategy(name)
    seen["strategies"].append(strategy)
    return strategy


def spy_worker_dir(directory, strategy):
    path = worker_dir(directory, strategy)
    seen["worker_dirs"].append(os.path.abspath(path))
    return path


def spy_episode_dataset(sample_fn, seed, start_step, num_steps, stream=0):
    seen["start_steps"].append(int(start_step))
    return episode_dataset(sample_fn, seed, start_step, num_steps, stream)


distribute.make_strategy, distribute.worker_dir = spy_make_strategy, spy_worker_dir
tasks.episode_dataset = spy_episode_dataset
# Paths on each machine may differ between workers (each worker has its own TMPDIR): the
# workers' comparison of their settings leaves them out (cache_dir here; data_dir, the
# other, is refused for sine).
config = config_lib.Config(strategy=strategy_name, meta_batch_size=6,
                           num_iterations=num_iterations, checkpoint_every=4, log_every=2,
                           validate_every=0, jit_compile="false",
                           cache_dir=os.path.join(tempfile.gettempdir(), "cache"))
experiment, step = trainer.train(config, model_dir)
np.savez(out, step=step, *[v.numpy() for v in experiment.model.trainable_variables])

(strategy,) = seen["strategies"]
resolver = compat.cluster_resolver(strategy)
with open(out + ".json", "w") as f:
    json.dump({"chief": distribute.is_chief(strategy), "pid": os.getpid(),
               "task": None if resolver is None else [resolver.task_type, resolver.task_id],
               "worker_dirs": seen["worker_dirs"],
               "worker_dirs_exist": [os.path.exists(p) for p in seen["worker_dirs"]],
               "start_steps": seen["start_steps"]}, f)
