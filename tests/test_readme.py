"""The README's Python examples run as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _kind(block):
    if "from tf_maml import rl" in block:
        return "rl"
    return "own_data" if "folder_tasks" in block else "library"


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    blocks = _python_blocks()
    kinds = [_kind(block) for block in blocks]
    assert {"library", "rl", "own_data"} <= set(kinds), "a README example is missing"
    omniglot = os.environ.get("TF_MAML_OMNIGLOT_DIR")
    if omniglot and not os.path.exists(os.path.join(omniglot, "images_background.zip")):
        raise FileNotFoundError(f"TF_MAML_OMNIGLOT_DIR={omniglot} holds no "
                                "images_background.zip")
    monkeypatch.chdir(tmp_path)  # the examples write runs/ where they run
    outputs = {}
    for block, kind in zip(blocks, kinds):
        if kind == "own_data" and not omniglot:
            continue  # it reads the Omniglot archive: checked where the data is (CI)
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
        outputs[kind] = capsys.readouterr().out.strip().splitlines()[-1]
    if omniglot:
        # The own-data example prints the served adapt signature's accuracy on one 5-way
        # task of held-out characters (chance: 0.2; about 0.7 on average).
        assert float(outputs["own_data"]) >= 0.4
        assert os.path.exists(os.path.join("runs", "own_data", "best.keras"))
        assert os.path.exists(os.path.join("runs", "own_data", "log.csv"))
    # The library example prints the query MSE after adapting a meta-trained model (an
    # untrained one stays near 3).
    assert float(outputs["library"]) < 1.5
    # The RL example prints the average return after 0, 1 and 2 adaptation steps.
    returns = [float(x) for x in outputs["rl"].strip("[]").split()]
    assert len(returns) == 3 and all(-200 < r < 0 for r in returns)
