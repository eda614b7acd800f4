"""A small client for a tf_maml model served by TF Serving (REST and gRPC).

REST needs only numpy and the standard library; gRPC needs `grpcio`,
`tensorflow` and `tensorflow-serving-api`.

    # adapt to 10 points of a sine wave, predict 50 others (REST, port 8501)
    python export/client.py --url=http://localhost:8501 --model=sine --demo=sine
    # the same over gRPC (port 8500)
    python export/client.py --grpc=localhost:8500 --model=sine --demo=sine
    # two tasks in one request, REST's row format, signature adapt_tasks
    python export/client.py --url=http://localhost:8501 --model=sine --demo=sine_tasks

One-task signatures (`adapt`, ...) use REST's columnar `"inputs"` format: the
row format needs every input to have the same first dimension, which support
and query sets usually do not. The task-major signatures (`adapt_tasks`,
`adapt_tasks_custom`) work in both; in the row format every instance is one
task.

Inputs must follow the training data's conventions (see export/README.md):
float32; Omniglot images [k, 28, 28, 1] in [0, 1] with ink = 1 on a 0
background; MiniImagenet [k, 84, 84, 3] RGB in [0, 1]; or, for image models,
encoded PNG/JPEG bytes through `adapt_images`, which preprocesses them as
training did.
"""

import argparse
import base64
import json
import urllib.error
import urllib.request

import numpy as np

__all__ = ["rest_body", "rest_predict", "grpc_request", "grpc_predict", "grpc_channel",
           "outputs_from_grpc", "MAX_MESSAGE_BYTES", "DEFAULT_TIMEOUT"]

# gRPC's default limit on a received message is 4 MiB: less than the answer for a
# large query set, or one MiniImagenet 5-way 5-shot task with 75 query images (8.5 MB).
# TF Serving accepts and sends up to 2 GiB - 1; so do the channels made here.
MAX_MESSAGE_BYTES = 2**31 - 1
# Seconds a request may take. TF Serving's own REST limit is its
# --rest_api_timeout_in_ms flag (default 30000): raise both together.
DEFAULT_TIMEOUT = 30.0


def _as_array(value):
    """numpy array of `value`; bytes stay whole (an object array: "S" arrays drop trailing NULs)."""
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (bytes, bytearray)) for v in value):
        array = np.empty(len(value), dtype=object)
        array[:] = [bytes(v) for v in value]
        return array
    return np.asarray(value)


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(value).decode("ascii")}
    value = _as_array(value)
    if value.dtype.kind in "SO":  # encoded images: {"b64": ...} each, as TF Serving wants
        return [_jsonable(v) for v in value] if value.ndim else _jsonable(value.item())
    return value.item() if value.ndim == 0 else value.tolist()


def rest_body(signature_name, inputs, rows=False):
    """The JSON body of a REST `:predict` call.

    Args:
        signature_name: e.g. "serving_default", "adapt", "adapt_custom",
            "adapted_weights", "adapt_tasks", "adapt_tasks_custom", "adapt_images".
        inputs: dict input name -> array-like (scalars for `adapt_custom`'s
            `inner_steps`, `inner_lr`; bytes or lists of bytes for images).
        rows: use the row format (`"instances"`, one per entry of the first
            axis; for the task-major signatures, one per task) instead of the
            columnar one (`"inputs"`).

    Returns:
        str (JSON).
    """
    if not rows:
        return json.dumps({"signature_name": signature_name,
                           "inputs": {name: _jsonable(value) for name, value in inputs.items()}})
    arrays = {name: _as_array(value) for name, value in inputs.items()}
    counts = {len(value) for value in arrays.values()}
    if len(counts) != 1:
        raise ValueError("the row format needs every input to have the same first dimension; "
                         f"got {({name: len(value) for name, value in arrays.items()})}")
    instances = [{name: _jsonable(value[i]) for name, value in arrays.items()}
                 for i in range(counts.pop())]
    return json.dumps({"signature_name": signature_name, "instances": instances})


def rest_predict(url, model_name, signature_name, inputs, version=None, timeout=DEFAULT_TIMEOUT,
                 rows=False):
    """POSTs to `<url>/v1/models/<model>[/versions/<v>]:predict`; returns dict name -> array.

    Args:
        url, model_name, signature_name, inputs: the server and the request.
        version: optional model version.
        timeout: seconds to wait for the answer (TF Serving gives up after its
            --rest_api_timeout_in_ms, 30 s by default, whatever this says).
        rows: send the row format (see `rest_body`); the answer's rows are
            stacked back into one array per output.

    Raises:
        RuntimeError: the server answered with an error (its message included).
    """
    path = f"{url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        path += f"/versions/{version}"
    request = urllib.request.Request(path + ":predict",
                                     data=rest_body(signature_name, inputs, rows).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"TF Serving answered {e.code}: {e.read().decode()}") from None
    if rows:
        predictions = payload["predictions"]
        if predictions and isinstance(predictions[0], dict):
            return {name: np.asarray([row[name] for row in predictions])
                    for name in predictions[0]}
        return {"predictions": np.asarray(predictions)}  # a single output comes unnamed
    outputs = payload["outputs"]
    if not isinstance(outputs, dict):  # a single output comes unnamed
        outputs = {"predictions": outputs}
    return {name: np.asarray(value) for name, value in outputs.items()}


