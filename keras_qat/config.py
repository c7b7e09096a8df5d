"""The options of `convert_quant_network`, validated once, in one place.

Every quantization option is a `(weights, activations)` pair, as in
MindSpore's `convert_quant_network`; a single value applies to both.
"""

import dataclasses

import keras

from keras_qat.ops import check_num_bits


def _pair(name, value):
    """Returns `value` as a `(weights, activations)` tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a single "
                "value or a (weights, activations) pair. "
                f"Received: {name}={value!r}"
            )
        return tuple(value)
    return (value, value)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a boolean "
            f"or a pair of booleans. Received: {name}={value!r}"
        )


def check_non_negative_int(name, value):
    """Raises `ValueError` unless `value` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a "
            f"non-negative integer. Received: {name}={value!r}"
        )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Validated options of `convert_quant_network`.

    Each pair field holds `(weights, activations)`.

    Args:
        num_bits: Bit widths, integers in `[2, 16]`.
        per_channel: Per-channel ranges; only weights may be per channel.
        symmetric: Symmetric ranges.
        narrow_range: Grids without their lowest level.
        quant_delay: Training steps before quantization starts.
        bn_fold: Whether BatchNorm is folded into the weights.
        freeze_bn: Training step from which folded BatchNorm statistics are
            frozen.
    """

    num_bits: tuple = (8, 8)
    per_channel: tuple = (False, False)
    symmetric: tuple = (False, False)
    narrow_range: tuple = (False, False)
    quant_delay: tuple = (0, 0)
    bn_fold: bool = True
    freeze_bn: int = 10_000_000

    @classmethod
    def from_args(
        cls,
        num_bits=(8, 8),
        per_channel=(False, False),
        symmetric=(False, False),
        narrow_range=(False, False),
        quant_delay=(0, 0),
        bn_fold=True,
        freeze_bn=10_000_000,
    ):
        """Validates user arguments and returns a `QuantConfig`.

        Raises:
            ValueError: naming the argument, for a pair of the wrong length,
                a bit width outside `[2, 16]`, a non-boolean flag, a negative
                or non-integer delay, or per-channel activations.
        """
        num_bits = _pair("num_bits", num_bits)
        for part, bits in zip(("weights", "activations"), num_bits):
            check_num_bits(bits, name=f"num_bits ({part})")
        flags = {
            "per_channel": _pair("per_channel", per_channel),
            "symmetric": _pair("symmetric", symmetric),
            "narrow_range": _pair("narrow_range", narrow_range),
        }
        for name, pair in flags.items():
            for value in pair:
                _check_bool(name, value)
        if flags["per_channel"][1]:
            raise ValueError(
                "Received an invalid value for `per_channel`: activations "
                "cannot be quantized per channel (integer kernels use one "
                "scale per activation tensor). Use per_channel=[True, False] "
                f"for per-channel weights. Received: per_channel={per_channel!r}"
            )
        quant_delay = _pair("quant_delay", quant_delay)
        for value in quant_delay:
            check_non_negative_int("quant_delay", value)
        _check_bool("bn_fold", bn_fold)
        check_non_negative_int("freeze_bn", freeze_bn)
        return cls(
            num_bits=num_bits,
            quant_delay=quant_delay,
            bn_fold=bn_fold,
            freeze_bn=freeze_bn,
            **flags,
        )

    def weight_options(self):
        """Keyword arguments of a quantized layer's weight quantizer."""
        return dict(
            num_bits=self.num_bits[0],
            per_channel=self.per_channel[0],
            symmetric=self.symmetric[0],
            narrow_range=self.narrow_range[0],
            quant_delay=self.quant_delay[0],
        )

    def activation_options(self):
        """Keyword arguments of a `FakeQuant` layer on activations."""
        return dict(
            num_bits=self.num_bits[1],
            symmetric=self.symmetric[1],
            narrow_range=self.narrow_range[1],
            quant_delay=self.quant_delay[1],
        )


def selected_layer_names(model, selectors, argument="skip_layers"):
    """Names of the layers of `model` that `selectors` choose.

    Args:
        model: A Sequential or Functional model.
        selectors: `None`, or one or a list of: a layer name, a layer class
            (its subclasses match too), or a predicate `layer -> bool`.
        argument: The argument's name, for error messages.

    Returns:
        A set of layer names.

    Raises:
        ValueError: for a name that is not a layer of `model`, or a selector
            of another type.
    """
    if selectors is None:
        return set()
    if isinstance(selectors, (str, type)) or callable(selectors):
        selectors = [selectors]
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = set()
    for selector in selectors:
        if isinstance(selector, str):
            if selector not in {layer.name for layer in layers}:
                raise ValueError(
                    f"Received an invalid value for `{argument}`: model "
                    f"'{model.name}' has no layer named '{selector}'. Its "
                    f"layers: {', '.join(layer.name for layer in layers)}."
                )
            names.add(selector)
        elif isinstance(selector, type):
            names.update(layer.name for layer in layers if isinstance(layer, selector))
        elif callable(selector):
            names.update(layer.name for layer in layers if selector(layer))
        else:
            raise ValueError(
                f"Received an invalid value for `{argument}`, expected layer "
                "names, layer classes or a predicate `layer -> bool`. "
                f"Received: {argument}={selectors!r}"
            )
    return names
