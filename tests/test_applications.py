"""keras.applications networks (weights=None, small inputs) convert, train
two steps with `fit`, save and load, and export to an all-int8 TFLite
model that agrees with the Keras model: the same top-1 wherever the two
largest logits are more than two output steps apart, and logits on average
within two output steps. About a minute each on 2 CPU cores.

The agreement asked of these untrained networks is looser than that of the
small models in test_export.py (within one step at every FakeQuant):
untrained deep networks amplify one-step rounding differences. Their
BatchNorm statistics are still the initial ones, so the logits vary little
between inputs and many rows are near-ties (`ambiguous_rows`); ResNet50 and
ResNet50V2 differ by up to 5 output steps. With statistics calibrated on
the data they are worse still: Keras' own CPU and XLA fake-quant kernels,
which differ only at float ties, then disagree by up to 32 output steps on
MobileNetV2. Top-1 parity proper is measured on trained networks (the
examples and `bench/applications.py --train_images`).
"""

import keras
import numpy as np
import pytest

import keras_qat as kq
from test_export import assert_integer_model

EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])

# (constructor, input size, extra arguments, what the network brings)
NETWORKS = {
    "MobileNetV2": (96, dict(alpha=0.35)),  # depthwise, ReLU6, inverted residuals
    "ResNet50": (64, {}),  # conv + BN, ZeroPadding2D, MaxPooling2D, Add
    "ResNet50V2": (64, {}),  # pre-activation: BatchNorm after no conv
    "MobileNetV3Small": (64, {}),  # Rescaling, hard-swish, SE Multiply, x + 3 ops
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_application_converts_trains_saves_and_exports(name, tmp_path):
    size, kwargs = NETWORKS[name]
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None, **kwargs
    )
    qmodel = kq.convert_quant_network(model, **EXPORTABLE)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, size, size, 3)).astype("float32")
    if name == "MobileNetV3Small":
        x *= 255  # it rescales its own input
    qmodel.compile(optimizer=keras.optimizers.SGD(1e-4),
                   loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    qmodel.fit(x[:16], keras.utils.to_categorical(rng.integers(0, 10, 16), 10), batch_size=8, verbose=0)
    path = str(tmp_path / f"{name}.keras")
    qmodel.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
    tflite_bytes = kq.export_tflite(loaded)  # raises if a float compute op is left
    assert_integer_model(tflite_bytes, ["CONV_2D"], per_channel_ops=("CONV_2D", "DEPTHWISE_CONV_2D"))
    report = kq.compare_tflite(loaded, tflite_bytes, x)
    assert report["top1_agreement_unambiguous"] == 1.0, report
    assert report["mean_abs_diff"] <= 2 * report["output_scale"], report
