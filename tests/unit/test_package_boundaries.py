"""The two packages keep to their sides (issue 2, DESIGN.md): the operator never imports the
training stack, not even lazily inside a function, and the client runtime never imports the
operator's Kubernetes stack, so a laptop installs it without them.

The clean-environment installs are in tests/unit/test_images.py and
tests/integration/test_client_install.py; these catch an import in a code path that those
imports do not reach.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pollinate_operator
import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "pollinate_operator"
RUNTIME = ROOT / "client-runtime" / "pollinate_runtime"
TRAINING_STACK = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
OPERATOR_STACK = {"kopf", "kubernetes"}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` anywhere in the file names (top level or inside a function);
    relative imports come back absolute, as `pollinate_runtime.store`."""
    source_root = next(p for p in (OPERATOR.parent, RUNTIME.parent) if path.is_relative_to(p))
    package = ".".join(path.relative_to(source_root).parent.parts)  # what `from .` means here
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def top_levels(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def offending(files: list[Path], forbidden: set[str]) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(top_levels(imported_modules(path)) & forbidden)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def runtime_modules_the_operator_uses() -> list[Path]:
    used = set()
    for path in OPERATOR.rglob("*.py"):
        used |= {n for n in imported_modules(path) if n.startswith("pollinate_runtime.")}
    files = []
    for name in sorted(used):
        parts = name.split(".")[1:]
        module, package = RUNTIME.joinpath(*parts).with_suffix(".py"), RUNTIME.joinpath(*parts, "__init__.py")
        files += [f for f in (module, package) if f.exists()]
    return sorted(set(files))


def test_imported_modules_sees_imports_inside_functions_and_relative_ones() -> None:
    names = imported_modules(RUNTIME / "cli.py")
    assert "pollinate_runtime.train.data" in names  # `from .train.data import ...` in a function
    assert "cryptography.hazmat.primitives.serialization" in names


def test_no_operator_module_imports_the_training_stack_anywhere() -> None:
    files = sorted(OPERATOR.rglob("*.py"))
    assert len(files) > 10
    assert offending(files, TRAINING_STACK) == {}


def test_the_runtime_modules_the_operator_uses_do_not_import_the_training_stack() -> None:
    files = runtime_modules_the_operator_uses()
    assert RUNTIME / "store.py" in files
    assert offending(files, TRAINING_STACK) == {}


def test_no_client_runtime_module_imports_kopf_or_the_kubernetes_client() -> None:
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) > 10
    assert offending(files, OPERATOR_STACK) == {}


@pytest.mark.slow  # imports every operator module in a fresh process
def test_importing_every_operator_module_loads_no_training_stack() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(pollinate_operator.__path__,
                                                            "pollinate_operator."))
    assert "pollinate_operator.handlers" in modules
    probe = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = {sorted(TRAINING_STACK)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
