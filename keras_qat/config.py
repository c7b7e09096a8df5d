"""Options, their validation and their defaults, in one place.

Every check raises `ValueError` in Keras' style, naming the argument and
ending in "Received: name=value". numpy booleans and integers are accepted
wherever Python ones are, and returned as Python values (so that configs
stay JSON-serializable).
"""

import dataclasses
import numbers

import numpy as np

MIN_BITS = 2
MAX_BITS = 16

# Defaults shared by the layers and `convert_quant_network`.
DEFAULT_NUM_BITS = 8
DEFAULT_EMA_DECAY = 0.999
# Training steps before folded BatchNorm statistics freeze: never, in practice.
DEFAULT_FREEZE_BN = 10_000_000


def _invalid(name, expected, value):
    return ValueError(
        f"Received an invalid value for `{name}`, expected {expected}. Received: {name}={value!r}"
    )


def check_bool(name, value):
    """Returns `value` as a Python bool; raises unless it is a boolean."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _invalid(name, "a boolean", value)


def check_int(name, value, minimum=0):
    """Returns `value` as a Python int; raises unless it is an integer
    >= `minimum` (booleans are not integers here)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        expected = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise _invalid(name, expected, value)
    return int(value)


def check_num_bits(value, name="num_bits"):
    """Returns `value` as a Python int; raises unless it is an integer in
    `[MIN_BITS, MAX_BITS]`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not MIN_BITS <= value <= MAX_BITS
    ):
        raise _invalid(name, f"an integer in [{MIN_BITS}, {MAX_BITS}]", value)
    return int(value)


def check_fraction(name, value):
    """Returns `value` as a Python float; raises unless it is a real number
    in `[0, 1)`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not 0.0 <= value < 1.0
    ):
        raise _invalid(name, "a number in [0, 1)", value)
    return float(value)


def check_optional_bool(name, value):
    """Returns `value` as a Python bool, or None; raises otherwise."""
    return None if value is None else check_bool(name, value)


