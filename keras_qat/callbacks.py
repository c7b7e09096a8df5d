"""Watching quantization while a model trains."""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_qat import quantizer_roles
from keras_qat.report import quant_report, range_rows


def _require_tensorboard():
    try:
        import tensorboard  # noqa: F401  (tf.summary writes through it)
    except ImportError as error:
        raise ImportError(
            "QuantRangeLogger writes TensorBoard event files and needs the `tensorboard` "
            "package: pip install 'keras-qat[tensorboard]'."
        ) from error


class QuantRangeLogger(keras.callbacks.Callback):
    """Writes every quantizer's range to TensorBoard, and warns of bad ones.

    At the end of every `every_n_epochs`-th epoch, for each quantized tensor
    of the model (activation grids and kernels, as in `quant_report`), the
    scalars `<tensor>/min`, `<tensor>/max` and `<tensor>/scale` are written
    with `tf.summary` to `log_dir`, at step `epoch`; with sample inputs `x`
    also `<tensor>/clipped`, the fraction of the samples' values the range
    clips. A warning (`UserWarning`) names each activation range that has
    collapsed to zero width although its quant delay has passed, and, with
    `x`, each that clips more than `warn_clipped` of the values.

    Args:
        log_dir: Directory of the event files (created if needed).
        every_n_epochs: How often to write, in epochs.
        x: Optional sample inputs (an array, list or dict) for the clipped
            fractions; a few batches are enough.
        warn_clipped: The clipped fraction above which to warn.

    Example:

    >>> import tempfile
    >>> inputs = keras.Input((4,))
    >>> qat = kq.convert_quant_network(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    >>> qat.compile(optimizer="sgd", loss="mse")
    >>> logger = kq.callbacks.QuantRangeLogger(tempfile.mkdtemp())
    >>> x = np.random.default_rng(0).uniform(-1, 1, (32, 4)).astype("float32")
    >>> qat.fit(x, np.zeros((32, 2)), epochs=2, verbose=0, callbacks=[logger]).epoch
    [0, 1]
    """

    def __init__(self, log_dir, every_n_epochs=1, x=None, warn_clipped=0.05):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(
                "Received an invalid value for `every_n_epochs`, expected a positive "
                f"integer. Received: every_n_epochs={every_n_epochs!r}"
            )
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(
                "Received an invalid value for `log_dir`, expected a directory path. "
                f"Received: log_dir={log_dir!r}"
            )
        if not 0.0 <= warn_clipped <= 1.0:
            raise ValueError(
                "Received an invalid value for `warn_clipped`, expected a fraction in "
                f"[0, 1]. Received: warn_clipped={warn_clipped!r}"
            )
        _require_tensorboard()
        self.log_dir = os.fspath(log_dir)
        self.every_n_epochs = every_n_epochs
        self.x = x
        self.warn_clipped = warn_clipped
        self._writer = None

    def on_train_begin(self, logs=None):
        """Checks, before the first epoch, that the model is quantized and
        that `x` fits its inputs (a report on it runs at once)."""
        if not quantizer_roles.model_quantizers(self.model):
            warnings.warn(
                f"QuantRangeLogger: model '{self.model.name}' has no quantizers, so there is "
                "no range to log. Train the model from `convert_quant_network`.",
                stacklevel=2,
            )
        elif self.x is not None:
            names = [t.name for t in self.model.inputs]
            shapes = [tuple(np.shape(v)[1:]) for v in keras.tree.flatten(self.x)]
            expected = [tuple(t.shape[1:]) for t in self.model.inputs]
            if len(shapes) != len(expected) or any(
                len(s) != len(e) or any(a not in (b, None) for b, a in zip(s, e))
                for s, e in zip(shapes, expected)
            ):
                raise ValueError(
                    f"QuantRangeLogger's `x` does not fit the model's inputs {names} of "
                    f"shapes {expected}. Received: x of shapes {shapes}"
                )

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        rows = range_rows(self.model) if self.x is None else quant_report(self.model, self.x).rows
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=epoch):
            for row in rows:
                for column in ("min", "max", "scale", "clipped"):
                    if row[column] is not None:
                        tf.summary.scalar(f"{row['tensor']}/{column}", row[column])
        self._writer.flush()
        self._warn(rows, epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _warn(self, rows, epoch):
        delayed = {
            layer.name
            for layer, role, quantizer in quantizer_roles.model_quantizers(self.model)
            if role == quantizer_roles.OUTPUT and int(quantizer.steps()) < quantizer.quant_delay
        }
        for row in rows:
            if row["kind"] != "activation" or row["tensor"] in delayed:
                continue
            if row["max"] - row["min"] == 0:
                warnings.warn(
                    f"Epoch {epoch}: the range of '{row['tensor']}' has collapsed to "
                    f"[{row['min']}, {row['max']}] (zero width): every value quantizes to "
                    "one level. Its input may be constant (a dead ReLU, for example).",
                    stacklevel=2,
                )
            elif row["clipped"] is not None and row["clipped"] > self.warn_clipped:
                warnings.warn(
                    f"Epoch {epoch}: the range of '{row['tensor']}' clips "
                    f"{row['clipped']:.1%} of the sample values (more than "
                    f"{self.warn_clipped:.1%}).",
                    stacklevel=2,
                )
