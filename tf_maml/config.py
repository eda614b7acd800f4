"""The hyperparameters of a run: one dataclass, validated, saved beside checkpoints."""

import dataclasses
import json
import os

from absl import logging

from tf_maml import files

__all__ = ["Config", "CONFIG_FILENAME", "DATASETS", "RL_DATASETS", "MODELS", "STRATEGIES",
           "ALGORITHMS", "ALGORITHM_OPTIONS", "SUPERVISED_OPTIONS", "RL_OPTIONS",
           "ignored_options", "OUTER_OPTIMIZERS", "OMNIGLOT_RESIZE_FILTERS",
           "load", "save", "drop_ignored_options", "TFDS_PREFIX", "DEFAULT_CLASS_SPLIT",
           "parse_class_split", "is_known_dataset"]

CONFIG_FILENAME = "config.json"
# The one list of each choice; flags' help, validation and the builders use these.
# "folder": the user's images, one sub-folder per class, in data_dir; "custom": a task family
# given in code (the Keras face); and any "tfds:NAME" (TFDS_PREFIX + a TensorFlow Datasets name).
# "navigation2d", "halfcheetah_velocity", "halfcheetah_direction": meta-reinforcement learning
# (the paper's section 5.3), trained with `tf_maml.rl.MAMLRL`; the RL fields below
# (fast_batch_size, outer_optimizer, ...) apply to them. The HalfCheetah ones need the "rl" extra.
RL_DATASETS = ("navigation2d", "halfcheetah_velocity", "halfcheetah_direction")
DATASETS = ("sine", "omniglot", "miniimagenet", "folder", "custom") + RL_DATASETS
TFDS_PREFIX = "tfds:"
# The user's data (folder, tfds:NAME): fractions of its classes for meta-train, -val and -test.
DEFAULT_CLASS_SPLIT = "0.64,0.16,0.2"
MODELS = ("auto", "mlp", "conv4", "conv4_maxpool", "fc")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
ALGORITHMS = ("maml", "anil", "metasgd", "mamlpp", "reptile")
INNER_OPTIMIZERS = ("sgd", "adam")
OUTER_OPTIMIZERS = ("trpo", "adam")
# The discounted returns are one product with an [H, H] matrix (400 MB in float32 at 10,000
# steps, 40 GB at 100,000): longer episodes would fail deep in TensorFlow's allocator.
MAX_HORIZON = 10000


def horizon_problem(name, value):
    """The message for a `value` of `name` (a horizon) above `MAX_HORIZON`, or None."""
    if isinstance(value, int) and value > MAX_HORIZON:
        return (f"{name} must be at most {MAX_HORIZON} steps (the discounted returns take an "
                f"[horizon, horizon] matrix: 400 MB at {MAX_HORIZON}), got {value!r}")
    return None
OMNIGLOT_RESIZE_FILTERS = ("lanczos", "nearest")
# Options that only one algorithm reads (validation refuses them, changed, for the others).
ALGORITHM_OPTIONS = {
    "mamlpp": ("msl_epochs", "first_order_epochs", "iterations_per_epoch", "per_step_bn",
               "learn_inner_lr", "min_meta_lr"),
    "reptile": ("inner_optimizer", "inner_batch_size", "eval_inner_batch_size",
                "carry_inner_state", "meta_step_size", "meta_step_size_final"),
}
# Options that only supervised tasks read, and options that only reinforcement learning
# reads: validation refuses them, changed, for the other kind of dataset.
SUPERVISED_OPTIONS = ("data_dir", "n_way", "image_size", "image_channels", "class_split",
                      "omniglot_split", "split_seed", "augment_rotations", "k_shot", "k_query",
                      "train_k_shot", "transductive", "transductive_support")
TRPO_OPTIONS = ("max_kl", "cg_iterations", "cg_damping", "backtrack_ratio", "max_backtracks")
RL_OPTIONS = ("fast_batch_size", "eval_fast_batch_size", "horizon", "sample_by_steps",
              "outer_optimizer", "max_kl",
              "cg_iterations", "cg_damping", "backtrack_ratio", "max_backtracks", "gamma",
              "gae_lambda", "eval_step_size_decay", "policy_output")


