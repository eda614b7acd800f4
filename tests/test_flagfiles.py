"""The flagfiles in flags/ parse into valid configs that hold the paper's recipes."""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest
from absl import flags

from tf_maml import cli
from tf_maml.config import Config

FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags")
FLAGFILES = sorted(glob.glob(os.path.join(FLAGS_DIR, "*.flags")))
FIELDS = {field.name: field for field in dataclasses.fields(Config)}

# The paper's hyperparameters (section 5 and appendix A.1), per experiment family.
_CHEETAH = dict(outer_optimizer="trpo", cg_iterations=10, cg_damping=1e-5, backtrack_ratio=0.8,
                max_backtracks=15, gamma=0.99, gae_lambda=1.0, num_eval_steps=3,
                num_eval_tasks=40, eval_step_size_decay=0.5, eval_fast_batch_size=20,
                policy_output="linear")
RECIPES = {
    "omniglot_5way": dict(dataset="omniglot", n_way=5, meta_batch_size=32, num_inner_steps=1,
                          inner_lr=0.4, meta_lr=1e-3, num_iterations=60000,
                          augment_rotations=True, omniglot_split="paper",
                          meta_gradient_clip=0.0),  # the original clips for MiniImagenet only
    "omniglot_20way": dict(dataset="omniglot", n_way=20, meta_batch_size=16, num_inner_steps=5,
                           inner_lr=0.1, meta_lr=1e-3, num_iterations=60000,
                           augment_rotations=True, omniglot_split="paper", meta_gradient_clip=0.0),
    "omniglot_20way_1shot_lake": dict(dataset="omniglot", n_way=20, meta_batch_size=16,
                                      num_inner_steps=5, inner_lr=0.1, meta_lr=1e-3,
                                      num_iterations=60000, augment_rotations=True,
                                      omniglot_split="lake"),
    "miniimagenet_5way": dict(dataset="miniimagenet", n_way=5, meta_batch_size=4,
                              num_inner_steps=5, inner_lr=0.01, k_query=15, num_eval_steps=10,
                              model="conv4_maxpool", meta_gradient_clip=10.0),
    "sine": dict(dataset="sine", k_shot=10, meta_batch_size=25, inner_lr=0.01,
                 num_iterations=70000),
    # The family: each paper's own recipe.
    "mamlpp_omniglot_20way": dict(
        algorithm="mamlpp", dataset="omniglot", n_way=20, k_shot=1, meta_batch_size=8,
        num_inner_steps=5, num_eval_steps=5, inner_lr=0.1, learn_inner_lr=True, per_step_bn=True,
        msl_epochs=10, iterations_per_epoch=500, meta_lr=1e-3, min_meta_lr=1e-5,
        num_iterations=50000, model="conv4"),
    "mamlpp_omniglot_20way_1shot_lake": dict(
        algorithm="mamlpp", dataset="omniglot", n_way=20, k_shot=1, meta_batch_size=8,
        num_inner_steps=5, num_eval_steps=5, inner_lr=0.1, num_iterations=50000,
        omniglot_split="lake"),
    "anil_omniglot_20way": dict(algorithm="anil", n_way=20, meta_batch_size=16,
                                num_inner_steps=5, inner_lr=0.1, num_iterations=60000),
    "metasgd_omniglot_5way": dict(algorithm="metasgd", n_way=5, meta_batch_size=32,
                                  num_inner_steps=1, inner_lr=0.4),
    "reptile_omniglot_5way": dict(
        algorithm="reptile", n_way=5, k_shot=1, train_k_shot=10, meta_batch_size=5,
        num_inner_steps=5, inner_optimizer="adam", inner_lr=0.001, inner_batch_size=10,
        eval_inner_batch_size=5,
        meta_step_size=1.0, meta_step_size_final=0.0, num_eval_steps=50,
        num_iterations=100000, augment_rotations=True, omniglot_split="paper",
        transductive=True, transductive_support=False),
    "reptile_omniglot_20way": dict(
        algorithm="reptile", n_way=20, k_shot=1, train_k_shot=10, meta_batch_size=5,
        num_inner_steps=10, inner_optimizer="adam", inner_lr=0.0005, inner_batch_size=20,
        eval_inner_batch_size=10,
        meta_step_size=1.0, meta_step_size_final=0.0, num_eval_steps=50,
        num_iterations=200000, augment_rotations=True, omniglot_split="paper",
        transductive=True, transductive_support=False),
    "sine_reptile": dict(algorithm="reptile", dataset="sine", k_shot=10, train_k_shot=50,
                         num_inner_steps=5, num_eval_steps=32, inner_optimizer="sgd",
                         inner_lr=0.02, inner_batch_size=10, meta_step_size=0.1,
                         num_iterations=30000),
    # Section 5.3: 2D navigation with MAML-TRPO (the original code's recipe; meta-batch 20 of
    # the checkpoint its evaluation loaded, chosen on validation goals).
    "rl_navigation": dict(dataset="navigation2d", meta_batch_size=20, fast_batch_size=20,
                          horizon=100, inner_lr=0.5, outer_optimizer="trpo",
                          max_kl=0.01, cg_iterations=10, cg_damping=1e-5, backtrack_ratio=0.8,
                          max_backtracks=15, gamma=0.99, gae_lambda=1.0, num_eval_steps=3,
                          num_eval_tasks=40, eval_step_size_decay=0.5, num_iterations=100,
                          policy_output="linear", goal_radius=0.01, normalized_actions=True,
                          eval_fast_batch_size=40, sample_by_steps=True),
    # Section 5.3: HalfCheetah goal velocity / direction, the settings of the checkpoints the
    # original evaluation scripts loaded (velocity: fbs10_mbs40 itr 475; direction:
    # fbs20_mbs40_mlr0.02 itr 100).
    "rl_cheetah_vel": dict(dataset="halfcheetah_velocity", meta_batch_size=40,
                           fast_batch_size=10, horizon=200, inner_lr=0.1, max_kl=0.01,
                           num_iterations=500, **_CHEETAH),
    "rl_cheetah_dir": dict(dataset="halfcheetah_direction", meta_batch_size=40,
                           fast_batch_size=20, horizon=200, inner_lr=0.1, max_kl=0.02,
                           num_iterations=100, **_CHEETAH),
}
ALGORITHM_PREFIXES = ("mamlpp_", "anil_", "metasgd_", "reptile_")


