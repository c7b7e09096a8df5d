"""The PNG of a `QuantReport` (matplotlib, the optional extra `plot`)."""

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as error:
        raise ImportError(
            "QuantReport.plot needs matplotlib: pip install 'keras-qat[plot]' "
            "(or pip install matplotlib)."
        ) from error
    return pyplot


def plot_report(rows, path, threshold_db):
    """Two panels over the rows in graph order: SQNR (local, and against
    the float model as a line) with bars below `threshold_db` highlighted,
    and the fraction of values clipped."""
    pyplot = _pyplot()
    names = [row["tensor"] for row in rows]
    local = np.array([_finite(row["local_sqnr_db"]) for row in rows], float)
    overall = np.array([_finite(row["sqnr_db"]) for row in rows], float)
    clipped = np.array([row["clipped"] or 0.0 for row in rows], float)
    positions = np.arange(len(rows))
    figure, (top, bottom) = pyplot.subplots(
        2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 7), sharex=True, height_ratios=[3, 1]
    )
    colors = ["tab:red" if value < threshold_db else "tab:blue" for value in np.nan_to_num(local)]
    hatches = ["//" if row["kind"] == "weights" else "" for row in rows]
    bars = top.bar(
        positions, np.nan_to_num(local), color=colors, label="local SQNR (hatched: weights)"
    )
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    top.plot(positions, overall, "k.-", label="SQNR against the float model")
    top.axhline(threshold_db, color="tab:red", linestyle="--", linewidth=1)
    top.set_ylabel("SQNR (dB)")
    top.legend(loc="lower left", fontsize="small")
    top.set_title(f"Quantized tensors (red: local SQNR below {threshold_db:g} dB)")
    bottom.bar(positions, 100 * clipped, color="tab:orange")
    bottom.set_ylabel("clipped (%)")
    bottom.set_xticks(positions, names, rotation=75, ha="right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _finite(value):
    """A plottable number: None and infinities become NaN / a cap."""
    if value is None:
        return np.nan
    return float(np.clip(value, -20.0, 100.0))
