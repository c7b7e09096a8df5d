"""keras-hub backbones at tiny configurations: int8 TFLite against Keras.

Issue 34's protocol, over seeds: each backbone (random weights, the tiny
configurations of `tests/test_keras_hub.py`, imported from there so that
the benchmark and the tests measure the same models) is converted with the
defaults, trained 2 steps on 32 random inputs (SGD 1e-3 towards random
targets, which sets its ranges), exported to int8 TFLite and compared with
the Keras model on 64 other random inputs (XNNPACK, `compare_tflite`). The
table gives the mean and largest difference in output steps, the share of
outputs within one step and the top-1 (per-token argmax) agreement on rows
without a near-tie; the target is a mean of at most one step and 100 %.

Usage:
    python bench/keras_hub_parity.py [--models vit_16,densenet] [--seeds 0,1,2]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_keras_hub as tiny  # noqa: E402
from results_file import write_results  # noqa: E402

import keras_qat as kq  # noqa: E402
from keras_qat.export.interpreter import float_ops  # noqa: E402


def vit(image_size, num_layers):
    def build():
        return keras_hub.models.ViTBackbone(
            image_shape=(image_size, image_size, 3),
            patch_size=8,
            num_layers=num_layers,
            num_heads=2,
            hidden_dim=8,
            mlp_dim=16,
        )

    return build


MODELS = {
    "vit_16": vit(16, 1),
    "vit_32": vit(32, 1),
    "vit_32_two_blocks": vit(32, 2),
    "deit": tiny.deit,
    "densenet": tiny.densenet,
    "efficientnet": tiny.efficientnet,
    "mobilenet_v3": tiny.mobilenet_v3,
    "resnet_pre_activation": tiny.resnet(True),
}

flags.DEFINE_list("models", list(MODELS), "Backbones to run.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (weights, data).")
flags.DEFINE_string("output", "bench/results/keras_hub_parity.json", "JSON output path.")
FLAGS = flags.FLAGS


def run(name, seed):
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    qat_model = kq.convert_quant_network(model)
    x = tiny.inputs_for(model, 32, seed=seed)
    targets = np.random.default_rng(seed).standard_normal((32,) + tuple(model.output.shape[1:]))
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    for _ in range(2):
        qat_model.train_on_batch(x, targets.astype("float32"))
    tflite_model = kq.export_tflite(qat_model)
    result = kq.compare_tflite(qat_model, tflite_model, tiny.inputs_for(model, 64, seed=seed + 10))
    return {
        "model": name,
        "seed": seed,
        "float_ops": float_ops(tflite_model),
        "mean_diff_steps": result["mean_abs_diff"] / result["output_scale"],
        **result,
    }


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; known: {sorted(MODELS)}")
    rows = []
    print(f"{'model':24s} seed  mean steps  max steps  within one  top-1 (clear)")
    for name in FLAGS.models:
        for seed in map(int, FLAGS.seeds):
            row = run(name, seed)
            rows.append(row)
            print(
                f"{name:24s} {seed:4d}  {row['mean_diff_steps']:10.3f}  "
                f"{row['max_diff_steps']:9.0f}  {row['within_one_step']:9.2%}  "
                f"{row['top1_agreement_unambiguous']:12.2%}",
                flush=True,
            )
    write_results(FLAGS.output, {"models": FLAGS.models, "seeds": FLAGS.seeds}, rows)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
