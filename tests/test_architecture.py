"""The house rules, read from the source: imports point only downward (experiments → dsv3_jax → pallas_kernels |
sharding → jax_compat), no module imports itself round a cycle, and no package module imports a project module
inside a function (the way a cycle is dodged)."""

from __future__ import annotations

import ast
import os

import pytest

from tests.fast_compile import ROOT

PACKAGES = ("experiments", "dsv3_jax", "pallas_kernels", "sharding", "jax_compat")
# What each package may import of the others: the floors.
ALLOWED = {
    "experiments": {"experiments", "dsv3_jax", "pallas_kernels", "sharding", "jax_compat"},
    "dsv3_jax": {"dsv3_jax", "pallas_kernels", "sharding", "jax_compat"},
    "pallas_kernels": {"pallas_kernels", "jax_compat"},
    "sharding": {"sharding", "jax_compat"},
    "jax_compat": {"jax_compat"},
}
# Imports inside functions that load an optional or heavy part on first use, never to dodge a cycle.
LAZY = {("dsv3_jax.data", "dsv3_jax.data._pipeline")}


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str, path: str) -> list[tuple[str, bool]]:
    """(imported project module, inside a function?) for every import in the module's source."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    out.append((target if target in MODULES else base, in_function))
            visit(child, nested)

    visit(tree, False)
    return [(target, lazy) for target, lazy in out if target.split(".")[0] in PACKAGES]


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_imports_point_only_downward():
    upward = [f"{name} imports {target}" for name, edges in GRAPH.items() for target, _ in edges
              if target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not upward, upward


def test_no_project_import_inside_a_function():
    inside = [f"{name} imports {target} inside a function" for name, edges in GRAPH.items()
              if not name.startswith("experiments") for target, lazy in edges if lazy and (name, target) not in LAZY]
    assert not inside, inside


def find_cycle() -> list[str] | None:
    """A cycle of module-level imports, or None."""
    edges = {name: sorted({t for t, lazy in targets if not lazy and t in MODULES and t != name})
             for name, targets in GRAPH.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle() is None, " -> ".join(find_cycle())


def test_the_checks_see_a_cycle_and_a_nested_import(monkeypatch):
    monkeypatch.setitem(GRAPH, "dsv3_jax.kernels", GRAPH["dsv3_jax.kernels"] + [("dsv3_jax.model.model", False)])
    assert find_cycle() is not None
    assert ("dsv3_jax.model.moe.backend", False) in GRAPH["dsv3_jax.model.moe.layer"]


@pytest.mark.parametrize("package", ["dsv3_jax", "sharding", "pallas_kernels"])
def test_every_package_module_is_parsed(package):
    assert sum(name.startswith(package) for name in MODULES) > 5
