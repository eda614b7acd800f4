"""absl flags shared by the entry points, and their conversion to a `Config`.

Library code never reads flags: entry points call `config_from_flags()` and
pass the `Config` on.
"""

import dataclasses
import os
import sys

import tensorflow as tf
from absl import app, flags

from tf_maml import config as config_lib
from tf_maml.config import Config

_DEFAULTS = Config()
_HELP = {
    "dataset": f"Task family: {', '.join(config_lib.DATASETS)}, or {config_lib.TFDS_PREFIX}NAME "
               "(a TensorFlow Datasets image-classification data set, e.g. "
               "tfds:emnist/balanced). folder: your images in --data_dir, one sub-folder per "
               "class; custom: tasks given in code (not from the command line); navigation2d, "
               "halfcheetah_velocity, halfcheetah_direction: meta-RL (the paper's section 5.3; "
               "HalfCheetah needs pip install -e '.[rl]').",
    "data_dir": "Local data: Omniglot archives/folders, MiniImagenet images/ + split CSVs, the "
                "class sub-folders of --dataset=folder, or TFDS' data directory. Empty: "
                "Omniglot from TFDS.",
    "cache_dir": "Cache for decoded images (empty: none).",
    "n_way": "Classes per task (classification).",
    "image_size": "folder/tfds: resize images to this many pixels square (0: keep their size).",
    "image_channels": "folder: 1 (grayscale) or 3 (RGB); 0: 1 if all images are grayscale.",
    "class_split": "folder/tfds: fractions of the classes for meta-train,val,test (shuffled "
                   "with --split_seed; val may be 0).",
    "omniglot_split": "paper (1200 random characters to meta-train) or lake (background/"
                      "evaluation alphabets).",
    "split_seed": "Seed of Omniglot's paper split and of the class split of folder/tfds data.",
    "augment_rotations": "Omniglot: training classes rotated by 90/180/270 degrees as new classes.",
    "omniglot_validation_characters": "Omniglot: meta-training characters held out (with "
                                      "--split_seed) for the validation during training; 0: "
                                      "validation samples the meta-test characters.",
    "omniglot_resize_filter": "Omniglot: 105->28 pixel resize, lanczos (MAML's preprocessing) "
                              "or nearest (Reptile's: binary, aliased strokes).",
    "model": f"Network: {', '.join(config_lib.MODELS)} (auto: the paper's for the dataset; "
             "conv4 for folder/tfds images).",
    "num_iterations": "Meta-training iterations.",
    "meta_batch_size": "Tasks per meta-batch.",
    "k_shot": "Support examples per task (per class for classification).",
    "k_query": "Query examples per task (per class for classification).",
    "num_inner_steps": "Inner gradient steps in meta-training (0: pretrained baseline).",
    "num_eval_steps": "Inner gradient steps at evaluation.",
    "inner_lr": "Inner-loop step size (alpha).",
    "meta_lr": "Meta (Adam) learning rate (beta).",
    "meta_gradient_clip": "Clip each element of the meta-gradient to [-c, c] before the "
                          "meta-update (the original MAML code's 10 for MiniImagenet); 0: off.",
    "first_order": "First-order MAML (no second derivatives).",
    "recompute_inner_steps": "Second order: recompute the inner steps' activations in the "
                             "backward pass instead of keeping them (memory for many inner "
                             "steps, at about one more support pass per step).",
    "algorithm": f"Meta-learning algorithm: {', '.join(config_lib.ALGORITHMS)}.",
    "msl_epochs": "MAML++: epochs over which the multi-step loss anneals to the last step.",
    "first_order_epochs": "MAML++: first-order meta-gradients for this many epochs, then second "
                          "order (derivative-order annealing).",
    "iterations_per_epoch": "MAML++: meta-iterations per epoch (the unit of its schedules).",
    "per_step_bn": "MAML++: one copy of each batch-norm weight per inner step.",
    "learn_inner_lr": "MAML++: learned per-layer per-step inner learning rates (LSLR).",
    "min_meta_lr": "MAML++: the meta learning rate is cosine-annealed down to this.",
    "inner_optimizer": "Reptile: inner optimizer, sgd or adam (beta_1 = 0).",
    "inner_batch_size": "Reptile: support examples per inner step in meta-training (0: all).",
    "eval_inner_batch_size": "Reptile: support examples per inner step outside meta-training "
                             "(evaluation, validation, adapt, the export; -1: "
                             "--inner_batch_size; 0: all).",
    "carry_inner_state": "Reptile with adam: carry Adam's moments across tasks and "
                         "meta-iterations and adapt from them at evaluation and in the export, "
                         "as the original code (default: fresh moments per task).",
    "meta_step_size": "Reptile: outer step size epsilon at the start.",
    "meta_step_size_final": "Reptile: outer step size at the end (linear annealing).",
    "train_k_shot": "Support examples per class in meta-training tasks, if not k_shot (0).",
    "transductive": "Evaluation: predict each task's query set as one batch (false: every "
                    "query example alone beside the support set).",
    "transductive_support": "Evaluation, with --transductive: the batch also holds the support "
                            "set; ignored without it.",
    "seed": "Seed of the initialization and of every sampled task.",
    "jit_compile": "XLA: auto (on for models on the layer-batched forward, except "
                   "convolutions on CPU, second-order max-pooling, recurrent layers, "
                   "recomputed inner steps and meta-RL), true or false.",
    "strategy": f"tf.distribute: {', '.join(config_lib.STRATEGIES)} (default: one device; "
                "mirrored: all local GPUs; multi_worker: cluster from TF_CONFIG).",
    "log_every": "Steps between progress lines and summaries.",
    "checkpoint_every": "Steps between checkpoints.",
    "validate_every": "Steps between validations on held-out tasks (0: never).",
    "num_eval_tasks": "Held-out tasks for evaluation.",
    "fast_batch_size": "RL: episodes per task and per sampling (with --sample_by_steps: that "
                       "many full-length episodes' worth of steps).",
    "eval_fast_batch_size": "RL evaluation: episodes per task and gradient step (0: "
                            "fast_batch_size; the original evaluations sampled 4000 steps: 40 "
                            "navigation or 20 HalfCheetah episodes' worth, more episodes where "
                            "they end early, see --sample_by_steps).",
    "horizon": "RL: steps per episode (0: the environment's, 100 for navigation2d, 200 for "
               f"HalfCheetah; at most {config_lib.MAX_HORIZON}).",
    "sample_by_steps": "RL, navigation2d with --goal_radius only: sample fast_batch_size x "
                       "horizon steps per task (evaluation: eval_fast_batch_size x horizon) "
                       "instead of that many episodes, as the original code: episodes ending "
                       "early make room for more (at most 4x).",
    "outer_optimizer": f"RL: meta-update, {', '.join(config_lib.OUTER_OPTIMIZERS)} (adam uses "
                       "--meta_lr).",
    "max_kl": "RL, TRPO: trust region on the mean KL divergence.",
    "cg_iterations": "RL, TRPO: conjugate-gradient iterations.",
    "cg_damping": "RL, TRPO: damping added to the KL's Hessian.",
    "backtrack_ratio": "RL, TRPO: line-search shrink factor per backtracking step.",
    "max_backtracks": "RL, TRPO: line-search steps before the update is rejected.",
    "gamma": "RL: discount factor.",
    "gae_lambda": "RL: GAE lambda (1: return minus the linear baseline).",
    "eval_step_size_decay": "RL evaluation: steps after the first use inner_lr times this "
                            "(0.5: the paper's alpha, then alpha/2).",
    "policy_output": "RL: the policy's mean head, linear (the original code's) or tanh (bounded "
                     "by the environment's action clip).",
    "goal_radius": "RL, navigation2d: end an episode within this distance of the goal (0: "
                   "fixed-length episodes).",
    "normalized_actions": "RL, navigation2d: the policy acts in [-1, 1], scaled by the "
                          "environment to its 0.1 clip (the original code's rllab normalize).",
    "rllab_halfcheetah": "RL, HalfCheetah: observe, reward and reset as the original rllab "
                         "environment (20 observations with the torso's centre of mass, its "
                         "centre-of-mass velocity, its reset noise) on Gymnasium's model.",
    "original_test_goals": "RL, HalfCheetah evaluation: the original test scripts' held-out "
                           "goals (np.random.seed(1), U[0, 2]; a direction is backward "
                           "below 1) instead of this project's own.",
    "goal_observed": "RL: observations end with the task's goal; with --num_inner_steps=0 this "
                     "trains the oracle (evaluate --oracle_dir).",
}

