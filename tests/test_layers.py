"""The layers of ``src/via_tunnel`` and who may import whom (ARCHITECTURE.md).

Read from the source with ``ast``, so lazy imports inside functions count as much as those at
the top: a rule that holds only until a function runs is no rule.

    core  <-  kernel  <-  group  <-  launch, daemon, gateway, doctor, trace  <-  cli
                                                                   lab (beside them)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "via_tunnel"
FRONT_ENDS = ("launch", "daemon", "gateway", "doctor", "trace")
# Each layer and the layers it may import (besides itself). `cli` may import anything.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "kernel": {"core"},
    "group": {"core", "kernel"},
    **{front: {"core", "kernel", "group"} for front in FRONT_ENDS},
    "lab": {"core", "kernel"},
    "cli": {"core", "kernel", "group", *FRONT_ENDS, "lab"},
    "": {"cli"},  # via_tunnel/__init__.py and __main__.py
}
# Besides the standard library, what each layer may import from outside the package.
THIRD_PARTY: dict[str, set[str]] = {
    "core": set(),
    "kernel": {"nftables", "pyroute2", "psutil", "dbus"},
    "cli": {"typer", "click"},
}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, top level or inside a function, fully qualified."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from via_tunnel.kernel import nft` imports the module via_tunnel.kernel.nft
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if _exists(candidate):
                    found.add(candidate)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (
        PACKAGE.parent / rel / "__init__.py").exists()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {mod: {i for i in _imports(path) if i.startswith("via_tunnel.") and i != mod}
         for mod, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_the_layers_below(module: str) -> None:
    layer = _layer(module)
    bad = []
    for imported in sorted(GRAPH[module]):
        target = _layer(imported)
        if target == layer or not target:
            continue
        if target not in ALLOWED[layer]:
            bad.append(imported)
    assert not bad, f"{module} (layer {layer or 'top'}) must not import {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in THIRD_PARTY))
def test_outside_imports_are_the_chosen_ones(module: str) -> None:
    layer = _layer(module)
    outside = {i.split(".")[0] for i in _imports(MODULES[module])} - {"via_tunnel"}
    foreign = sorted(o for o in outside
                     if o not in sys.stdlib_module_names and o not in THIRD_PARTY[layer])
    assert not foreign, f"{module} imports {foreign}"


def test_no_other_layer_imports_third_party_it_was_not_given() -> None:
    allowed_anywhere = THIRD_PARTY["kernel"] | THIRD_PARTY["cli"]
    for module, path in MODULES.items():
        outside = {i.split(".")[0] for i in _imports(path)} - {"via_tunnel"}
        foreign = outside - set(sys.stdlib_module_names) - allowed_anywhere
        assert not foreign, f"{module} imports {sorted(foreign)}"


def test_no_import_cycles() -> None:
    """Between modules, lazy imports included."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for nxt in sorted(GRAPH.get(mod, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[mod] = 2

    for mod in sorted(MODULES):
        if mod not in state:
            visit(mod)


def test_packages_are_the_layers() -> None:
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py")} - {"via_tunnel"}
    assert packages == set(ALLOWED) - {""}
    assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py", "__main__.py"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (split it by concern)"
