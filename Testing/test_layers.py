"""The engine's layering: no import cycles, no GUI imports, and the lower floors import without torch.

The floors are listed in README.md ("Code layout"). The import graph is read from the source files (module-level
imports only: an import inside a function is how a lower module reaches an optional, heavier one on demand).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT

ENGINE = PROJECT_ROOT / "cmedl"
#: modules that must import on a machine without torch (the Slicer panels and `cmedl info` rely on it)
TORCH_FREE = (
    "errors", "filebase", "cpu", "memory", "devices", "segment_options", "training.choices", "progress",
    "volumes", "imagefiles", "niftigz", "modality", "lungs", "lesions", "metrics", "modelcard", "catalogue",
    "downloads",
    "processes", "jobs", "phantom", "training.runfolder", "training.runs", "training.launch",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports when it is imported (``if TYPE_CHECKING`` blocks left out)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        statements = node.body if isinstance(node, ast.Try) else [node]
        for statement in statements:
            if isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
                found.add(statement.module)
                found.update(f"{statement.module}.{alias.name}" for alias in statement.names)
    return found


def engine_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in ENGINE.rglob("*.py")}
    return {name: (module_level_imports(path) & set(files)) - {name, "cmedl"} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules (first repeated at the end), or [] if there is none."""
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if not state.get(target):
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 2
        return []

    for module in sorted(graph):
        if not state.get(module):
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_engine_has_no_import_cycle() -> None:
    graph = engine_graph()
    assert "cmedl.modelfile" in graph and "cmedl.filebase" in graph["cmedl.modelfile"]
    assert find_cycle(graph) == []


def test_the_engine_never_imports_a_gui() -> None:
    for path in ENGINE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        imported = {name.split(".")[0] for name in module_level_imports(path)}
        # also imports inside functions: the engine may not reach a GUI on demand either
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"slicer", "qt", "vtk", "ctk", "PythonQt"}, path


def test_the_lower_floors_import_without_torch() -> None:
    probe = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module('cmedl.' + name)\n"
        "print('imported', len(" + repr(TORCH_FREE) + "))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"imported {len(TORCH_FREE)}" in result.stdout
