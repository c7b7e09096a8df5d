"""The JSON file a benchmark writes: when, where, with which flags, its rows."""

import json
import os
import platform
import time


def write_results(path, flag_values, rows, **extra):
    """Writes `rows` with today's date, the machine and `flag_values` (a
    dict) to `path`, creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": platform.processor() or platform.machine(),
                "flags": flag_values,
                **extra,
                "rows": rows,
            },
            f,
            indent=1,
        )
