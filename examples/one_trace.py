"""`compile` for the examples: one trace of the training step, not two.

With TensorFlow and no distribution strategy, Keras creates the optimizer's
slots and the compiled metrics' variables while it traces the first
training step; `tf.function` then traces the whole step a second time (it
retraces a function that created variables). A QAT network's step is a large
graph, so the examples create those variables before `fit`: the optimizer is
built, and metrics are passed as objects (whose variables exist already).
"""


def compile(model, optimizer, loss, metrics=()):
    """`model.compile(optimizer, loss, metrics)`, then builds the optimizer
    for `model`'s trainable variables; `metrics` are `keras.metrics.Metric`
    objects. Call it under the strategy scope the model was created in."""
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    model.optimizer.build(model.trainable_variables)
