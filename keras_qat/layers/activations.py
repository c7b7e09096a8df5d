"""Activations as TFLite's int8 ops compute them.

Two activations have no single int8 kernel: TFLite computes them as two int8
ops, and the first op's result is rounded to a fixed grid. These layers
simulate that rounding with a `FakeQuant` sub-layer named `quantizer`, of the
fixed range in `keras_qat.int8_rules`. `convert_quant_network` puts a
`FakeQuant` after them for the second op.

`LeakyReLUActivation` is a serializable leaky ReLU of a given slope, the
activation of a fusion layer that absorbed a `LeakyReLU` layer.
"""

import keras

from keras_qat.layers.fake_quant import FakeQuant, with_scale_spec


class TwoOpActivation(keras.layers.Layer):
    """Base: an activation that TFLite computes as two int8 ops.

    Subclasses set `intermediate_range`, the fixed range of the first op's
    output, and compute the activation around `self.quantizer` in `call`.

    Args:
        quantizer: The intermediate grid: a `FakeQuant` with the fixed range
            `intermediate_range`, a dict of `FakeQuant` options (bit width,
            quant delay, ...; the range is set here), or None for the
            defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Raises:
        ValueError: for a `quantizer` of another range or type.
    """

    intermediate_range = None

    def __init__(self, quantizer=None, **kwargs):
        super().__init__(**kwargs)
        if quantizer is None or (isinstance(quantizer, dict) and "class_name" not in quantizer):
            quantizer = dict(quantizer or {}, fixed_range=self.intermediate_range)
            quantizer.setdefault("name", "quantizer")
        self.quantizer = FakeQuant.get(quantizer, "quantizer")
        if self.quantizer.fixed_range != tuple(self.intermediate_range):
            raise ValueError(
                f"{self.__class__.__name__}'s intermediate grid is TFLite's fixed range "
                f"{self.intermediate_range}. Received: quantizer with fixed_range="
                f"{self.quantizer.fixed_range}"
            )

    def build(self, input_shape):
        if not self.quantizer.built:  # built when loaded
            self.quantizer.build(input_shape)

    def quantizers(self):
        """`{"intermediate": quantizer}` (`keras_qat.quantizer_roles`)."""
        return {"intermediate": self.quantizer}

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config

    @classmethod
    def from_config(cls, config):
        """Also reads the configs of keras-qat 0.2.0.dev, whose `num_bits`
        and `quant_delay` were arguments of the layer itself."""
        config = dict(config)
        legacy = {key: config.pop(key) for key in ("num_bits", "quant_delay") if key in config}
        if legacy:
            config["quantizer"] = dict(config.get("quantizer") or {}, **legacy)
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantHardSigmoid(TwoOpActivation):
    """`hard_sigmoid`, `relu6(x + 3) / 6`, as TFLite's int8 ops compute it.

    TFLite has no int8 hard-sigmoid kernel: the converter turns
    `hard_sigmoid` into an ADD of 3 with a fused ReLU6, then a MUL by 1/6,
    and each of them needs a quantized output. This layer rounds the ReLU6
    result to a fixed `[0, 6]` grid; `convert_quant_network` puts a
    `FakeQuant` of fixed range `[0, 1]` after it for the MUL.

    Args:
        quantizer: The options of the intermediate grid (see
            `TwoOpActivation`).
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantHardSigmoid()
    >>> y = layer(np.array([-4.0, 0.0, 4.0], "float32"))  # 3 is level 128 of [0, 6]
    >>> [round(float(v), 4) for v in y]
    [0.0, 0.502, 1.0]
    """

    intermediate_range = (0.0, 6.0)

    def call(self, inputs, training=False):
        clipped = keras.ops.relu6(inputs + 3.0)
        return self.quantizer(clipped, training=training) * (1.0 / 6.0)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantSwish(TwoOpActivation):
    """`swish` / `silu`, `x * sigmoid(x)`, as TFLite's int8 ops compute it.

    TFLite computes swish as a LOGISTIC and a MUL, and the int8 LOGISTIC
    writes the sigmoid on its fixed grid (scale 1/256, range `[0, 255/256]`)
    before the multiplication. Computed in float, the sigmoid is not rounded
    there, and int8 swish outputs differ by a step or two from it. This layer
    rounds the sigmoid to that grid; `convert_quant_network` puts a
    `FakeQuant` after it for the MUL. Called with
    `return_sigmoid_scale=True`, the layer also returns the step of the
    sigmoid's grid (0 while it does not quantize): one of the MUL's operand
    grids, with which that `FakeQuant` rounds the product as the int8 MUL
    does (`FakeQuant(operand_scales=)`).

    Args:
        quantizer: The options of the sigmoid's grid (see
            `TwoOpActivation`).
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantSwish()
    >>> [round(float(v), 4) for v in layer(np.array([-1.0, 0.0, 2.0], "float32"))]
    [-0.2695, 0.0, 1.7578]
    """

    intermediate_range = (0.0, 255 / 256)

    def call(self, inputs, training=False, return_sigmoid_scale=False):
        sigmoid = keras.ops.sigmoid(inputs)
        if not return_sigmoid_scale:
            return inputs * self.quantizer(sigmoid, training=training)
        sigmoid, scale = self.quantizer(sigmoid, training=training, return_scale=True)
        return inputs * sigmoid, scale

    def compute_output_spec(self, inputs, training=False, return_sigmoid_scale=False):
        outputs = keras.KerasTensor(inputs.shape, inputs.dtype)
        return with_scale_spec(outputs, return_sigmoid_scale)


@keras.saving.register_keras_serializable(package="keras_qat")
class LeakyReLUActivation:
    """A serializable leaky ReLU with a given slope, for fused activations.

    Example:

    >>> LeakyReLUActivation(0.1)(np.array([-1.0, 2.0], "float32")).numpy()
    array([-0.1,  2. ], dtype=float32)
    """

    def __init__(self, negative_slope):
        self.negative_slope = negative_slope

    def __call__(self, x):
        return keras.activations.leaky_relu(x, negative_slope=self.negative_slope)

    def get_config(self):
        return {"negative_slope": self.negative_slope}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
