"""Quantized fusion layers: the float layers with fake-quantized weights.

Each quantized layer subclasses its float fusion layer and changes one
thing: the kernel is fake-quantized before the conv or matmul. The weight
range is the kernel's own min / max (per output channel with
`per_channel=True`), taken at every call, so it never goes stale. The output
activation is quantized by a separate `FakeQuant` layer that
`convert_quant_network` places after the layer.

The bias is added as the integer kernel adds it: rounded to the int32 grid
of the accumulator, `input_scale * weight_scale` per output channel, once
the layer's input is quantized (`keras_qat.layers.input_grid`; the input
scale comes from the `FakeQuant` before the layer).

With `has_bn=True` these layers fake-quantize the raw kernel and then apply
an ordinary BatchNormalization (MindSpore's `bn_fold=False`); the bias then
stays float, since the deployed bias is the one TFLite folds later.
"""

import keras
import tensorflow as tf

from keras_qat import ops
from keras_qat.config import check_non_negative_int
from keras_qat.layers.fake_quant import FakeQuant, is_tracing_for_export
from keras_qat.layers.input_grid import InputGridTracking
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct


class _QuantizedWeights(InputGridTracking):
    """Mixin that fake-quantizes the kernel of a fusion layer.

    The bias is rounded to the int32 grid on which the integer kernel adds
    it (`int32_bias`), once the layer's input grid is known.

    Args:
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One range per output channel (the kernel's last axis).
        symmetric: Symmetric weight range.
        narrow_range: Grid `[1, 2**num_bits - 1]`; with `symmetric=True` the
            signed grid `[-(2**(b-1) - 1), 2**(b-1) - 1]` of TFLite's int8
            weights.
        quant_delay: Training steps before the weights are quantized.
    """

    def __init__(
        self,
        *args,
        num_bits=8,
        per_channel=False,
        symmetric=False,
        narrow_range=False,
        quant_delay=0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        ops.check_num_bits(num_bits)
        for name, value in (
            ("per_channel", per_channel),
            ("symmetric", symmetric),
            ("narrow_range", narrow_range),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected a "
                    f"boolean. Received: {name}={value!r}"
                )
        check_non_negative_int("quant_delay", quant_delay)
        self.num_bits = num_bits
        self.per_channel = per_channel
        self.symmetric = symmetric
        self.narrow_range = narrow_range
        self.quant_delay = quant_delay

    def build(self, input_shape):
        super().build(input_shape)
        self.step = self.add_weight(
            name="step",
            shape=(),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            aggregation="only_first_replica",
        )

    def weight_kernel(self):
        """The float kernel whose quantized version the layer applies."""
        return self.linear_layer.kernel

    def linear(self, inputs, training=False):
        float_kernel = self.weight_kernel()
        kernel, weights_active = self.maybe_quantize_weights(float_kernel, training)
        outputs = self.apply_kernel(inputs, kernel)
        if self.linear_layer.use_bias:
            bias = self.linear_layer.bias
            if not self.has_bn:  # else the deployed bias is BatchNorm's fold
                bias = self.int32_bias(bias, float_kernel, weights_active, training)
            outputs = tf.nn.bias_add(outputs, bias)
        return outputs

    def int32_bias(self, bias, float_kernel, weights_active, training):
        """`bias` on the int32 grid of the integer kernel's accumulator.

        The grid step is `input_scale * weight_scale` per output channel
        (see `keras_qat.layers.input_grid`). The bias stays float while the
        weights or the input are not quantized, and in a layer whose input
        has no single known grid.
        """
        grid = self.input_grid(training)
        if grid is None:
            return bias
        input_scale, input_active = grid
        rounded = ops.int32_bias(bias, input_scale * self.weight_scale(float_kernel))
        if input_active is True and weights_active is True:
            return rounded
        return tf.where(tf.logical_and(input_active, weights_active), rounded, bias)

    def weight_range(self, kernel):
        """Returns the `(min, max)` of `kernel`, per output channel or not."""
        kernel = tf.cast(kernel, tf.float32)
        if self.per_channel:
            axes = list(range(kernel.shape.rank - 1))
            return tf.reduce_min(kernel, axes), tf.reduce_max(kernel, axes)
        return tf.reduce_min(kernel), tf.reduce_max(kernel)

    def weight_scale(self, kernel):
        """The grid step of `kernel`'s quantization, per channel or not."""
        return ops.grid_scale(
            *self.weight_range(kernel),
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
        )

    def quantize_weights(self, kernel):
        """Fake-quantizes `kernel` with its own range."""
        min_val, max_val = self.weight_range(kernel)
        return ops.fake_quant(
            kernel,
            min_val,
            max_val,
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=-1 if self.per_channel else None,
        )

    def maybe_quantize_weights(self, kernel, training):
        """`kernel`, fake-quantized once `quant_delay` steps have passed.

        Returns `(kernel, active)`: `active` says whether it is quantized,
        a boolean tensor or (while traced for export) Python `True`. A
        training call also advances the step counter. Kernels are small, so
        both are computed and one is selected (`tf.where`, not `tf.cond`):
        no control flow in the layer, and the gradient of the chosen one
        flows.
        """
        if is_tracing_for_export() and not training:
            return self.quantize_weights(kernel), True
        step = tf.identity(self.step)
        if training:
            self.step.assign_add(1)
        active = step >= self.quant_delay
        return tf.where(active, self.quantize_weights(kernel), kernel), active

    def copy_weights_from(self, layer):
        """Copies every weight of float layer `layer` into this layer.

        Weights are matched by their path below the layer (`conv/kernel`,
        `bn/gamma`, ...), so the order of creation does not matter.
        """
        own = {_relative_path(v, self): v for v in self.weights}
        for source in layer.weights:
            key = _relative_path(source, layer)
            if key not in own:
                raise ValueError(
                    f"Cannot copy weight '{key}' of layer '{layer.name}' "
                    f"({layer.__class__.__name__}) into "
                    f"{self.__class__.__name__}: it has no such weight."
                )
            own[key].assign(source)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_bits=self.num_bits,
            per_channel=self.per_channel,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            quant_delay=self.quant_delay,
        )
        return config


