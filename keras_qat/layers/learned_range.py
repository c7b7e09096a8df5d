"""Learned ranges: quantizers whose grid step is a trainable variable (LSQ).

LSQ's fake quant and its gradients are in `keras_qat.layers.lsq`; where a
step starts, in `keras_qat.layers.range_start`.

- `LearnedWeightQuantizer`: symmetric weights (zero in the middle of the
  grid), one step per tensor or per output channel. The step is a learned
  factor times the step of the kernel's own range, so that it follows the
  kernel's scale: a folded BatchNorm's moving variance, still settling in a
  fine-tune of a briefly trained network, rescales the folded kernel at
  every step, which a fixed step could not follow at Adam's pace (learned
  ranges then lost to min / max ranges by 2-9 points in one epoch).
- `LearnedFakeQuant`: activations, one step per tensor, set with the zero
  point from the first training batch; the zero point then stays (a fixed
  zero point rather than LSQ+'s learned offset).

Where a step starts matters in a short fine-tune (Adam moves a log-step by
about the learning rate per update: a few percent in an epoch at 3e-4). It
starts from the data's own range (the kernel's, the first batch's min /
max) scaled by the fraction in `START_FRACTIONS` (0.3 to 1) whose grid
rounds that data with the least squared error: at 4 bits a clipped grid
rounds most values more finely than the full range's. Measured in one-epoch
W4A4 fine-tunes in docs/measurements.md. `kq.calibrate` still starts
activations from the min / max over its batches.

The trainable variable is the logarithm of the step (of the weights'
factor), `log_scale`, so an update moves the step by a factor, never to
zero or below. Its gradient is LSQ's step gradient divided by the step (not the
chain rule's times the step): plain SGD then moves the step as LSQ's own
update of the step would, to first order (`d log s = ds / s`), and Adam and
the other optimizers that normalize each variable's update move it by a
relative amount of about the learning rate (on the step itself, a learning
rate of 1e-2 would wipe out a step of 0.004 in one update, and the int32
bias grid of a layer after it overflowed: docs/measurements.md). A
constraint keeps `log_scale` within `log(MIN_STEP)` and `log(MAX_STEP)`
after each update, and a weight step is clipped to them, so the step stays
finite and positive whatever the learning rate. It is an
ordinary trainable variable, all-reduced under `tf.distribute`; the
gradient scale counts the elements of the global batch.
"""

import math

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.config import check_bool
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.lsq import (
    MAX_STEP,
    MIN_STEP,
    at_least_min_step,
    grad_scale,
    learned_step_fake_quant,
    relative_step_of,
    step_of,
    zero_level,
)
from keras_qat.layers.quantizer import across_replicas, one_replica
from keras_qat.layers.range_start import (
    START_FRACTIONS,
    activation_errors,
    least_error_fraction,
    start_weight_fraction,
    sum_across_replicas,
)
from keras_qat.layers.weight_quantizer import WeightQuantizer

__all__ = [
    "DEFAULT_STEP_RATE",
    "MAX_STEP",
    "MIN_STEP",
    "START_FRACTIONS",
    "LearnedFakeQuant",
    "LearnedWeightQuantizer",
    "learned_step_fake_quant",
    "step_of",
]

# How many times faster than the learning rate the log-step moves.
DEFAULT_STEP_RATE = 1.0


class _LogStepBounds(keras.constraints.Constraint):
    """Keeps `exp(rate * log_step)` within the step bounds (a `Constraint`
    instance: Keras 3.10 takes no closure as a constraint)."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, log_step):
        low, high = math.log(MIN_STEP) / self.rate, math.log(MAX_STEP) / self.rate
        return tf.clip_by_value(log_step, low, high)

    def get_config(self):
        return {"rate": self.rate}


def _log_step_weight(layer, shape):
    return layer.add_weight(
        name="log_scale",
        shape=shape,
        initializer="zeros",
        dtype="float32",
        trainable=True,
        autocast=False,
        constraint=_LogStepBounds(layer.step_rate),
        aggregation="mean",
    )


def _set_step(layer, step, where):
    """Sets `layer`'s step to `step` where `where` (its first batch)."""
    log_step = tf.math.log(step) / layer.step_rate
    layer.log_scale.assign(tf.where(where, log_step, layer.log_scale))


