"""Evaluates a trained model: `python -m tf_maml.evaluate --model_dir=DIR [--baseline_dir=DIR2]`,
or an exported one: `python -m tf_maml.evaluate --saved_model=EXPORT [--data_dir=DIR]`.

Prints the query metric after 0..num_eval_steps inner steps on held-out tasks
(mean ± 95% CI) and writes `eval_results.json` and plots into --output_dir
(default: --model_dir; with flags that change the protocol, such as
--num_eval_tasks or --inner_lr, a subdirectory of it named after them, so the
run's own results are never replaced). A meta-RL run (--dataset=navigation2d) reports the
average return after 0..num_eval_steps policy-gradient steps (the paper's
Fig. 5) for the run, the baseline, the random initialization and the oracle
(`--oracle_dir`: a policy trained with the goal in its observations).

With --saved_model, an export of tf_maml.export is evaluated through its
signatures (`serving_default` before adaptation, `adapt_tasks` after its own
steps) on the meta-test tasks of the config it records, as it is served; only
--data_dir, --cache_dir, --num_eval_tasks and --output_dir apply.
"""

import dataclasses
import os
import sys

from absl import flags, logging

from tf_maml import cli, reporting
from tf_maml import config as config_lib

flags.DEFINE_string("model_dir", None, "A directory written by tf_maml.train.")
flags.DEFINE_string("saved_model", None,
                    "Instead of --model_dir: an export of tf_maml.export (a version directory, or "
                    "its base directory: the highest version), evaluated through its signatures.")
flags.DEFINE_string("baseline_dir", None,
                    "Optional second run (e.g. a pretrained baseline trained with "
                    "--num_inner_steps=0) evaluated on the same tasks with the same protocol.")
flags.DEFINE_string("oracle_dir", None,
                    "RL: a run trained with --goal_observed (flags/rl_*_oracle.flags) in the "
                    "same environment, reported as the 'oracle (trained)' row on the same goals.")
flags.DEFINE_string("output_dir", None, "Where results and plots go (default: --model_dir; "
                    "with --saved_model, nowhere: the table is printed).")
OVERRIDABLE = ("num_eval_steps", "num_eval_tasks", "inner_lr", "transductive",
               "transductive_support", "data_dir", "cache_dir", "eval_step_size_decay",
               "eval_fast_batch_size", "eval_inner_batch_size", "original_test_goals",
               "sample_by_steps")
WHERE_THE_DATA_IS = ("data_dir", "cache_dir")  # overrides that leave the protocol as it is
cli.define_config_flags(OVERRIDABLE)
# The config's flags are defined in tf_maml.cli: --help lists them as this command's own.
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def _files(directory):
    """{name: (mtime_ns, size)} of the files directly in `directory` ({} if none)."""
    if not directory or not os.path.isdir(directory):
        return {}
    found = {}
    for entry in os.scandir(directory):
        if entry.is_file():
            stat = entry.stat()
            found[entry.name] = (stat.st_mtime_ns, stat.st_size)
    return found


def _interrupted_message(directory, before):
    """What an interrupted evaluation says: which results it had written in `directory`
    (files new or changed since `before`, `_files` before it began writing; None: it had not
    got that far), if any."""
    after = {} if before is None else _files(directory)
    written = sorted(name for name, stat in after.items()
                     if name != "train.log" and before.get(name) != stat)
    if not written:
        return "Interrupted; the evaluation was not finished and no results were written."
    return (f"Interrupted; the evaluation was not finished. It had written {', '.join(written)} "
            f"in {directory}; any other results there are from an earlier evaluation. Rerun "
            "to evaluate again.")


def main(argv):
    cli.no_positional_arguments(argv)
    logging.set_verbosity(logging.INFO)
    # Flags given on the command line override the run's saved config.
    overrides = cli.overrides_from_flags(OVERRIDABLE)
    output_dir = FLAGS.output_dir
    if output_dir is not None and not output_dir.strip():
        # ("" would fall back to --model_dir, over the run's own results.)
        cli.fail("--output_dir is empty (an unset variable?): give a directory")
    before = None  # the results' directory before the evaluation writes (None: not yet known)
    if (FLAGS.model_dir is None) == (FLAGS.saved_model is None):
        cli.fail("give --model_dir (a run of tf_maml.train) or --saved_model (an export of "
                 "tf_maml.export), one of them")
    if FLAGS.saved_model is not None:
        if FLAGS.baseline_dir or FLAGS.oracle_dir:
            cli.fail("--baseline_dir and --oracle_dir go with --model_dir, not --saved_model")
        before = _files(output_dir)
        try:
            result = reporting.evaluate_export(FLAGS.saved_model, output_dir=output_dir,
                                               **overrides)
            print(f"{result['saved_model']}: {result['num_tasks']} meta-test tasks, through "
                  f"its signatures\n{'steps':>5} | {result['metric']}")
            for steps, mean, ci in zip(result["steps"], result["mean"], result["ci95"]):
                print(f"{steps:>5} | {mean:.4f} ± {ci:.4f}")
        except KeyboardInterrupt:
            logging.warning(_interrupted_message(output_dir, before))
            raise SystemExit(130) from None
        except cli.USER_ERRORS as e:
            cli.fail(cli.describe(e))
        return
    try:
        saved = config_lib.load(FLAGS.model_dir)
        # Bad values are refused before anything is said about where results would go.
        dataclasses.replace(saved, **overrides).validate()
        idle = [k for k in ("inner_lr", "eval_step_size_decay") if k in overrides]
        if saved.goal_observed and idle:
            raise ValueError(f"{', '.join('--' + k for k in idle)}: the run in "
                             f"{FLAGS.model_dir} is a goal-observed oracle, which does not "
                             "adapt (its return is the same after every step count)")
        # Flags that change the run's own protocol (a flag repeating its value does not;
        # --inner_lr always does: it replaces learned rates, and a baseline's own rate).
        protocol = {k: v for k, v in overrides.items()
                    if k not in WHERE_THE_DATA_IS and (k == "inner_lr" or getattr(saved, k) != v)}
        if output_dir is None and protocol:
            # Another protocol's results go beside the run's own, never over them.
            output_dir = os.path.join(FLAGS.model_dir, "eval_" + "_".join(
                f"{k}={v}" for k, v in sorted(protocol.items())))
            logging.info("Protocol flags given (%s): results go to %s",
                         ", ".join(sorted(protocol)), output_dir)
        before = _files(output_dir or FLAGS.model_dir)
        reporting.evaluate_and_report(FLAGS.model_dir, baseline_dir=FLAGS.baseline_dir,
                                      output_dir=output_dir,
                                      oracle_dir=FLAGS.oracle_dir, **overrides)
    except KeyboardInterrupt:
        logging.warning(_interrupted_message(output_dir or FLAGS.model_dir, before))
        raise SystemExit(130) from None
    except cli.USER_ERRORS as e:
        cli.fail(cli.describe(e))


def run():
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
