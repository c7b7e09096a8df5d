"""`BatchBroadcast`: a tensor of one row repeated to another tensor's batch.

Traced layer code tiles a class token to the batch (`ops.tile(token,
(ops.shape(x)[0], 1, 1))`) or broadcasts a table to the input's shape; a
graph for any batch size does that with this layer
(`keras_qat.transforms.batch_size`). TFLite computes it as BROADCAST_TO,
which keeps the int8 grid.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_qat")
class BatchBroadcast(keras.layers.Layer):
    """Called on `[x, reference]`: `x` (batch axis of size 1) repeated to
    `reference`'s batch size.

    Example:

    >>> token = np.ones((1, 1, 4), "float32")
    >>> BatchBroadcast()([token, np.zeros((3, 7, 4), "float32")]).shape
    TensorShape([3, 1, 4])
    """

    def call(self, inputs):
        x, reference = inputs
        shape = (keras.ops.shape(reference)[0],) + tuple(keras.ops.shape(x)[1:])
        return keras.ops.broadcast_to(x, shape)

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (reference_shape[0],) + tuple(x_shape[1:])
