"""Inputs to an exported model, given as the Keras model takes them."""

import numpy as np


def as_input_list(x, names):
    """`x` (an array, a list in `names` order, or a dict by name) as a list
    of arrays in `names` order; raises for empty or mismatched inputs."""
    if isinstance(x, dict):
        missing = sorted(set(names) - set(x))
        if missing:
            raise ValueError(
                f"Received inputs without {missing}; the model's inputs are {list(names)}. "
                f"Received: x with keys {sorted(x)}"
            )
        x = [x[name] for name in names]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    x = [np.asarray(v) for v in x]
    if len(x) != len(names):
        raise ValueError(f"Expected {len(names)} inputs ({list(names)}). Received: {len(x)} inputs")
    if any(len(v) == 0 for v in x) or len({len(v) for v in x}) != 1:
        raise ValueError(
            "Expected non-empty inputs with one batch size. Received batch sizes: "
            f"{[len(v) for v in x]}"
        )
    return x
