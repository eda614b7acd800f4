"""One worker of a multi-worker run (TF_CONFIG set by the caller); saves its final weights.

usage: multi_worker.py MODEL_DIR NUM_ITERATIONS OUT.npz
"""

import sys

import numpy as np

from tf_maml import config as config_lib
from tf_maml import trainer

model_dir, num_iterations, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
strategy = sys.argv[4] if len(sys.argv) > 4 else "multi_worker"
config = config_lib.Config(strategy=strategy, meta_batch_size=6, num_iterations=num_iterations,
                           checkpoint_every=4, log_every=2, validate_every=0, jit_compile="false")
experiment, step = trainer.train(config, model_dir)
np.savez(out, step=step, *[v.numpy() for v in experiment.model.trainable_variables])
