"""Exports a trained run for TF Serving.

    python -m tf_maml.export --model_dir=runs/sine --export_dir=/models/sine

writes `/models/sine/<version>/` (a SavedModel; version = the checkpoint's
training step unless --version) with the signatures `serving_default`, `adapt`,
`adapt_custom`, `adapted_weights`, `adapt_tasks`, `adapt_tasks_custom` (and,
for image datasets, `decode_images` and `adapt_images`; see `tf_maml.serving`).
Requests are limited (examples per support and query set, inner steps, tasks
per request): the dataset's defaults, or --max_support_examples,
--max_query_examples, --max_inner_steps, --max_tasks.
"""

from absl import app, flags, logging

from tf_maml import cli, serving
from tf_maml import experiment as experiment_lib

flags.DEFINE_string("model_dir", None, "A directory written by tf_maml.train.")
flags.DEFINE_string("export_dir", None, "The model's base path; the version goes below it.")
flags.DEFINE_integer("version", None, "Version number, >= 1 (default: the checkpoint's step).")
flags.DEFINE_string("checkpoint", None, "A checkpoint path (default: the latest in --model_dir).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing version (the old one is served "
                                         "until the new one is complete).")
LIMIT_FLAGS = {
    "max_support_examples": "Most examples in one task's support set (default: the dataset's).",
    "max_query_examples": "Most examples in one task's query set, and in serving_default's x "
                          "(default: the dataset's).",
    "max_inner_steps": "Largest inner_steps of the custom signatures; at least "
                       "--num_eval_steps (default: the dataset's).",
    "max_tasks": "Most tasks in one request of adapt_tasks and adapt_tasks_custom (default: the "
                 "dataset's).",
}
for _name, _help in LIMIT_FLAGS.items():
    flags.DEFINE_integer(_name, None, _help)
flags.mark_flags_as_required(["model_dir", "export_dir"])
OVERRIDABLE = ("num_eval_steps", "inner_lr")
cli.define_config_flags(OVERRIDABLE)
FLAGS = flags.FLAGS


def _checked_flags():
    """The limit overrides; `ValueError` naming a bad flag (checked before any work)."""
    if FLAGS.version is not None and FLAGS.version < 1:
        raise ValueError(f"--version must be a positive integer (TF Serving ignores version "
                             f"0), got {FLAGS.version}")
    limits = {name: FLAGS[name].value for name in LIMIT_FLAGS if FLAGS[name].value is not None}
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    return limits


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    overrides = cli.overrides_from_flags(OVERRIDABLE)
    try:
        limits = _checked_flags()
        # No data is loaded: the model is rebuilt from the run's config.
        experiment, step = experiment_lib.restore(FLAGS.model_dir, overrides,
                                                  checkpoint_path=FLAGS.checkpoint)
        config = experiment.config
        # The algorithm's own rates (learned ones included) unless --inner_lr is given.
        inner_lr = overrides.get("inner_lr")
        version = FLAGS.version if FLAGS.version is not None else max(step, 1)
        path = serving.export(experiment, FLAGS.export_dir, version, config.num_eval_steps,
                              inner_lr, overwrite=FLAGS.overwrite, limits=limits)
    except cli.USER_ERRORS as e:
        cli.fail(cli.describe(e))
    rates = inner_lr if inner_lr is not None else f"the {config.algorithm} rates"
    print(f"exported step {step} of {FLAGS.model_dir} to {path} "
          f"(adapt: {config.num_eval_steps} steps with {rates}; limits in "
          f"{path}/assets.extra/{serving.CONFIG_ASSET})")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
