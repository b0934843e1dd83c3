"""The package's imports point one way, and every module can be read in one sitting.

Read from the source (nothing is imported): module-level and function-level imports alike,
since a function-level import still runs. ``TYPE_CHECKING`` imports are left out (they never
run). The layers, top to bottom; a module may import its own layer's modules (no cycles)
and any layer below:

    operators, sensors, transfers, plugins   the Airflow roles users put in DAGs / the UI
    links                                    extra links (operators list them)
    triggers                                 the triggerer's side
    hooks                                    the only HTTP client of the API
    leaf modules                             models, families, lineage, metrics, exceptions, redact, compat, identity, events, manifest, manifest_store, results, xcom_keys, state

``get_provider_info`` (what Airflow reads of the provider) imports nothing of the package;
any module may read it. ``emulator`` stands apart: it imports nothing of the client it checks, and nothing imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_flux"
MAX_LINES = 500

LAYERS: dict[str, int] = {
    "exceptions": 0,
    "compat": 0,
    "redact": 0,
    "families": 0,
    "lineage": 0,
    "metrics": 0,
    "models": 1,
    "xcom_keys": 1,
    "manifest": 1,
    "manifest_store": 1,
    "state": 1,
    "results": 1,
    "identity": 2,
    "events": 2,
    "hooks": 3,
    "triggers": 4,
    "links": 5,
    "operators": 6,
    "sensors": 6,
    "transfers": 6,
    "plugins": 6,
}
#: Imports nothing of the package; the entry point Airflow reads.
STANDALONE = {"get_provider_info", "__init__"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        mods[".".join(parts).removesuffix(".__init__") or "__init__"] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return hidden


def _imports(name: str, path: Path) -> set[str]:
    """The package modules (dotted, without ``airflow_flux.``) that ``name`` imports at run time."""
    tree = ast.parse(path.read_text())
    hidden = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(["airflow_flux", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "airflow_flux" or target.startswith("airflow_flux."):
                found.add(target.removeprefix("airflow_flux").lstrip(".") or "__init__")
    return found


def _owner(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        owners = {_owner(t, mods) for t in _imports(name, path)}
        graph[name] = {o for o in owners if o and o != name and not name.startswith(o + ".")}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_every_module_is_in_a_layer():
    unknown = {m for m in _graph() if _layer(m) not in LAYERS and _layer(m) not in STANDALONE | {"emulator"}}
    assert not unknown, f"add these to LAYERS (and the README's layout): {sorted(unknown)}"


def test_no_import_points_up():
    upward = []
    for module, targets in _graph().items():
        top = _layer(module)
        for target in targets:
            below = _layer(target)
            if top in STANDALONE:
                upward.append(f"{module} -> {target} (imports nothing of the package)")
            elif below in STANDALONE:
                continue  # it imports nothing of the package, so no path through it leads up
            elif top == "emulator" or below == "emulator":
                if top != below:
                    upward.append(f"{module} -> {target} (the emulator stands apart)")
            elif LAYERS[below] > LAYERS[top]:
                upward.append(f"{module} -> {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1  # on the current path
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_can_be_read_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines (split it by job)"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # A checker that cannot fail proves nothing: feed it the shapes it must catch.
    sample = tmp_path / "mod.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from airflow_flux.operators import X\n"
        "def f():\n    from airflow_flux.triggers.flux import FluxStatusTrigger\n"
        "from . import models\n"
    )
    found = _imports("hooks.mod", sample)
    assert "triggers.flux.FluxStatusTrigger" in found and "triggers.flux" in found
    assert "hooks.models" in found or "hooks" in found
    assert not any(t.startswith("operators") for t in found)
