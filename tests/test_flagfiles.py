"""The flagfiles in flags/ parse into valid configs that hold the paper's recipes."""

import dataclasses
import glob
import os

import pytest

from tf_maml.config import Config

FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags")
FLAGFILES = sorted(glob.glob(os.path.join(FLAGS_DIR, "*.flags")))
FIELDS = {field.name: field for field in dataclasses.fields(Config)}

# The paper's hyperparameters (section 5 and appendix A.1), per experiment family.
RECIPES = {
    "omniglot_5way": dict(dataset="omniglot", n_way=5, meta_batch_size=32, num_inner_steps=1,
                          inner_lr=0.4, meta_lr=1e-3, num_iterations=60000,
                          augment_rotations=True, omniglot_split="paper"),
    "omniglot_20way": dict(dataset="omniglot", n_way=20, meta_batch_size=16, num_inner_steps=5,
                           inner_lr=0.1, meta_lr=1e-3, num_iterations=60000,
                           augment_rotations=True, omniglot_split="paper"),
    "miniimagenet_5way": dict(dataset="miniimagenet", n_way=5, meta_batch_size=4,
                              num_inner_steps=5, inner_lr=0.01, k_query=15, num_eval_steps=10,
                              model="conv4_maxpool"),
    "sine": dict(dataset="sine", k_shot=10, meta_batch_size=25, inner_lr=0.01,
                 num_iterations=70000),
}


def _parse(path):
    """{field: value} from a flagfile, converted as absl would for the Config flags."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            assert line.startswith("--"), f"{path}: not a flag: {line!r}"
            name, has_value, text = line[2:].partition("=")
            if not has_value:
                name, text = (name[2:], "false") if name.startswith("no") else (name, "true")
            if name == "flagfile":  # nested, relative to the repository root
                values.update(_parse(os.path.join(os.path.dirname(FLAGS_DIR), text)))
                continue
            assert name in FIELDS, f"{path}: --{name} is not a Config flag"
            kind = FIELDS[name].type
            if kind in (bool, "bool"):
                value = text == "true"
            elif kind in (int, "int"):
                value = int(text)
            elif kind in (float, "float"):
                value = float(text)
            else:
                value = text
            values[name] = value
    return values


def test_there_are_flagfiles_for_every_paper_setting():
    names = {os.path.basename(path)[:-len(".flags")] for path in FLAGFILES}
    for dataset, ways in (("omniglot", (5, 20)), ("miniimagenet", (5,))):
        for n_way in ways:
            for k_shot in (1, 5):
                name = f"{dataset}_{n_way}way_{k_shot}shot"
                assert {name, name + "_first_order"} <= names
    assert {"sine", "sine_first_order", "sine_pretrained"} <= names


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

    family = next(prefix for prefix in RECIPES if name.startswith(prefix))
    for field, expected in RECIPES[family].items():
        assert getattr(config, field) == pytest.approx(expected), (name, field)
    if "shot" in name:
        k_shot = int(name.split("way_")[1].split("shot")[0])
        assert config.k_shot == k_shot
    assert config.first_order == name.endswith("_first_order")
    if name.endswith("_fc"):
        assert config.model == "fc"
    elif family.startswith("omniglot"):
        assert config.model == "conv4"
    if name == "sine_pretrained":
        assert config.num_inner_steps == 0
    elif family == "sine":
        assert config.num_inner_steps == 1
