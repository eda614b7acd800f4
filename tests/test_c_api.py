"""The export as TF Serving runs it: C++ LoadSavedModel through the TensorFlow C API.

TF Serving loads a SavedModel with the C++ `LoadSavedModel` (tag "serve") and runs
signatures by feeding and fetching the graph tensors named in the MetaGraphDef's
signature_def, in one long-lived session. The Python loaders the other export tests use are
different implementations, so this test compiles `tests/c_api/load_and_run.c` with gcc
against the C API shipped in the TensorFlow wheel, has it load an export written by the
command line (`python -m tf_maml.train`, `python -m tf_maml.export`) and run a sequence of
requests, good and malformed, in one session, and compares every answer with
`tf.saved_model.load(path).signatures[...]`.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "c_api", "load_and_run.c")
TOLERANCE = dict(rtol=1e-6, atol=1e-6)  # same graph, same kernels
LOAD_SYMBOL = "TF_LoadSessionFromSavedModel"
LIBRARIES = ("libtensorflow_cc.so.2", "libtensorflow.so.2")  # the wheel's, then libtensorflow's


def _exports(library, symbol):
    """Whether `library` exports `symbol`; None when nm cannot tell."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    result = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True,
                            text=True)
    if result.returncode != 0:
        return None
    return any(line.split()[-1].split("@")[0] == symbol
               for line in result.stdout.splitlines() if line.split())


def _c_api():
    """(gcc, include dir, lib dir, library) or pytest.skip with the reason."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot compile the C API client")
    include, lib_dir = tf.sysconfig.get_include(), tf.sysconfig.get_lib()
    header = os.path.join(include, "tensorflow", "c", "c_api.h")
    if not os.path.isfile(header):
        pytest.skip(f"TensorFlow C API header missing: {header}")
    present = [name for name in LIBRARIES if os.path.isfile(os.path.join(lib_dir, name))]
    if not present:
        pytest.skip(f"no TensorFlow C API library ({', '.join(LIBRARIES)}) in {lib_dir}")
    for name in present:
        if _exports(os.path.join(lib_dir, name), LOAD_SYMBOL) is not False:
            return gcc, include, lib_dir, name
    pytest.skip(f"{', '.join(present)} in {lib_dir} do not export {LOAD_SYMBOL}")


def _compile(tmp_dir):
    """Starts gcc in the background; returns (process, binary path)."""
    gcc, include, lib_dir, library = _c_api()
    binary = os.path.join(tmp_dir, "load_and_run")
    command = [gcc, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-o", binary, SOURCE,
               f"-I{include}", f"-L{lib_dir}", f"-l:{library}"]
    if os.path.isfile(os.path.join(lib_dir, "libtensorflow_framework.so.2")):
        command.append("-l:libtensorflow_framework.so.2")
    command.append(f"-Wl,-rpath,{lib_dir}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    return process, binary, command


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"


def _signature_defs(path):
    """{signature: ({input key: tensor name}, {output key: tensor name})} of the 'serve' graph."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    serve = [g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags]
    assert len(serve) == 1, "expected one MetaGraphDef tagged 'serve'"
    return {key: ({k: v.name for k, v in sig.inputs.items()},
                  {k: v.name for k, v in sig.outputs.items()})
            for key, sig in serve[0].signature_def.items()}


def _sine_task(seed, k=10, q=7):
    rng = np.random.default_rng(seed)
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
    support_x = rng.uniform(-5.0, 5.0, (k, 1)).astype(np.float32)
    query_x = np.linspace(-5.0, 5.0, q, dtype=np.float32)[:, None]
    return {"support_x": support_x,
            "support_y": (amplitude * np.sin(support_x - phase)).astype(np.float32),
            "query_x": query_x}


TASK, OTHER_TASK = _sine_task(0), _sine_task(1)
CUSTOM = {"inner_steps": np.int32(3), "inner_lr": np.float32(0.02)}
BAD_SUPPORT_X = {**TASK, "support_x": np.arange(20, dtype=np.float32).reshape(10, 2)}

# (label, signature, inputs), run in this order in ONE C session.
REQUESTS = [
    ("serve", "serving_default", {"x": TASK["query_x"]}),
    ("adapt", "adapt", TASK),
    ("adapt_custom", "adapt_custom", {**TASK, **CUSTOM}),
    ("adapt_custom_0_steps", "adapt_custom",
     {**TASK, "inner_steps": np.int32(0), "inner_lr": np.float32(0.02)}),
    ("adapted_weights", "adapted_weights",
     {"support_x": TASK["support_x"], "support_y": TASK["support_y"]}),
    ("bad_support_x", "adapt", BAD_SUPPORT_X),
    ("adapt_after_bad", "adapt", OTHER_TASK),
    ("bad_inner_steps", "adapt_custom",
     {**OTHER_TASK, "inner_steps": np.int32(-1), "inner_lr": np.float32(0.02)}),
    ("adapt_custom_after_bad", "adapt_custom", {**OTHER_TASK, **CUSTOM}),
    ("adapt_again", "adapt", TASK),
]
BAD = {"bad_support_x": "support_x must have shape [num_examples, 1]",
       "bad_inner_steps": "inner_steps must be in [0, "}


def _format_tensor(name, value):
    value = np.asarray(value)
    dtype = {np.dtype(np.float32): "float", np.dtype(np.int32): "int32"}[value.dtype]
    values = [repr(float(v)) if dtype == "float" else str(int(v)) for v in value.ravel()]
    return " ".join([name, dtype, str(value.ndim), *map(str, value.shape), *values])


