"""The shape of the code is checked, not hoped for: layers import only downwards, no module imports itself
through others, and no module grows past 600 lines. Imports are read from the source (module level and
inside functions alike), so a lazy import cannot hide a cycle or a layer break."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

# Lower number = lower layer; a module may import its own layer and lower ones only.
LAYERS = {
    "library.io": 0,
    "library.toml_values": 0,
    "library.models": 1,
    "library.data": 1,
    "library.adapters": 2,
    "library.cache": 2,
    "library.training": 3,
    "networks": 4,
    "library.cli": 5,
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder in ("library", "networks"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in out if module in known and module != name}


def _layer(module: str) -> int | None:
    for prefix, layer in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def test_no_module_is_longer_than_600_lines() -> None:
    paths = [*ROOT.glob("*.py"), *(p for d in ("library", "networks", "tools") for p in (ROOT / d).rglob("*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_layers_import_only_downwards() -> None:
    breaks = []
    for module, imported in _graph().items():
        for target in imported:
            mine, theirs = _layer(module), _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                breaks.append(f"{module} -> {target}")
    assert not breaks, breaks


def test_library_never_imports_scripts_or_tools() -> None:
    for path in (ROOT / "library").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("tools", "bench", "train_")), f"{path}: {name}"


def test_no_import_cycles() -> None:
    graph = _graph()
    # Only module-to-module edges count: importing a package's __init__ that imports nothing is not a cycle.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles[:5]


def test_the_checker_sees_lazy_imports() -> None:
    """A function-level import is an edge like any other (the layer and cycle tests above rely on it)."""
    graph = _graph()
    assert any("library.models.loading" in targets for targets in graph.values())
    assert _layer("library.cli.config") > _layer("library.training.loop") > _layer("library.data.datasets")