_FIELD_NAMES = [field.name for field in dataclasses.fields(Config)]


def define_config_flags(names=None, flag_values=flags.FLAGS):
    """Defines one flag per `Config` field (or those named), with its default.

    Args:
        names: the fields to define (default: all).
        flag_values: the `absl.flags.FlagValues` to define them in.
    """
    for field in dataclasses.fields(Config):
        if (names is not None and field.name not in names) or field.name in flag_values:
            continue
        default = getattr(_DEFAULTS, field.name)
        helptext = _HELP[field.name]
        kwargs = dict(flag_values=flag_values)
        if field.type in (bool, "bool"):
            flags.DEFINE_boolean(field.name, default, helptext, **kwargs)
        elif field.type in (int, "int"):
            flags.DEFINE_integer(field.name, default, helptext, **kwargs)
        elif field.type in (float, "float"):
            flags.DEFINE_float(field.name, default, helptext, **kwargs)
        else:
            flags.DEFINE_string(field.name, default, helptext, **kwargs)


def config_from_flags(base=None, flag_values=flags.FLAGS):
    """Builds a validated `Config` from the parsed flags.

    Args:
        base: a `Config` whose values are kept for fields whose flags were not
            given on the command line (e.g. the config saved with a run).
        flag_values: the parsed `absl.flags.FlagValues`.

    Raises:
        app.UsageError: a value is invalid (absl prints it without a traceback).
    """
    values = {}
    for name in _FIELD_NAMES:
        if name not in flag_values:
            continue
        flag = flag_values[name]
        if base is not None and not flag.present:
            continue
        values[name] = flag.value
    config = dataclasses.replace(base or _DEFAULTS, **values)
    try:
        return config.validate()
    except ValueError as e:
        fail(str(e))  # one line, as evaluate and export report a bad flag


