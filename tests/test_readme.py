"""The README's Python examples run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _kind(block):
    if "from tf_maml import rl" in block:
        return "rl"
    return "own_data" if "folder_tasks" in block else "library"


@pytest.mark.parametrize("kind", ["library", "rl", "own_data"])
def test_readme_python_examples_run(kind, capsys, tmp_path, monkeypatch):
    """Each kind of README example runs as written, in a fresh directory, and prints what its
    text says it prints."""
    blocks = [block for block in _python_blocks() if _kind(block) == kind]
    assert blocks, f"the README has no {kind} example"
    omniglot = os.environ.get("TF_MAML_OMNIGLOT_DIR")
    if kind == "own_data":
        if not omniglot:
            pytest.skip("the own-data example reads the Omniglot archive: "
                        "TF_MAML_OMNIGLOT_DIR is not set")
        if not os.path.exists(os.path.join(omniglot, "images_background.zip")):
            raise FileNotFoundError(f"TF_MAML_OMNIGLOT_DIR={omniglot} holds no "
                                    "images_background.zip")
    monkeypatch.chdir(tmp_path)  # the examples write runs/ where they run
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.strip().splitlines()
    output = printed[-1]
    if kind == "own_data":
        # The served adapt signature's accuracy on one 5-way task of held-out characters
        # (chance: 0.2; about 0.7 on average).
        assert float(output) >= 0.4
        assert os.path.exists(os.path.join("runs", "own_data", "best.keras"))
        assert os.path.exists(os.path.join("runs", "own_data", "log.csv"))
    elif kind == "library":
        # The query MSE after adapting a meta-trained model with the algorithm's rule, then
        # with the core alone (an untrained one stays near 3).
        assert float(printed[-2]) < 1.5 and float(output) < 1.5
    else:
        # The average return after 0, 1 and 2 adaptation steps.
        returns = [float(x) for x in output.strip("[]").split()]
        assert len(returns) == 3 and all(-200 < r < 0 for r in returns)
        assert len(set(returns)) == 3  # each adaptation step moved the policy


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_the_command_line_table_matches_the_flags_and_their_defaults():
    """Every `Config` field is in the README's flag table, with its real default."""
    import dataclasses

    from tf_maml.config import Config

    defaults = Config()
    text = _readme()
    lines = text[text.index("| flag | default | meaning |"):].splitlines()[2:]
    listed = set()
    for line in lines:
        if not line.startswith("|"):
            break
        names_cell, default_cell = [cell.strip() for cell in line.strip("|").split(" | ")][:2]
        names = re.findall(r"--(?:\[no\])?(\w+)", names_cell)
        listed.update(names)
        documented = [d.strip().strip("`") for d in default_cell.split(", ")]
        if len(documented) != len(names):
            assert len(documented) == 1, f"{names}: {len(documented)} defaults for them"
            continue
        for name, text_default in zip(names, documented):
            if not hasattr(defaults, name):
                continue  # a CLI-only flag (model_dir, evaluate, ...)
            value = getattr(defaults, name)
            text_default = re.sub(r"\s*\(.*\)$", "", text_default)  # "0 (the env's)"
            if isinstance(value, bool):
                assert text_default in (("on", "true") if value else ("off", "false")), name
            elif isinstance(value, (int, float)):
                assert float(text_default) == value, f"--{name}: {text_default} vs {value}"
            elif value == "":
                assert text_default == "–", f"--{name}: {text_default!r} vs empty"
            else:
                assert text_default == value, f"--{name}: {text_default!r} vs {value!r}"
    missing = [f.name for f in dataclasses.fields(Config) if f.name not in listed]
    assert not missing, f"flags missing from the README's table: {missing}"


def _commands():
    """(program, flag names, flagfiles) of every command line the README shows."""
    text = _readme().replace("\\\n", " ")
    pattern = r"(python -m tf_maml\.(?:train|evaluate|export)|python bench/\w+\.py)([^`\n]*)"
    for program, rest in re.findall(pattern, text):
        names = re.findall(r"(?:^|\s)--([a-z_]+)", rest)
        flagfiles = re.findall(r"--flagfile=(\S+\.flags)", rest)
        yield program, names, flagfiles


def test_every_command_in_the_readme_uses_flags_that_exist():
    import subprocess
    import sys

    used, flagfiles = {}, set()
    for program, names, files in _commands():
        used.setdefault(program, set()).update(names)
        flagfiles.update(f for f in files if "$" not in f)
    assert "python -m tf_maml.train" in used and "python bench/meta_step.py" in used
    for path in flagfiles:
        assert os.path.exists(os.path.join(ROOT, path)), f"the README names {path}"
    text = _readme()
    start = text.index("\n## Command line")
    command_line_section = text[start:text.index("\n## ", start + 1)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    for program, names in used.items():
        names -= {"flagfile"}
        if not names:
            continue
        result = subprocess.run([sys.executable, *program.split()[1:], "--helpfull"],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        defined = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", result.stdout, flags=re.M))
        if program.startswith("python -m tf_maml."):
            # The program's own flags (not Config's: the table test covers those) are
            # documented in the Command line section.
            module = program.rsplit(".", 1)[1]
            own = re.search(rf"^\S*tf_maml[/.]{module}(?:\.py)?:\n((?:[ \t].*\n?)*)",
                            result.stdout, flags=re.M)
            assert own, f"{program} --helpfull lists no flags of its own"
            own = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", own.group(1), flags=re.M))
            undocumented = sorted(n for n in own if not re.search(
                rf"--(?:\[no\])?{n}\b", command_line_section))
            assert not undocumented, (f"{program} defines flags the README's Command line "
                                      f"section does not mention: {undocumented}")
        if not defined:  # an argparse script
            result = subprocess.run([sys.executable, *program.split()[1:], "--help"],
                                    capture_output=True, text=True, cwd=ROOT, env=env,
                                    timeout=300)
            defined = set(re.findall(r"--(\w+)", result.stdout))
        assert defined, f"{program} --helpfull: {result.stderr[-2000:]}"
        unknown = sorted(n for n in names
                         if n not in defined and not (n.startswith("no") and n[2:] in defined))
        assert not unknown, f"the README runs {program} with flags it does not define: {unknown}"
