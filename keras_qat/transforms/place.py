"""Placement: where the integer model rounds, and the quantizers that stand
for its grids.

`Placement` rebuilds a fusion network operation by operation; for each it
applies the first rule of `keras_qat.transforms.rules.PLACEMENT_RULES`
that matches. It answers the questions the rules ask, from the graph and
`keras_qat.int8_rules`: does an operation's integer result get a grid of
its own or is it rounded by its consumers, does a quantized layer consume
it (then the `FakeQuant` before it is called with `return_scale=True` and
the layer with `input_scale=`: the input scale of its int32 bias is an edge
of the Keras graph, saved and loaded with it), must its grid be
zero-centred; and it makes the quantizers with the options of
`convert_quant_network`.
"""

import functools

import keras

from keras_qat import graph, int8_rules, quantizers
from keras_qat.layers.attention_mask import AttentionScoreMask
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.learned_range import LearnedFakeQuant
from keras_qat.layers.quantized import has_quantized_form
from keras_qat.layers.weight_operand import WeightOperand
from keras_qat.transforms import rules
from keras_qat.transforms.clones import Clones
from keras_qat.transforms.support import is_float, is_integer_cast

# Layers through which a grid reaches a consumer: an average pooling that
# stays as it is (its input has other consumers) keeps its input's grid too.
_GRID_KEEPING = int8_rules.GRID_KEEPING_LAYERS + int8_rules.GRID_KEEPING_OPERATIONS
_GRID_PASSING_LAYERS = (
    int8_rules.GRID_KEEPING_LAYERS
    + int8_rules.GRID_KEEPING_OPERATIONS
    + (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D)
)


