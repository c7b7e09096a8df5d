"""ResNet-20 on Fashion-MNIST: float, QAT with bn_fold=False, QAT with bn_fold=True.

1. Train a ResNet-20-style fusion network (Conv2DBnAct(has_bn=True) blocks,
   Add shortcuts) in float and save it.
2. Convert it twice, with bn_fold=True (BatchNorm folded into the weights
   that are fake-quantized, MindSpore's default) and with bn_fold=False
   (raw weights fake-quantized, then an ordinary BatchNorm), and QAT-train
   each for the same number of steps from the float weights.
3. Print float / bn_fold=False / bn_fold=True test accuracies (int8
   simulated) and write them as JSON.
4. With --export_tflite: export each QAT network to TFLite (weights of up
   to 4 bits as INT4 tensors), evaluate it on the test set and compare it
   with the Keras network (top-1 agreement); activations must be 8-bit.
   With --export_onnx: the same for a QDQ ONNX model run by ONNX Runtime
   (the `onnx` extra; 8-bit activations, weights stored as int8).

Data: Fashion-MNIST IDX files, by default from the Debian package
dataset-fashion-mnist (`bash scripts/get_data.sh fashion_mnist`), or
`--data_dir`.

Usage:
    python examples/resnet_quant.py [--float_epochs 6] [--qat_epochs 1] [--export_tflite]
        [--export_onnx]
"""

import collections
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idx_data  # noqa: E402
import quant_flags  # noqa: E402
import strategies  # noqa: E402
from models import resnet20  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string(
    "data_dir", None, "Directory with the Fashion-MNIST IDX files; default: the Debian package's."
)
flags.DEFINE_string("output_dir", "runs/resnet", "Where models and results are written.")
flags.DEFINE_integer("float_epochs", 6, "Float training epochs.")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs, for each of bn_fold=True and bn_fold=False.")
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_float("float_lr", 2e-3, "Adam learning rate of float training (cosine decay).")
flags.DEFINE_float("qat_lr", 1e-4, "Adam learning rate of QAT (cosine decay over the QAT steps).")
flags.DEFINE_string(
    "float_model", None, "A trained float .keras network to start from (skips float training)."
)
flags.DEFINE_bool(
    "int16_activations",
    False,
    "Symmetric activation grids (zero point 0), exported with --export_tflite in TFLite's 16x8 "
    "mode (int16 activations, int8 weights); use with --num_bits=8,16.",
)
flags.DEFINE_integer(
    "first_last_bits",
    0,
    "Bit width of the first and last layers: the input and the stem's weights, the pooled "
    "input, weights and output of the logits layer (LSQ keeps them at 8); 0: --num_bits.",
)
flags.DEFINE_integer("quant_delay", 100, "Training steps before fake quantization starts.")
flags.DEFINE_integer(
    "freeze_bn", 300, "Training step from which folded BatchNorm statistics freeze."
)
flags.DEFINE_integer(
    "limit_train", 0, "Use only this many training images (0: all); for smoke runs."
)
flags.DEFINE_list("bn_fold", ["false", "true"], "The bn_fold modes to QAT-train, in order.")
flags.DEFINE_integer("seed", 1, "Random seed.")
flags.DEFINE_bool(
    "export_tflite", False, "Export each QAT network to TFLite, evaluate and compare it."
)
flags.DEFINE_bool(
    "export_onnx",
    False,
    "Export each QAT network to a QDQ ONNX model, evaluate it in ONNX Runtime and compare it.",
)
flags.DEFINE_bool(
    "pack_int4",
    True,
    "With --export_tflite: store weights of up to 4 bits as INT4 (false: as int8 tensors of the "
    "same levels, which XNNPACK runs; see kq.export_tflite).",
)
FLAGS = flags.FLAGS


def train(model, data, epochs, learning_rate, strategy):
    (x_train, y_train), (x_test, y_test) = data
    times = strategies.fit(
        model,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=FLAGS.batch_size,
        optimizer=keras.optimizers.Adam(learning_rate),
        strategy=strategy,
        seed=FLAGS.seed,
    )
    return strategies.accuracy(model, x_test, y_test), float(sum(times))


