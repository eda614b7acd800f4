"""Meta-trains a model: `python -m tf_maml.train --model_dir=DIR [--flagfile=flags/sine.flags]`.

Rerunning the same command resumes from the latest checkpoint in DIR. Unless
--noevaluate, the final model is then evaluated (table and plots in DIR).
"""

import signal

from absl import app, flags, logging

from tf_maml import cli, reporting, trainer

flags.DEFINE_string("model_dir", None, "Directory for checkpoints, config and summaries.")
flags.DEFINE_boolean("evaluate", True, "Evaluate on held-out tasks after training.")
flags.mark_flag_as_required("model_dir")
cli.define_config_flags()
FLAGS = flags.FLAGS


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"received signal {signum}")


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    # SIGTERM (a scheduler's preemption, `kill`) stops training like Ctrl-C does:
    # the trainer writes a checkpoint at the current step before exiting.
    signal.signal(signal.SIGTERM, _interrupt)
    config = cli.config_from_flags()
    try:
        trainer.train(config, FLAGS.model_dir)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    except KeyboardInterrupt:
        logging.warning("Interrupted; the last step is checkpointed in %s. Rerun the same "
                        "command to resume.", FLAGS.model_dir)
        raise SystemExit(130)
    if FLAGS.evaluate:
        reporting.evaluate_and_report(FLAGS.model_dir)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
