"""`WeightOperand`: a layer's own weight as a tensor of the graph.

A custom layer that uses its weight in an operation (`x * self.scale`, a
position table sliced and added, a class token concatenated) computes with
a tensor that no layer of a Functional graph outputs. Tracing such a layer
(`keras_qat.transforms.tracing`) puts a `WeightOperand` in the graph
instead: it holds a copy of the weight (trainable as the original) and
outputs it, whatever its input (any tensor of the graph, which only places
it there). In the int8 model the weight is a constant operand, stored on
the int8 grid of its own range; placement puts a `FakeQuant` after a float
`WeightOperand` for that (an integer one, such as position ids, is left as
it is), or, where it reaches only a concatenation (a class token), puts it
on the concatenation's grid.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_qat")
class WeightOperand(keras.layers.Layer):
    """Outputs its weight, a tensor of fixed shape, whatever its input.

    Args:
        shape: The weight's shape (a tuple of integers).
        weight_dtype: The weight's dtype (default: the layer's variable
            dtype).
        initializer: The weight's initializer (tracing copies the traced
            layer's weight in instead).
        **kwargs: Base layer keyword arguments, such as `name`, `trainable`
            (whether the weight trains) and `dtype`.

    Example:

    >>> operand = WeightOperand((1, 3), initializer="ones", name="scale")
    >>> operand(np.zeros((2, 5))).numpy()
    array([[1., 1., 1.]], dtype=float32)
    """

    def __init__(self, shape, weight_dtype=None, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(d) for d in shape)
        self.weight_dtype = weight_dtype
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape=None):
        dtype = self.weight_dtype or self.variable_dtype
        self.value = self.add_weight(
            name="value", shape=self.shape, dtype=dtype, initializer=self.initializer
        )

    def call(self, inputs):
        value = keras.ops.convert_to_tensor(self.value)
        if keras.backend.is_float_dtype(value.dtype):
            value = keras.ops.cast(value, self.compute_dtype)
        return value

    def compute_output_shape(self, input_shape):
        return self.shape

    def compute_output_spec(self, inputs):
        dtype = self.weight_dtype or self.variable_dtype
        if keras.backend.is_float_dtype(dtype):
            dtype = self.compute_dtype
        return keras.KerasTensor(self.shape, dtype=dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "shape": self.shape,
            "weight_dtype": self.weight_dtype,
            "initializer": keras.initializers.serialize(self.initializer),
        }
