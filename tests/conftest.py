import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, for tf.distribute tests (MirroredStrategy). This
# must happen before TensorFlow initializes its devices, so here, first.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)


def mirrored_strategy():
    """A MirroredStrategy over the two logical CPUs whose collective keys
    differ from earlier strategies' of this process: every MirroredStrategy
    starts its group keys at 1, and a later one's all-gathers then met an
    earlier one's keys ("Collective instance 104 expected type 0 ... got type
    2"); TensorFlow's own tests set this base ("Only set this in tests")."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
