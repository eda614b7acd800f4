"""A small client for a tf_maml model served by TF Serving (REST and gRPC).

REST needs only numpy and the standard library; gRPC needs `grpcio`,
`tensorflow` and `tensorflow-serving-api`.

    # adapt to 10 points of a sine wave, predict 50 others (REST, port 8501)
    python export/client.py --url=http://localhost:8501 --model=sine --demo=sine
    # the same over gRPC (port 8500)
    python export/client.py --grpc=localhost:8500 --model=sine --demo=sine

Requests use the columnar `"inputs"` format: TF Serving's row format needs
every input to have the same first dimension, which support and query sets
usually do not.
"""

import argparse
import json
import urllib.request

import numpy as np

__all__ = ["rest_body", "rest_predict", "grpc_request", "grpc_predict", "outputs_from_grpc"]


def _jsonable(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def rest_body(signature_name, inputs):
    """The JSON body of a REST `:predict` call, in the columnar format.

    Args:
        signature_name: "serving_default", "adapt", "adapt_custom" or "adapted_weights".
        inputs: dict input name -> array-like (scalars for `inner_steps`, `inner_lr`).

    Returns:
        str (JSON).
    """
    return json.dumps({"signature_name": signature_name,
                       "inputs": {name: _jsonable(value) for name, value in inputs.items()}})


def rest_predict(url, model_name, signature_name, inputs, version=None, timeout=30):
    """POSTs to `<url>/v1/models/<model>[/versions/<v>]:predict`; returns dict name -> array.

    Raises:
        RuntimeError: the server answered with an error (its message included).
    """
    path = f"{url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        path += f"/versions/{version}"
    request = urllib.request.Request(path + ":predict",
                                     data=rest_body(signature_name, inputs).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"TF Serving answered {e.code}: {e.read().decode()}") from None
    outputs = payload["outputs"]
    if not isinstance(outputs, dict):  # a single output comes unnamed
        outputs = {"predictions": outputs}
    return {name: np.asarray(value) for name, value in outputs.items()}


def grpc_request(model_name, signature_name, inputs, dtypes=None, version=None):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest`.

    Args:
        model_name: the name in TF Serving's model config.
        signature_name: see `rest_body`.
        inputs: dict input name -> array-like.
        dtypes: dict input name -> numpy dtype (default: float32, int32 for
            `support_y` given as integers and for `inner_steps`).
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
        value = np.asarray(value)
        dtype = (dtypes or {}).get(name)
        if dtype is None:
            dtype = np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value.astype(dtype)))
    return request


def outputs_from_grpc(response):
    """dict output name -> numpy array, from a `PredictResponse`."""
    import tensorflow as tf
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def grpc_predict(target, request, timeout=30):
    """Sends a `PredictRequest` to `host:port`; returns dict output name -> array."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return outputs_from_grpc(stub.Predict(request, timeout=timeout))


def _sine_demo():
    rng = np.random.default_rng(0)
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
    parser.add_argument("--demo", choices=["sine"], default="sine")
    args = parser.parse_args()
    if bool(args.url) == bool(args.grpc):
        parser.error("give exactly one of --url and --grpc")
    inputs, truth = _sine_demo()
    if args.url:
        outputs = rest_predict(args.url, args.model, "adapt", inputs)
    else:
        outputs = grpc_predict(args.grpc, grpc_request(args.model, "adapt", inputs))
    mse = float(np.mean((outputs["predictions"] - truth) ** 2))
    print(f"adapted to 10 points; MSE on 50 query points: {mse:.4f}")


if __name__ == "__main__":
    main()