def main(argv):
    del argv
    quant_flags.num_bits()  # a bad value fails before training
    bn_fold_modes()
    if FLAGS.export_tflite and quant_flags.num_bits()[1] != (16 if int16() else 8):
        raise app.UsageError(
            "--export_tflite needs 8-bit activations (TFLite's integer kernels), or 16-bit "
            f"ones with --int16_activations. Received: --num_bits={','.join(FLAGS.num_bits)}"
        )
    if FLAGS.export_onnx and (quant_flags.num_bits()[1] != 8 or int16()):
        raise app.UsageError(
            "--export_onnx needs 8-bit activations. Received: "
            f"--num_bits={','.join(FLAGS.num_bits)}" + (" --int16_activations" if int16() else "")
        )
    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    strategy = strategies.make_strategy(FLAGS.strategy, FLAGS.tpu)
    data = idx_data.load_for_training("fashion_mnist", FLAGS.data_dir, FLAGS.limit_train)
    chief = strategies.is_chief(strategy)  # the one writer under multi-worker training
    out_dir = FLAGS.output_dir if chief else tempfile.mkdtemp()
    with strategy.scope():
        results = train_all(data, strategy, out_dir)
    if not chief:
        return
    for bn_fold in bn_fold_modes():
        if FLAGS.export_tflite:
            results.update(export(bn_fold, data))
        if FLAGS.export_onnx:
            results.update(export_onnx(bn_fold, data))
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(f"{'model':<28}{'test accuracy':>15}{'train s':>10}")
    print(
        f"{'float':<28}{100 * results['float_accuracy']:>14.2f}%{results['float_seconds']:>10.0f}"
    )
    kind = quant_flags.label()
    for bn_fold in bn_fold_modes():
        print(
            f"{f'QAT {kind}, bn_fold={bn_fold}':<28}"
            f"{100 * results[f'bn_fold_{bn_fold}_accuracy']:>14.2f}%"
            f"{results[f'bn_fold_{bn_fold}_seconds']:>10.0f}"
        )
        if FLAGS.export_tflite:
            key = f"bn_fold_{bn_fold}_tflite"
            print(
                f"{f'  TFLite, bn_fold={bn_fold}':<28}{100 * results[key + '_accuracy']:>14.2f}%"
                f"   top-1 agreement with Keras {100 * results[key + '_top1_agreement']:.2f} %,"
                f" weight tensors {results[key + '_weight_types']}"
            )
        if FLAGS.export_onnx:
            key = f"bn_fold_{bn_fold}_onnx"
            print(
                f"{f'  ONNX, bn_fold={bn_fold}':<28}{100 * results[key + '_accuracy']:>14.2f}%"
                f"   top-1 agreement with Keras {100 * results[key + '_top1_agreement']:.2f} %,"
                f" max {results[key + '_max_diff_steps']:.1f} output steps (ONNX Runtime)"
            )
    print(
        f"QAT: {results['qat_steps']} steps each; float: {FLAGS.float_epochs} epochs; "
        f"{results['replicas']} replica(s), --strategy={FLAGS.strategy}"
    )


