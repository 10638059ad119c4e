"""The docs' house rules, read from the source: every package module opens with a docstring of one to three lines, and
every reference to a project module (dotted or as a path) in docstrings, comments, README.md and BUILD.md resolves."""

from __future__ import annotations

import ast
import functools
import glob
import io
import os
import re
import tokenize

from tests.fast_compile import ROOT

PACKAGES = ("dsv3_jax", "pallas_kernels", "sharding", "experiments", "jax_compat")
DOCS = ("README.md", "BUILD.md")
_NAMES = "|".join(PACKAGES)
# `dsv3_jax.train.build.build_step`, not `jax.sharding.Mesh` nor `tests/sharding.x`.
DOTTED = re.compile(rf"(?<![\w./-])(?:{_NAMES})(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# `dsv3_jax/train/build.py`, `dsv3_jax/model/moe/`, `tests/...` excluded.
PATH = re.compile(rf"(?<![\w./-])(?:{_NAMES})(?:/[A-Za-z0-9_.*-]+)+/?")


def package_files() -> list[str]:
    return sorted(path for package in PACKAGES
                  for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True))


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


@functools.cache
def _tree(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read())


def _module_file(parts: list[str]) -> str | None:
    """The file of the module or package the dotted parts name, or None."""
    base = os.path.join(ROOT, *parts)
    if os.path.isfile(base + ".py"):
        return base + ".py"
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.join(base, "__init__.py")
    return None


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body binds at its top level (also inside top-level if/try blocks)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                names |= _bound_names(block)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            if isinstance(node.value, (ast.List, ast.Tuple)):   # names a module __getattr__ hands out lazily
                names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return names


def unresolved(reference: str) -> str | None:
    """Why a dotted reference (`pkg.module.attr[.member]`) does not resolve, or None when it does."""
    parts = reference.split(".")
    for cut in range(len(parts), 0, -1):
        if (path := _module_file(parts[:cut])) is not None:
            break
    else:
        return f"no module {parts[0]}"
    rest = parts[cut:]
    if not rest:
        return None
    tree = _tree(path)
    if rest[0] not in _bound_names(tree.body):
        return f"{'.'.join(parts[:cut])} has no {rest[0]}"
    if len(rest) > 1:   # a class's member: checked one level deep
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == rest[0]]
        if classes and rest[1] not in _bound_names(classes[0].body):
            return f"{'.'.join(parts[:cut + 1])} has no {rest[1]}"
    return None


def missing_path(reference: str) -> str | None:
    """Why a path reference (`dsv3_jax/train/build.py`, `dsv3_jax/model/moe/`) names nothing, or None."""
    reference = reference.rstrip(".")
    found = glob.glob(os.path.join(ROOT, reference)) if "*" in reference else os.path.exists(
        os.path.join(ROOT, reference))
    return None if found else "no such file or folder"


def references(text: str) -> list[tuple[int, str, str | None]]:
    """(line offset within text, reference, why it fails or None) for every project reference in text."""
    out = []
    for offset, line in enumerate(text.splitlines()):
        out += [(offset, m.group(), unresolved(m.group())) for m in DOTTED.finditer(line)]
        out += [(offset, m.group(), missing_path(m.group())) for m in PATH.finditer(line)]
    return out


def texts(path: str) -> list[tuple[int, str]]:
    """(first line, text) of every docstring and comment of a Python file."""
    with open(path) as f:
        source = f.read()
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            out.append((token.start[0], token.string))
    return out


def module_docstring_problems() -> list[str]:
    problems = []
    for path in package_files():
        doc = ast.get_docstring(_tree(path), clean=False)
        lines = doc.strip().splitlines() if doc else []
        if not 1 <= len(lines) <= 3:
            problems.append(f"{_rel(path)}: module docstring of {len(lines)} lines (want 1 to 3)")
        problems += [f"{_rel(path)}: module docstring line over 120 characters: {line[:40]}..."
                     for line in lines if len(line) > 120]
    return problems


def stale_references() -> list[str]:
    problems = []
    for path in package_files():
        for first, text in texts(path):
            problems += [f"{_rel(path)}:{first + offset}: {ref}: {why}"
                         for offset, ref, why in references(text) if why]
    for name in DOCS:
        with open(os.path.join(ROOT, name)) as f:
            problems += [f"{name}:{offset + 1}: {ref}: {why}" for offset, ref, why in references(f.read()) if why]
    return problems


def test_module_docstrings_are_one_to_three_lines():
    problems = module_docstring_problems()
    assert not problems, "\n".join(problems)


def test_project_references_resolve():
    problems = stale_references()
    assert not problems, "\n".join(problems)


def test_the_checks_see_stale_references():
    assert unresolved("dsv3_jax.train.build.build_step") is None
    assert unresolved("dsv3_jax.io.hf.load_pretrained") is None
    assert unresolved("dsv3_jax.data.make_batch_iterator") is None      # lazily exported through __all__
    assert unresolved("dsv3_jax.config.model_config.ModelConfig.softmax_scale") is None
    assert unresolved("dsv3_jax.aot") == "dsv3_jax has no aot"
    assert unresolved("dsv3_jax.kernels.select") == "dsv3_jax.kernels has no select"
    assert unresolved("sharding.ep_report") == "sharding has no ep_report"
    assert missing_path("dsv3_jax/train/build.py") is None and missing_path("dsv3_jax/model/moe/") is None
    assert missing_path("dsv3_jax/layers/mla.py") is not None
    refs = [ref for _, ref, _ in references("see `jax.sharding.Mesh`, tests/sharding/x.py and sharding.mesh.")]
    assert refs == ["sharding.mesh"]
