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

from keras_qat.config import DEFAULT_NUM_BITS
from keras_qat.layers.fake_quant import FakeQuant


class TwoOpActivation(keras.layers.Layer):
    """Base: an activation that TFLite computes as two int8 ops.

    Subclasses set `intermediate_range`, the fixed range of the first op's
    output, and compute the activation around `self.quantizer` in `call`.

    Args:
        num_bits: Bit width of the intermediate grid.
        quant_delay: Training steps before quantization starts.
        **kwargs: Base layer keyword arguments, such as `name`.
    """

    intermediate_range = None

    def __init__(self, num_bits=DEFAULT_NUM_BITS, quant_delay=0, **kwargs):
        super().__init__(**kwargs)
        self.quantizer = FakeQuant(
            num_bits=num_bits,
            quant_delay=quant_delay,
            fixed_range=self.intermediate_range,
            name="quantizer",
        )

    def build(self, input_shape):
        self.quantizer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_bits=self.quantizer.num_bits, quant_delay=self.quantizer.quant_delay)
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantHardSigmoid(TwoOpActivation):
    """`hard_sigmoid`, `relu6(x + 3) / 6`, as TFLite's int8 ops compute it.

    TFLite has no int8 hard-sigmoid kernel: the converter turns
    `hard_sigmoid` into an ADD of 3 with a fused ReLU6, then a MUL by 1/6,
    and each of them needs a quantized output. This layer rounds the ReLU6
    result to a fixed `[0, 6]` grid; `convert_quant_network` puts a
    `FakeQuant` of fixed range `[0, 1]` after it for the MUL.

    Args:
        num_bits: Bit width of the intermediate grid.
        quant_delay: Training steps before quantization starts.
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
    `FakeQuant` after it for the MUL.

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
        return inputs * self.quantizer(keras.ops.sigmoid(inputs), training=training)


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