def _parse(path):
    """The `Config` absl makes of a flagfile, exactly as `python -m tf_maml.train` would."""
    flag_values = flags.FlagValues()
    cli.define_config_flags(flag_values=flag_values)
    flag_values(["train", *cli.expand_flagfiles([f"--flagfile={path}"])])
    return {name: flag_values[name].value for name in FIELDS if flag_values[name].present}


def test_there_are_flagfiles_for_every_paper_setting():
    names = {os.path.basename(path)[:-len(".flags")] for path in FLAGFILES}
    for dataset, ways in (("omniglot", (5, 20)), ("miniimagenet", (5,))):
        for n_way in ways:
            for k_shot in (1, 5):
                name = f"{dataset}_{n_way}way_{k_shot}shot"
                assert {name, name + "_first_order"} <= names
    assert {"sine", "sine_first_order", "sine_pretrained"} <= names
    for task in ("navigation", "cheetah_vel", "cheetah_dir"):
        assert {f"rl_{task}", f"rl_{task}_pretrained", f"rl_{task}_oracle"} <= names


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_is_a_valid_config_with_the_paper_recipe(path):
    name = os.path.basename(path)[:-len(".flags")]
    values = _parse(path)
    if values.get("dataset") == "miniimagenet":
        values.setdefault("data_dir", "DIR")  # given on the command line (no TFDS fallback)
    config = Config(**values).validate()
    # A usage line in its header names the file itself.
    with open(path) as f:
        usage = [line for line in f if line.startswith("# python -m")]
    assert all(f"--flagfile=flags/{name}.flags" in line for line in usage), usage

    family = max((prefix for prefix in RECIPES if name.startswith(prefix)), key=len)
    for field, expected in RECIPES[family].items():
        assert getattr(config, field) == pytest.approx(expected), (name, field)
    algorithm = next((p[:-1] for p in ALGORITHM_PREFIXES if name.startswith(p)), None)
    algorithm = algorithm or next((a for a in ("anil", "metasgd", "mamlpp", "reptile")
                                   if name.endswith("_" + a)), "maml")
    assert config.algorithm == algorithm, name
    if "shot" in name:
        k_shot = int(name.split("way_")[1].split("shot")[0])
        assert config.k_shot == k_shot
    assert config.first_order == name.endswith("_first_order")
    if config.dataset == "omniglot":
        assert (config.omniglot_split == "lake") == name.endswith("_lake"), name
    if name.endswith("_fc"):
        assert config.model == "fc"
    elif "omniglot" in family:
        assert config.model == "conv4"
    if name == "sine_pretrained" or name.endswith(("_pretrained", "_oracle")):
        assert config.num_inner_steps == 0
    elif name in ("sine", "sine_first_order", "sine_anil", "sine_metasgd") or (
            name.startswith("rl_")):
        assert config.num_inner_steps == 1
    # Only the oracles see the goal.
    assert config.goal_observed == name.endswith("_oracle")


