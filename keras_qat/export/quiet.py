"""TensorFlow's own logging kept out of what export prints.

Saving a SavedModel and converting it log a few dozen INFO lines (through
Python's `tensorflow` logger, and through absl when the program runs under
`absl.app`), and the TFLite interpreter's C++ runtime prints a line when it
applies its default delegate. `quiet()` silences both around a call unless
the user asked for them: `verbose=True`, or TensorFlow's usual environment
variable `TF_CPP_MIN_LOG_LEVEL=0`. What was printed to the C-level stderr
is shown if the call raises.
"""

import contextlib
import logging
import os
import sys
import tempfile


def wants_logs(verbose=None):
    """Whether TensorFlow's logging should be shown: `verbose` if given,
    else whether `TF_CPP_MIN_LOG_LEVEL` is set to 0."""
    if verbose is not None:
        return bool(verbose)
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() == "0"


@contextlib.contextmanager
def quiet(verbose=None):
    """Within this context TensorFlow's INFO logging and the native stderr
    are silenced (unless `wants_logs(verbose)`)."""
    if wants_logs(verbose):
        yield
        return
    with _python_logs_at_warning(), _native_stderr_captured():
        yield


@contextlib.contextmanager
def _python_logs_at_warning():
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _native_stderr_captured():
    """File descriptor 2 goes to a temporary file; its text is written to
    `sys.stderr` if the body raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