def _write_requests(path, signature_defs):
    """Writes the C program's request file; returns each request's output keys in order."""
    lines, output_keys = [str(len(REQUESTS))], {}
    for label, signature, inputs in REQUESTS:
        input_names, output_names = signature_defs[signature]
        assert set(inputs) == set(input_names), (signature, sorted(input_names))
        keys = sorted(output_names)
        output_keys[label] = keys
        lines.append(f"{label} {len(inputs)} {len(keys)}")
        lines.extend(_format_tensor(input_names[k], v) for k, v in sorted(inputs.items()))
        lines.extend(output_names[k] for k in keys)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return output_keys


def _parse_results(stdout, output_keys):
    """{label: {output key: array}} for OK requests, {label: (code, name, message)} for errors."""
    lines = stdout.splitlines()
    assert lines and lines[0] == "LOADED", stdout[-2000:]
    results, i = {}, 1
    while i < len(lines):
        fields = lines[i].split(" ", 4)
        assert fields[0] == "REQUEST", lines[i]
        label = fields[1]
        if fields[2] == "ERROR":
            results[label] = (int(fields[3]), fields[4].split(" ", 1)[0],
                              fields[4].split(" ", 1)[1].replace("\\n", "\n"))
            i += 1
            continue
        outputs = {}
        for n, key in enumerate(output_keys[label]):
            tokens = lines[i + 1 + n].split()
            assert tokens[:2] == ["OUTPUT", str(n)] and tokens[2] == "float", tokens[:3]
            ndims = int(tokens[3])
            shape = [int(d) for d in tokens[4:4 + ndims]]
            outputs[key] = np.array([float(v) for v in tokens[4 + ndims:]],
                                    np.float32).reshape(shape)
        results[label] = outputs
        i += 1 + len(output_keys[label])
    assert list(results) == [label for label, _, _ in REQUESTS], list(results)
    return results


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(export path, C results by label, Python-loaded SavedModel)."""
    tmp = str(tmp_path_factory.mktemp("c_api"))
    gcc, binary, command = _compile(tmp)  # compiles and links while the model trains
    try:
        model_dir, export_dir = os.path.join(tmp, "run"), os.path.join(tmp, "export")
        _cli("tf_maml.train", f"--model_dir={model_dir}", "--num_iterations=20", "--noevaluate",
             "--log_every=10", "--checkpoint_every=20", "--validate_every=0")
        _cli("tf_maml.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    finally:
        compile_output = gcc.communicate(timeout=300)[0]
    assert gcc.returncode == 0, f"{' '.join(command)}\n{compile_output}"
    versions = [v for v in os.listdir(export_dir) if v.isdigit()]
    assert len(versions) == 1, os.listdir(export_dir)
    path = os.path.join(export_dir, versions[0])

    requests = os.path.join(tmp, "requests.txt")
    output_keys = _write_requests(requests, _signature_defs(path))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([binary, path, requests], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, f"load_and_run failed:\n{run.stdout}\n{run.stderr}"
    return path, _parse_results(run.stdout, output_keys), tf.saved_model.load(path)


def _python(model, signature, inputs):
    outputs = model.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def _assert_same(c_outputs, py_outputs, label):
    assert sorted(c_outputs) == sorted(py_outputs), label
    for key in py_outputs:
        assert c_outputs[key].shape == py_outputs[key].shape, (label, key)
        np.testing.assert_allclose(c_outputs[key], py_outputs[key], **TOLERANCE,
                                   err_msg=f"{label}/{key}: C API != tf.saved_model.load")


def test_good_requests_match_python_loader(served):
    _, c_results, model = served
    for label, signature, inputs in REQUESTS:
        if label not in BAD:
            assert isinstance(c_results[label], dict), (label, c_results[label])
            _assert_same(c_results[label], _python(model, signature, inputs), label)
    # The comparisons are not vacuous: adaptation changes the answer, 0 steps does not.
    q = len(TASK["query_x"])
    assert c_results["serve"]["predictions"].shape == (q, 1)
    assert not np.allclose(c_results["adapt"]["predictions"], c_results["serve"]["predictions"])
    assert not np.allclose(c_results["adapt_custom"]["predictions"],
                           c_results["adapt"]["predictions"])
    np.testing.assert_allclose(c_results["adapt_custom_0_steps"]["predictions"],
                               c_results["serve"]["predictions"], **TOLERANCE)
    assert c_results["adapted_weights"]  # one output per model weight


def test_malformed_requests_are_invalid_argument_and_session_recovers(served):
    _, c_results, model = served
    requests = {label: (signature, inputs) for label, signature, inputs in REQUESTS}
    for label, message in BAD.items():
        assert isinstance(c_results[label], tuple), f"{label} succeeded in C: {c_results[label]}"
        code, name, c_message = c_results[label]
        assert name == "INVALID_ARGUMENT", (label, code, name, c_message)
        assert message in c_message, (label, c_message)
        with pytest.raises(tf.errors.InvalidArgumentError) as python_error:
            _python(model, *requests[label])
        assert message in str(python_error.value), (label, str(python_error.value))
    # The same session answers the next good requests correctly...
    for label in ("adapt_after_bad", "adapt_custom_after_bad"):
        _assert_same(c_results[label], _python(model, *requests[label]), label)
    # ...and statelessly: the first request repeated after the failures gives the same bits.
    np.testing.assert_array_equal(c_results["adapt_again"]["predictions"],
                                  c_results["adapt"]["predictions"])
