"""The package layout (docs/architecture.md): every module imports, no import cycle, no import from a lower layer
back up. The import graph is read from the source with ast (every import, at module level or inside a function,
TYPE_CHECKING ones included), so a lazy import cannot hide a cycle."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import torchsaq

SRC = Path(torchsaq.__file__).resolve().parent

#: the layers, lowest first: a module may import its own layer or a lower one, never a higher one
LAYERS = [
    ("registry", "_io", "_optional", "_dtensor"),
    ("quant",),
    ("integrations",),
    ("optim", "export"),
    ("train",),
    ("analysis",),
    ("cli", "__main__", "__init__", "vocab"),  # vocab: a view of the registries, for code written against 0.1
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["torchsaq", *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str) -> set[str]:
    """The torchsaq modules ``module`` imports (the deepest module each import statement names)."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node.level, node.module) if node.level else (node.module or "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t.startswith("torchsaq") and t != module and t != "torchsaq":
                found.add(t)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its package {top!r} has no layer in test_architecture.LAYERS")


GRAPH = {m: imports_of(m) for m in MODULES}


@pytest.mark.parametrize("module", [m for m in MODULES if not m.endswith("_triton_lsq")])
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_import_from_a_higher_layer():
    up = sorted(f"{m} imports {n}" for m, deps in GRAPH.items() for n in deps if _layer(n) > _layer(m))
    assert not up, "imports from a higher layer:\n" + "\n".join(up)


def test_the_old_flat_paths_are_the_moved_modules():
    """``torchsaq.sam`` and the other paths of the flat layout give the module that moved (torchsaq.MOVED)."""
    for old, new in torchsaq.MOVED.items():
        if old == "_triton_lsq":
            continue
        assert importlib.import_module(f"torchsaq.{old}") is importlib.import_module(f"torchsaq.{new}"), old
    assert importlib.import_module("torchsaq.models.cifar") is importlib.import_module("torchsaq.train.models.cifar")
