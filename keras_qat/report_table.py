"""QuantReport: `quant_report`'s rows as a table, JSON and a plot."""

import json

import numpy as np

COLUMNS = (
    "tensor",
    "kind",
    "layer",
    "layer_class",
    "min",
    "max",
    "scale",
    "zero_point",
    "num_bits",
    "clipped",
    "grid_used",
    "local_sqnr_db",
    "sqnr_db",
    "tflite_exact",
    "tflite_max_steps",
)


class QuantReport:
    """The rows of `quant_report`, with ways to read them.

    `str(report)` is an aligned table, `to_json()` and `columns()` give the
    data, `ranked()` the rows from the worst local SQNR up, and `plot(path)`
    writes a PNG (matplotlib, the optional extra `plot`).
    """

    def __init__(self, rows):
        self.rows = list(rows)

    def columns(self):
        """A dict of columns (`COLUMNS`), each a list in row order."""
        return {name: [row[name] for row in self.rows] for name in COLUMNS}

    def to_json(self, path=None):
        """The rows as JSON (non-finite numbers as the strings "inf", ...);
        written to `path` too when given."""
        text = json.dumps(
            [{k: _jsonable(v) for k, v in row.items()} for row in self.rows], indent=1
        )
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def ranked(self, key="local_sqnr_db"):
        """Rows sorted by `key`, lowest first; rows without it last."""
        present = [row for row in self.rows if row[key] is not None]
        return sorted(present, key=lambda row: row[key]) + [
            row for row in self.rows if row[key] is None
        ]

    def __str__(self):
        return format_table(self.rows)

    def plot(self, path, threshold_db=20.0):
        """Writes a PNG: SQNR per tensor (bars under `threshold_db` in red)
        and the fraction of values clipped. Needs matplotlib."""
        from keras_qat.report_plot import plot_report

        plot_report(self.rows, path, threshold_db)


def _jsonable(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


_SHOWN = (
    ("tensor", "{}"),
    ("kind", "{}"),
    ("layer_class", "{}"),
    ("min", "{:.4g}"),
    ("max", "{:.4g}"),
    ("scale", "{:.3g}"),
    ("zero_point", "{}"),
    ("num_bits", "{}"),
    ("clipped", "{:.2%}"),
    ("grid_used", "{:.0%}"),
    ("local_sqnr_db", "{:.1f}"),
    ("sqnr_db", "{:.1f}"),
    ("tflite_exact", "{:.2%}"),
    ("tflite_max_steps", "{:.0f}"),
)


def format_table(rows):
    """The rows as an aligned text table (numbers right-aligned)."""
    cells = [[name for name, _ in _SHOWN]]
    for row in rows:
        cells.append(["-" if row[n] is None else fmt.format(row[n]) for n, fmt in _SHOWN])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_SHOWN))]
    lines = []
    for line in cells:
        text = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(text).rstrip())
    return "\n".join(lines)
