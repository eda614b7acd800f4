"""Exports a trained run for TF Serving.

    python -m tf_maml.export --model_dir=runs/sine --export_dir=/models/sine

writes `/models/sine/<version>/` (a SavedModel; version = the checkpoint's
training step unless --version) with the signatures `serving_default`, `adapt`,
`adapt_custom` and `adapted_weights` (see `tf_maml.serving`).
"""

from absl import app, flags, logging

from tf_maml import cli, serving
from tf_maml import experiment as experiment_lib

flags.DEFINE_string("model_dir", None, "A directory written by tf_maml.train.")
flags.DEFINE_string("export_dir", None, "The model's base path; the version goes below it.")
flags.DEFINE_integer("version", None, "Version number (default: the checkpoint's step).")
flags.DEFINE_string("checkpoint", None, "A checkpoint path (default: the latest in --model_dir).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing version.")
flags.mark_flags_as_required(["model_dir", "export_dir"])
OVERRIDABLE = ("num_eval_steps", "inner_lr")
cli.define_config_flags(OVERRIDABLE)
FLAGS = flags.FLAGS


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    overrides = cli.overrides_from_flags(OVERRIDABLE)
    try:
        # No data is loaded: the model is rebuilt from the run's config.
        experiment, step = experiment_lib.restore(FLAGS.model_dir, overrides,
                                                  checkpoint_path=FLAGS.checkpoint)
        config = experiment.config
        # The algorithm's own rates (learned ones included) unless --inner_lr is given.
        inner_lr = overrides.get("inner_lr")
        path = serving.export(experiment, FLAGS.export_dir, FLAGS.version or max(step, 1),
                              config.num_eval_steps, inner_lr, overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    rates = inner_lr if inner_lr is not None else f"the {config.algorithm} rates"
    print(f"exported step {step} of {FLAGS.model_dir} to {path} "
          f"(adapt: {config.num_eval_steps} steps with {rates})")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
