"""The README's Python examples run as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2, "the README's library and RL examples are missing"
    outputs = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
        kind = "rl" if "from tf_maml import rl" in block else "library"
        outputs[kind] = capsys.readouterr().out.strip().splitlines()[-1]
    # The library example prints the query MSE after adapting a meta-trained model (an
    # untrained one stays near 3).
    assert float(outputs["library"]) < 1.5
    # The RL example prints the average return after 0, 1 and 2 adaptation steps.
    returns = [float(x) for x in outputs["rl"].strip("[]").split()]
    assert len(returns) == 3 and all(-200 < r < 0 for r in returns)