# Inputs the exported signatures always take as float32 (`[[0, 0]]` observations, or
# `inner_lr=1`, are floats to the model, not int32 tensors TF Serving would refuse).
FLOAT_INPUTS = frozenset({"x", "support_x", "query_x", "inner_lr", "observations", "actions",
                          "rewards", "query_observations"})


def grpc_request(model_name, signature_name, inputs, dtypes=None, version=None):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest`.

    Args:
        model_name: the name in TF Serving's model config.
        signature_name: see `rest_body`.
        inputs: dict input name -> array-like.
        dtypes: dict input name -> numpy dtype (default: float32 for the
            signatures' float inputs, `FLOAT_INPUTS`, even when given as
            integers; otherwise int32 for integer values, e.g. classification
            labels, `inner_steps` and `lengths`, and float32 for the rest;
            bytes stay strings).
        version: optional model version.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        value = _as_array(value)
        dtype = (dtypes or {}).get(name)
        if dtype is None and value.dtype.kind in "SO":
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            continue
        if dtype is None:
            dtype = (np.int32 if np.issubdtype(value.dtype, np.integer)
                     and name not in FLOAT_INPUTS else np.float32)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value.astype(dtype)))
    return request


def outputs_from_grpc(response):
    """dict output name -> numpy array, from a `PredictResponse`."""
    import tensorflow as tf
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def grpc_channel(target, max_message_bytes=MAX_MESSAGE_BYTES):
    """An insecure channel to `host:port` whose messages may be `max_message_bytes` long.

    gRPC's default 4 MiB limit on received messages would fail large answers
    (and a server with that default, large requests) with RESOURCE_EXHAUSTED.
    """
    import grpc
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    return grpc.insecure_channel(target, options=options)


def grpc_predict(target, request, timeout=DEFAULT_TIMEOUT, max_message_bytes=MAX_MESSAGE_BYTES):
    """Sends a `PredictRequest` to `host:port`; returns dict output name -> array.

    Args:
        target: `host:port` of TF Serving's gRPC port.
        request: from `grpc_request`.
        timeout: the call's deadline in seconds.
        max_message_bytes: the channel's limit on sent and received messages.
    """
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc_channel(target, max_message_bytes) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return outputs_from_grpc(stub.Predict(request, timeout=timeout))


def _sine_task(rng):
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    support_x = rng.uniform(-5, 5, (10, 1)).astype(np.float32)
    query_x = np.linspace(-5, 5, 50, dtype=np.float32)[:, None]
    inputs = {"support_x": support_x, "support_y": amplitude * np.sin(support_x - phase),
              "query_x": query_x}
    return inputs, amplitude * np.sin(query_x - phase)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="REST base URL, e.g. http://localhost:8501")
    parser.add_argument("--grpc", help="gRPC target, e.g. localhost:8500")
    parser.add_argument("--model", required=True, help="model name in TF Serving")
    parser.add_argument("--demo", choices=["sine", "sine_tasks"], default="sine",
                        help="sine: one task with adapt; sine_tasks: two tasks in one "
                             "adapt_tasks request (REST: row format)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds per request")
    args = parser.parse_args()
    if bool(args.url) == bool(args.grpc):
        parser.error("give exactly one of --url and --grpc")
    rng = np.random.default_rng(0)
    if args.demo == "sine":
        inputs, truth = _sine_task(rng)
        signature, rows = "adapt", False
    else:
        tasks = [_sine_task(rng) for _ in range(2)]
        inputs = {name: np.stack([t[0][name] for t in tasks]) for name in tasks[0][0]}
        truth = np.stack([t[1] for t in tasks])
        signature, rows = "adapt_tasks", True
    if args.url:
        outputs = rest_predict(args.url, args.model, signature, inputs, timeout=args.timeout,
                               rows=rows)
    else:
        outputs = grpc_predict(args.grpc, grpc_request(args.model, signature, inputs),
                               timeout=args.timeout)
    mse = float(np.mean((outputs["predictions"] - truth) ** 2))
    print(f"adapted to 10 points per task; MSE on 50 query points: {mse:.4f}")


if __name__ == "__main__":
    main()