def as_pair(name, value):
    """Returns `value` as a `(weights, activations)` tuple: a single value
    applies to both."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _invalid(name, "a single value or a (weights, activations) pair", value)
        return tuple(value)
    return (value, value)


def check_layer_num_bits(value):
    """Returns `layer_num_bits` as `{layer name: (weights, activations)}`,
    each width an int or None (the model's default); raises unless `value`
    is None or a dict from layer names to a bit width or a pair of them."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _invalid("layer_num_bits", "a dict from layer names to bit widths (or pairs)", value)

    def width(name, bits):
        return None if bits is None else check_num_bits(bits, name)

    return {
        layer: _pair_of(f"layer_num_bits['{layer}']", bits, width) for layer, bits in value.items()
    }


def is_single_width(bits):
    """Whether a `layer_num_bits` value is one width (for all of the
    layer's quantizers), not a `(weights, activations)` pair."""
    return not isinstance(bits, (list, tuple))


def _pair_of(name, value, check):
    weights, activations = as_pair(name, value)
    return (
        check(f"{name}[0] (weights)", weights),
        check(f"{name}[1] (activations)", activations),
    )


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """The validated options of `convert_quant_network`.

    Each pair field holds `(weights, activations)`. Build it with
    `QuantOptions.from_args`, which validates and resolves the defaults;
    the converter passes `weight_options()` to each layer's
    `WeightQuantizer` and `activation_options()` to each `FakeQuant`.

    The defaults are TFLite's int8 scheme: symmetric weights on the narrow
    grid (zero point 0, levels -127..127), asymmetric activations on the full
    grid. `per_channel[0]` may stay None: per channel for convolution
    kernels, per tensor for dense ones (the converter decides per layer).
    `layer_num_bits` holds the widths of named layers that override
    `num_bits` (`convert_quant_network`'s `layer_num_bits`).
    """

    num_bits: tuple = (DEFAULT_NUM_BITS, DEFAULT_NUM_BITS)
    per_channel: tuple = (None, False)
    symmetric: tuple = (True, False)
    narrow_range: tuple = (True, False)
    quant_delay: tuple = (0, 0)
    bn_fold: bool = True
    freeze_bn: int = DEFAULT_FREEZE_BN
    range_learning: tuple = (False, False)
    layer_num_bits: tuple = ()  # ((layer name, (weights, activations)), ...)
    single_width_layers: frozenset = frozenset()  # names given one width for both

    @classmethod
    def from_args(
        cls,
        num_bits,
        per_channel,
        symmetric,
        narrow_range,
        quant_delay,
        bn_fold,
        freeze_bn,
        range_learning=False,
        layer_num_bits=None,
    ):
        """Validates user arguments and returns the options.

        `narrow_range` None (or a None entry) means narrow where symmetric;
        `per_channel` None for weights means per layer kind (see the class
        docstring).

        Raises:
            ValueError: naming the argument, for a pair of the wrong length,
                a bit width outside `[2, 16]`, a non-boolean flag, a negative
                or non-integer count, per-channel activations, or learned
                ranges for asymmetric weights.
        """
        per_channel = _pair_of("per_channel", per_channel, check_optional_bool)
        if per_channel[1]:
            raise ValueError(
                "Received an invalid value for `per_channel`: activations "
                "cannot be quantized per channel (integer kernels use one "
                "scale per activation tensor). Use per_channel=[True, False] "
                f"for per-channel weights. Received: per_channel={per_channel!r}"
            )
        symmetric = _pair_of("symmetric", symmetric, check_bool)
        narrow_range = _pair_of("narrow_range", narrow_range, check_optional_bool)
        learned = _pair_of("range_learning", range_learning, check_bool)
        if learned[0] and not symmetric[0]:
            raise ValueError(
                "Received an invalid value for `range_learning`: learned weight ranges "
                "are symmetric (TFLite's int8 weights are); use symmetric=[True, ...]. "
                f"Received: range_learning={learned!r}, symmetric={symmetric!r}"
            )
        return cls(
            num_bits=_pair_of("num_bits", num_bits, lambda n, v: check_num_bits(v, n)),
            per_channel=(per_channel[0], bool(per_channel[1])),
            symmetric=symmetric,
            narrow_range=tuple(s if n is None else n for s, n in zip(symmetric, narrow_range)),
            quant_delay=_pair_of("quant_delay", quant_delay, check_int),
            bn_fold=check_bool("bn_fold", bn_fold),
            freeze_bn=check_int("freeze_bn", freeze_bn),
            range_learning=_pair_of("range_learning", range_learning, check_bool),
            layer_num_bits=tuple(sorted(check_layer_num_bits(layer_num_bits).items())),
            single_width_layers=frozenset(
                name for name, bits in (layer_num_bits or {}).items() if is_single_width(bits)
            ),
        )

    def weight_options(self, calls_per_step=1, per_channel=False, layer_name=None):
        """Keyword arguments of a layer's `WeightQuantizer`; `per_channel`
        applies where the option `per_channel[0]` is None; the bit width is
        `layer_num_bits`' for `layer_name` where it gives one."""
        if self.per_channel[0] is not None:
            per_channel = self.per_channel[0]
        return self._options(0, calls_per_step, layer_name, per_channel=per_channel)

    def activation_options(self, calls_per_step=1, layer_name=None):
        """Keyword arguments of a `FakeQuant` on the activations of layer
        `layer_name` (or of the model input of that name)."""
        return self._options(1, calls_per_step, layer_name)

    def bits_of(self, layer_name, index):
        """The bit width `layer_num_bits` gives layer `layer_name`'s weights
        (`index` 0) or activations (1), or None."""
        return dict(self.layer_num_bits).get(layer_name, (None, None))[index]

    def _options(self, index, calls_per_step, layer_name, **extra):
        bits = self.bits_of(layer_name, index)
        return dict(
            num_bits=self.num_bits[index] if bits is None else bits,
            symmetric=self.symmetric[index],
            narrow_range=self.narrow_range[index],
            quant_delay=self.quant_delay[index],
            calls_per_step=calls_per_step,
            **extra,
        )
