"""Evaluates trained runs on held-out tasks and writes the table, JSON and plots."""

import dataclasses
import json
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from tf_maml import algorithms
from tf_maml import config as config_lib
from tf_maml import evaluation, files
from tf_maml import experiment as experiment_lib
from tf_maml import losses, serving
from tf_maml import tasks as tasks_lib
from tf_maml.tasks import SineTasks, step_seed

__all__ = ["evaluate_and_report", "evaluate_export", "EXPORT_OVERRIDABLE"]

RESULTS_FILENAME = "eval_results.json"
TRAINING_CURVE_FILENAME = "validation_curve.png"
CURVE_FILENAME = "eval_curve.png"
SINE_FIT_FILENAME = "sine_fit.png"


ALGORITHM_LABELS = {name: cls.label for name, cls in algorithms.ALGORITHMS.items()}


# What defines a meta-RL environment beyond its dataset: runs evaluated side by side (on one
# shared environment) must agree on these.
RL_ENVIRONMENT_FIELDS = ("horizon", "normalized_actions", "goal_radius", "rllab_halfcheetah")


def _label(config, model_dir, taken):
    if config.goal_observed:
        label = "oracle (trained)"
    elif config.num_inner_steps > 0:
        label = ALGORITHM_LABELS[config.algorithm]
    else:
        label = "pretrained"
    if config.num_inner_steps > 0 and config.first_order and config.algorithm == "maml":
        label = "FOMAML"
    return label if label not in taken else os.path.basename(os.path.normpath(model_dir))


# What `evaluate_export` takes besides the export: where the data is, how many tasks. The
# export fixes the rest of the protocol (its steps, rates, transductive query batch).
EXPORT_OVERRIDABLE = ("num_eval_tasks", "data_dir", "cache_dir")


def export_version_path(saved_model):
    """The SavedModel directory of `saved_model`: itself, or the highest version under it.

    Raises:
        FileNotFoundError: neither a SavedModel nor a directory of numbered versions.
    """
    if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
        return saved_model
    versions = files.saved_model_versions(saved_model)
    if not versions:
        what = "does not exist" if not os.path.exists(saved_model) else (
            "holds no saved_model.pb and no numbered version that does")
        raise FileNotFoundError(f"{saved_model} {what}: --saved_model must be an export of "
                                "tf_maml.export (a version directory or its base directory)")
    return os.path.join(saved_model, str(versions[-1]))


def _export_config(path, overrides):
    """The `Config` an export records (its run's), with `overrides` applied."""
    record_path = os.path.join(path, "assets.extra", serving.CONFIG_ASSET)
    if not os.path.isfile(record_path):
        raise FileNotFoundError(f"{path} holds no assets.extra/{serving.CONFIG_ASSET}: it was "
                                "not written by tf_maml.export")
    try:
        with open(record_path) as f:
            record = json.load(f)
        values = {k: v for k, v in record.items() if not k.startswith("export_")}
        values, _ = config_lib.drop_ignored_options(values)
        config = config_lib.Config.from_dict(values)
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{record_path} is not a config this version of tf_maml reads: "
                         f"{e}") from None
    if values.get("dataset") in config_lib.RL_DATASETS:
        raise ValueError(f"{path} is a policy: evaluate its run with --model_dir (the "
                         "meta-test protocol of RL samples trajectories)")
    unknown = sorted(set(overrides) - set(EXPORT_OVERRIDABLE))
    if unknown:
        raise ValueError(f"an export's protocol is fixed when it is exported; only "
                         f"{', '.join(EXPORT_OVERRIDABLE)} (and output_dir, where the results "
                         f"go) may be given with it, not {', '.join(unknown)}")
    return dataclasses.replace(config, **overrides).validate(), record