def train_all(data, strategy, out_dir):
    """Float training, then QAT with bn_fold=False and with bn_fold=True."""
    steps_per_epoch = -(-len(data[0][0]) // FLAGS.batch_size)
    if FLAGS.float_model:
        network = keras.saving.load_model(FLAGS.float_model)
        float_accuracy, float_seconds = strategies.accuracy(network, *data[1]), 0.0
    else:
        network = resnet20(input_shape=(28, 28, 1))
        schedule = keras.optimizers.schedules.CosineDecay(
            FLAGS.float_lr, decay_steps=FLAGS.float_epochs * steps_per_epoch
        )
        float_accuracy, float_seconds = train(network, data, FLAGS.float_epochs, schedule, strategy)
    float_path = os.path.join(out_dir, "resnet20_float.keras")
    network.save(float_path)

    results = {"float_accuracy": float_accuracy, "float_seconds": float_seconds}
    for bn_fold in bn_fold_modes():
        keras.utils.set_random_seed(FLAGS.seed)  # same data order for both
        qat = kq.convert_quant_network(
            keras.saving.load_model(float_path),
            bn_fold=bn_fold,
            freeze_bn=FLAGS.freeze_bn,
            quant_delay=FLAGS.quant_delay,
            per_channel=[True, False],
            symmetric=[True, int16()],
            narrow_range=[True, int16()],
            num_bits=quant_flags.num_bits(),
            range_learning=FLAGS.range_learning,
            layer_num_bits=first_last_bits(),
        )
        # Like the float run, end at learning rate 0: a converged network is
        # fine-tuned, not thrown off by a constant rate.
        schedule = keras.optimizers.schedules.CosineDecay(
            FLAGS.qat_lr, decay_steps=FLAGS.qat_epochs * steps_per_epoch
        )
        accuracy, seconds = train(qat, data, FLAGS.qat_epochs, schedule, strategy)
        qat.save(os.path.join(out_dir, f"resnet20_qat_bn_fold_{bn_fold}.keras"))
        results[f"bn_fold_{bn_fold}_accuracy"] = accuracy
        results[f"bn_fold_{bn_fold}_seconds"] = seconds
    results.update(
        float_epochs=FLAGS.float_epochs,
        qat_epochs=FLAGS.qat_epochs,
        qat_steps=FLAGS.qat_epochs * steps_per_epoch,
        train_images=int(len(data[0][0])),
        replicas=strategy.num_replicas_in_sync,
        num_bits=list(quant_flags.num_bits()),
        range_learning=FLAGS.range_learning,
        first_last_bits=FLAGS.first_last_bits,
    )
    return results


def int16():
    """Whether activations are TFLite's int16 ones (--int16_activations):
    symmetric with zero point 0, and exported in the 16x8 mode."""
    return FLAGS.int16_activations


def first_last_bits():
    """`layer_num_bits` for --first_last_bits: the widths of the first and
    last layers of `models.resnet20`, or None."""
    bits = FLAGS.first_last_bits
    if not bits:
        return None
    return {"image": bits, "stem": (bits, None), "pool": bits, "logits": bits}


def export(bn_fold, data):
    """Exports the QAT network of `bn_fold` to TFLite and measures it."""
    name = f"resnet20_qat_bn_fold_{bn_fold}"
    network = keras.saving.load_model(os.path.join(FLAGS.output_dir, name + ".keras"))
    model = kq.export_tflite(
        network,
        os.path.join(FLAGS.output_dir, name + ".tflite"),
        pack_int4=FLAGS.pack_int4,
        activations="int16" if int16() else "int8",
    )
    _, (x_test, y_test) = data
    outputs, _ = kq.run_tflite(model, x_test)
    types = weight_types(model)
    # TFLite's INT4 kernels put outputs up to two steps off (docs/known-limits.md):
    # rows whose two largest logits are within four steps are near-ties.
    tie_steps = 4.0 if "INT4" in types else 2.0
    report = kq.compare_tflite(network, model, x_test, tie_steps=tie_steps)
    key = f"bn_fold_{bn_fold}_tflite"
    return {
        **measured(key, outputs, y_test, report, model),
        f"{key}_tie_steps": tie_steps,
        f"{key}_weight_types": types,
    }


def measured(key, outputs, y_test, report, model):
    """An exported model's accuracy, agreement with Keras and size, as
    results.json keys that start with `key`."""
    entries = ("top1_agreement", "top1_agreement_unambiguous", "ambiguous_rows")
    entries += ("within_one_step", "max_diff_steps")
    return {
        f"{key}_accuracy": float(np.mean(outputs.argmax(-1) == y_test)),
        **{f"{key}_{entry}": report[entry] for entry in entries},
        f"{key}_bytes": len(model),
    }


def export_onnx(bn_fold, data):
    """Exports the QAT network of `bn_fold` to ONNX and measures it."""
    name = f"resnet20_qat_bn_fold_{bn_fold}"
    network = keras.saving.load_model(os.path.join(FLAGS.output_dir, name + ".keras"))
    model = kq.export_onnx(network, os.path.join(FLAGS.output_dir, name + ".onnx"))
    _, (x_test, y_test) = data
    outputs, _ = kq.run_onnx(model, x_test)
    report = kq.compare_onnx(network, model, x_test)
    return measured(f"bn_fold_{bn_fold}_onnx", outputs, y_test, report, model)


def weight_types(model):
    """How many constant tensors of rank >= 2 (kernels) the flatbuffer
    stores in each type: INT4 (two values a byte) or INT8 for int8 models."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    return dict(
        collections.Counter(
            names[t.type]
            for t in flat.subgraphs[0].tensors
            if len(t.shape) >= 2 and t.buffer and flat.buffers[t.buffer].data is not None
        )
    )


def bn_fold_modes():
    """--bn_fold as booleans."""
    modes = {"true": True, "false": False}
    if not FLAGS.bn_fold or any(m.lower() not in modes for m in FLAGS.bn_fold):
        raise app.UsageError(
            f"--bn_fold takes true and / or false. Received: --bn_fold={','.join(FLAGS.bn_fold)}"
        )
    return [modes[m.lower()] for m in FLAGS.bn_fold]


if __name__ == "__main__":
    app.run(main)