def ignored_options(values):
    """The options that a config's algorithm, dataset and outer optimizer never read.

    Args:
        values: a dict of `Config` fields (missing ones take their defaults).

    Returns:
        `{name: owner}`: each ignored option and what reads it (for messages).
    """
    defaults = Config()
    algorithm = values.get("algorithm", defaults.algorithm)
    rl = values.get("dataset", defaults.dataset) in RL_DATASETS
    ignored = {name: f"algorithm={owner}" for owner, names in ALGORITHM_OPTIONS.items()
               if owner != algorithm for name in names}
    if algorithm == "reptile":
        ignored["first_order"] = "algorithms other than reptile"
        ignored["meta_gradient_clip"] = "algorithm=maml, anil, metasgd or mamlpp"
    elif values.get("num_inner_steps", defaults.num_inner_steps) == 0:
        ignored["first_order"] = "runs with inner steps"
    if rl:
        ignored.update({name: "supervised datasets"
                        for name in SUPERVISED_OPTIONS + ("meta_gradient_clip",)})
        if (values.get("dataset", defaults.dataset) != "navigation2d"
                or not values.get("goal_radius", defaults.goal_radius)):
            ignored["sample_by_steps"] = ("episodes that can end early (navigation2d with "
                                          "goal_radius)")
        if values.get("outer_optimizer", defaults.outer_optimizer) == "trpo":
            ignored["meta_lr"] = "outer_optimizer=adam (TRPO's step size is max_kl)"
        else:
            ignored.update({name: "outer_optimizer=trpo" for name in TRPO_OPTIONS})
    else:
        ignored.update({name: "reinforcement learning" for name in RL_OPTIONS})
        dataset = values.get("dataset", defaults.dataset)
        if is_known_dataset(dataset) and dataset != "omniglot":  # one dataset's options
            ignored.update({name: "dataset omniglot"
                            for name in ("omniglot_split", "augment_rotations")})
            if dataset != "folder" and not dataset.startswith(TFDS_PREFIX):
                ignored["split_seed"] = "datasets omniglot, folder and tfds:NAME"
        if dataset == "sine":
            ignored["n_way"] = "classification datasets"
            ignored["data_dir"] = "datasets read from files (omniglot, miniimagenet, folder, tfds)"
    return ignored


# Fields that may change when a run is resumed (they do not change what the
# run computes, or they extend it).
_FLOAT32_TINY = 1.1754944e-38  # float32's smallest normal number

RESUMABLE_FIELDS = frozenset({
    "num_iterations", "log_every", "checkpoint_every", "validate_every", "num_eval_tasks",
    "num_eval_steps", "jit_compile", "data_dir", "cache_dir", "strategy", "transductive",
    "transductive_support",
    "eval_step_size_decay", "eval_fast_batch_size", "recompute_inner_steps",
    "eval_inner_batch_size", "original_test_goals",
})


class MissingExtraError(ImportError):
    """An optional extra is not installed (the message gives its install line)."""


def is_known_dataset(name):
    """Whether `name` is one of `DATASETS` or "tfds:NAME"."""
    return isinstance(name, str) and (
        name in DATASETS or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)))