def test_every_algorithm_has_flagfiles_on_sine_and_omniglot():
    names = {os.path.basename(path)[:-len(".flags")] for path in FLAGFILES}
    for algorithm in ("anil", "metasgd", "mamlpp", "reptile"):
        assert f"sine_{algorithm}" in names
        assert any(n.startswith(f"{algorithm}_omniglot") for n in names), algorithm


def test_absl_parses_a_bad_flagfile_value_as_an_error(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--algorithm=mamlpp\n--num_inner_steps=zero\n")
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(str(bad))


def test_a_flagfile_includes_the_file_beside_it_from_any_directory(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "more").mkdir(parents=True)
    (recipes / "base.flags").write_text("# the base\n--n_way=7\n// also a comment\n\n--k_shot=3\n")
    (recipes / "more" / "child.flags").write_text("--flagfile=../base.flags\n--k_shot=4\n")
    (recipes / "top.flags").write_text("--seed=5\n--flagfile=more/child.flags\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Each included file's flags in its place, later flags overriding earlier ones (as absl).
    assert cli.expand_flagfiles([f"--flagfile={recipes / 'top.flags'}", "--k_shot=9", "--",
                                 "--flagfile=x"]) == [
        "--seed=5", "--n_way=7", "--k_shot=3", "--k_shot=4", "--k_shot=9", "--", "--flagfile=x"]
    # A path not beside the including file is read from the working directory, as absl does.
    (elsewhere / "cwd.flags").write_text("--n_way=2\n")
    (recipes / "uses_cwd.flags").write_text("--flagfile=cwd.flags\n")
    assert cli.expand_flagfiles(["--flagfile", str(recipes / "uses_cwd.flags")]) == ["--n_way=2"]
    # The shipped recipes include each other by name: the same config from any directory.
    assert _parse(os.path.join(FLAGS_DIR, "anil_omniglot_20way_1shot.flags"))["n_way"] == 20


def test_a_missing_or_circular_flagfile_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.flags").write_text("--flagfile=gone.flags\n")
    with pytest.raises(ValueError, match=r"cannot read flagfile gone.flags \(included by "
                                         r"a.flags\): No such file"):
        cli.expand_flagfiles(["--flagfile=a.flags"])
    (tmp_path / "b.flags").write_text("--flagfile=c.flags\n")
    (tmp_path / "c.flags").write_text("--flagfile=b.flags\n")
    with pytest.raises(ValueError, match=r"flagfile .*b.flags \(included by .*c.flags\) "
                                         "includes itself"):
        cli.expand_flagfiles(["--flagfile=b.flags"])
    # The command line: a shipped recipe from another directory reaches the config (whose
    # validation then refuses the bad value, before anything runs); a missing file is one line.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    recipe = os.path.join(FLAGS_DIR, "sine_anil.flags")
    result = subprocess.run([sys.executable, "-m", "tf_maml.train", f"--flagfile={recipe}",
                             f"--model_dir={tmp_path / 'run'}", "--num_inner_steps=-1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "num_inner_steps" in result.stderr, result.stderr[-2000:]
    assert "flagfile" not in result.stderr, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "tf_maml.train", "--flagfile=a.flags",
                             f"--model_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot read flagfile gone.flags (included by a.flags): No such file or "
        "directory"), result.stderr[-2000:]
