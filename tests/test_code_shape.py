"""The package's shape: short functions, Keras internals in one module,
shallow class hierarchies."""

import ast
import inspect
import pathlib
import re

import keras

import keras_qat as kq

PACKAGE = pathlib.Path(kq.__file__).parent
MAX_CODE_LINES = 40

# Private names of Keras objects that keras_qat reads (see keras_qat/graph.py).
KERAS_PRIVATE = re.compile(
    r"keras\.src|_keras_history|_inbound_nodes|_outbound_nodes|_run_through_graph"
    r"|(?<!\w)_functional\b|_flatten_layers|_nodes_by_depth|_inputs_struct|_outputs_struct"
)


def code_lines(function, source_lines):
    """Lines of a function's body that hold code: no docstring, comments or
    blank lines."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    lines = source_lines[body[0].lineno - 1 : function.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_no_function_is_longer_than_40_lines_of_code():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name != "__init__"
            ):
                count = code_lines(node, source.splitlines())
                if count > MAX_CODE_LINES:
                    too_long.append(
                        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count})"
                    )
    assert not too_long, too_long


def test_keras_internals_are_used_in_graph_py_only():
    users = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "graph.py" and KERAS_PRIVATE.search(path.read_text())
    ]
    assert users == []


def test_class_hierarchies_are_shallow():
    deep = {}
    for name in kq.__all__:
        obj = getattr(kq, name)
        if inspect.isclass(obj):
            own = [c for c in obj.__mro__ if c.__module__.startswith("keras_qat")]
            if len(own) > 3:
                deep[name] = [c.__name__ for c in own]
    assert deep == {}
    assert issubclass(kq.QuantConv2DBnFoldAct, keras.layers.Layer)


MAX_MODULE_LINES = 500


def test_no_module_is_longer_than_500_lines():
    long_modules = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}


def test_no_module_is_named_like_a_standard_library_module():
    import sys

    shadowing = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.stem in sys.stdlib_module_names
    ]
    assert shadowing == []
