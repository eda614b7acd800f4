"""How far float32 meta-gradients are from a float64 reference, path by path.

    python bench/meta_gradient_precision.py --data_dir=../shared/data/omniglot
    python bench/meta_gradient_precision.py --data_dir=../shared/data/omniglot --activation=softplus \
        --model_dir=runs/omniglot_20way_1shot

One meta-batch of Omniglot N-way 1-shot tasks (random strokes without `--data_dir`),
conv4 at its initialization or at the weights of a run (`--model_dir`, a conv4 run
of the same N), `--num_inner_steps` second-order steps. It prints, for each path,
the largest and the median relative error per weight tensor (‖g − g_ref‖ / ‖g_ref‖)
against the per-task path in float64:

- the layer-batched forward in float32 (fused batch norm, closed-form second
  derivative: what training runs);
- the per-task path in float32 (the composite batch-norm formula);
- the float64 reference itself with its weights perturbed by a relative
  `--perturbation`: how much the meta-gradient moves for a change of about float32's
  resolution.

With ReLU the adapted weights (and the loss after adaptation) jump where a unit
crosses zero, and Omniglot's background makes many units equal: the third line
then shows errors as large as the float32 paths'; with `--activation=softplus`
(the same network, smooth) all three measure round-off alone.
"""

import os

from absl import app, flags

flags.DEFINE_string("data_dir", "", "Omniglot archives (empty: random strokes).")
flags.DEFINE_string("model_dir", "", "A conv4 run whose latest weights to use (default: the "
                    "initialization).")
flags.DEFINE_enum("activation", "relu", ["relu", "softplus"], "conv4's activation.")
flags.DEFINE_integer("n_way", 20, "Classes per task.")
flags.DEFINE_integer("meta_batch_size", 4, "Tasks in the meta-batch.")
flags.DEFINE_integer("num_inner_steps", 5, "Second-order inner steps.")
flags.DEFINE_float("inner_lr", 0.1, "Inner step size.")
flags.DEFINE_float("perturbation", 1e-7, "Relative weight perturbation of the third line.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_maml  # noqa: F401 - first: its oneDNN default (tf_maml/__init__.py)
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_maml import algorithms, core, functional, losses, models
    from tf_maml import experiment as experiment_lib
    from tf_maml import tasks as tasks_lib
    from tf_maml.config import Config
    from tf_maml.tasks import Episode

    n = FLAGS.n_way
    if FLAGS.data_dir:
        tasks = tasks_lib.build(Config(dataset="omniglot", n_way=n, k_shot=1, k_query=1,
                                       data_dir=FLAGS.data_dir))
        episode = tasks.sample(tf.constant([7, 11], tf.int64), FLAGS.meta_batch_size)
    else:  # strokes: 90% background zeros
        rng = np.random.default_rng(0)
        shape = (FLAGS.meta_batch_size, n, 28, 28, 1)
        images = [np.where(rng.uniform(size=shape) < 0.9, 0.0, rng.uniform(0.5, 1, shape))
                  for _ in range(2)]
        labels = tf.tile(tf.range(n)[None], [FLAGS.meta_batch_size, 1])
        episode = Episode(tf.constant(images[0], tf.float32), labels,
                          tf.constant(images[1], tf.float32), labels)

    def build(dtype):
        base = models.conv4(n, dtype=dtype)
        if FLAGS.activation == "relu":
            return base
        layers = [keras.Input((28, 28, 1), dtype=dtype)] + [
            keras.layers.Activation("softplus", dtype=dtype)
            if isinstance(layer, keras.layers.ReLU) else layer
            for layer in base.layers]
        return keras.Sequential(layers)

    if FLAGS.model_dir:
        experiment, step = experiment_lib.restore(FLAGS.model_dir)
        values = [v.numpy() for v in experiment.model.trainable_variables]
        print(f"weights of {FLAGS.model_dir} at step {step}")
    else:
        keras.utils.set_random_seed(0)
        values = [v.numpy() for v in build("float32").trainable_variables]

    def meta_gradient(dtype, vectorize, perturbation=0.0):
        model = build(dtype)
        rng = np.random.default_rng(1)
        for variable, value in zip(model.trainable_variables, values):
            variable.assign(value * (1 + perturbation * rng.standard_normal(value.shape)))
        cast = Episode(tf.cast(episode.support_x, dtype), episode.support_y,
                       tf.cast(episode.query_x, dtype), episode.query_y)
        forward = functional.make_forward(model, vectorize=vectorize)
        maml = algorithms.MAML(model, forward, losses.sparse_softmax_cross_entropy,
                               FLAGS.inner_lr, FLAGS.num_inner_steps, False)
        loss, grads, _ = core.meta_gradients(lambda ps: maml.meta_loss(ps, cast),
                                             list(model.trainable_variables))
        return float(loss), [g.numpy().astype(np.float64) for g in grads]

    reference_loss, reference = meta_gradient("float64", "map_fn")
    print(f"{n}-way 1-shot, {FLAGS.meta_batch_size} tasks, {FLAGS.num_inner_steps} inner steps, "
          f"{FLAGS.activation}; float64 per-task meta-loss {reference_loss:.7f}")
    print(f"{'path':44s} {'meta-loss':>10s} {'max err':>9s} {'median':>9s}")
    for name, args in (("layer-batched float32 (fused BN, closed form)", ("float32", "layers")),
                       ("per-task float32 (composite BN)", ("float32", "map_fn")),
                       (f"float64, weights perturbed by {FLAGS.perturbation:g}",
                        ("float64", "map_fn", FLAGS.perturbation))):
        loss, grads = meta_gradient(*args)
        errors = [np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
                  for g, r in zip(grads, reference)]
        print(f"{name:44s} {loss:10.7f} {max(errors):9.2e} {np.median(errors):9.2e}")


if __name__ == "__main__":
    app.run(main)