def _relative_path(variable, layer):
    """The path of `variable` below `layer`, such as `conv/kernel`."""
    path = variable.path
    prefix = layer.path + "/" if hasattr(layer, "path") else layer.name + "/"
    if path.startswith(prefix):
        return path[len(prefix) :]
    return path.split("/", 1)[-1]


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DBnAct(_QuantizedWeights, Conv2DBnAct):
    """`Conv2DBnAct` whose kernel is fake-quantized.

    Takes every argument of `Conv2DBnAct`, plus the weight-quantization
    options below. Usually created by `convert_quant_network`, not by hand.

    Args:
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output channel.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `Conv2DBnAct`.

    Raises:
        ValueError: for an invalid argument.

    Example:

    >>> layer = QuantConv2DBnAct(8, 3, per_channel=True, activation="relu")
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 8])
    """


class DepthwiseKernelChannelsLast:
    """Mixin: a depthwise kernel seen with its output channels last.

    The kernel `(kh, kw, in, multiplier)` is used as `(kh, kw, 1, in *
    multiplier)`: output channel `c * multiplier + m` on the last axis, the
    layout of TFLite's depthwise weights. Per-channel quantization and
    BatchNorm folding then work on the last axis as for a conv, with one
    range per output channel (tfmot quantized the wrong axis here,
    tensorflow#47858); `apply_kernel` reshapes back.
    """

    def weight_kernel(self):
        kernel = self.depthwise.kernel
        kh, kw, channels, multiplier = kernel.shape
        return tf.reshape(kernel, [kh, kw, 1, channels * multiplier])


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv2DBnAct(
    DepthwiseKernelChannelsLast, _QuantizedWeights, DepthwiseConv2DBnAct
):
    """`DepthwiseConv2DBnAct` whose kernel is fake-quantized.

    Takes every argument of `DepthwiseConv2DBnAct`, plus the
    weight-quantization options of `QuantConv2DBnAct`. With
    `per_channel=True` each of the `in_channels * depth_multiplier` output
    channels has its own range. Usually created by `convert_quant_network`.

    Args:
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output channel.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `DepthwiseConv2DBnAct`.

    Raises:
        ValueError: for an invalid argument.

    Example:

    >>> layer = QuantDepthwiseConv2DBnAct(3, depth_multiplier=2,
    ...                                   per_channel=True)
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 6])
    """