class Placement:
    """Builds the quantization network of one fusion network.

    `convert()` rebuilds the graph, calling `place(operation, ...)` at each
    node; `place` picks the first rule of `rules.PLACEMENT_RULES` that
    applies. The placement knows where the integer model rounds (the
    consumers of each operation) and makes the quantizers; the rules say
    what each kind of operation becomes.
    """

    def __init__(self, options, model, skipped):
        self.options = options
        self.graph = graph.Graph(model)
        self.model = model
        self.skipped = set(skipped)
        self.names = {layer.name for layer in model.layers}
        self.clones = Clones()
        self.bits_used = set()  # (layer name, 0 weights / 1 activations)
        self.scales = {}  # id(new tensor) -> the scale of its grid (a tensor)
        self.quantized_inputs = {}  # id(new model input) -> its FakeQuant output
        self._constant = {}  # id(operation) -> whether it computes from weight operands only
        self.input_layers = {  # the rebuilt model's inputs keep these names
            layer.name: layer for layer in self.graph.input_layers
        }

    def convert(self):
        qat_model = graph.rebuild(self.model, self.place)
        self.clones.copy_weights()
        self.check_layer_num_bits_used()
        return qat_model

    def weight_options(self, layer, **kwargs):
        """The options of `layer`'s weight quantizer (`QuantOptions.weight_options`)."""
        self.bits_used.add((layer.name, 0))
        return self.options.weight_options(
            self.graph.call_count(layer), layer_name=layer.name, **kwargs
        )

    def activation_options(self, layer_name, calls_per_step=1):
        """The options of a `FakeQuant` on the output of `layer_name`."""
        self.bits_used.add((layer_name, 1))
        return self.options.activation_options(calls_per_step, layer_name=layer_name)

    def check_layer_num_bits_used(self):
        """Raises `ValueError` for a `layer_num_bits` width that no quantizer took."""
        unused = []
        for name, _ in self.options.layer_num_bits:
            taken = [(name, index) in self.bits_used for index in (0, 1)]
            if name in self.options.single_width_layers:
                unused += [] if any(taken) else [f"'{name}'"]
                continue
            unused += [
                f"'{name}' {kind}"
                for index, kind in enumerate(("weights", "activations"))
                if self.options.bits_of(name, index) is not None and not taken[index]
            ]
        if unused:
            raise ValueError(
                "Received an invalid value for `layer_num_bits`: these layers have no such "
                f"quantizer (or none at all) in model '{self.model.name}': "
                f"{', '.join(unused)} (a layer without "
                "weights has no weight width; a layer whose consumers round its result, such "
                "as a conv before a ReLU layer, has no FakeQuant of its own: name the "
                "consumer, or use None in the pair). "
                f"Received: layer_num_bits={dict(self.options.layer_num_bits)!r}"
            )

    def place(self, operation, *args, **kwargs):
        args, kwargs = keras.tree.map_structure(self.quantize_model_input, (args, kwargs))
        for applies, rule in rules.PLACEMENT_RULES:
            if applies(self, operation):
                return self.onto_concatenation_grid(operation, rule(self, operation, args, kwargs))
        raise AssertionError(f"no placement rule for {operation!r}")  # unreachable

    def onto_concatenation_grid(self, operation, outputs):
        """`outputs` of a grid-keeping operation (a max pooling, a reshape)
        that a concatenation and other layers read, put on the
        concatenation's grid for all of them: TFLite's converter carries
        CONCATENATION's same-scale constraint back to that result and
        requantizes it there, so the other readers see it requantized too
        (measured: DenseNet's pooled stem, read by a concatenation and a
        BatchNormalization, was 0.37 steps off on average)."""
        concatenation = self._sharing_concatenation(operation)
        if concatenation is None:
            return outputs
        return self.onto_grid_of(concatenation, operation, outputs)

    def onto_grid_of(self, concatenation, operation, outputs):
        """`outputs` of `operation` quantized onto `concatenation`'s grid
        (its `QuantConcatenate` called with `onto_grid=True`). The call
        returns the grid's scale too: it comes before the concatenation's
        own call, which may return it, and Keras checks a graph with the
        number of outputs of a layer's first call."""
        layer = rules.concatenation_of(self, concatenation)
        onto_grid = functools.partial(layer, onto_grid=True, input_scales=self.scales_of([outputs]))
        return self.apply_quantizer(onto_grid, outputs, with_scale=True)

    def _sharing_concatenation(self, operation):
        """The one concatenation that reads `operation`'s result beside other
        layers, where that result keeps its input's grid; else None."""
        if not isinstance(operation, _GRID_KEEPING) or self.is_skipped(operation):
            return None
        consumers = self.graph.consumers(operation)
        joins = [c for c in consumers if isinstance(c, keras.layers.Concatenate)]
        if len(joins) != 1 or self.is_skipped(joins[0]):
            return None
        others = len(consumers) > 1 or self.graph.is_output(operation)
        return joins[0] if others else None

    # Where the integer model rounds.

    def is_skipped(self, operation):
        return operation.name in self.skipped

    def rounds_output(self, operation):
        """Whether `operation`'s integer result is rounded onto a new grid."""
        return (
            has_quantized_form(operation)
            or isinstance(operation, int8_rules.ROUNDING_LAYERS + int8_rules.ROUNDING_OPERATIONS)
            or self.is_skipped(operation)  # a float result
            or is_integer_cast(operation, self.graph)
        )

    def is_constant(self, operation):
        """Whether `operation` computes from weight operands only (a traced
        layer's own weights): the converter folds such a subgraph into one
        constant, stored on the int8 grid of its own range."""
        if id(operation) not in self._constant:
            producers = self.graph.producers(operation)
            self._constant[id(operation)] = isinstance(operation, WeightOperand) or (
                bool(producers) and all(self.is_constant(p) for p in producers)
            )
        return self._constant[id(operation)]

    def feeds_non_constant(self, operation):
        """Whether a constant `operation`'s result meets other tensors (or is
        a model output): where the folded constant is quantized."""
        return self.graph.is_output(operation) or any(
            not self.is_constant(c) for c in self.graph.consumers(operation)
        )

    def concatenation_storing(self, operation):
        """The one concatenation on whose grid the converter stores constant
        `operation`'s result: it reaches that concatenation and nothing
        else, directly or through grid-keeping layers (a class token tiled
        to the batch). Else None.

        The constant is then put on that grid before anything moves it
        (`onto_grid`). On a grid of its own it was requantized by an int8
        QUANTIZE, which XNNPACK computes with the ratio of the scales
        rounded to 8 fractional bits (`lrintf(256 * ratio)` in its qs8
        convert kernels): a keras-hub ViT's class token at 3.39 steps of
        the concatenation's grid became 4, and its layer norm turned that
        step into 13 (TF 2.21). TF 2.20's converter gave the BROADCAST_TO of
        such a constant the concatenation's scale without requantizing it
        (DeiT's class and distillation tokens 84 steps off). Measured.
        """
        if not self.is_constant(operation) or not self.feeds_non_constant(operation):
            return None
        return self._concatenation_reached(operation)

    def _concatenation_reached(self, operation):
        """The one non-constant concatenation that `operation`'s result
        reaches, directly or as the first input of grid-keeping layers, if
        it reaches nothing else; else None."""
        if self.graph.is_output(operation) or self.is_skipped(operation):
            return None
        reached = set()
        for consumer in self.graph.consumers(operation):
            if isinstance(consumer, keras.layers.Concatenate) and not self.is_constant(consumer):
                reached.add(consumer if not self.is_skipped(consumer) else None)
            elif isinstance(consumer, _GRID_KEEPING) and not self.is_constant(consumer):
                first = self.graph.producers(consumer)[:1] == [operation]
                reached.add(self._concatenation_reached(consumer) if first else None)
            else:
                return None
        return reached.pop() if len(reached) == 1 else None

    def rounded_by_consumers(self, operation):
        """Whether every consumer of `operation` rounds its result onto the
        consumer's own grid (int8_rules.rounds_for_producer), or passes it
        on to attention score masks only (`passes_to_score_masks`)."""
        consumers = self.graph.consumers(operation)
        return (
            bool(consumers)
            and not self.graph.is_output(operation)
            and all(
                not self.is_skipped(c)
                and (int8_rules.rounds_for_producer(c) or self.passes_to_score_masks(c))
                for c in consumers
            )
        )

    def passes_to_score_masks(self, operation):
        """Whether `operation` keeps its input's grid and passes it only to
        attention score masks (directly or through more such operations).
        A score mask quantizes the scores itself, and the converter carries
        its grid back through RESHAPE and TRANSPOSE to the BATCH_MATMUL
        (an einsum's scores, reshaped and transposed): that matmul rounds
        onto it and needs no grid of its own."""
        if not isinstance(operation, _GRID_KEEPING) or self.is_skipped(operation):
            return False
        consumers = self.graph.consumers(operation)
        return (
            bool(consumers)
            and not self.graph.is_output(operation)
            and all(
                (isinstance(c, AttentionScoreMask) and not self.is_skipped(c))
                or self.passes_to_score_masks(c)
                for c in consumers
            )
        )

    def unrounded(self, operation):
        """Whether `operation`'s result leaves it without a grid of its own,
        for its consumers to round."""
        return self.rounds_output(operation) and self.rounded_by_consumers(operation)

    def needs_scale(self, operation):
        """Whether a quantized layer (or a bilinear resize, which rounds to
        its input's grid, a concatenation, which requantizes it onto its
        own, or a multiplication, whose product is rounded from its
        operands' grids) consumes `operation`'s output, directly or through
        layers that keep its grid."""
        for consumer in self.graph.consumers(operation):
            if int8_rules.is_bilinear_resize(consumer) and not self.is_skipped(consumer):
                return True
            if isinstance(consumer, _GRID_PASSING_LAYERS):
                if self.needs_scale(consumer):
                    return True
            elif has_quantized_form(consumer) and not self.is_skipped(consumer):
                return True
            elif isinstance(consumer, keras.layers.Concatenate) and not self.is_skipped(consumer):
                return True  # requantized onto its grid (`QuantConcatenate`)
            elif self.multiplies(consumer):
                return True  # its product rounded as the int8 MUL rounds it
        return False

    def multiplies(self, operation):
        """Whether `operation` is a quantized int8 MUL of tensors (a
        `Multiply`, `x * y`, a swish), whose product the `FakeQuant` after
        it rounds from its operands' grids (`FakeQuant(operand_scales=)`)."""
        kind = int8_rules.multiplies_its_operands(operation) or int8_rules.is_swish(operation)
        return kind and not self.is_skipped(operation)

    def reads_as_indices(self, operation):
        """Whether every consumer of `operation` reads its values as indices
        or flags (token ids, 0 / 1 attention masks: `int8_rules.reads_indices`),
        which no grid may round."""
        consumers = self.graph.consumers(operation)
        return bool(consumers) and all(
            int8_rules.reads_indices(c, self.operand_index(c, operation)) for c in consumers
        )

    def operand_index(self, consumer, operation):
        """The position of `operation`'s output among `consumer`'s inputs."""
        producers = self.graph.producers(consumer)
        return producers.index(operation) if operation in producers else 0

    # Quantizers.

    def feeds_matmul_rhs(self, operation):
        """Whether `operation`'s output is the second operand of a
        `keras.ops.matmul`, directly or through layers that keep its grid.

        TFLite's int8 BATCH_MATMUL ignores that operand's zero point (how
        far off an asymmetric one puts it: docs/measurements.md), so its
        grid must be zero-centred: symmetric, on the narrow grid (zero
        point 0).
        """
        for consumer in self.graph.consumers(operation):
            if isinstance(consumer, _GRID_PASSING_LAYERS):
                if self.feeds_matmul_rhs(consumer):
                    return True
            elif isinstance(consumer, graph.MATMUL_OPERATION) and not self.is_skipped(consumer):
                operands = self.graph.input_tensors(consumer)
                if len(operands) == 2 and graph.producer(operands[1]) is operation:
                    return True
        return False

    def fake_quant(
        self, name, fixed_range=None, activation=None, zero_centred=False, layer_name=None
    ):
        """A new `FakeQuant` named `<name>_quant` (made unique), applying a
        fused `activation` (None, "relu", "relu6") before it quantizes; with
        `zero_centred`, symmetric on the narrow grid. It quantizes the output
        of layer `layer_name` (default `name`), whose `layer_num_bits` apply."""
        base = candidate = f"{name}_quant"
        suffix = 1
        while candidate in self.names:  # Keras operations may share a name with a layer
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.names.add(candidate)
        options = self.activation_options(layer_name or name)
        if zero_centred:
            options.update(symmetric=True, narrow_range=True)
        learned = self.options.range_learning[1] and fixed_range is None
        quantizer_class = LearnedFakeQuant if learned else FakeQuant
        return quantizer_class(
            name=candidate, fixed_range=fixed_range, activation=activation, **options
        )

    def shared_quantizer(self, layer):
        """The `quantizer` of a layer that holds its output's range (a
        concatenation, an average pooling, an attention mask): options, or a
        `LearnedFakeQuant` with learned activation ranges; zero-centred
        where it feeds a matmul's second operand (`feeds_matmul_rhs`)."""
        options = self.activation_options(layer.name, self.graph.call_count(layer))
        if self.feeds_matmul_rhs(layer):  # a rotary embedding's stacked key halves
            options.update(symmetric=True, narrow_range=True)
        return LearnedFakeQuant(**options) if self.options.range_learning[1] else options

    def apply_quantizer(self, quantizer, tensor, with_scale, operand_scales=None, from_float=False):
        """`quantizer(tensor)`; with `with_scale`, the scale of its grid is
        kept for the quantized layers that consume the result; with
        `operand_scales`, the grids of the two operands of the product
        `tensor` that the quantizer (a `FakeQuant`) rounds; with
        `from_float`, `tensor` is a float model input, which the quantizer
        rounds as TFLite's QUANTIZE from float does."""
        kwargs = {} if operand_scales is None else {"operand_scales": operand_scales}
        if from_float:
            kwargs["from_float"] = True
        if not with_scale:
            return quantizer(tensor, **kwargs)
        outputs, scale = quantizer(tensor, return_scale=True, **kwargs)
        self.scales[id(outputs)] = scale
        return outputs

    def quantize_output(
        self, operation, outputs, fixed_range=None, name=None, activation=None, operand_scales=None
    ):
        """A `FakeQuant` on `operation`'s result, unless its consumers round
        it (a fixed range is always kept: the kernel's output has it); with
        `activation`, the fused activation that the `FakeQuant` applies;
        with `operand_scales`, the grids of the operands of the product it
        rounds."""
        if fixed_range is None and self.rounded_by_consumers(operation):
            return quantizers.fused_activation(outputs, activation)
        zero_centred = fixed_range is None and self.feeds_matmul_rhs(operation)
        quantizer = self.fake_quant(
            name or operation.name, fixed_range, activation, zero_centred, operation.name
        )
        return self.apply_quantizer(quantizer, outputs, self.needs_scale(operation), operand_scales)

    def moves_activation(self, layer):
        """The fused activation ("relu", "relu6") of fusion layer `layer` that
        moves into the `FakeQuant` after it, or None (no such activation, or
        no `FakeQuant` after it: its consumers round its result)."""
        name = int8_rules.activation_name(layer.activation)
        if name not in int8_rules.FUSED_ACTIVATIONS or self.rounded_by_consumers(layer):
            return None
        return name

    def pixel_range(self, operation):
        """The fixed range of a `Rescaling` of a uint8 model input onto an
        exact 8-bit grid (`int8_rules.uint8_pixel_range`), else None."""
        if not isinstance(operation, keras.layers.Rescaling):
            return None
        inputs = self.graph.input_tensors(operation)
        if len(inputs) != 1 or keras.backend.standardize_dtype(inputs[0].dtype) != "uint8":
            return None
        if not isinstance(graph.producer(inputs[0]), keras.layers.InputLayer):
            return None
        return int8_rules.uint8_pixel_range(operation, self.activation_options(operation.name))

    def quantize_model_input(self, tensor):
        """The `FakeQuant` output of a float model input; other values
        (integer inputs among them: see `rules.place_integer_cast`) unchanged."""
        layer = graph.producer(tensor) if isinstance(tensor, keras.KerasTensor) else None
        if not isinstance(layer, keras.layers.InputLayer) or not is_float(tensor):
            return tensor
        original = self.input_layers[layer.name]
        if self.reads_as_indices(original):
            return tensor
        if id(tensor) not in self.quantized_inputs:
            self.quantized_inputs[id(tensor)] = self.apply_quantizer(
                self.fake_quant(layer.name, zero_centred=self.feeds_matmul_rhs(original)),
                tensor,
                self.needs_scale(original),
                from_float=True,
            )
        return self.quantized_inputs[id(tensor)]

    def keep_scale(self, inputs, outputs):
        """`outputs`, recorded as lying on the grid of `inputs` (if known)."""
        scale = self.scales.get(id(inputs))
        if scale is not None:
            self.scales[id(outputs)] = scale
        return outputs

    def scales_of(self, tensors):
        """The steps of the grids `tensors` lie on, or None if one is not
        known (or there are none)."""
        scales = [self.scales.get(id(t)) for t in tensors]
        return scales if scales and all(s is not None for s in scales) else None

    def scale_of(self, tensor):
        """`{"input_scale": scale}` for a quantized layer's call, or `{}`."""
        scale = self.scales.get(id(tensor))
        return {} if scale is None else {"input_scale": scale}
