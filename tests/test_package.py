"""Packaging: one installed namespace, the console script, ops registered in one domain/opset."""

import importlib.util
import subprocess
import sys

import graphattn
from graphattn import ops
from graphattn.cli import main


def test_generic_folders_are_not_top_level_packages():
    for generic in ("ops", "runtime", "models", "exporters"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or "graphattn" not in (spec.origin or ""), generic
    for package in (
        "graphattn.ops",
        "graphattn.runtime",
        "graphattn.models",
        "graphattn.exporters",
    ):
        assert importlib.util.find_spec(package) is not None, package


def test_every_function_is_in_one_domain_and_opset():
    functions = ops.registered_functions()
    assert len(functions) >= 15
    for name, function in functions.items():
        proto = function.to_function_proto()
        assert proto.domain == "graphattn", name
        imports = {o.domain: o.version for o in proto.opset_import}
        assert imports.get("", 23) == 23, name
        assert imports.get("graphattn", 1) == 1, name
        assert function.function.__doc__, f"{name} has no docstring"


def test_version_and_help(capsys):
    for flag in ("--version", "--help"):
        try:
            main([flag])
        except SystemExit as done:
            assert done.code == 0
    text = capsys.readouterr().out
    assert f"graphattn {graphattn.__version__}" in text
    assert "commands" in text


def test_console_script_lists_ops():
    result = subprocess.run(
        [sys.executable, "-m", "graphattn", "ops"], capture_output=True, text=True, check=True
    )
    assert "graphattn.ScaledDotProductAttention <scale>(" in result.stdout
