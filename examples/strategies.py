"""--strategy for the examples: default, mirrored, multi_worker, tpu.

The TPU set-up follows TensorFlow's documented TPUStrategy calls
(TPUClusterResolver, connect_to_cluster, initialize_tpu_system); it has not
been run here (no TPU on the development or CI machines).
"""

from absl import flags
import tensorflow as tf

flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy to train under.")
flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu (for example grpc://10.0.0.2:8470).")


def make_strategy(name, tpu=None):
    """Returns the `tf.distribute` strategy named by `--strategy`.

    Raises:
        ValueError: for `multi_worker`, which Keras 3's `fit` does not
            support (keras-team/keras#20585); keras-qat's layers do, with a
            custom loop such as tests/multi_worker_train.py.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        "--strategy=multi_worker: Keras 3's model.fit does not run under "
        "MultiWorkerMirroredStrategy (keras-team/keras#20585, tensorflow#72388), "
        "and these examples train with fit. keras-qat's layers do work under it "
        "with a custom training loop: see tests/multi_worker_train.py."
    )
