"""Gaussian policies as functions of task-batched weights.

A policy is a Keras model for the action mean (one input, the observation;
one output, the mean) and a state-independent log standard deviation, one per
action dimension. Both are meta-parameters and both adapt in the inner loop:
the adapted weights are the model's trainable weights followed by the log-std,
each with a leading task axis.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_maml.functional import make_forward
from tf_maml.tasks.episodes import check_positive_ints

__all__ = ["gaussian_mlp_policy", "GaussianPolicy", "log_prob", "kl_divergence", "entropy"]


def gaussian_mlp_policy(obs_dim, action_dim, hidden=(100, 100), activation="relu", dtype=None,
                        output_bound=None, name="gaussian_mlp_policy"):
    """The mean network of the MAML paper's policy: obs → 100 → 100 → action mean, ReLU.

    The log-std is not part of the model: `GaussianPolicy` adds it (initial 0).

    Args:
        obs_dim: observation size.
        action_dim: action size.
        hidden: width of each hidden layer.
        activation: hidden activation (the original code's ReLU).
        dtype: Keras dtype policy or name (e.g. "float64"), default float32.
        output_bound: None (a linear mean, the original code's) or b: the mean
            is `b * tanh(dense)`, e.g. the environment's action bound, so that
            the mean stays where the clipped action still depends on it.
        name: model name.

    Returns:
        A built `keras.Sequential` mapping `[batch, obs_dim]` to `[batch, action_dim]`.

    Raises:
        ValueError: a size that is not a positive integer.

    Example:

    ```python
    policy = GaussianPolicy(gaussian_mlp_policy(2, 2))
    ```
    """
    check_positive_ints("gaussian_mlp_policy", obs_dim=obs_dim, action_dim=action_dim,
                        **{f"hidden[{i}]": size for i, size in enumerate(hidden)})
    layers = [keras.Input((obs_dim,), dtype=dtype)]
    layers += [keras.layers.Dense(size, activation=activation, dtype=dtype) for size in hidden]
    if output_bound is None:
        layers.append(keras.layers.Dense(action_dim, dtype=dtype))
    else:
        layers.append(keras.layers.Dense(action_dim, activation="tanh", dtype=dtype))
        layers.append(keras.layers.Rescaling(output_bound, dtype=dtype))
    return keras.Sequential(layers, name=name)


def log_prob(actions, mean, log_std):
    """Log-density of diagonal Gaussians, summed over the last (action) axis.

    Args:
        actions: `[..., action_dim]`.
        mean: broadcastable to `actions`.
        log_std: broadcastable to `actions`.

    Returns:
        `actions.shape[:-1]`.
    """
    z = (actions - mean) * tf.exp(-log_std)
    dim = tf.cast(tf.shape(actions)[-1], actions.dtype)
    return (-0.5 * tf.reduce_sum(tf.square(z), -1)
            - tf.reduce_sum(log_std + tf.zeros_like(actions), -1)
            - 0.5 * dim * np.log(2.0 * np.pi))


def kl_divergence(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p ‖ q) between diagonal Gaussians, summed over the last axis.

    Args:
        mean_p, log_std_p: the first distribution (e.g. the old policy).
        mean_q, log_std_q: the second (e.g. the new policy); all broadcastable.

    Returns:
        The broadcast shape without the last axis.
    """
    var_p = tf.exp(2.0 * log_std_p)
    var_q = tf.exp(2.0 * log_std_q)
    terms = log_std_q - log_std_p + (var_p + tf.square(mean_p - mean_q)) / (2.0 * var_q) - 0.5
    return tf.reduce_sum(terms + tf.zeros_like(mean_p + mean_q), -1)


def entropy(log_std):
    """Entropy of diagonal Gaussians, summed over the last axis."""
    return tf.reduce_sum(log_std + 0.5 * np.log(2.0 * np.pi * np.e), -1)


class GaussianPolicy:
    """A diagonal Gaussian policy: a Keras mean model and a learned state-independent log-std.

    Args:
        model: a built Keras model with one input (observations `[batch,
            obs_dim]`) and one output (the action mean `[batch, action_dim]`),
            e.g. `gaussian_mlp_policy(...)`; any such model works.
        init_log_std: initial value of every log-std entry (0: std 1, as the
            original code).
        action_dim: needed only when it cannot be read from `model.outputs`
            (a subclassed model); where it can, it must agree.
        forward: the model's task-batched forward (default `make_forward(model)`).

    Attributes:
        log_std: the `[action_dim]` log-std variable.
        variables: the meta-parameters, `model.trainable_variables + [log_std]`;
            task-batched weights follow this order.

    Raises:
        ValueError: the action size cannot be determined or disagrees with the
            model's outputs, outputs that are not `[batch, action_dim]`, or
            outputs of another dtype than the weights (mixed precision).

    Example:

    ```python
    policy = GaussianPolicy(gaussian_mlp_policy(2, 2))
    weights = tf_maml.core.broadcast_to_tasks(policy.variables, 20)
    mean, log_std = policy.distribution(weights, observations)   # observations [20, N, 2]
    ```
    """

    def __init__(self, model, init_log_std=0.0, action_dim=None, forward=None):
        self.model = model
        self.forward = forward if forward is not None else make_forward(model)
        try:
            output = model.outputs[0]
        except (AttributeError, IndexError, ValueError, TypeError):
            output = None  # a subclassed model: its mean is checked when it is traced
        if output is not None:
            if len(output.shape) != 2:
                raise ValueError(f"the policy model must output action means [batch, "
                                 f"action_dim], got outputs of shape {tuple(output.shape)}")
            if action_dim is not None and output.shape[-1] not in (None, action_dim):
                raise ValueError(f"action_dim={action_dim} but the model outputs "
                                 f"{output.shape[-1]} action means")
            if action_dim is None:
                action_dim = output.shape[-1]
            variable_dtype = model.trainable_variables[0].dtype if model.trainable_variables \
                else None
            if variable_dtype is not None and tf.as_dtype(output.dtype) != tf.as_dtype(
                    variable_dtype):
                raise ValueError(f"the policy model outputs {tf.as_dtype(output.dtype).name} but "
                                 f"its weights are {tf.as_dtype(variable_dtype).name} (a mixed-"
                                 "precision policy): use one dtype for policies")
        if action_dim is None:
            raise ValueError("cannot read the action size from the model's outputs; pass "
                             "action_dim=")
        self.action_dim = int(action_dim)
        self.dtype = tf.as_dtype(model.trainable_variables[0].dtype)
        self.num_model_weights = len(model.trainable_variables)
        self.log_std = tf.Variable(tf.fill([self.action_dim], tf.cast(init_log_std, self.dtype)),
                                   name="log_std")

    @property
    def variables(self):
        """The policy's meta-parameters: the model's trainable weights, then the log-std."""
        return list(self.model.trainable_variables) + [self.log_std]

    def distribution(self, weights, observations, training=False):
        """Mean and log-std of every task's policy at task-batched observations.

        Args:
            weights: task-batched weights in the order of `variables`.
            observations: `[num_tasks, ..., obs_dim]` (any number of batch axes).
            training: passed to the model's forward (False: dropout off, batch
                normalization on moving statistics).

        Returns:
            `(mean, log_std)`: `mean` is `[num_tasks, ..., action_dim]`;
            `log_std` is `[num_tasks, 1, ..., 1, action_dim]` (broadcastable).

        Raises:
            ValueError: observations without a batch axis.
        """
        observations = tf.convert_to_tensor(observations)
        rank = observations.shape.rank
        if rank is None or rank < 3:
            raise ValueError("observations must be [num_tasks, batch..., obs_dim], got shape "
                             f"{observations.shape}")
        model_weights, log_std = weights[:self.num_model_weights], weights[self.num_model_weights]
        if rank == 3:
            mean = self.forward(list(model_weights), observations, training)
        else:
            shape = tf.shape(observations)
            flat = tf.reshape(observations, tf.stack([shape[0], -1, shape[-1]]))
            mean = self.forward(list(model_weights), flat, training)
            mean = tf.reshape(mean, tf.concat([shape[:-1], [self.action_dim]], 0))
        if mean.shape[-1] is not None and mean.shape[-1] != self.action_dim:
            raise ValueError(f"the policy model outputs {mean.shape[-1]} action means per "
                             f"observation, not action_dim={self.action_dim}")
        log_std = tf.reshape(log_std, [-1] + [1] * (rank - 2) + [self.action_dim])
        return mean, tf.cast(log_std, mean.dtype)

    def log_prob(self, weights, observations, actions, training=False):
        """`log π(actions | observations)` of every task's policy, `actions.shape[:-1]`."""
        mean, log_std = self.distribution(weights, observations, training)
        return log_prob(actions, mean, log_std)
