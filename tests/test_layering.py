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


DATA = os.path.join(ROOT, "flaxen", "data")
# what flaxen/data may import from flaxen: itself and the error types; everything else (config,
# tasks, loop, ...) sits above it and hands it what it needs
DATA_MAY_IMPORT = ("flaxen.data", "flaxen.errors")


def test_flaxen_data_imports_nothing_above_it():
    offending = []
    for name in sorted(os.listdir(DATA)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(DATA, name)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for line, module in _imports(tree):
            top = module == "flaxen" or module.startswith("flaxen.")
            if top and not any(module == m or module.startswith(m + ".") for m in DATA_MAY_IMPORT):
                offending.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {module}")
    assert not offending, "flaxen/data must not import the layers above it:\n" + "\n".join(offending)


TASK_NAMES = ("mlm", "clm", "seq_cls", "token_cls", "qa", "seq2seq", "span_corruption", "causal_lm", "seq2seq_lm")


def _name_tests(tree: ast.AST):
    """(line, source) of comparisons of something with a task or head name: `x == 'seq_cls'`,
    `x in ('mlm', 'clm')`, `x != 'clm'` (dict keys and plain arguments are not tests)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = []
        for operand in operands:
            if isinstance(operand, ast.Constant):
                literals.append(operand.value)
            elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                literals += [e.value for e in operand.elts if isinstance(e, ast.Constant)]
        if any(value in TASK_NAMES for value in literals):
            yield node.lineno, ast.unparse(node)


def test_no_branching_on_task_names_outside_tasks_and_heads():
    """The steps, loop, evaluation, data pipeline, config and scripts call a Task (flaxen/tasks/)
    or a head spec (models/heads.py); they never test a task's or head's name."""
    allowed = {os.path.join("models", "heads.py")}
    files = []
    for top in ("flaxen", "models", "scripts"):
        for directory, _, names in os.walk(os.path.join(ROOT, top)):
            files += [os.path.join(directory, f) for f in names if f.endswith(".py")]
    files += [os.path.join(ROOT, name) for name in ("train.py", "eval.py", "generate.py", "predict.py", "export.py")]
    offending = []
    for path in sorted(files):
        relative = os.path.relpath(path, ROOT)
        if relative in allowed or relative.startswith(os.path.join("flaxen", "tasks") + os.sep):
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        offending += [f"{relative}:{line}: {source}" for line, source in _name_tests(tree)]
    assert not offending, "branching on a task or head name:\n" + "\n".join(offending)
