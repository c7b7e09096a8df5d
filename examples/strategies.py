"""--strategy for the examples: default, mirrored, multi_worker, tpu.

Keras 3's `model.fit` and `evaluate` do not run under
MultiWorkerMirroredStrategy (keras-team/keras#20585, tensorflow#72388), so
`fit` and `accuracy` here use `model.fit` / a plain forward pass, or under
that strategy an equivalent custom loop (`strategy.run` of a GradientTape
step; the Keras optimizer all-reduces the gradients). Launch one process per
worker with TF_CONFIG set, as TensorFlow's multi-worker guide describes;
only the chief (worker 0) writes files.

The TPU set-up follows TensorFlow's documented TPUStrategy calls
(TPUClusterResolver, connect_to_cluster, initialize_tpu_system); it has not
been run here (no TPU on the development or CI machines).
"""

import time

import keras
import numpy as np
import one_trace
import tensorflow as tf
from absl import flags

flags.DEFINE_enum(
    "strategy",
    "default",
    ["default", "mirrored", "multi_worker", "tpu"],
    "tf.distribute strategy to train under.",
)
flags.DEFINE_string(
    "tpu", None, "TPU address for --strategy=tpu (for example grpc://10.0.0.2:8470)."
)


def make_strategy(name, tpu=None):
    """Returns the `tf.distribute` strategy named by `--strategy`."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes files: always, except non-chief workers."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def fit(model, x, y, *, epochs, batch_size, optimizer, strategy, seed=1):
    """Trains `model` (logits, integer labels); returns seconds per epoch.

    `model.fit`, or under MultiWorkerMirroredStrategy the same training as a
    custom loop over the global batches, each worker taking its shard.
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if not is_multi_worker(strategy):
        timer = _EpochTimer()
        accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        one_trace.compile(model, optimizer, loss, [accuracy_metric])
        model.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=[timer], verbose=2)
        return timer.times
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed)
        .batch(batch_size)
        .with_options(options)
    )
    optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(per_example(y, model(x, training=True))) / batch_size
        optimizer.apply(tape.gradient(value, model.trainable_variables), model.trainable_variables)

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for batch_x, batch_y in strategy.experimental_distribute_dataset(data):
            step(batch_x, batch_y)
        times.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}/{epochs}: {times[-1]:.1f} s")
    return times


def accuracy(model, x, y, batch_size=1000):
    """Top-1 accuracy of the logits of `model` on `x` (inference mode)."""
    predict = tf.function(lambda batch: model(batch, training=False))
    logits = np.concatenate(
        [predict(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    )
    return float(np.mean(logits.argmax(-1) == y))


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
