"""`Quantizer`: what the quantizer layers share.

The grid options (bit width, symmetric, narrow range, per channel), their
validation, the step counter and the quant delay. `FakeQuant`
(`keras_qat.layers.fake_quant`) and `WeightQuantizer`
(`keras_qat.layers.weight_quantizer`) are its two kinds.
"""

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.config import DEFAULT_NUM_BITS, check_bool, check_int, check_num_bits
from keras_qat.layers.call_context import (
    calibration_method,
    is_bypassed,
    is_tracing_for_export,
)


def one_replica():
    """Whether the code runs outside a `tf.distribute` strategy or on one
    replica of it (no collective to make)."""
    context = tf.distribute.get_replica_context()
    return context is None or context.num_replicas_in_sync == 1


def across_replicas(batch_min, batch_max):
    """The min of `batch_min` and max of `batch_max` over all replicas.

    Inside a `tf.distribute` strategy each replica sees its shard of the
    global batch; gathering the per-replica values and reducing them gives
    every replica the range that a single device computes from the whole
    batch (`tf.distribute.ReduceOp` has no MIN / MAX, hence `all_gather`).
    Outside a strategy, or with one replica, the values are returned as
    they are.
    """
    if one_replica():
        return batch_min, batch_max
    both = tf.distribute.get_replica_context().all_gather(
        tf.stack([batch_min, batch_max])[None], axis=0
    )  # one collective
    return tf.reduce_min(both[:, 0], axis=0), tf.reduce_max(both[:, 1], axis=0)


class Quantizer(keras.layers.Layer):
    """Base of the quantizers: grid options, step counter, quant delay.

    Args:
        num_bits: Bit width, an integer in `[2, 16]`.
        symmetric: Whether the range is symmetric around zero.
        narrow_range: Whether the grid is `[1, 2**num_bits - 1]`.
        per_channel: Whether to keep one range per channel.
        quant_delay: Number of training steps before quantization starts.
        calls_per_step: How many times the quantizer is called in one
            training step: a layer shared by `n` calls of a model counts `n`
            calls a step, and its delays count steps, not calls
            (`convert_quant_network` sets it from the model's graph).
        **kwargs: Base layer keyword arguments, such as `name`.
    """

    def __init__(
        self,
        num_bits=DEFAULT_NUM_BITS,
        symmetric=False,
        narrow_range=False,
        per_channel=False,
        quant_delay=0,
        calls_per_step=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_bits = check_num_bits(num_bits)
        self.symmetric = check_bool("symmetric", symmetric)
        self.narrow_range = check_bool("narrow_range", narrow_range)
        self.per_channel = check_bool("per_channel", per_channel)
        self.quant_delay = check_int("quant_delay", quant_delay)
        self.calls_per_step = check_int("calls_per_step", calls_per_step, minimum=1)

    def steps(self, calls=None):
        """Training steps so far (or in `calls` training calls)."""
        calls = self.step if calls is None else calls
        return calls if self.calls_per_step == 1 else calls // self.calls_per_step

    def add_step_counter(self):
        """Creates `step`, the number of training calls so far."""
        self.step = self.add_weight(
            name="step",
            shape=(),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            aggregation="only_first_replica",
        )

    def count_call(self):
        """Adds 1 to `step`, as one op: the TensorFlow variable's own
        `assign_add` (Keras' `assign_add` is a read, an add and an assign)."""
        self.step.value.assign_add(1)

    def advance(self, training):
        """Counts a training call; returns whether this call quantizes.

        The result is Python `True` while the model is traced for export
        and in training calls without a quant delay (no run-time choice, so
        no control flow), Python `False` in inference while quantization is
        bypassed (`call_context.quantization_bypassed`) or calibrating
        (`call_context.calibrating`), else a boolean tensor: the delay has
        passed (counted before this call).
        """
        if training:
            if self.quant_delay == 0:
                self.count_call()
                return True
            before = tf.identity(self.step)
            self.count_call()
            return self.steps(before) >= self.quant_delay
        if is_tracing_for_export():
            return True
        if is_bypassed(self) or calibration_method() is not None:
            return False
        return self.steps() >= self.quant_delay

    def reset_range(self):
        """Forgets what the range learned from data (a hook for quantizers
        that keep one; nothing here: a kernel's range is its own)."""

    def end_delay(self):
        """Counts the quant delay as passed: quantizes from the next call."""
        delay = self.quant_delay * self.calls_per_step
        if delay:
            self.step.assign(tf.maximum(self.step, tf.constant(delay, self.step.dtype)))

    def fake_quant(self, x, min_val, max_val, axis=-1, clip_gradient=True):
        """`quantizers.fake_quant` with this quantizer's grid options."""
        return quantizers.fake_quant(
            x,
            min_val,
            max_val,
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=axis if self.per_channel else None,
            clip_gradient=clip_gradient,
        )

    def grid_scale(self, min_val, max_val):
        """The step of this quantizer's grid for a range."""
        return quantizers.grid_scale(
            min_val, max_val, self.num_bits, self.symmetric, self.narrow_range
        )

    @classmethod
    def get(cls, identifier, argument="quantizer"):
        """An instance of this class from an instance, a config dict (its
        options, or a serialized quantizer) or None (the defaults)."""
        if identifier is None:
            return cls()
        if isinstance(identifier, dict):
            if "class_name" in identifier:
                identifier = keras.saving.deserialize_keras_object(identifier)
            else:
                return cls(**identifier)
        if isinstance(identifier, cls):
            return identifier
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected a "
            f"{cls.__name__}, a dict of its options or None. "
            f"Received: {argument}={identifier!r}"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            per_channel=self.per_channel,
            quant_delay=self.quant_delay,
            calls_per_step=self.calls_per_step,
        )
        return config
