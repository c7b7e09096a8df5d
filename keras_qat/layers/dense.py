"""`DenseBnAct`: a dense layer as a fusion layer."""

import keras
import tensorflow as tf

from keras_qat.layers.call_context import is_tracing_for_export
from keras_qat.layers.fusion import FusionLayer


@keras.saving.register_keras_serializable(package="keras_qat")
class DenseBnAct(FusionLayer):
    """Densely-connected layer, optional BatchNormalization and activation.

    A drop-in for `keras.layers.Dense` (followed by `BatchNormalization` when
    `has_bn=True`), and the unit that `convert_quant_network` quantizes. The
    matmul is a `keras.layers.Dense` sub-layer named `dense`, the BatchNorm a
    `keras.layers.BatchNormalization` named `bn`.

    Args:
        units, use_bias, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: As in `keras.layers.Dense`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the matmul.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

    Input shape:
        N-D tensor `(batch, ..., input_dim)`.

    Output shape:
        N-D tensor `(batch, ..., units)`.

    Raises:
        ValueError: for an invalid argument (as `keras.layers.Dense` does).

    Example:

    >>> layer = DenseBnAct(10, activation="relu6")
    >>> layer(np.zeros((4, 32), "float32")).shape
    TensorShape([4, 10])
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        has_bn=False,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            activation=activation,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.dense = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
            name="dense",
        )
        self._as_conv = False  # True while traced for export as a 1x1 conv

    @property
    def linear_layer(self):
        return self.dense

    def kernel(self):
        kernel = self.dense.kernel
        if self._as_conv:
            return tf.reshape(kernel, [1, 1] + list(kernel.shape))
        return kernel

    def kernel_op(self, inputs, kernel):
        if kernel.shape.rank == 4:  # (1, 1, in, out): as a 1x1 convolution
            return tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID")
        return keras.ops.matmul(inputs, kernel)

    def bn_input_shape(self, input_shape):
        """A quantized layer's BatchNorm sees the flattened `(n, units)`
        output (see `call`)."""
        shape = self.dense.compute_output_shape(input_shape)
        return shape if not self.quantized else (None, shape[-1])

    def build(self, input_shape):
        super().build(input_shape)
        if self.quantized and self.bn is not None:
            # Traced for export as a 1x1 conv, the BatchNorm (inference: the
            # moving statistics, per last axis) normalizes `(n, 1, 1, units)`.
            units = self.dense.units
            self.bn.input_spec = keras.InputSpec(min_ndim=2, axes={-1: units})

    def call(self, inputs, training=False, input_scale=None):
        """As `FusionLayer.call`. A quantized layer runs on inputs flattened
        to `(n, in)` (traced for export with per-channel weights, `(n, 1, 1,
        in)`: a 1x1 convolution), bias, BatchNorm and activation included,
        and reshapes the result back.

        On more than 2D inputs Keras' matmul is a Tensordot, whose bias add
        comes after a reshape, where the converter leaves it in float; on
        2D inputs the converter fuses it into an int8 FULLY_CONNECTED. It
        turns a MatMul with per-channel fake-quantized weights into a
        transpose whose quantized axis does not match, but converts a 1x1
        Conv2D with per-output-channel weights into an int8 CONV_2D; the
        kernel is reshaped to `(1, 1, in, out)` before it is quantized, so
        its quantized axis is the last one throughout.
        """
        self._as_conv = (
            self.quantized
            and self.weight_quantizer.per_channel
            and not training
            and is_tracing_for_export()
        )
        if not self.quantized or (inputs.shape.rank == 2 and not self._as_conv):
            return super().call(inputs, training=training, input_scale=input_scale)
        in_units, units = self.dense.kernel.shape
        flat = tf.reshape(inputs, [-1, 1, 1, in_units] if self._as_conv else [-1, in_units])
        outputs = super().call(flat, training=training, input_scale=input_scale)
        middle = list(inputs.shape[1:-1])
        if all(size is not None for size in middle):  # a static shape: no shape ops
            return tf.reshape(outputs, [-1] + middle + [units])
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [units]], 0))
