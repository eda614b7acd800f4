"""Meta-trains a model: `python -m tf_maml.train --model_dir=DIR [--flagfile=flags/sine.flags]`.

Rerunning the same command resumes from the latest checkpoint in DIR. Unless
--noevaluate, the final model is then evaluated (table and plots in DIR).

`--dataset=navigation2d` (e.g. `--flagfile=flags/rl_navigation.flags`) meta-trains
a Gaussian policy with MAML-RL (REINFORCE inner step, TRPO or Adam outer step),
with the same checkpoints, resume and interrupt handling.
"""

import os
import signal
import sys
import threading

from absl import flags, logging

from tf_maml import cli, distribute, reporting, trainer
from tf_maml import experiment as experiment_lib

flags.DEFINE_string("model_dir", None, "Directory for checkpoints, config and summaries.")
flags.DEFINE_boolean("evaluate", True, "Evaluate on held-out tasks after training.")
flags.mark_flag_as_required("model_dir")
cli.define_config_flags()
# The config's flags are defined in tf_maml.cli: --help lists them as this command's own.
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


_SIGNALS = []


def _interrupt(signum, frame):
    _SIGNALS.append(signum)
    raise KeyboardInterrupt(f"received signal {signum}")


def _from_interrupt(error, handled=None):
    """Whether `error` is a KeyboardInterrupt or was raised while handling one (a signal
    that reached Python inside TensorFlow's C++, which reports `SystemError: ...
    returned a result with an exception set` with the interrupt as its context).

    The chain is followed no further than `handled`: an exception that the code
    around a finalizer was handling is the finalizer's context, not its cause (an
    unrelated error of a finalizer run while a checkpoint is saved after an
    interrupt is not that interrupt).
    """
    seen = set()
    while error is not None and error is not handled and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _quiet_interrupts():
    """Keeps an interrupt's traceback off the terminal: main says what was saved.

    A signal can arrive while TensorFlow's C++ calls back into Python (tracing
    flattens structures); the interrupt may then surface where Python prints
    tracebacks itself (`sys.excepthook`, or `sys.unraisablehook` for a finalizer,
    which also drops the exception: the signal is then delivered again, so that
    the interrupt still stops the run).
    """
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, error, traceback):
        if not (_SIGNALS and _from_interrupt(error)):
            excepthook(kind, error, traceback)
        else:  # one that escaped main's handling (before training began): one line
            print(f"Interrupted (received signal {_SIGNALS[0]}).", file=sys.stderr)

    def quiet_unraisablehook(unraisable):
        if not (_SIGNALS and _from_interrupt(unraisable.exc_value, sys.exc_info()[1])):
            unraisablehook(unraisable)
        else:  # a moment later, from another thread: after the finalizer has returned
            timer = threading.Timer(0.2, os.kill, (os.getpid(), _SIGNALS[-1]))
            timer.daemon = True
            timer.start()

    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _interrupted_message(error, model_dir):
    """What an interrupt left behind, in one line (only what is true)."""
    if isinstance(error, trainer.Interrupted):
        text = error.describe()
        text = text[0].upper() + text[1:]
        if not error.chief:
            return (f"{text}. Rerun the same command on every worker to resume from the "
                    f"chief's latest checkpoint in {model_dir}.")
        if error.saved or error.latest:
            return f"{text}. Rerun the same command to resume."
        return f"{text} in {model_dir}. Rerun the same command to start again."
    # Outside the training loop (or a signal that TensorFlow turned into another
    # error): say what is on disk.
    checkpoints = experiment_lib.checkpoint_paths(
        os.path.join(model_dir, experiment_lib.CHECKPOINT_SUBDIR))
    if checkpoints:
        return (f"Interrupted; the latest checkpoint is {checkpoints[0]}. Rerun the same command "
                "to resume.")
    return (f"Interrupted; no checkpoint has been written in {model_dir}. Rerun the same "
            "command to start again.")


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    # SIGTERM (a scheduler's preemption, `kill`) stops training like Ctrl-C does:
    # the trainer writes a checkpoint at the current step before exiting.
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)  # Ctrl-C, recorded (not where ignored: `&`)
    _quiet_interrupts()
    config = cli.config_from_flags()
    try:
        _, step = trainer.train(config, FLAGS.model_dir)
    except Exception as e:  # noqa: BLE001 -- sorted below; anything else is re-raised
        if _SIGNALS:
            logging.warning(_interrupted_message(e, FLAGS.model_dir))
            raise SystemExit(130) from None
        if isinstance(e, cli.USER_ERRORS):
            cli.fail(cli.describe(e))
        raise
    except KeyboardInterrupt as e:
        logging.warning(_interrupted_message(e, FLAGS.model_dir))
        raise SystemExit(130) from None
    if FLAGS.evaluate and not distribute.is_chief_worker_process(config.strategy):
        logging.info("Training is complete; the chief evaluates the run, this worker stops "
                     "(the chief's log may then call this worker unhealthy or crashed: it is "
                     "not).")
    elif FLAGS.evaluate:
        try:
            reporting.evaluate_and_report(FLAGS.model_dir)
        except (KeyboardInterrupt, Exception) as e:
            if not (_SIGNALS or isinstance(e, KeyboardInterrupt)):
                if isinstance(e, cli.USER_ERRORS):
                    cli.fail(cli.describe(e))
                raise
            logging.warning("Interrupted during the evaluation; training is complete (step %d, "
                            "checkpointed in %s). Evaluate with: python -m tf_maml.evaluate "
                            "--model_dir=%s", step, FLAGS.model_dir, FLAGS.model_dir)
            raise SystemExit(130) from None


def run():
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