def overrides_from_flags(names):
    """The `Config` fields among `names` whose flags were given on the command line."""
    return {name: flags.FLAGS[name].value for name in names if flags.FLAGS[name].present}


_FLAGFILE_PREFIXES = ("--flagfile=", "-flagfile=")


def expand_flagfiles(args, _including=None, _stack=()):
    """Command-line arguments with every `--flagfile` replaced by the flags it holds.

    Read as absl reads flagfiles (one flag per line; blank lines and lines
    starting with `#` or `//` skipped; nested `--flagfile=` lines expanded in
    place; nothing after `--`), except that a relative path inside a flagfile
    names a file beside that flagfile first, and only otherwise one relative to
    the working directory (as absl alone does): a recipe that includes another
    works from any directory.

    Args:
        args: the arguments after the program name.

    Returns:
        The arguments with no `--flagfile` left.

    Raises:
        ValueError: a flagfile that cannot be read, or one that includes itself.

    Example:

    ```python
    expand_flagfiles(["--flagfile=flags/anil_omniglot_20way_1shot.flags", "--seed=1"])
    ```
    """
    expanded, index = [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            expanded.extend(args[index:])
            break
        if arg in ("--flagfile", "-flagfile") and _including is None and index + 1 < len(args):
            path, index = args[index + 1], index + 2
        elif arg.startswith(_FLAGFILE_PREFIXES):
            path, index = arg.split("=", 1)[1], index + 1
        else:
            expanded.append(arg)
            index += 1
            continue
        if not path:  # as absl: an empty value names no file
            continue
        if _including is not None and not os.path.isabs(path):
            beside = os.path.join(os.path.dirname(_including), path)
            if os.path.isfile(beside):
                path = beside
        where = f" (included by {_including})" if _including else ""
        if os.path.realpath(path) in _stack:
            raise ValueError(f"flagfile {path}{where} includes itself")
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError as e:
            raise ValueError(f"cannot read flagfile {path}{where}: {e.strerror or e}") from None
        flag_lines = [line.strip() for line in lines
                      if not line.isspace() and not line.startswith(("#", "//"))]
        expanded.extend(expand_flagfiles(flag_lines, path, _stack + (os.path.realpath(path),)))
    return expanded


def parse_flags(argv):
    """absl's parser, on the arguments with their flagfiles expanded (`expand_flagfiles`)."""
    try:
        args = expand_flagfiles(argv[1:])
    except ValueError as e:
        fail(str(e))
    return app.parse_flags_with_usage(argv[:1] + args)


def run(main, module):
    """Runs an entry point's `main` under absl, with its `--help` also as a console script.

    absl's `--help` shows the docstring of `__main__` and the key flags of the module
    named by `sys.argv[0]`: right for `python -m tf_maml.train`, but a console script
    (`tf_maml_train`) is a wrapper without either, and its help listed no flag.

    Args:
        main: the entry point's `main(argv)`.
        module: the entry point's module object.
    """
    script = sys.argv[0]
    main_module = sys.modules.get("__main__")
    if main_module is not module:  # a console script's wrapper
        for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
            flags.FLAGS.register_key_flag_for_module(script, flag)
        if main_module is not None and not main_module.__doc__:
            main_module.__doc__ = module.__doc__
    app.run(main, flags_parser=parse_flags)


def no_positional_arguments(argv):
    """Rejects positional arguments (absl passes them in `argv[1:]`)."""
    if len(argv) > 1:
        # One line (absl's UsageError printed the whole --help above it).
        fail(f"unexpected argument{'s' if len(argv) > 2 else ''} "
             f"{', '.join(repr(a) for a in argv[1:])}: flags start with -- "
             f"(--name=value, in a flagfile too; see --help)")


# What an entry point reports in one line (`fail(describe(e))`) rather than a traceback:
# bad input (ValueError), filesystem errors (OSError), a missing optional extra (ImportError,
# with its install line), TensorFlow's I/O errors.
USER_ERRORS = (ValueError, OSError, config_lib.MissingExtraError, tf.errors.OpError)


def describe(error):
    """An exception as one line: its message's first line (OS errors name their path)."""
    from tf_maml import experiment  # noqa: PLC0415 -- heavy; only when reporting an error
    return experiment.error_text(error, limit=2000)


def fail(message):
    """Prints `message` to stderr and exits with status 1 (user errors, no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
