"""The MAML paper's networks as ordinary Keras 3 models.

They are plain `keras.Sequential` models: they train, save and serve like any
Keras model, and `tf_maml.functional.make_forward` runs them with every task
of a meta-batch batched into single kernels. Any other built Keras model works
with the library as well.

Batch normalization follows the paper: each task normalizes with its own batch
statistics (`training=True` everywhere); moving statistics are never used.
Convolutions feeding a batch normalization have no bias (it would be removed
by the normalization: its true gradient is zero).
"""

import keras

__all__ = ["mlp", "conv4", "fc", "build"]


def _input_dtype(dtype):
    """The input's dtype for layers of the dtype policy or name `dtype`: the policy's variable
    dtype (float32 for "mixed_float16", whose layers compute in float16), or None."""
    if dtype is None:
        return None
    return keras.dtype_policies.get(dtype).variable_dtype


def mlp(input_shape=(1,), output_size=1, hidden_sizes=(40, 40), dtype=None, name="mlp"):
    """The sine-regression network: input → 40 → 40 → output, ReLU.

    Args:
        input_shape: shape of one input example.
        output_size: number of outputs.
        hidden_sizes: width of each hidden layer.
        dtype: Keras dtype policy or name (e.g. "float64"), default float32.
        name: model name.

    Returns:
        A built `keras.Sequential`.

    Example:

    ```python
    model = mlp()  # 1-40-40-1
    ```
    """
    layers = [keras.Input(input_shape, dtype=_input_dtype(dtype))]
    layers += [keras.layers.Dense(size, activation="relu", dtype=dtype) for size in hidden_sizes]
    layers.append(keras.layers.Dense(output_size, dtype=dtype))
    return keras.Sequential(layers, name=name)


def conv4(num_classes, input_shape=(28, 28, 1), filters=64, pooling="stride", dtype=None,
          name="conv4"):
    """The paper's 4-block convolutional classifier.

    Each block is a 3×3 convolution, batch normalization and ReLU; spatial
    downsampling is a stride-2 convolution (`pooling="stride"`, Omniglot) or
    a 2×2 max-pool (`pooling="max"`, MiniImagenet). A linear head gives
    `num_classes` logits.

    Args:
        num_classes: N of the N-way tasks.
        input_shape: image shape (H, W, C).
        filters: channels per block (64 for Omniglot, 32 for MiniImagenet).
        pooling: "stride" or "max".
        dtype: Keras dtype policy or name.
        name: model name.

    Returns:
        A built `keras.Sequential`.

    Raises:
        ValueError: unknown `pooling`.

    Example:

    ```python
    model = conv4(5)  # Omniglot 5-way
    model = conv4(5, input_shape=(84, 84, 3), filters=32, pooling="max")
    ```
    """
    if pooling not in ("stride", "max"):
        raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
    layers = [keras.Input(input_shape, dtype=_input_dtype(dtype))]
    for _ in range(4):
        layers.append(keras.layers.Conv2D(filters, 3, strides=2 if pooling == "stride" else 1,
                                          padding="same", use_bias=False, dtype=dtype))
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
        layers.append(keras.layers.ReLU(dtype=dtype))
        if pooling == "max":
            layers.append(keras.layers.MaxPooling2D(2, dtype=dtype))
    layers += [keras.layers.Flatten(dtype=dtype), keras.layers.Dense(num_classes, dtype=dtype)]
    return keras.Sequential(layers, name=name)


def fc(num_classes, input_shape=(28, 28, 1), hidden_sizes=(256, 128, 64, 64), dtype=None,
       name="fc"):
    """The paper's non-convolutional classifier: 256-128-64-64, BN and ReLU.

    Args:
        num_classes: N of the N-way tasks.
        input_shape: image shape; images are flattened.
        hidden_sizes: width of each hidden layer.
        dtype: Keras dtype policy or name.
        name: model name.

    Returns:
        A built `keras.Sequential`.
    """
    layers = [keras.Input(input_shape, dtype=_input_dtype(dtype)),
              keras.layers.Flatten(dtype=dtype)]
    for size in hidden_sizes:
        layers.append(keras.layers.Dense(size, use_bias=False, dtype=dtype))
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
        layers.append(keras.layers.ReLU(dtype=dtype))
    layers.append(keras.layers.Dense(num_classes, dtype=dtype))
    return keras.Sequential(layers, name=name)


def build(config, input_shape, output_size):
    """Builds the model a `Config` names, for a task family's shapes.

    Args:
        config: a `tf_maml.config.Config`.
        input_shape: shape of one input example.
        output_size: outputs (regression) or classes (classification).

    Returns:
        A built Keras model.

    Raises:
        ValueError: unknown `config.model`, a convolutional model for inputs
            that are not images `(height, width, channels)`, or mlp for inputs
            that are not vectors.
    """
    name = config.model_for(input_shape)
    if name in ("conv4", "conv4_maxpool") and len(tuple(input_shape)) != 3:
        raise ValueError(f"model {name} takes images (height, width, channels); the "
                         f"{config.dataset} inputs have shape {tuple(input_shape)} (use model "
                         f"mlp, or auto)")
    if name == "mlp" and len(tuple(input_shape)) != 1:
        raise ValueError(f"model mlp takes feature vectors; the {config.dataset} inputs have "
                         f"shape {tuple(input_shape)} (use model conv4 or fc for images, or "
                         f"auto)")
    if name == "mlp":
        return mlp(input_shape, output_size)
    if name == "conv4":
        return conv4(output_size, input_shape)
    if name == "conv4_maxpool":
        return conv4(output_size, input_shape, filters=32, pooling="max")
    if name == "fc":
        return fc(output_size, input_shape)
    raise ValueError(f"unknown model {config.model!r}; expected mlp, conv4, conv4_maxpool or fc")
