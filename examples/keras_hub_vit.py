"""keras-hub's `ViTBackbone` on MNIST: float, QAT, int8 TFLite.

The steps and flags of `examples/vit_quant.py`, with keras-hub's vision
transformer in place of ours: a `ViTBackbone` (7x7 patches, a class token,
learned position embeddings, `--blocks` encoder blocks of `--width` with
`--heads` heads and an MLP of twice the width), mean pooling over its tokens
and a Dense classifier, trained from scratch (keras-hub's presets need a
network). `convert_quant_network` traces keras-hub's custom layers into the
operations they compute.

Needs keras-hub (`pip install keras-hub`, or the `test` extra).
Data: MNIST IDX files (`bash scripts/get_data.sh mnist`) or `--data_dir`;
`--dataset=fashion_mnist` for Fashion-MNIST.

Usage:
    python examples/keras_hub_vit.py [--float_epochs 5] [--qat_epochs 1] [--blocks 2]
"""

import os
import sys

import keras
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vit_quant  # noqa: E402  (its flags are this example's)

flags.FLAGS.set_default("output_dir", "runs/keras_hub_vit")


def keras_hub_vit(width, heads, blocks):
    """keras-hub's `ViTBackbone` for 28x28x1 images with a 10-class head."""
    try:
        import keras_hub
    except ImportError as error:
        raise SystemExit("This example needs keras-hub: pip install keras-hub") from error
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(28, 28, 1),
        patch_size=7,
        num_layers=blocks,
        num_heads=heads,
        hidden_dim=width,
        mlp_dim=2 * width,
    )
    inputs = keras.Input((28, 28, 1))
    tokens = keras.layers.GlobalAveragePooling1D()(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(tokens))


if __name__ == "__main__":
    app.run(lambda argv: vit_quant.main(argv, network_fn=keras_hub_vit))
