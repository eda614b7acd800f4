"""Meta-trains a model: `python -m tf_maml.train --model_dir=DIR [--flagfile=flags/sine.flags]`.

Rerunning the same command resumes from the latest checkpoint in DIR. Unless
--noevaluate, the final model is then evaluated (table and plots in DIR).
"""

from absl import app, flags, logging

from tf_maml import cli, reporting, trainer

flags.DEFINE_string("model_dir", None, "Directory for checkpoints, config and summaries.")
flags.DEFINE_boolean("evaluate", True, "Evaluate on held-out tasks after training.")
flags.mark_flag_as_required("model_dir")
cli.define_config_flags()
FLAGS = flags.FLAGS


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    config = cli.config_from_flags()
    try:
        experiment, step = trainer.train(config, FLAGS.model_dir)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    if FLAGS.evaluate:
        reporting.evaluate_and_report(FLAGS.model_dir)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
