"""models/ stands alone: no file under it imports flaxen, and its errors are flaxen's errors.

Why: models/ (architectures, heads, Hugging Face interop, PEFT) must be usable, testable and
publishable without the training library; flaxen depends on models/, never the reverse. The
error types live in models.errors and flaxen re-exports them, so `except flaxen.FlaxenError`
still catches a bad model config or checkpoint.
"""
import ast
import os
import subprocess
import sys

import flaxen
import models.errors

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
MODELS = os.path.join(ROOT, "models")


def _imports(tree: ast.AST):
    """(line, module name) of every import in `tree`, inside functions and classes too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_no_file_under_models_imports_flaxen():
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(MODELS) for f in names if f.endswith(".py"))
    assert len(files) > 10
    offending = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for line, module in _imports(tree):
            if module == "flaxen" or module.startswith("flaxen."):
                offending.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {module}")
    assert not offending, "models/ must not import flaxen:\n" + "\n".join(offending)


def test_importing_models_loads_no_flaxen_module():
    code = "import sys, models, models.peft; print([m for m in sys.modules if m.split('.')[0] == 'flaxen'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_models_errors_are_flaxen_errors():
    assert flaxen.FlaxenError is models.errors.Error
    assert flaxen.ConfigError is models.errors.ConfigError and flaxen.CheckpointError is models.errors.CheckpointError
    assert issubclass(models.errors.ConfigError, flaxen.FlaxenError)
    assert issubclass(models.errors.CheckpointError, flaxen.FlaxenError)
    assert issubclass(flaxen.DataError, flaxen.FlaxenError)
    assert not issubclass(flaxen.DataError, (models.errors.ConfigError, models.errors.CheckpointError))
