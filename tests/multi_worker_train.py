"""A worker of the MultiWorkerMirroredStrategy test (tests/test_distribute.py).

Run with TF_CONFIG set: trains the test model on fixed global batches and
saves every weight to the .npz file named by the first argument. Imported by
the test, `train(strategy)` runs the same training on one device.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so this uses a custom loop: `strategy.run` of a
GradientTape step, and the Keras optimizer (which all-reduces gradients).
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import keras_qat as kq

GLOBAL_BATCH = 8


def build():
    inputs = keras.Input((6, 6, 2))
    x = kq.Conv2DBnAct(3, 3, has_bn=True, synchronized=True, activation="relu")(inputs)
    outputs = kq.DenseBnAct(2)(keras.layers.Flatten()(x))
    return kq.convert_quant_network(keras.Model(inputs, outputs), quant_delay=1, freeze_bn=2)


def dataset(steps):
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [rng.standard_normal((GLOBAL_BATCH, 6, 6, 2)) * (s + 1) for s in range(steps)]
    )
    y = rng.standard_normal((GLOBAL_BATCH * steps, 2))
    data = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y.astype("float32")))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.batch(GLOBAL_BATCH).with_options(options)


def train(strategy, steps=4):
    keras.utils.set_random_seed(7)
    with strategy.scope():
        model = build()
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model(x, training=True) - y), axis=-1)
            loss = tf.reduce_sum(per_example) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    for x, y in strategy.experimental_distribute_dataset(dataset(steps)):
        step(x, y)
    return [np.array(v.numpy()) for v in model.weights]


if __name__ == "__main__":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    weights = train(strategy)
    np.savez(sys.argv[1], **{f"w{i}": w for i, w in enumerate(weights)})
