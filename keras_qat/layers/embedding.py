"""`QuantEmbedding`: an embedding whose table is fake-quantized.

In the integer model an embedding is a GATHER from an int8 table, and its
output keeps the table's grid: nothing rounds after it. The table is
quantized per tensor (a gathered row would otherwise carry one scale per
column, which no int8 kernel after it takes), by a `WeightQuantizer`
sub-layer like a conv kernel's.
"""

import keras
import tensorflow as tf

from keras_qat.layers.fake_quant import with_scale_spec
from keras_qat.layers.weight_quantizer import WeightQuantizer


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantEmbedding(keras.layers.Embedding):
    """`keras.layers.Embedding` whose table is fake-quantized.

    Called with `return_scale=True`, the layer also returns the grid of its
    output (the table's step, 0 during the quant delay), for the int32 bias
    of a quantized layer that consumes it.

    Args:
        input_dim, output_dim, embeddings_initializer, embeddings_regularizer,
            embeddings_constraint, mask_zero: As in `keras.layers.Embedding`.
        weight_quantizer: A per-tensor `WeightQuantizer`, a dict of its
            options, or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Raises:
        ValueError: for a per-channel `weight_quantizer` or another invalid
            argument.

    Example:

    >>> layer = QuantEmbedding(10, 4, weight_quantizer=dict(num_bits=4))
    >>> layer(np.array([[1, 2, 3]])).shape
    TensorShape([1, 3, 4])
    """

    def __init__(self, input_dim, output_dim, weight_quantizer=None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.weight_quantizer = WeightQuantizer.get(weight_quantizer, "weight_quantizer")
        if self.weight_quantizer.per_channel:
            raise ValueError(
                "QuantEmbedding quantizes its table per tensor: a gathered row with "
                "one scale per column has no int8 consumer. Received: "
                "weight_quantizer with per_channel=True"
            )

    def build(self, input_shape=None):
        super().build(input_shape)
        if not self.weight_quantizer.built:  # built when loaded
            self.weight_quantizer.build(self.embeddings.shape)

    def call(self, inputs, training=False, return_scale=False):
        weights = self.weight_quantizer.quantize_weights(
            tf.cast(self.embeddings, tf.float32), training
        )
        if inputs.dtype not in (tf.int32, tf.int64):
            inputs = tf.cast(inputs, tf.int32)
        outputs = tf.cast(tf.gather(weights.values, inputs), self.compute_dtype)
        if return_scale:
            return outputs, tf.reshape(tf.cast(weights.scale, tf.float32), [])
        return outputs

    def quantizers(self):
        """`{"weights/embeddings": weight_quantizer}` (`keras_qat.quantizer_roles`)."""
        return {"weights/embeddings": self.weight_quantizer}

    def quantized_weights(self):
        """`{"weights/embeddings": the float32 table}`."""
        return {"weights/embeddings": tf.cast(self.embeddings, tf.float32)}

    def compute_output_spec(self, inputs, training=False, return_scale=False):
        shape = tuple(inputs.shape) + (self.output_dim,)
        return with_scale_spec(keras.KerasTensor(shape, self.compute_dtype), return_scale)

    def copy_weights_from(self, source):
        """Copies the table of the float `keras.layers.Embedding` `source`."""
        self.embeddings.assign(source.embeddings)

    def get_config(self):
        config = super().get_config()
        config["weight_quantizer"] = keras.saving.serialize_keras_object(self.weight_quantizer)
        return config