class DenseAsConvForExport:
    """Mixin: traces a per-channel quantized dense unit as a 1x1 conv.

    The TFLite converter turns a MatMul with per-channel fake-quantized
    weights into a transpose whose quantized axis does not match ("'tfl.
    transpose' op has mismatched quantized axes"), but converts a 1x1
    Conv2D with per-output-channel weights into an int8 CONV_2D. So the
    export trace of a per-channel layer runs the whole unit (1x1 conv, bias,
    BatchNorm, activation) on `(n, 1, 1, in)` inputs and reshapes back at
    the end. The kernel is reshaped to `(1, 1, in, out)` before it is
    quantized, so its quantized axis is the last one throughout; ranges and
    dot products are those of the matmul. Training and inference are not
    affected.
    """

    _as_conv = False  # True while traced for export as a 1x1 conv.

    def weight_kernel(self):
        kernel = super().weight_kernel()
        if self._as_conv:
            return tf.reshape(kernel, [1, 1] + list(kernel.shape))
        return kernel

    def call(self, inputs, training=False):
        self._as_conv = (
            self.per_channel and not training and is_tracing_for_export()
        )
        if not self._as_conv:
            return super().call(inputs, training=training)
        in_units, units = self.dense.kernel.shape
        flat = tf.reshape(inputs, [-1, 1, 1, in_units])
        outputs = super().call(flat, training=training)
        if inputs.shape.rank == 2:  # a static shape: no shape ops in the model
            return tf.reshape(outputs, [-1, units])
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [units]], 0))


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDenseBnAct(DenseAsConvForExport, _QuantizedWeights, DenseBnAct):
    """`DenseBnAct` whose kernel is fake-quantized.

    Takes every argument of `DenseBnAct`, plus the weight-quantization
    options of `QuantConv2DBnAct`. Usually created by
    `convert_quant_network`, not by hand.

    Args:
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output unit.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `DenseBnAct`.

    Raises:
        ValueError: for an invalid argument.

    Example:

    >>> layer = QuantDenseBnAct(4, num_bits=4)
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 4])
    """


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConcatenate(keras.layers.Concatenate):
    """`Concatenate` whose inputs and output share one quantization range.

    An integer concatenation writes every input on the output's grid
    (TFLite requires one scale for all operands of CONCATENATION). This
    layer keeps that range in a `FakeQuant` sub-layer named `quant`, learned
    from the concatenated values, and quantizes with it the inputs listed in
    `quantize_inputs` (by default all) and the output.

    `convert_quant_network` lists the inputs that have no `FakeQuant` of
    their own: an integer op writes those directly on the concatenation's
    grid. An input that is already fake-quantized (because other layers use
    it too) is left as it is and is requantized by the output's
    quantization, as the integer model requantizes it; quantizing it here
    as well would put two fake-quant ops in a row, which the TFLite
    converter does not translate faithfully.

    Args:
        axis: Concatenation axis.
        quantize_inputs: `None` (all inputs) or one boolean per input.
        num_bits: Bit width of the shared range.
        symmetric: Symmetric range.
        narrow_range: Grid `[1, 2**num_bits - 1]`.
        ema: Moving-average range updates (see `FakeQuant`).
        ema_decay: Moving-average decay.
        quant_delay: Training steps before quantization starts.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantConcatenate(axis=-1)
    >>> y = layer([np.ones((2, 3)), -np.ones((2, 2))], training=True)
    >>> float(layer.quant.min.numpy()), float(layer.quant.max.numpy())
    (-1.0, 1.0)
    """

    def __init__(
        self,
        axis=-1,
        quantize_inputs=None,
        num_bits=8,
        symmetric=False,
        narrow_range=False,
        ema=True,
        ema_decay=0.999,
        quant_delay=0,
        **kwargs,
    ):
        super().__init__(axis=axis, **kwargs)
        if quantize_inputs is not None:
            quantize_inputs = [bool(flag) for flag in quantize_inputs]
        self.quantize_inputs = quantize_inputs
        self.quant = FakeQuant(
            num_bits=num_bits, symmetric=symmetric, narrow_range=narrow_range, ema=ema,
            ema_decay=ema_decay, quant_delay=quant_delay, name="quant",
        )

    def build(self, input_shape):
        if self.quantize_inputs is not None and len(self.quantize_inputs) != len(input_shape):
            raise ValueError(
                f"`quantize_inputs` has {len(self.quantize_inputs)} entries for "
                f"{len(input_shape)} inputs. Received: quantize_inputs={self.quantize_inputs}"
            )
        super().build(input_shape)
        self.quant.build(self.compute_output_shape(input_shape))

    def call(self, inputs, training=False):
        flags = self.quantize_inputs or [True] * len(inputs)
        min_val, max_val, active = self.quant.observe(super().call(inputs), training)
        inputs = [
            self.quant.quantize_with(x, min_val, max_val, active) if flag else x
            for x, flag in zip(inputs, flags)
        ]
        outputs = super().call(inputs)
        if all(flags):  # already on the shared grid
            return outputs
        return self.quant.quantize_with(outputs, min_val, max_val, active)

    def compute_output_spec(self, inputs, training=False):
        return super().compute_output_spec(inputs)

    def output_grid(self, training=False):
        """`(scale, active)` of the output's grid: see `FakeQuant.output_grid`."""
        return self.quant.output_grid(training)

    def get_config(self):
        config = super().get_config()
        config["quantize_inputs"] = self.quantize_inputs
        config.update(_range_options(self.quant))
        return config


