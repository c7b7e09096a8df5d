"""The SavedModel that the TFLite converter reads.

`save_for_conversion` writes what `model.export(path)` writes for the
converter, the model's inference call as the `serving_default` signature
with the variables it reads, and nothing else: the function is traced once
(Keras' `ExportArchive` traces a model three times: for its variables, for
the model's own default signature, and again for the signature), and the
gradient functions of the fake-quant ops' custom gradients are not saved
(a conversion never asks for them). The converter's output is the same
model. Measured on `keras.applications.MobileNetV3Small` (64 x 64, 200
quantizers): saving took 11-15 s instead of 37-45 s.
"""

import contextlib
import logging

import tensorflow as tf

from keras_qat import graph

# What TensorFlow logs when it loads a function saved without the
# gradients of its custom-gradient ops, as the converter does here.
_UNSAVED_GRADIENTS = "with ops with unsaved custom gradients"


def save_for_conversion(model, path):
    """Writes `model`'s inference call to `path` as a SavedModel whose
    `serving_default` signature takes the inputs `model.export` would
    serve (their structure and names)."""
    serve = tf.function(
        lambda *inputs: model(*inputs, training=False),
        input_signature=graph.export_input_signature(model),
        autograph=False,
    )
    concrete = serve.get_concrete_function()
    module = tf.Module()
    module.served_variables = list(concrete.variables)
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, path, signatures={"serving_default": concrete}, options=options)


class _WithoutUnsavedGradientWarnings(logging.Filter):
    def filter(self, record):
        return _UNSAVED_GRADIENTS not in record.getMessage()


@contextlib.contextmanager
def unsaved_gradients_unmentioned():
    """Within this context TensorFlow does not warn that the SavedModels
    of `save_for_conversion` have no gradient functions."""
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    log_filter = _WithoutUnsavedGradientWarnings()
    for logger in loggers:
        logger.addFilter(log_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(log_filter)