def parse_class_split(class_split):
    """The fractions (train, val, test) of a class split: "0.64,0.16,0.2" or 3 numbers.

    Raises:
        ValueError: not 3 non-negative numbers summing to 1 with train and test > 0.
    """
    problem = (f"class_split must be 3 fractions of the classes for train, val and test, "
               f"summing to 1 (train and test > 0), like {DEFAULT_CLASS_SPLIT!r}; got "
               f"{class_split!r}")
    try:
        parts = class_split.split(",") if isinstance(class_split, str) else list(class_split)
        fractions = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if (len(fractions) != 3 or not all(0 <= f <= 1 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0 or fractions[2] == 0):
        raise ValueError(problem)
    return fractions


@dataclasses.dataclass
class Config:
    """Everything that defines a MAML run.

    Defaults reproduce the paper's sine-regression experiment (section 5.1).

    Attributes:
        dataset: task family: "sine", "omniglot", "miniimagenet", "folder"
            (your images in `data_dir`, one sub-folder per class), "tfds:NAME"
            (a TensorFlow Datasets image-classification data set, e.g.
            "tfds:emnist/balanced"), "custom" (a task family given in code;
            `tf_maml.tasks.build` cannot build it), or meta-RL (the paper's
            section 5.3, with `tf_maml.rl`): "navigation2d" (2D point
            navigation), "halfcheetah_velocity" or "halfcheetah_direction"
            (Gymnasium's MuJoCo HalfCheetah, the `[rl]` extra).
        data_dir: local data (Omniglot: Lake's archives or folders; MiniImagenet:
            `images/` and the split CSVs; folder: the class sub-folders;
            tfds: TFDS' data directory, empty for its default). Empty: Omniglot
            comes from TFDS.
        cache_dir: cache for decoded images (empty: no cache).
        n_way: classes per task (classification).
        image_size: folder and tfds: resize images to image_size ×
            image_size (0: keep the data's size; a folder's images must then
            share one size).
        image_channels: folder: 1 (grayscale) or 3 (RGB); 0: 1 if every image
            is grayscale, else 3.
        class_split: folder and tfds: fractions of the classes for
            meta-training, meta-validation and meta-test, "train,val,test"
            (classes shuffled with `split_seed`; val may be 0, then validation
            uses the test classes).
        omniglot_split: "paper" (1200 random characters for meta-training, the
            rest for meta-test) or "lake" (background / evaluation alphabets).
        split_seed: seed of the paper split of Omniglot's characters, and of
            the class split of folder and tfds data.
        augment_rotations: Omniglot training classes also rotated by 90°, 180°
            and 270°, each a new class (the paper's augmentation).
        omniglot_validation_characters: Omniglot: meta-training characters
            held out for the validation during training (the original code
            holds out 100 of its 1200); 0: validation samples the meta-test
            characters (monitoring only; the paper's 1200 all train).
        omniglot_resize_filter: Omniglot: how the 105×105 drawings become
            28×28: "lanczos" (the MAML code's preprocessing) or "nearest" (what
            the Reptile code's loader gets: binary, aliased strokes).
        model: network: "mlp", "conv4", "conv4_maxpool" or "fc"; "auto" picks
            the paper's network for the dataset, conv4 for folder and tfds
            images, and for custom tasks conv4 (image inputs) or mlp.
        num_iterations: meta-training iterations (outer steps).
        meta_batch_size: tasks per meta-batch.
        k_shot: support examples per task (per class for classification).
        k_query: query examples per task (per class for classification).
        num_inner_steps: inner gradient steps during meta-training (0 trains a
            non-adaptive "pretrained" baseline on all tasks jointly).
        num_eval_steps: inner gradient steps at evaluation (metrics are
            reported after each step 0..num_eval_steps).
        inner_lr: inner-loop step size α.
        meta_lr: Adam learning rate β of the meta-update.
        meta_gradient_clip: clip every element of the meta-gradient to
            [−meta_gradient_clip, meta_gradient_clip] before the meta-update, as
            the original MAML code does for MiniImagenet (10); 0: no clipping.
            Not for Reptile (its update is not a gradient) nor reinforcement
            learning.
        first_order: first-order MAML (no second derivatives).
        recompute_inner_steps: second order: recompute each inner step's
            activations when the meta-gradient needs them instead of keeping
            them, so memory no longer grows with each step's activations (for
            many inner steps), at the cost of about one more forward and
            backward pass of the support set per step. Same meta-gradients.
            Not with models that draw random numbers (dropout: the recomputed
            step would draw new masks) nor with `jit_compile="true"` (XLA
            merges the recomputation back; "auto" turns XLA off for it).
        algorithm: "maml" (`first_order` for first-order MAML, `num_inner_steps=0`
            for the pretrained baseline), "anil" (adapt the head only), "metasgd"
            (learned per-parameter inner rates), "mamlpp" (MAML++) or
            "reptile".
        msl_epochs: MAML++: epochs over which the multi-step loss anneals to
            the last step (0: last step only).
        first_order_epochs: MAML++: first-order meta-gradients for this many
            epochs, second order afterwards (derivative-order annealing).
        iterations_per_epoch: MAML++: meta-iterations per epoch (the unit of
            its schedules).
        per_step_bn: MAML++: one copy of every batch-norm weight per inner step.
        learn_inner_lr: MAML++: learned per-layer per-step inner rates (LSLR).
        min_meta_lr: MAML++: the meta learning rate is cosine-annealed from
            `meta_lr` to this.
        inner_optimizer: Reptile: "sgd" or "adam" (β₁ = 0) in the inner loop.
        inner_batch_size: Reptile: support examples per inner step in
            meta-training (0: all).
        eval_inner_batch_size: Reptile: support examples per inner step at
            evaluation and in the export (-1: `inner_batch_size`; 0: all); the
            original recipes evaluate 20-way 1-shot with 10.
        carry_inner_state: Reptile with Adam: carry Adam's moments and step
            count from task to task and across meta-iterations, and adapt
            from them at evaluation and in the export, as the original code
            does (default: fresh moments for every task).
        meta_step_size: Reptile: ε at the start of training.
        meta_step_size_final: Reptile: ε at the end (linear annealing).
        train_k_shot: support examples per class in meta-training tasks when
            different from `k_shot` (0: `k_shot`); Reptile's recipe trains with
            10 shots and evaluates 1-shot.
        transductive: evaluation: predict a task's whole query set in one batch
            (batch norm sees all query examples); false predicts every query
            example alone with the support set beside it (Reptile's
            non-transductive protocol).
        transductive_support: evaluation, with `transductive`: the batch also
            holds the support set, so batch norm sees support and query
            examples together (both MAML's and Reptile's original code predict
            the query set alone). Ignored without `transductive`.
        seed: seeds the initialization and every sampled task.
        jit_compile: "auto" (XLA for dense-only models, where it is faster on
            CPU; not for convolutions), "true" or "false".
        strategy: tf.distribute strategy: "default" (one device), "mirrored"
            (all local GPUs), "multi_worker" (TF_CONFIG) or "tpu".
        log_every: steps between progress lines and training summaries.
        checkpoint_every: steps between checkpoints.
        validate_every: steps between validation on held-out tasks (0: never).
        num_eval_tasks: held-out tasks for evaluation.
        fast_batch_size: RL: episodes per task and per sampling (paper: 20;
            with `sample_by_steps`, that many full-length episodes' steps).
        eval_fast_batch_size: RL evaluation: episodes per task and gradient
            step (0: `fast_batch_size`; the original evaluation sampled 4000
            steps, 40 episodes' worth of 100, more episodes where they end early:
            `sample_by_steps`).
        horizon: RL: steps per episode (0: the environment's, 100 for
            navigation2d, 200 for HalfCheetah).
        sample_by_steps: RL, navigation2d with `goal_radius` only (refused
            elsewhere): each sampling collects `fast_batch_size ×
            horizon` environment steps per task (in evaluation
            `eval_fast_batch_size × horizon`) instead of that many episodes,
            as the original code's samplers: episodes that end early (at the
            goal, `goal_radius`) leave room for more, up to 4× as many.
            Evaluation samples every run of its table (baseline, oracle) so.
        outer_optimizer: RL: "trpo" (the paper's) or "adam" (with `meta_lr`)
            for the meta-update.
        max_kl: RL, TRPO: the trust region δ on the mean KL.
        cg_iterations: RL, TRPO: conjugate-gradient iterations.
        cg_damping: RL, TRPO: damping added to the KL's Hessian.
        backtrack_ratio: RL, TRPO: line-search step shrink factor.
        max_backtracks: RL, TRPO: line-search steps before giving up.
        gamma: RL: discount.
        gae_lambda: RL: GAE's λ (1: return minus the linear baseline).
        eval_step_size_decay: RL evaluation: the first gradient step uses
            `inner_lr`, later ones `inner_lr * eval_step_size_decay` (the
            paper's α, then α/2).
        policy_output: RL: the policy's mean head, "linear" (the original
            code's) or "tanh" (the environment's action bound times tanh: the
            mean cannot drift outside the action clip, where adaptation stops
            working).
        goal_radius: RL, navigation2d: an episode ends once the point is
            within this distance of the goal in each coordinate (0: fixed-length
            episodes; the reference implementations use 0.01).
        normalized_actions: RL, navigation2d: the policy acts in [-1, 1] and
            the environment scales its (clipped) action by 0.1, as the original
            code's rllab `normalize` wrapper; otherwise actions are clipped to
            [-0.1, 0.1] unscaled (pytorch-maml-rl's convention).
        rllab_halfcheetah: RL, HalfCheetah: the original rllab environment's
            observations (20: joint positions without x, velocities, and the
            torso's centre of mass, x included), its centre-of-mass forward
            velocity in the reward and its reset noise (qpos + 0.01·N(0, 1)),
            on Gymnasium's model; otherwise `HalfCheetah-v5`'s own (17
            observations, the root's finite-difference velocity, qpos +
            U(-0.1, 0.1)).
        original_test_goals: RL, HalfCheetah evaluation: the held-out goals
            of the original code's test scripts (`np.random.seed(1)`, then
            U[0, 2]; a direction is backward below 1) instead of this
            project's own held-out stream; `num_eval_tasks` takes the first
            ones (the scripts used 40).
        goal_observed: RL: observations end with the task's goal
            (`tf_maml.rl.GoalObserved`); with `num_inner_steps=0` this trains
            the paper's oracle, evaluated with `evaluate --oracle_dir`.
    """

    dataset: str = "sine"
    data_dir: str = ""
    cache_dir: str = "~/.cache/tf_maml"
    n_way: int = 5
    image_size: int = 0
    image_channels: int = 0
    class_split: str = DEFAULT_CLASS_SPLIT
    omniglot_split: str = "paper"
    split_seed: int = 0
    augment_rotations: bool = True
    omniglot_validation_characters: int = 0
    omniglot_resize_filter: str = "lanczos"
    model: str = "auto"
    num_iterations: int = 70000
    meta_batch_size: int = 25
    k_shot: int = 10
    k_query: int = 10
    num_inner_steps: int = 1
    num_eval_steps: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 0.001
    meta_gradient_clip: float = 0.0
    first_order: bool = False
    recompute_inner_steps: bool = False
    algorithm: str = "maml"
    msl_epochs: int = 10
    first_order_epochs: int = 0
    iterations_per_epoch: int = 500
    per_step_bn: bool = True
    learn_inner_lr: bool = True
    min_meta_lr: float = 1e-5
    inner_optimizer: str = "sgd"
    inner_batch_size: int = 0
    eval_inner_batch_size: int = -1
    carry_inner_state: bool = False
    meta_step_size: float = 1.0
    meta_step_size_final: float = 0.0
    train_k_shot: int = 0
    transductive: bool = True
    transductive_support: bool = False
    seed: int = 0
    jit_compile: str = "auto"
    strategy: str = "default"
    log_every: int = 1000
    checkpoint_every: int = 5000
    validate_every: int = 5000
    num_eval_tasks: int = 600
    fast_batch_size: int = 20
    eval_fast_batch_size: int = 0
    horizon: int = 0
    sample_by_steps: bool = False
    outer_optimizer: str = "trpo"
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15
    gamma: float = 0.99
    gae_lambda: float = 1.0
    eval_step_size_decay: float = 0.5
    policy_output: str = "linear"
    goal_radius: float = 0.0
    normalized_actions: bool = False
    rllab_halfcheetah: bool = False
    original_test_goals: bool = False
    goal_observed: bool = False

    @property
    def episodes_per_evaluation_step(self):
        """RL: episodes per task and gradient step in evaluation (`eval_fast_batch_size` or
        `fast_batch_size`)."""
        return self.eval_fast_batch_size or self.fast_batch_size

    @property
    def is_rl(self):
        """Whether the dataset is a reinforcement-learning environment (`RL_DATASETS`)."""
        return self.dataset in RL_DATASETS

    def __post_init__(self):
        # numpy's scalars and 0-d arrays (a sweep over np.logspace, np.arange) as the
        # Python numbers the checks, JSON and the flags expect.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value).__module__ != "numpy" or getattr(value, "shape", None) != ():
                continue
            scalar = value[()]  # (a 0-d array's scalar; a scalar's self)
            if value.dtype.kind == "b":
                setattr(self, field.name, bool(scalar))
            elif value.dtype.kind in "iu":
                setattr(self, field.name, int(scalar))
            elif value.dtype.kind == "f":
                # np.float32(0.1) as 0.1, not 0.10000000149011612: its shortest repr
                setattr(self, field.name, float(str(scalar)))

    def validate(self):
        """Checks every field; raises `ValueError` naming the first bad one."""
        problems = []

        def need(condition, message):
            if not condition:
                problems.append(message)

        if not is_known_dataset(self.dataset):  # the checks below depend on the dataset
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or {TFDS_PREFIX}NAME "
                             f"(a TensorFlow Datasets name), got {self.dataset!r}")
        need(self.dataset != "folder" or self.data_dir,
             "dataset folder needs data_dir (a directory with one sub-folder of images per "
             "class)")
        need(isinstance(self.image_size, int) and self.image_size >= 0,
             f"image_size must be a non-negative integer (0: keep the data's size), got "
             f"{self.image_size!r}")
        need(self.image_channels in (0, 1, 3),
             f"image_channels must be 0 (from the images), 1 or 3, got {self.image_channels!r}")
        try:
            parse_class_split(self.class_split)
        except ValueError as e:
            problems.append(str(e))
        need(self.omniglot_split in ("paper", "lake"),
             f"omniglot_split must be 'paper' or 'lake', got {self.omniglot_split!r}")
        need(self.dataset != "miniimagenet" or self.data_dir,
             "dataset miniimagenet needs data_dir (a directory with images/ and "
             "train.csv, val.csv, test.csv)")
        need(self.model in MODELS, f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        need(self.algorithm in ALGORITHMS,
             f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        need(self.inner_optimizer in INNER_OPTIMIZERS,
             f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, "
             f"got {self.inner_optimizer!r}")
        need(not self.carry_inner_state or self.algorithm != "reptile"
             or self.inner_optimizer == "adam",
             "carry_inner_state is for algorithm=reptile with inner_optimizer=adam (SGD has no "
             "state to carry)")
        need(self.algorithm == "maml" or self.num_inner_steps >= 1,
             f"algorithm={self.algorithm} needs num_inner_steps >= 1 (num_inner_steps=0, the "
             f"pretrained baseline, is for algorithm=maml)")
        need(not (self.first_order and self.algorithm == "reptile"),
             "first_order does not apply to algorithm=reptile (its update is first order by "
             "construction)")
        need(not (self.first_order and self.num_inner_steps == 0),
             "first_order does not apply to num_inner_steps=0 (the pretrained baseline has no "
             "inner gradients to differentiate through)")
        # Options set away from their defaults where nothing reads them (another
        # algorithm's, the other kind of dataset's) would be silently ignored.
        defaults = Config()
        for name, owner in ignored_options(self.to_dict()).items():
            if name == "first_order":
                continue  # its own message above
            if owner.startswith("algorithm="):
                where = f"algorithm={self.algorithm}"
            elif name == "meta_lr" or name in TRPO_OPTIONS and self.is_rl:
                where = f"outer_optimizer={self.outer_optimizer}"
            elif name == "sample_by_steps":
                # Set by the navigation flagfile, so often not typed by the user.
                need(not self.sample_by_steps,
                     f"sample_by_steps is for episodes that can end early (navigation2d with "
                     f"goal_radius), not {self.dataset}"
                     f"{' with goal_radius=0' if self.dataset == 'navigation2d' else ''}: pass "
                     f"--sample_by_steps=false (flags/rl_navigation.flags sets it)")
                continue
            else:
                where = f"dataset {self.dataset}"
            need(getattr(self, name) == getattr(defaults, name),
                 f"{name} is for {owner} (got {where}, where it would be ignored)")
        if self.recompute_inner_steps:
            need(not self.first_order and self.algorithm != "reptile",
                 "recompute_inner_steps applies to second-order meta-gradients only (first "
                 "order and Reptile keep no activations of the inner steps)")
            need(self.dataset not in RL_DATASETS,
                 "recompute_inner_steps is not available for reinforcement learning")
            need(self.jit_compile != "true",
                 "recompute_inner_steps does not work with jit_compile=true: XLA merges the "
                 "recomputed steps back into the forward pass, so no memory is saved (auto "
                 "turns XLA off for it)")
        for name in ("num_iterations", "meta_batch_size", "k_shot", "k_query", "num_eval_tasks",
                     "log_every", "checkpoint_every", "n_way", "iterations_per_epoch"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_inner_steps", "num_eval_steps", "validate_every", "seed", "split_seed",
                     "msl_epochs", "first_order_epochs", "inner_batch_size", "train_k_shot"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("inner_lr", "meta_lr", "min_meta_lr", "meta_step_size"):
            value = getattr(self, name)
            positive = isinstance(value, (int, float)) and 0 < value < float("inf")
            need(positive, f"{name} must be a positive number, got {value!r}")
            # Below float32's smallest normal number a rate flushes to 0 in the graph.
            need(not positive or value >= _FLOAT32_TINY,
                 f"{name} must be at least {_FLOAT32_TINY:.3g} (smaller rates are 0 in "
                 f"float32), got {value!r}")
        for name in ("seed", "split_seed"):
            need(getattr(self, name) < 2**32,
                 f"{name} must be below 2**32, got {getattr(self, name)!r}")
        need(self.num_iterations < 2**62,
             f"num_iterations must be below 2**62, got {self.num_iterations!r}")
        need(isinstance(self.meta_gradient_clip, (int, float))
             and 0 <= self.meta_gradient_clip < float("inf"),
             f"meta_gradient_clip must be a non-negative number (0: no clipping), got "
             f"{self.meta_gradient_clip!r}")
        need(isinstance(self.meta_step_size_final, (int, float))
             and 0 <= self.meta_step_size_final < float("inf"),
             f"meta_step_size_final must be a non-negative number, got "
             f"{self.meta_step_size_final!r}")
        need(self.strategy in STRATEGIES,
             f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        need(self.jit_compile in ("auto", "true", "false"),
             f"jit_compile must be auto, true or false, got {self.jit_compile!r}")
        need(self.is_rl or not self.goal_observed,
             f"goal_observed applies to the reinforcement-learning datasets only, not to "
             f"{self.dataset!r}")
        need(not self.goal_observed or self.num_inner_steps == 0,
             f"goal_observed trains the oracle, which sees the goal and does not adapt: it "
             f"needs num_inner_steps=0, got {self.num_inner_steps} (see "
             f"flags/rl_navigation_oracle.flags)")
        if self.dataset != "navigation2d":
            for name in ("normalized_actions", "goal_radius"):
                need(not getattr(self, name), f"{name} applies to navigation2d only, not to "
                                              f"{self.dataset!r}")
        for name in ("rllab_halfcheetah", "original_test_goals"):
            need(self.dataset.startswith("halfcheetah") or not getattr(self, name),
                 f"{name} applies to the HalfCheetah datasets only, not to {self.dataset!r}")
        need(not (self.dataset.startswith("halfcheetah") and self.jit_compile == "true"),
             "jit_compile=true is not possible with the HalfCheetah environments: their "
             "MuJoCo simulations step in Python, which XLA cannot compile")
        need(self.outer_optimizer in OUTER_OPTIMIZERS,
             f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got "
             f"{self.outer_optimizer!r}")
        need(isinstance(self.eval_inner_batch_size, int) and self.eval_inner_batch_size >= -1,
             f"eval_inner_batch_size must be -1 (inner_batch_size) or a non-negative integer, "
             f"got {self.eval_inner_batch_size!r}")
        need(isinstance(self.omniglot_validation_characters, int)
             and self.omniglot_validation_characters >= 0,
             f"omniglot_validation_characters must be a non-negative integer, got "
             f"{self.omniglot_validation_characters!r}")
        need(not self.omniglot_validation_characters
             or self.omniglot_validation_characters >= self.n_way,
             f"omniglot_validation_characters ({self.omniglot_validation_characters}) must be "
             f"0 or at least n_way ({self.n_way}): a validation task needs n_way characters")
        need(self.dataset in ("sine", "custom") + RL_DATASETS or not isinstance(self.n_way, int)
             or self.n_way >= 2 or self.n_way < 1,  # (below 1: "a positive integer", above)
             f"n_way must be at least 2 for classification (one class leaves nothing to tell "
             f"apart), got {self.n_way}")
        need(self.omniglot_resize_filter in OMNIGLOT_RESIZE_FILTERS,
             f"omniglot_resize_filter must be one of {', '.join(OMNIGLOT_RESIZE_FILTERS)}, got "
             f"{self.omniglot_resize_filter!r}")
        image_folders = self.dataset == "folder" or self.dataset.startswith(TFDS_PREFIX)
        for name, applies in (("image_size", image_folders), ("class_split", image_folders),
                              ("image_channels", self.dataset == "folder")):
            need(applies or self.is_rl or getattr(self, name) == getattr(Config(), name),
                 f"{name} applies to dataset folder"
                 f"{'' if name == 'image_channels' else ' and tfds:NAME'} only, not to "
                 f"{self.dataset!r}, where it would be ignored")
        need(self.dataset == "omniglot" or self.omniglot_resize_filter == "lanczos",
             f"omniglot_resize_filter applies to omniglot only, not to {self.dataset!r}")
        need(self.dataset == "omniglot" or not self.omniglot_validation_characters,
             f"omniglot_validation_characters applies to omniglot only, not to "
             f"{self.dataset!r} (folder and tfds data: the val fraction of --class_split)")
        for name in ("fast_batch_size", "cg_iterations", "max_backtracks"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("horizon", "eval_fast_batch_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        need(horizon_problem("horizon", self.horizon) is None,
             horizon_problem("horizon", self.horizon))
        for name in ("max_kl", "eval_step_size_decay"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and 0 < value < float("inf"),
                 f"{name} must be a positive number, got {value!r}")
        need(isinstance(self.cg_damping, (int, float)) and 0 <= self.cg_damping < float("inf"),
             f"cg_damping must be a non-negative number, got {self.cg_damping!r}")
        need(self.policy_output in ("linear", "tanh"),
             f"policy_output must be linear or tanh, got {self.policy_output!r}")
        need(isinstance(self.goal_radius, (int, float)) and 0 <= self.goal_radius < float("inf"),
             f"goal_radius must be a non-negative number, got {self.goal_radius!r}")
        for name in ("backtrack_ratio", "gamma", "gae_lambda"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and 0 < value <= 1
                 and (name != "backtrack_ratio" or value < 1),
                 f"{name} must be in (0, 1{')' if name == 'backtrack_ratio' else ']'}, got "
                 f"{value!r}")
        if self.is_rl:
            need(self.algorithm == "maml",
                 f"dataset {self.dataset} (reinforcement learning) trains with algorithm=maml "
                 f"(MAML-RL, or num_inner_steps=0 for the pretrained baseline), got "
                 f"{self.algorithm!r}")
            need(self.model in ("auto", "mlp"),
                 f"dataset {self.dataset}: the policy is an mlp (model auto or mlp), got "
                 f"{self.model!r}")
            need(self.strategy == "default",
                 f"dataset {self.dataset} trains on one device (strategy=default), got "
                 f"{self.strategy!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def model_name(self):
        """The concrete model: resolves "auto" for the dataset."""
        return self.model_for()

    def model_for(self, input_shape=None):
        """The concrete model for inputs of `input_shape`: resolves "auto".

        "auto" is the paper's network for its datasets, conv4 for the user's
        images (folder, tfds) and, for "custom" tasks, conv4 for image inputs
        `(H, W, C)` and mlp otherwise ("auto" while `input_shape` is unknown).
        """
        if self.model != "auto":
            return self.model
        paper = {"sine": "mlp", "omniglot": "conv4", "miniimagenet": "conv4_maxpool",
                 "folder": "conv4", **{name: "mlp" for name in RL_DATASETS}}
        if self.dataset in paper:
            return paper[self.dataset]
        if input_shape is not None:
            return "conv4" if len(input_shape) == 3 else "mlp"
        return "conv4" if self.dataset.startswith(TFDS_PREFIX) else "auto"

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a Config from a dict, rejecting unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**values)


def _stored_path(path):
    """A relative local path made absolute, so that the run's directory can be evaluated
    and exported from any working directory; `~`, URLs and "" are kept as given."""
    if not path or path.startswith("~") or "://" in path:
        return path
    return os.path.abspath(path)


def as_stored(config):
    """`config` as `save` writes it: relative `data_dir` and `cache_dir` made absolute."""
    return dataclasses.replace(config, data_dir=_stored_path(config.data_dir),
                               cache_dir=_stored_path(config.cache_dir))


def save(config, model_dir):
    """Writes `config.json` into `model_dir` (atomically).

    Relative `data_dir` and `cache_dir` are stored as absolute paths (`as_stored`).
    """
    os.makedirs(model_dir, exist_ok=True)
    return files.write_json(os.path.join(model_dir, CONFIG_FILENAME),
                            as_stored(config).to_dict(), indent=2, sort_keys=True)


def drop_ignored_options(values):
    """Resets the options a saved config's algorithm ignores (saved before they were refused).

    Configs written by earlier versions may hold options that nothing read
    (`ignored_options`: another algorithm's, `first_order` with Reptile, the
    other kind of dataset's, another dataset's), which had no effect then: resetting them to their
    defaults keeps such runs loadable, computing exactly what they did.

    Args:
        values: a dict of `Config` fields.

    Returns:
        `(values, reset)`: a copy with those options at their defaults, and the
        names reset.
    """
    defaults = Config()
    values, reset = dict(values), []
    for name in ignored_options(values):
        if name in values and values[name] != getattr(defaults, name):
            values[name] = getattr(defaults, name)
            reset.append(name)
    return values, reset


_RESETS_REPORTED = set()


def _is_export(path):
    """Whether `path` is a SavedModel or an export base directory of numbered versions."""
    return (os.path.isfile(os.path.join(path, "saved_model.pb"))
            or bool(files.saved_model_versions(path)))


def load(model_dir, flag="--model_dir"):
    """Reads the `Config` saved in `model_dir`.

    Args:
        model_dir: a directory written by `tf_maml.train`.
        flag: the flag that named the directory, for the error message.

    Raises:
        FileNotFoundError: `model_dir` holds no `config.json` (not a training directory).
        ValueError: the file is not a valid config.
    """
    path = os.path.join(model_dir, CONFIG_FILENAME)
    if not os.path.exists(path):
        what = "does not exist" if not os.path.exists(model_dir) else "holds no " + CONFIG_FILENAME
        hint = ""
        if _is_export(model_dir):
            hint = (" (this is an export of tf_maml.export, a SavedModel: evaluate it with "
                    "`python -m tf_maml.evaluate --saved_model=...`, serve it, or load it with "
                    "tf.saved_model.load and call its adapt signature)")
        raise FileNotFoundError(
            f"{model_dir} {what}: {flag} must be a directory written by tf_maml.train{hint}")
    try:
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
        # Every version wrote the dataset (later fields default when missing, for older
        # runs' files): without it the file would load as the default sine run.
        if "dataset" not in values:
            raise ValueError("it names no dataset, which every run's config does")
        values, reset = drop_ignored_options(values)
        if reset and (path, tuple(reset)) not in _RESETS_REPORTED:
            # Once per file: evaluate and export read the config more than once.
            _RESETS_REPORTED.add((path, tuple(reset)))
            logging.warning("%s: %s reset to the default(s): the run's algorithm and dataset "
                            "ignore them (it computed the same)", path, ", ".join(reset))
        return Config.from_dict(values).validate()
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid tf_maml config: {e}") from None


def check_resumable(saved, requested):
    """Raises `ValueError` if `requested` changes what the saved run computes."""
    changed = resume_changes(saved, requested)
    if changed:
        raise ValueError(
            "the model directory holds a run with a different configuration ("
            + "; ".join(changed) + "). Use a new --model_dir, or the same flags to resume.")


def resume_changes(saved, requested):
    """What `requested` changes that a resume of `saved` may not: `["field: old -> new", ...]`.

    Every field outside `RESUMABLE_FIELDS`, and `num_iterations` where it stretches a
    schedule (MAML++, Reptile's annealing), and XLA for reinforcement learning.
    """
    before, after = saved.to_dict(), requested.to_dict()
    # "auto" and the model it resolves to are the same network (the quick start's
    # default run may be resumed with flags/sine.flags, which names "mlp").
    if saved.model_name == requested.model_name:
        after["model"] = before["model"]
    changed = [f"{k}: {v!r} -> {after[k]!r}" for k, v in before.items()
               if k not in RESUMABLE_FIELDS and after[k] != v]
    if saved.is_rl and (saved.jit_compile == "true") != (requested.jit_compile == "true"):
        # XLA's CPU kernels draw other numbers from the same stateless seeds (even with the
        # algorithm named), so the rest of the run would sample other episodes.
        changed.append(f"jit_compile: {saved.jit_compile!r} -> {requested.jit_compile!r}, "
                       f"which samples other episodes from the same seeds")
    if saved.num_iterations != requested.num_iterations:
        # The outer optimizer's schedule spans num_iterations for these algorithms.
        schedule = ("MAML++'s cosine schedule of the meta learning rate"
                    if saved.algorithm == "mamlpp" else
                    "Reptile's annealing of meta_step_size"
                    if saved.algorithm == "reptile"
                    and saved.meta_step_size != saved.meta_step_size_final else None)
        if schedule:
            changed.append(f"num_iterations: {saved.num_iterations!r} -> "
                           f"{requested.num_iterations!r}, which would stretch {schedule}")
    return changed