def _signature_message(error):
    """The message a signature's check gave, without TensorFlow's graph-execution framing."""
    lines = [line.strip() for line in str(error.message).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Detected at node", "[["))
            and line not in ("Graph execution error:", "<stack traces unavailable>")]
    message = kept[-1] if kept else str(error.message).strip()
    # tf.debugging.Assert's framing: "assertion failed: [text] [values]".
    framed = re.fullmatch(r"assertion failed: \[(.*)\] \[(.*)\]", message)
    return f"{framed.group(1)} {framed.group(2)}" if framed else message


def evaluate_export(saved_model, output_dir=None, **overrides):
    """Evaluates an exported SavedModel through its signatures, as it is served.

    The meta-test tasks are those `evaluate_and_report` gives its run (the
    same seed, stream and batches), built from the config the export records;
    each is predicted by `serving_default` (before adaptation) and by
    `adapt_tasks` (after the export's own steps and rates, the query set as
    one batch). For a transductive run this reproduces the run's evaluation
    at that step; a served model is checked without its run directory.

    Args:
        saved_model: an export's version directory, or its base directory (the
            highest version is taken, as TF Serving does).
        output_dir: where `eval_results.json` goes (default: nowhere; the
            export's directory is never written).
        **overrides: `EXPORT_OVERRIDABLE` fields (`data_dir`, `cache_dir`: data
            moved since training; `num_eval_tasks`).

    Returns:
        dict: `metric`, `steps` (`[0, num_eval_steps]`), `mean` and `ci95`
        (lists, one per step), `num_tasks`, `saved_model`.

    Raises:
        FileNotFoundError: not an export, or its data is missing.
        ValueError: a meta-RL policy, a custom dataset, other overrides, data
            other than the run's (when the export records it) or that its
            signatures refuse, an adaptation that diverges.
        PermissionError: `output_dir` is not writable.

    Example:

    ```python
    from tf_maml import reporting
    figures = reporting.evaluate_export("export/models/sine_maml")  # the highest version
    ```
    """
    path = export_version_path(saved_model)
    config, record = _export_config(path, overrides)
    if config.is_rl:
        raise ValueError(f"{path} is a policy: evaluate its run with --model_dir (the "
                         "meta-test protocol of RL samples trajectories)")
    if config.dataset == "custom":
        raise ValueError(f"{path} was meta-trained on tasks given in code (dataset 'custom'): "
                         "sample them yourself and call its adapt_tasks signature")
    if output_dir is not None:
        experiment_lib.check_writable(output_dir, "--output_dir")
    tasks = tasks_lib.build(config)
    fingerprint = tasks_lib.data_fingerprint(tasks)
    record_path = os.path.join(path, "assets.extra", serving.DATA_FINGERPRINT_ASSET)
    if fingerprint is not None and not os.path.exists(record_path):
        logging.warning("%s records no data fingerprint (exported before it was kept, or not "
                        "with the export CLI): the data at data_dir=%r cannot be checked against "
                        "the data its run was trained on", path, config.data_dir)
    elif fingerprint is not None:
        saved = experiment_lib.read_data_fingerprint(record_path)
        if saved is not None:
            experiment_lib.compare_data_fingerprints(
                saved, fingerprint, config.data_dir, f"the run exported to {path}", record_path,
                "Give the run's own data (--data_dir)")
    _, metric_fn, metric_name = losses.for_tasks(tasks)
    loaded = tf.saved_model.load(path)
    missing = {"serving_default", "adapt_tasks"} - set(loaded.signatures)
    if missing:
        raise ValueError(f"{path} has no {' or '.join(sorted(missing))} signature (exported by "
                         "an earlier version): export the run again")
    serve, adapt_tasks = loaded.signatures["serving_default"], loaded.signatures["adapt_tasks"]
    dtype = adapt_tasks.structured_input_signature[1]["support_x"].dtype
    label_dtype = adapt_tasks.structured_input_signature[1]["support_y"].dtype
    max_tasks = int(record.get("export_limits", {}).get("max_tasks", 1))
    num_tasks, batch_size = config.num_eval_tasks, evaluation.batch_size_for(config)
    steps = int(record.get("export_num_eval_steps", config.num_eval_steps))
    chunks = []
    for index, start in enumerate(range(0, num_tasks, batch_size)):
        episode = tasks.sample(step_seed(config.seed, index, tasks_lib.TEST),
                               min(batch_size, num_tasks - start), "test")
        support_x, query_x = (tf.cast(episode.support_x, dtype), tf.cast(episode.query_x, dtype))
        support_y = tf.cast(episode.support_y, label_dtype)
        count = int(query_x.shape[0])
        try:
            before = tf.stack([serve(x=query_x[i])["predictions"] for i in range(count)])
            after = tf.concat([adapt_tasks(support_x=support_x[i:i + max_tasks],
                                           support_y=support_y[i:i + max_tasks],
                                           query_x=query_x[i:i + max_tasks])["predictions"]
                               for i in range(0, count, max_tasks)], axis=0)
        except tf.errors.InvalidArgumentError as e:  # the signature's own check, in one line
            where = f" of --data_dir={config.data_dir!r}" if config.data_dir else ""
            raise ValueError(f"{path} refused the meta-test tasks{where}: "
                             f"{_signature_message(e)}") from None
        chunks.append(np.stack([metric_fn(episode.query_y, tf.cast(p, episode.query_x.dtype))
                                .numpy() for p in (before, after)]))
        logging.info("evaluated %d of %d tasks", start + count, num_tasks)
    mean, ci = evaluation.summarize(np.concatenate(chunks, axis=1))
    result = {"metric": metric_name, "steps": [0, steps], "mean": [float(x) for x in mean],
              "ci95": [float(x) for x in ci], "num_tasks": num_tasks,
              "saved_model": os.path.abspath(path)}
    task = f"{config.n_way}-way {config.k_shot}-shot " if tasks.is_classification else ""
    logging.info("%s on %d meta-test tasks (%s%s), through its signatures: %s %.4f ± %.4f "
                 "before adaptation, %.4f ± %.4f after %d step(s)", path, num_tasks, task,
                 config.dataset, metric_name, mean[0], ci[0], mean[1], ci[1], steps)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        evaluation.write_json(os.path.join(output_dir, RESULTS_FILENAME), metric_name,
                              {"export": (mean, ci)},
                              extra={"steps": [0, steps], "num_tasks": num_tasks,
                                     "saved_model": result["saved_model"]})
    return result


def evaluate_and_report(model_dir, baseline_dir=None, output_dir=None, oracle_dir=None,
                        **overrides):
    """Evaluates a run (and optionally a baseline run on the same tasks), prints and saves results.

    Both runs are evaluated with the protocol of `model_dir`'s config (task
    distribution, `inner_lr`, `num_eval_steps`, `num_eval_tasks`), on the same
    held-out tasks.

    An RL run (`dataset="navigation2d"`) is evaluated as the MAML paper's
    Fig. 5: average return after 0..`num_eval_steps` policy-gradient steps
    (`inner_lr`, then `inner_lr * eval_step_size_decay`) on `num_eval_tasks`
    held-out goals, for the run, the baseline, the random initialization
    and the oracle that sees the goal: navigation's analytic best policy, and
    the policy trained with `goal_observed=True` in `oracle_dir` if given.

    Args:
        model_dir: a directory written by `tf_maml.train`.
        baseline_dir: optional second run with the same architecture.
        output_dir: where to write results (default `model_dir`).
        oracle_dir: RL: a run trained with `goal_observed=True` on the same
            dataset (`flags/rl_*_oracle.flags`); its return without adaptation
            is the "oracle (trained)" row.
        **overrides: `Config` fields that change the protocol
            (`num_eval_steps`, `num_eval_tasks`, `inner_lr`) or say where the
            data is now (`data_dir`, `cache_dir`).

    Returns:
        dict label -> (mean, ci95) arrays over steps 0..num_eval_steps.

    Raises:
        FileNotFoundError: a directory has no config or checkpoint (the
            message names the flag: --model_dir, --baseline_dir or --oracle_dir).
        PermissionError: the results cannot be written (checked before the
            evaluation runs).
        ValueError: invalid overrides, unreadable checkpoints, the
            baseline's architecture differs, or `oracle_dir` is not a
            goal-observed run of the same RL dataset.
    """
    # Everything that can be checked cheaply is, before data is loaded; nothing is
    # created until then (a mistyped --model_dir must not become a directory).
    config_lib.load(model_dir, "--model_dir")
    if baseline_dir:
        _check_baseline(model_dir, baseline_dir)
    if oracle_dir:
        _check_oracle(config_lib.load(model_dir, "--model_dir"),
                      config_lib.load(oracle_dir, "--oracle_dir"), oracle_dir)
    if output_dir is not None:
        experiment_lib.check_writable(output_dir, "--output_dir")
    else:
        output_dir = model_dir
        try:
            experiment_lib.check_writable(output_dir, "--model_dir")
        except PermissionError as e:
            raise PermissionError(f"{e}: give --output_dir for the results") from None
    for name in (RESULTS_FILENAME, CURVE_FILENAME, TRAINING_CURVE_FILENAME, SINE_FIT_FILENAME):
        path = os.path.join(output_dir, name)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    experiment, step = experiment_lib.restore(model_dir, overrides, load_tasks=True)
    config = experiment.config
    if config.is_rl:
        return _evaluate_rl(model_dir, baseline_dir, output_dir, experiment, step, oracle_dir)
    runs = {_label(config, model_dir, ()): (experiment, step)}
    if baseline_dir:
        # The baseline is evaluated on this run's tasks: its own data is not loaded.
        # Protocol overrides that live in the algorithm apply to a Reptile baseline too.
        baseline_overrides = ({"eval_inner_batch_size": overrides["eval_inner_batch_size"]}
                              if "eval_inner_batch_size" in overrides
                              and config_lib.load(baseline_dir, "--baseline_dir").algorithm
                              == "reptile" else None)
        baseline, baseline_step = experiment_lib.restore(baseline_dir, baseline_overrides,
                                                         tasks=experiment.tasks)
        shapes = [tuple(v.shape) for v in experiment.model.trainable_variables]
        if [tuple(v.shape) for v in baseline.model.trainable_variables] != shapes:
            raise ValueError(f"{baseline_dir} holds a different architecture than {model_dir}")
        runs[_label(baseline.config, baseline_dir, runs)] = (baseline, baseline_step)
    os.makedirs(output_dir, exist_ok=True)

    jit = experiment_lib.resolve_jit_compile(config, experiment.model,
                                               experiment.forward.vectorized)
    # An --inner_lr given at evaluation replaces the algorithms' own (learned) rates.
    inner_lr = overrides.get("inner_lr")
    results, curve_fns = {}, {}
    for label, (run, run_step) in runs.items():
        logging.info("evaluating %s (step %d) on %d held-out tasks", label, run_step,
                     config.num_eval_tasks)
        curve_fns[label] = evaluation.make_curve_fn(run.algorithm, experiment.metric_fn,
                                                    config.num_eval_steps, inner_lr,
                                                    config.transductive, jit_compile=jit,
                                                    transductive_support=(
                                                        config.transductive_support))
        per_task = evaluation.evaluate_model(curve_fns[label], run.algorithm.meta_variables,
                                             experiment.tasks, config.seed,
                                             config.num_eval_tasks, tasks_lib.TEST,
                                             evaluation.batch_size_for(config))
        results[label] = evaluation.summarize(per_task)

    name = experiment.metric_name
    task = f"{config.n_way}-way " if experiment.tasks.is_classification else ""
    table = evaluation.format_table(name, results)
    protocol = ("" if config.transductive and not config.transductive_support
                else ", transductive with the support set" if config.transductive
                else ", non-transductive")
    mini_batch = getattr(experiment.algorithm, "eval_inner_batch_size", None)
    if mini_batch:
        protocol += f", support mini-batches of {mini_batch}"
    # Meta-SGD's and MAML++'s (LSLR) own rates are learned, unless --inner_lr replaced them.
    learned = inner_lr is None and (config.algorithm == "metasgd" or (
        config.algorithm == "mamlpp" and config.learn_inner_lr))
    rates = (f"learned inner rates, initialised at {config.inner_lr:g}" if learned
             else f"inner_lr={inner_lr or config.inner_lr}")
    print(f"\n{name} on {config.num_eval_tasks} held-out {config.dataset} {task}tasks "
          f"(K={config.k_shot}, {rates}{protocol}), "
          f"mean ± 95% CI:\n{table}\n{_non_finite_note(name, results)}")
    model_name = config.model_for(experiment.spec.input_shape)
    extra = {"num_tasks": config.num_eval_tasks, "inner_lr": config.inner_lr,
             "inner_lr_learned": learned,
             "algorithm": config.algorithm, "transductive": config.transductive,
             "transductive_support": config.transductive_support,
             "k_shot": config.k_shot, "dataset": config.dataset, "model": model_name,
             "n_way": config.n_way if experiment.tasks.is_classification else None,
             "steps_trained": {label: s for label, (_, s) in runs.items()}}
    if config.algorithm == "reptile":
        extra["eval_inner_batch_size"] = mini_batch   # 0: the whole support set
    evaluation.write_json(os.path.join(output_dir, RESULTS_FILENAME), name, results, extra)
    title = f"{config.dataset} {task}K={config.k_shot}, {model_name}"
    paths = [evaluation.plot_curves(os.path.join(output_dir, CURVE_FILENAME), name, results,
                                    title)]
    history = validation_history(model_dir)
    if history:
        paths.append(evaluation.plot_validation_history(
            os.path.join(output_dir, TRAINING_CURVE_FILENAME), name, history,
            f"{title}: validation during meta-training"))
    if isinstance(experiment.tasks, SineTasks):
        paths.append(_plot_sine(os.path.join(output_dir, SINE_FIT_FILENAME), runs, experiment,
                                config))
    print("wrote " + ", ".join([os.path.join(output_dir, RESULTS_FILENAME)] + paths))
    return results


def _non_finite_note(metric_name, results):
    """A note under the table for metrics that are NaN or infinite (empty if none)."""
    lines = []
    for label, (mean, _) in results.items():
        steps = [step for step, value in enumerate(mean) if not np.isfinite(value)]
        if steps:
            lines.append(f"note: {label} {metric_name} is not finite (nan/inf) after "
                         f"{_steps_text(steps)} inner step(s): the adaptation or the model "
                         "diverged (a lower inner_lr may help); eval_results.json records "
                         "these values as null.")
    return "\n".join(lines) + "\n" if lines else ""


def _steps_text(steps):
    if steps == list(range(steps[0], steps[-1] + 1)) and len(steps) > 1:
        return f"{steps[0]}-{steps[-1]}"
    return ", ".join(str(s) for s in steps)


def validation_history(model_dir):
    """The validation metrics logged during training, from the TensorBoard events.

    Returns:
        dict tag suffix ("before_adaptation", "after_adaptation") -> sorted list
        of (step, value); empty if the run logged no validation.
    """
    history = {}
    pattern = os.path.join(model_dir, "train", "events.out.tfevents.*")
    for path in sorted(tf.io.gfile.glob(pattern)):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.tag.startswith("validation/"):
                        number = float(tf.make_ndarray(value.tensor)) if value.HasField(
                            "tensor") else value.simple_value
                        key = value.tag.split("_", 1)[1]
                        history.setdefault(key, {})[event.step] = number
        except tf.errors.DataLossError:  # a file cut short by a crash: keep what was read
            pass
    return {key: sorted(values.items()) for key, values in history.items()}


def _plot_sine(path, runs, experiment, config):
    """One held-out sine task, fitted from K points by each run (the paper's Fig. 2)."""
    tasks = experiment.tasks
    seed = step_seed(config.seed, 0, stream=tasks_lib.TEST + 1)
    episode = tasks.sample(seed, 1)
    amplitude, phase = tasks.sample_parameters(
        tf.random.experimental.stateless_split(seed, 3)[0], 1)
    grid = np.linspace(*tasks.input_range, 200, dtype=np.float32)
    grid_x = tf.constant(grid[None, :, None])
    truth = tasks.function(grid_x, amplitude, phase)
    episode = episode._replace(query_x=grid_x, query_y=truth)
    panels = {}
    for label, (run, _) in runs.items():
        _, predictions = evaluation.adaptation_curve(
            run.algorithm, run.algorithm.meta_variables, episode, experiment.metric_fn,
            config.num_eval_steps)
        panels[f"{label}, K={config.k_shot}"] = [p.numpy()[0, :, 0] for p in predictions]
    shown = sorted({0, min(1, config.num_eval_steps), config.num_eval_steps})
    return evaluation.plot_sine_fits(path, panels, episode.support_x.numpy()[0, :, 0],
                                     episode.support_y.numpy()[0, :, 0], grid,
                                     truth.numpy()[0, :, 0], shown)


RL_METRIC = "return"


def _check_oracle(config, oracle_config, oracle_dir):
    """Raises ValueError unless `oracle_dir` holds a goal-observed run of `config`'s dataset."""
    if not config.is_rl:
        raise ValueError("--oracle_dir applies to reinforcement-learning runs only, not to "
                         f"{config.dataset!r}")
    if oracle_config.dataset != config.dataset:
        raise ValueError(f"--oracle_dir {oracle_dir} holds a {oracle_config.dataset} run, not "
                         f"{config.dataset}")
    if not oracle_config.goal_observed:
        raise ValueError(f"--oracle_dir {oracle_dir} must hold a run trained with "
                         f"--goal_observed (flags/rl_*_oracle.flags)")


def _check_same_environment(config, other, flag, other_dir):
    """Raises ValueError unless `other`'s environment is `config`'s (`RL_ENVIRONMENT_FIELDS`)."""
    for field in RL_ENVIRONMENT_FIELDS:
        if getattr(other, field) != getattr(config, field):
            raise ValueError(
                f"{flag} {other_dir} was trained with {field}={getattr(other, field)!r}, the "
                f"evaluated run with {field}={getattr(config, field)!r}: runs are compared in "
                "one environment")


def _restore_named(model_dir, flag):
    """`experiment.restore`, with a missing or bad checkpoint's message naming the flag."""
    try:
        return experiment_lib.restore(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from None


def _check_baseline(model_dir, baseline_dir):
    """Refuses, in one line, a supervised baseline trained on other tasks or another network."""
    config = config_lib.load(model_dir, "--model_dir")
    baseline_config = config_lib.load(baseline_dir, "--baseline_dir")
    if config.is_rl and baseline_config.is_rl:
        return  # the reinforcement-learning checks name the environments
    if config.is_rl or baseline_config.is_rl:
        raise ValueError(f"--baseline_dir {baseline_dir} holds a {baseline_config.dataset} run; "
                         f"--model_dir {model_dir}: {config.dataset}. A baseline needs the same "
                         f"tasks")

    def describe(run_config, run_dir):
        spec = experiment_lib.load_spec(run_dir, run_config)
        return (run_config.dataset, tuple(spec.input_shape), spec.output_size,
                run_config.model_for(spec.input_shape))

    ours, theirs = describe(config, model_dir), describe(baseline_config, baseline_dir)
    if ours != theirs:
        def text(d):
            return f"{d[0]} tasks, inputs {d[1]}, {d[2]} outputs, model {d[3]}"
        raise ValueError(f"--baseline_dir {baseline_dir} holds a run on {text(theirs)}; "
                         f"--model_dir {model_dir}: {text(ours)}. A baseline is evaluated on "
                         f"the run's tasks, so it needs the same tasks and network")


def _evaluate_rl(model_dir, baseline_dir, output_dir, experiment, step, oracle_dir=None):
    """The paper's Fig. 5 protocol for a meta-RL run: returns after 0..num_eval_steps steps."""
    from tf_maml import rl  # noqa: PLC0415 -- RL only
    from tf_maml.rl.maml_rl import TEST_SEED  # noqa: PLC0415

    config = experiment.config
    runs = {_label(config, model_dir, ()): (experiment, step)}
    if baseline_dir:
        baseline_config = config_lib.load(baseline_dir, "--baseline_dir")
        if not baseline_config.is_rl or baseline_config.dataset != config.dataset:
            raise ValueError(f"--baseline_dir {baseline_dir} holds a {baseline_config.dataset} "
                             f"run, not {config.dataset}")
        if baseline_config.goal_observed:
            raise ValueError(f"--baseline_dir {baseline_dir} holds a goal-observed run (an "
                             "oracle): give it as --oracle_dir")
        _check_same_environment(config, baseline_config, "--baseline_dir", baseline_dir)
    if oracle_dir:
        _check_same_environment(config, config_lib.load(oracle_dir, "--oracle_dir"),
                                "--oracle_dir", oracle_dir)
    if baseline_dir:
        baseline, baseline_step = _restore_named(baseline_dir, "--baseline_dir")
        runs[_label(baseline.config, baseline_dir, runs)] = (baseline, baseline_step)
    oracle_run = _restore_named(oracle_dir, "--oracle_dir") if oracle_dir else None
    oracle_label = _label(oracle_run[0].config, oracle_dir, runs) if oracle_run else None
    # The random initialization: the run's policy before meta-training.
    runs["random init"] = (experiment_lib.build_experiment(config), 0)
    os.makedirs(output_dir, exist_ok=True)

    algorithm = experiment.algorithm
    # One environment for every run (it does not depend on the policy): simulated
    # environments hold one simulation per episode, about 1 MB each for HalfCheetah.
    base_env = algorithm.env.env if isinstance(algorithm.env, rl.GoalObserved) else algorithm.env
    for run, _ in runs.values():
        run.algorithm.env = (rl.GoalObserved(base_env) if run.config.goal_observed
                             else base_env)
        # One sampling protocol for every row of the table: the evaluated run's.
        run.algorithm.sample_by_steps = config.sample_by_steps
    if config.original_test_goals:
        tasks = base_env.original_test_goals(config.num_eval_tasks)
    else:
        tasks = algorithm.evaluation_tasks(TEST_SEED, config.num_eval_tasks)
    num_steps = config.num_eval_steps
    sizes = [config.inner_lr] + [config.inner_lr * config.eval_step_size_decay] * (
        max(num_steps, 1) - 1)
    episodes = config.episodes_per_evaluation_step
    results = {}
    for label, (run, run_step) in runs.items():
        logging.info("evaluating %s (step %d) on %d held-out goals", label, run_step,
                     config.num_eval_tasks)
        if run.config.goal_observed:
            # A policy that sees the goal is evaluated as the oracle row is: without
            # adaptation, its return repeated at every step.
            returns = run.algorithm.evaluate(TEST_SEED, tasks=tasks, num_steps=0,
                                             num_trajectories=episodes, per_task=True)
            per_task = np.tile(returns, (num_steps + 1, 1))
        else:
            per_task = run.algorithm.evaluate(TEST_SEED, tasks=tasks, num_steps=num_steps,
                                              step_sizes=sizes, num_trajectories=episodes,
                                              per_task=True)
        results[label] = evaluation.summarize(per_task)
    if hasattr(base_env, "oracle_returns"):   # navigation: the analytic best policy
        oracle = np.asarray(base_env.oracle_returns(tasks, algorithm.horizon))
        results["oracle"] = evaluation.summarize(np.tile(oracle, (num_steps + 1, 1)))
    if oracle_run is not None:   # the trained oracle: sees the goal, never adapts
        oracle, oracle_step = oracle_run
        oracle.algorithm.env = rl.GoalObserved(base_env)
        oracle.algorithm.sample_by_steps = config.sample_by_steps
        logging.info("evaluating the trained oracle (step %d)", oracle_step)
        returns = oracle.algorithm.evaluate(TEST_SEED, tasks=tasks, num_steps=0,
                                            num_trajectories=episodes, per_task=True)
        results[oracle_label] = evaluation.summarize(np.tile(returns, (num_steps + 1, 1)))
        runs[oracle_label] = oracle_run

    table = evaluation.format_table(RL_METRIC, results)
    steps_text = ("no gradient step" if num_steps == 0 else
                  "no adaptation: a goal-observed run and its random init are evaluated as "
                  "they are" if config.goal_observed else
                  "step sizes " + ", ".join(f"{s:g}" for s in sizes[:num_steps]))
    which = "the original test scripts' " if config.original_test_goals else ""
    sampled = (f"{episodes * algorithm.horizon} steps (episodes ending early make room for "
               f"more)" if algorithm.by_steps else
               f"{episodes} episodes x {algorithm.horizon} steps")
    print(f"\naverage return on {which}{config.num_eval_tasks} held-out {config.dataset} goals "
          f"({sampled} per gradient step, "
          f"{steps_text}), mean ± 95% CI:\n{table}\n"
          f"{_non_finite_note(RL_METRIC, results)}")
    extra = {"num_tasks": config.num_eval_tasks, "inner_lr": config.inner_lr,
             "step_sizes": sizes[:num_steps], "algorithm": config.algorithm,
             "dataset": config.dataset, "fast_batch_size": config.fast_batch_size,
             "eval_fast_batch_size": episodes,
             "sample_by_steps": algorithm.by_steps,
             "horizon": algorithm.horizon, "outer_optimizer": config.outer_optimizer,
             "original_test_goals": config.original_test_goals,
             "goals": np.asarray(tasks, np.float64).round(6).tolist(),
             "steps_trained": {label: s for label, (_, s) in runs.items()}}
    if hasattr(algorithm.env, "close"):   # frees simulations (re-created if used again)
        algorithm.env.close()
    evaluation.write_json(os.path.join(output_dir, RESULTS_FILENAME), RL_METRIC, results, extra)
    title = f"{config.dataset}: {config.outer_optimizer.upper()}, inner_lr={config.inner_lr:g}"
    paths = [evaluation.plot_curves(os.path.join(output_dir, CURVE_FILENAME), "average return",
                                    results, title)]
    history = validation_history(model_dir)
    if history:
        paths.append(evaluation.plot_validation_history(
            os.path.join(output_dir, TRAINING_CURVE_FILENAME), RL_METRIC, history,
            f"{title}: validation during meta-training"))
    print("wrote " + ", ".join([os.path.join(output_dir, RESULTS_FILENAME)] + paths))
    return results
