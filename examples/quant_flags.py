"""The quantization flags that the examples share: --num_bits, --range_learning."""

from absl import app, flags

flags.DEFINE_list(
    "num_bits", ["8", "8"], "Bit widths of weights and activations, as in --num_bits=4,8."
)
flags.DEFINE_bool("range_learning", False, "Learned ranges (LSQ) for weights and activations.")
FLAGS = flags.FLAGS


def num_bits():
    """--num_bits as a (weights, activations) pair of integers."""
    if len(FLAGS.num_bits) != 2 or not all(b.strip().isdigit() for b in FLAGS.num_bits):
        raise app.UsageError(
            "--num_bits takes two integers, weights then activations. "
            f"Received: --num_bits={','.join(FLAGS.num_bits)}"
        )
    bits = tuple(int(b) for b in FLAGS.num_bits)
    if not all(2 <= b <= 16 for b in bits):
        raise app.UsageError(
            f"--num_bits takes widths from 2 to 16. Received: --num_bits={','.join(FLAGS.num_bits)}"
        )
    return bits


def label():
    """`int8`, or `W4A8`, `W4A4 LSQ`, ...: what the flags quantize to."""
    weights, activations = num_bits()
    kind = "int8" if (weights, activations) == (8, 8) else f"W{weights}A{activations}"
    return kind + (" LSQ" if FLAGS.range_learning else "")