def _range_options(fake_quant):
    """The options of a `FakeQuant` sub-layer, for a layer's config."""
    config = fake_quant.get_config()
    keys = ("num_bits", "symmetric", "narrow_range", "ema", "ema_decay", "quant_delay")
    return {key: config[key] for key in keys}


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantAveragePooling2D(keras.layers.AveragePooling2D):
    """`AveragePooling2D` whose input and output share one range.

    TFLite's int8 AVERAGE_POOL_2D writes its output on its input's grid
    (same scale and zero point), so the average is rounded to that grid.
    This layer keeps the range in a `FakeQuant` sub-layer named `quant`,
    learned from its input, quantizes the input with it (its producer then
    needs no `FakeQuant` of its own) and rounds the average to the same
    grid as the int8 kernel does: half away from zero in signed integers
    (XNNPACK, TFLite's default CPU path, matched on 99.98 % of outputs in
    our measurement, where rounding half up as a FakeQuant does matched
    70 %: averages of 2x2 windows are ties a quarter of the time).
    `convert_quant_network` uses it where the pooled tensor has no other
    consumer.

    Args:
        pool_size, strides, padding, data_format: As in `AveragePooling2D`.
        num_bits: Bit width of the shared range.
        symmetric: Symmetric range.
        narrow_range: Grid `[1, 2**num_bits - 1]`.
        ema: Moving-average range updates (see `FakeQuant`).
        ema_decay: Moving-average decay.
        quant_delay: Training steps before quantization starts.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantAveragePooling2D(2)
    >>> y = layer(np.ones((1, 4, 4, 2), "float32"), training=True)
    >>> y.shape
    TensorShape([1, 2, 2, 2])
    """

    def __init__(
        self,
        pool_size,
        strides=None,
        padding="valid",
        data_format=None,
        num_bits=8,
        symmetric=False,
        narrow_range=False,
        ema=True,
        ema_decay=0.999,
        quant_delay=0,
        **kwargs,
    ):
        super().__init__(pool_size, strides=strides, padding=padding, data_format=data_format, **kwargs)
        self.quant = FakeQuant(
            num_bits=num_bits, symmetric=symmetric, narrow_range=narrow_range, ema=ema,
            ema_decay=ema_decay, quant_delay=quant_delay, name="quant",
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.quant.build(input_shape)

    def call(self, inputs, training=False):
        min_val, max_val, active = self.quant.observe(inputs, training)
        pooled = super().call(self.quant.quantize_with(inputs, min_val, max_val, active))
        if active is True:  # traced for export: the converter reads the range
            return self.quant.quantize_with(pooled, min_val, max_val, active)
        return tf.where(active, self.round_average(pooled, min_val, max_val), pooled)

    def round_average(self, pooled, min_val, max_val):
        """`pooled` (averages of on-grid values) rounded to the grid half
        away from zero in signed integers; straight-through gradient."""
        quant = self.quant
        low, high = ops.quant_range(min_val, max_val, quant.symmetric)
        nudged_min, _, scale = ops.nudged_range(low, high, quant.num_bits, quant.narrow_range)
        offset = 2.0 ** (quant.num_bits - 1)  # level -> signed integer
        signed = (tf.cast(pooled, tf.float32) - nudged_min) / scale - offset
        # Averages are multiples of 1 / window size: only ties lie within
        # 1e-3 of a half, and float error must not move them below it.
        rounded = tf.sign(signed) * tf.floor(tf.abs(signed) + 0.5 + 1e-3)
        on_grid = tf.cast((rounded + offset) * scale + nudged_min, pooled.dtype)
        return pooled + tf.stop_gradient(on_grid - pooled)

    def compute_output_spec(self, inputs, training=False):
        return super().compute_output_spec(inputs)

    def output_grid(self, training=False):
        """`(scale, active)` of the output's grid: see `FakeQuant.output_grid`."""
        return self.quant.output_grid(training)

    def get_config(self):
        config = super().get_config()
        config.update(_range_options(self.quant))
        return config


class _TwoOpActivation(keras.layers.Layer):
    """Base: an activation that TFLite computes as two int8 ops.

    The first op's result is rounded to a fixed grid, held by a `FakeQuant`
    sub-layer named `quant` of range `intermediate_range`; subclasses
    compute the activation around it in `call`.
    """

    intermediate_range = None

    def __init__(self, num_bits=8, quant_delay=0, **kwargs):
        super().__init__(**kwargs)
        self.quant = FakeQuant(
            num_bits=num_bits,
            quant_delay=quant_delay,
            fixed_range=self.intermediate_range,
            name="quant",
        )

    def build(self, input_shape):
        self.quant.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_bits=self.quant.num_bits, quant_delay=self.quant.quant_delay)
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantHardSigmoid(_TwoOpActivation):
    """`hard_sigmoid`, `relu6(x + 3) / 6`, as TFLite's int8 ops compute it.

    TFLite has no int8 hard-sigmoid kernel: the converter turns
    `hard_sigmoid` into an ADD of 3 with a fused ReLU6, then a MUL by 1/6,
    and each of them needs a quantized output. This layer quantizes the
    ReLU6 result with a `FakeQuant` sub-layer named `quant` of fixed range
    `[0, 6]`; `convert_quant_network` puts a `FakeQuant` of fixed range
    `[0, 1]` after it for the MUL.

    Args:
        num_bits: Bit width of the intermediate range.
        quant_delay: Training steps before quantization starts.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantHardSigmoid()
    >>> [float(v) for v in layer(np.array([-4.0, 0.0, 4.0], "float32"))]
    [0.0, 0.5, 1.0]
    """

    intermediate_range = (0.0, 6.0)

    def call(self, inputs, training=False):
        clipped = keras.ops.relu6(inputs + 3.0)
        return self.quant(clipped, training=training) * (1.0 / 6.0)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantSwish(_TwoOpActivation):
    """`swish` / `silu`, `x * sigmoid(x)`, as TFLite's int8 ops compute it.

    TFLite computes swish as a LOGISTIC and a MUL, and the int8 LOGISTIC
    writes the sigmoid on its fixed grid (scale 1/256, range `[0, 255/256]`)
    before the multiplication. Computed in float, the sigmoid is not rounded
    there, and 14 % of int8 swish outputs differed by one or two steps in
    our measurement. This layer rounds the sigmoid to that grid with a
    `FakeQuant` sub-layer named `quant` of fixed range;
    `convert_quant_network` puts a `FakeQuant` after it for the MUL.

    Args:
        num_bits: Bit width of the sigmoid's grid.
        quant_delay: Training steps before quantization starts.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantSwish()
    >>> [round(float(v), 4) for v in layer(np.array([-1.0, 0.0, 2.0], "float32"))]
    [-0.2695, 0.0, 1.7578]
    """

    intermediate_range = (0.0, 255 / 256)

    def call(self, inputs, training=False):
        return inputs * self.quant(keras.ops.sigmoid(inputs), training=training)