def _check_step_rate(step_rate):
    """`step_rate` as a float (None: `DEFAULT_STEP_RATE`); raises if it is
    not a number in (0, 100]."""
    step_rate = DEFAULT_STEP_RATE if step_rate is None else step_rate
    if (
        isinstance(step_rate, bool)
        or not isinstance(step_rate, (int, float))
        or not (0 < step_rate <= 100)
    ):
        raise ValueError(
            "Received an invalid value for `step_rate`, expected a number in (0, 100]. "
            f"Received: step_rate={step_rate!r}"
        )
    return float(step_rate)


def _saved_before_step_rate(config):
    """A config saved before `step_rate` existed holds the plain logarithm
    of the step: rate 1."""
    return {"step_rate": 1.0, **config}


def _flag_weight(layer):
    return layer.add_weight(
        name="initialized",
        shape=(),
        initializer="zeros",
        dtype="float32",
        trainable=False,
        autocast=False,
        aggregation="only_first_replica",
    )


@keras.saving.register_keras_serializable(package="keras_qat")
class LearnedWeightQuantizer(WeightQuantizer):
    """A `WeightQuantizer` whose step is learned (LSQ), per tensor or per
    output channel.

    The step is a learned factor times the step of the kernel's own range
    (as `WeightQuantizer` would quantize it, per channel or not): the
    trainable variable `log_scale` holds the factor's logarithm, so the
    step follows the kernel's scale as it changes (a folded BatchNorm's
    moving variance still settling rescales the folded kernel every step)
    and learns the clipping against it with LSQ's gradient. The first
    training call sets the factor to the one of `START_FRACTIONS` that
    rounds the kernel with the least squared error; until then the
    kernel's own range is used. `step_for(kernel)` is the step. Only
    symmetric grids (TFLite's weights) are learned.

    Args:
        num_bits, narrow_range, per_channel, quant_delay: As in
            `WeightQuantizer`.
        symmetric: Must be True.
        step_rate: How many times the learning rate the log-step moves per
            update (default `DEFAULT_STEP_RATE`).
        relative_step: Whether the step is relative to the kernel's range
            (True, the default). A quantizer saved before this option
            existed loads with False: `log_scale` holds the step itself.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> quantizer = LearnedWeightQuantizer(num_bits=4, symmetric=True,
    ...                                    narrow_range=True)
    >>> kernel = tf.constant([[0.7, -0.35], [0.1, 0.2]])
    >>> quantizer.build(kernel.shape)
    >>> _ = quantizer.quantize_weights(kernel, training=True)
    >>> round(float(quantizer.step_for(kernel).numpy()), 4)  # 0.95 * 0.7 / 7
    0.095
    """

    def __init__(self, *args, step_rate=None, relative_step=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_rate = _check_step_rate(step_rate)
        self.relative_step = check_bool("relative_step", relative_step)
        if not self.symmetric:
            raise ValueError(
                "Learned weight ranges are symmetric (TFLite's int8 weights are). "
                f"Received: symmetric={self.symmetric}"
            )

    def build(self, kernel_shape):
        shape = (kernel_shape[-1],) if self.per_channel else ()
        self.log_scale = _log_step_weight(self, shape)
        self.initialized = _flag_weight(self)
        super().build(kernel_shape)

    @property
    def scale(self):
        """The learned step (per channel or not) of a quantizer with
        `relative_step=False`; a relative step depends on the kernel:
        `step_for(kernel)`."""
        if self.relative_step:
            raise AttributeError(
                f"'{self.name}' learns its step relative to the kernel's range: "
                "use `step_for(kernel)` (the owning layer's `quantized_weights()` "
                "gives the kernel)."
            )
        return step_of(self.log_scale, self.step_rate)

    def step_for(self, kernel):
        """The learned step for `kernel` (per channel or not)."""
        if self.relative_step:
            return relative_step_of(self.log_scale, self.step_rate, self._own_step(kernel))
        return self.scale

    def _own_step(self, kernel):
        """The step of `kernel`'s own range."""
        return self.grid_scale(*super().range(kernel))

    def get_config(self):
        return {
            **super().get_config(),
            "step_rate": self.step_rate,
            "relative_step": self.relative_step,
        }

    @classmethod
    def from_config(cls, config):
        return super().from_config({"relative_step": False, **_saved_before_step_rate(config)})

    def learned_range(self, kernel):
        zero = zero_level(self.num_bits, self.narrow_range, True)
        qmin, qmax = quantizers.quant_levels(self.num_bits, self.narrow_range)
        step = at_least_min_step(self.step_for(kernel))
        return (qmin - zero) * step, (qmax - zero) * step

    def range(self, kernel):
        """The learned range once set, before that the kernel's."""
        low, high = self.learned_range(kernel)
        kernel_low, kernel_high = super().range(kernel)
        ready = self.initialized > 0
        return tf.where(ready, low, kernel_low), tf.where(ready, high, kernel_high)

    def reset_range(self):
        """Back to the kernel's own range until the next training call sets
        the step from it."""
        self.initialized.assign(0.0)

    def prepare(self, kernel, training):
        """At a training call: the first sets the step from the kernel (the
        fraction of `START_FRACTIONS` of its own step that rounds it with the
        least squared error); every one records the kernel's own step."""
        if not training:
            return
        first = self.initialized <= 0
        own_step = self._own_step(kernel)

        def start_fraction():
            zero = zero_level(self.num_bits, self.narrow_range, True)
            qmin, qmax = quantizers.quant_levels(self.num_bits, self.narrow_range)
            values = tf.stop_gradient(tf.cast(kernel, tf.float32))
            return start_weight_fraction(
                values, own_step, float(qmin - zero), float(qmax - zero), self.per_channel
            )

        no_fraction = tf.ones_like(own_step)
        fraction = tf.cond(first, start_fraction, lambda: no_fraction)
        _set_step(self, fraction if self.relative_step else fraction * own_step, first)
        self.initialized.assign(1.0)

    def quantize_kernel(self, kernel, min_val, max_val, training):
        if not training:
            return super().quantize_kernel(kernel, min_val, max_val, training)
        zero = zero_level(self.num_bits, self.narrow_range, True)
        highest = quantizers.quant_levels(self.num_bits, self.narrow_range)[1] - zero
        step = self.step_for(kernel)
        per_step = tf.size(kernel) // tf.size(step)
        return learned_step_fake_quant(
            kernel,
            step,
            zero,
            self.num_bits,
            self.narrow_range,
            grad_scale(per_step, float(highest)),
        )


@keras.saving.register_keras_serializable(package="keras_qat")
class LearnedFakeQuant(FakeQuant):
    """A `FakeQuant` on activations whose step is learned (LSQ).

    The first training batch sets the step and the zero point from its
    min / max scaled by the fraction of `START_FRACTIONS` whose grid rounds
    the batch with the least squared error; the step then learns with LSQ's
    gradient and the zero point stays. `min` and `max` are
    the range of that grid, computed from them. One step per tensor.

    Args:
        num_bits, symmetric, narrow_range, quant_delay, activation: As in
            `FakeQuant`.
        step_rate: How many times the learning rate the log-step moves per
            update (default `DEFAULT_STEP_RATE`).
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> fq = LearnedFakeQuant(num_bits=8)
    >>> y = fq(tf.constant([[-1.0, 0.5, 2.0]]), training=True)
    >>> round(float(fq.scale.numpy()) * 255, 4), float(fq.zero_point.numpy())
    (3.0, 85.0)
    """

    def __init__(self, *args, step_rate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_rate = _check_step_rate(step_rate)
        if self.per_channel or self.fixed_range is not None:
            raise ValueError(
                "Learned activation ranges are per tensor and not fixed. Received: "
                f"per_channel={self.per_channel}, fixed_range={self.fixed_range}"
            )

    def build(self, input_shape):
        self._reduce_axes = None
        self.log_scale = _log_step_weight(self, ())
        zero = zero_level(self.num_bits, self.narrow_range, self.symmetric) or 0
        self.zero_point = self.add_weight(
            name="zero_point",
            shape=(),
            initializer=keras.initializers.Constant(float(zero)),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        self.initialized = _flag_weight(self)
        self.add_step_counter()

    @property
    def scale(self):
        """The learned step."""
        return step_of(self.log_scale, self.step_rate)

    def get_config(self):
        return {**super().get_config(), "step_rate": self.step_rate}

    @classmethod
    def from_config(cls, config):
        return super().from_config(_saved_before_step_rate(config))

    @property
    def min(self):
        qmin, _ = quantizers.quant_levels(self.num_bits, self.narrow_range)
        return (qmin - self.zero_point) * at_least_min_step(self.scale)

    @property
    def max(self):
        _, qmax = quantizers.quant_levels(self.num_bits, self.narrow_range)
        return (qmax - self.zero_point) * at_least_min_step(self.scale)

    def has_range(self):
        return self.initialized > 0

    def update_range(self, x):
        """Sets the step and zero point from the first finite batch (its
        min / max times the fraction of `START_FRACTIONS` whose grid rounds
        it with the least squared error, over all replicas); later batches
        leave them to the optimizer. Returns the range."""
        first = tf.logical_not(self.has_range())
        if one_replica():
            # Nothing to do after the first batch: skip the batch's range.
            tf.cond(first, lambda: self._start(x, first), tf.no_op)
        else:
            # Collectives stay out of conditionals (replicas cannot meet
            # inside one): every batch gathers, later ones to no effect.
            self._start(x, first)
        return self.min, self.max

    def _start(self, x, first):
        batch_min, batch_max = across_replicas(*(tf.stop_gradient(v) for v in self._batch_range(x)))
        low, high = quantizers.quant_range(batch_min, batch_max, self.symmetric)

        def errors():
            values = tf.stop_gradient(tf.cast(self.activate(x), tf.float32))
            return activation_errors(values, low, high, self.num_bits, self.narrow_range)

        no_errors = tf.zeros((len(START_FRACTIONS),))
        errors = sum_across_replicas(tf.cond(first, errors, lambda: no_errors))
        fraction = least_error_fraction(errors)
        self._start_from(fraction * low, fraction * high, first)
        return tf.no_op()

    def calibrate_range(self, x, method):
        """In calibration, with either method, the step and zero point of
        the min and max over the batches so far: where learning starts."""
        batch_min, batch_max = across_replicas(*self._batch_range(x))
        ready = self.has_range()
        low = tf.where(ready, tf.minimum(self.min, batch_min), batch_min)
        high = tf.where(ready, tf.maximum(self.max, batch_max), batch_max)
        self._start_from(low, high, True)

    def _start_from(self, batch_min, batch_max, where):
        """Sets the step and zero point of the grid over `[batch_min,
        batch_max]` where `where` and that grid is usable (finite, not
        empty)."""
        low, high = quantizers.quant_range(batch_min, batch_max, self.symmetric)
        nudged_min, _, step = quantizers.nudged_range(low, high, self.num_bits, self.narrow_range)
        usable = tf.logical_and(tf.math.is_finite(step), step > 0)
        chosen = tf.logical_and(usable, where)
        qmin, _ = quantizers.quant_levels(self.num_bits, self.narrow_range)
        zero = tf.round(qmin - nudged_min / tf.where(usable, step, 1.0))
        _set_step(self, tf.where(usable, step, 1.0), chosen)
        self.zero_point.assign(tf.where(chosen, zero, self.zero_point))
        self.initialized.assign(tf.where(usable, 1.0, self.initialized))

    def reset_range(self):
        """Back to no range: the next batch sets the step."""
        self.initialized.assign(0.0)

    def quantize_with(self, x, min_val, max_val, active, training=False):
        """In training, LSQ's fake quant with the learned step; else the
        fake quant of the learned range."""
        if not training:
            return super().quantize_with(x, min_val, max_val, active, training)
        highest = quantizers.quant_levels(self.num_bits, self.narrow_range)[1] - self.zero_point

        def quantize():
            x_in = self.activate(x)
            return learned_step_fake_quant(
                x_in,
                self.scale,
                self.zero_point,
                self.num_bits,
                self.narrow_range,
                grad_scale(tf.size(x_in), highest, per_replica=True),
            )

        if active is True:
            return quantize()
        return tf.cond(active, quantize, lambda: tf.identity(self.activate(x)))
