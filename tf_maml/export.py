"""Exports a trained run for TF Serving.

    python -m tf_maml.export --model_dir=runs/sine --export_dir=/models/sine

writes `/models/sine/<version>/` (a SavedModel; version = the checkpoint's
training step unless --version) with the signatures `serving_default`, `adapt`,
`adapt_custom`, `adapted_weights`, `adapt_tasks`, `adapt_tasks_custom` (and,
for image datasets, `decode_images` and `adapt_images`; see `tf_maml.serving`).
Requests are limited (examples per support and query set, inner steps, tasks
per request): the dataset's defaults, or --max_support_examples,
--max_query_examples, --max_inner_steps, --max_tasks.

A meta-RL run (--dataset=navigation2d) exports its policy instead
(`tf_maml.rl.serving`): `serving_default` (action means of the
meta-initialization), `adapt` (one policy-gradient step of --inner_lr, default
the run's, on a request's episodes) and `adapt_custom` (the request's
inner_lr), limited by --max_episodes, --max_horizon, --max_query_observations.
"""

import dataclasses
import os
import sys

from absl import flags, logging

from tf_maml import cli, serving
from tf_maml import config as config_lib
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
POLICY_LIMIT_FLAGS = {
    "max_episodes": "Meta-RL runs: most episodes in one adapt request (default 100).",
    "max_horizon": "Meta-RL runs: most steps per episode in one adapt request (default 1000, "
                   f"at most {config_lib.MAX_HORIZON}).",
    "max_query_observations": "Meta-RL runs: most rows of query_observations, and of "
                              "serving_default's observations (default 10000).",
}
for _name, _help in {**LIMIT_FLAGS, **POLICY_LIMIT_FLAGS}.items():
    flags.DEFINE_integer(_name, None, _help)
flags.mark_flags_as_required(["model_dir", "export_dir"])
OVERRIDABLE = ("num_eval_steps", "inner_lr", "eval_inner_batch_size")
cli.define_config_flags(OVERRIDABLE)
# The config's flags are defined in tf_maml.cli: --help lists them as this command's own.
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def _checked_flags():
    """The limit overrides; `ValueError` naming a bad flag (checked before any work)."""
    for name in ("model_dir", "export_dir"):
        if not FLAGS[name].value.strip():
            raise ValueError(f"--{name} is empty (an unset variable?): give a directory")
    if FLAGS.version is not None and not 1 <= FLAGS.version < 2**63:
        raise ValueError(f"--version must be a positive integer below 2**63 (TF Serving reads "
                         f"versions as int64), got {FLAGS.version}")
    limits = {name: FLAGS[name].value for name in {**LIMIT_FLAGS, **POLICY_LIMIT_FLAGS}
              if FLAGS[name].value is not None}
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
        # The signature's own settings stay out of the restored config, so that the config
        # recorded with the export is the run's (the signature's are recorded as export_*).
        inner_lr = overrides.pop("inner_lr", None)
        num_eval_steps = overrides.pop("num_eval_steps", None)
        # No data is loaded: the model is rebuilt from the run's config.
        experiment, step = experiment_lib.restore(FLAGS.model_dir, overrides,
                                                  checkpoint_path=FLAGS.checkpoint,
                                                  simulate=False)
        if "eval_inner_batch_size" in overrides:
            # Reptile's adapt uses the flag's batch (the algorithm was built with it); the
            # recorded config keeps the run's, the signature's goes in as export_*.
            experiment = dataclasses.replace(experiment, config=dataclasses.replace(
                experiment.config, eval_inner_batch_size=config_lib.load(
                    FLAGS.model_dir).eval_inner_batch_size))
        config = experiment.config
        # The training flags' checks (a finite positive rate, a step count in range).
        dataclasses.replace(config, **{name: value for name, value in (
            ("inner_lr", inner_lr), ("num_eval_steps", num_eval_steps))
            if value is not None}).validate()
        if config.is_rl and num_eval_steps is not None:
            raise ValueError("--num_eval_steps does not apply to a meta-RL policy's export: "
                             "its adapt signatures take one policy-gradient step on the "
                             "request's episodes (--inner_lr sets its size)")
        if num_eval_steps is None:
            num_eval_steps = config.num_eval_steps
        wrong = sorted(set(limits) & set(LIMIT_FLAGS if config.is_rl else POLICY_LIMIT_FLAGS))
        if wrong:
            kind, own = (("a meta-RL policy", POLICY_LIMIT_FLAGS) if config.is_rl else
                         ("a supervised run", LIMIT_FLAGS))
            raise ValueError(f"{', '.join('--' + name for name in wrong)}: not a limit of "
                             f"{kind}'s export (its limits: "
                             f"{', '.join('--' + name for name in own)})")
        # The algorithm's own rates (learned ones included) unless --inner_lr is given.
        version = FLAGS.version if FLAGS.version is not None else max(step, 1)
        # The run's data record goes with the export: evaluating it refuses other data.
        record = os.path.join(FLAGS.model_dir, experiment_lib.DATA_FILENAME)
        fingerprint = (experiment_lib.read_data_fingerprint(record)
                       if os.path.exists(record) and not config.is_rl else None)
        path = serving.export(experiment, FLAGS.export_dir, version, num_eval_steps,
                              inner_lr, overwrite=FLAGS.overwrite, limits=limits,
                              data_fingerprint=fingerprint)
    except cli.USER_ERRORS as e:
        cli.fail(cli.describe(e))
    except KeyboardInterrupt:
        logging.warning("Interrupted; the export did not finish. A version appears in "
                        "--export_dir only when complete (it is written to <version>.tmp, then "
                        "renamed), so any numbered version there is whole: the new one if it "
                        "was renamed in, else what was there before. A leftover <version>.tmp "
                        "is ignored by TF Serving and removed by the next export.")
        raise SystemExit(130) from None
    where = f"limits in {path}/assets.extra/{serving.CONFIG_ASSET}"
    if config.is_rl:
        rate = inner_lr if inner_lr is not None else config.inner_lr
        print(f"exported the policy of step {step} of {FLAGS.model_dir} to {path} (adapt: one "
              f"policy-gradient step with inner_lr {rate} on the request's episodes; {where})")
        return
    rates = inner_lr if inner_lr is not None else f"the {config.algorithm} rates"
    print(f"exported step {step} of {FLAGS.model_dir} to {path} "
          f"(adapt: {num_eval_steps} step{'' if num_eval_steps == 1 else 's'} with {rates}; "
          f"{where})")


def run():
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
