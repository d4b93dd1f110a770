"""The architecture as a test: imports go one way, and there is no import circle anywhere.

Every ``import`` statement counts, including those inside functions (lazy imports hide a circle
from the interpreter, not from a reader). Layers, bottom up, are listed in ``service/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("learner", "memory", "service")

# Each layer and the layers it may import (besides itself).
BASE = {"service.errors", "service.metrics"}
ALLOWED: dict[str, set[str]] = {
    "learner": set(),
    "memory": {"learner"},
    "service.base": {"learner", "memory"},
    "service.core": {"service.base", "learner", "memory"},
    "service.kafka": {"service.core", "service.base", "learner", "memory"},
    "service.models": {"service.core", "service.base", "learner", "memory"},
    "service.serving": {"service.models", "service.core", "service.base", "learner", "memory"},
    "service.roles": {"service.models", "service.kafka", "service.core", "service.base", "learner", "memory"},
    "service.tools": {"service.serving", "service.models", "service.kafka", "service.core", "service.base",
                      "learner", "memory"},
    "service.app": {"service.tools", "service.roles", "service.serving", "service.models", "service.kafka",
                    "service.core", "service.base", "learner", "memory"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module.split(".")[0] in ("learner", "memory"):
        return module.split(".")[0]
    if module in BASE or module == "service":
        return "service.base"
    return ".".join(module.split(".")[:2])


def sources() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "gen" in path.relative_to(ROOT).parts:  # protoc's output
                continue
            found[module_name(path)] = path
    return found


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, resolved to the longest known module name."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = sources()
    known = set(found)
    return {mod: imports_of(path, mod, known) for mod, path in found.items()}


def test_every_module_has_a_known_layer(graph: dict[str, set[str]]) -> None:
    unknown = sorted(m for m in graph if layer_of(m) not in ALLOWED)
    assert not unknown, f"modules outside every layer (add them to one): {unknown}"


def test_imports_follow_the_layer_order(graph: dict[str, set[str]]) -> None:
    wrong = []
    for mod, deps in graph.items():
        own = layer_of(mod)
        for dep in deps:
            other = layer_of(dep)
            if other != own and other not in ALLOWED.get(own, set()):
                wrong.append(f"{mod} ({own}) imports {dep} ({other})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    # Tarjan's strongly connected components; any component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_package_init_imports_do_not_hide_a_circle() -> None:
    # A package's __init__ that imports its own submodules makes every `from pkg.x import` pull
    # the whole package; the layers above rely on importing one module at a time.
    heavy = [p for p in (ROOT / "service").rglob("__init__.py")
             if "gen" not in p.parts and any(isinstance(n, (ast.Import, ast.ImportFrom))
                                             for n in ast.parse(p.read_text()).body)]
    assert not heavy, f"service package __init__ files that import: {heavy}"


def test_service_top_level_stays_small() -> None:
    top = [p.name for p in (ROOT / "service").glob("*.py")]
    assert len(top) <= 12, f"{len(top)} modules at service/'s top level: {sorted(top)}"


def test_no_class_in_service_is_longer_than_250_lines() -> None:
    long = []
    for path in (ROOT / "service").rglob("*.py"):
        if "gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > 250:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert not long, f"classes longer than 250 lines: {long}"


def test_the_layer_check_catches_a_violation(tmp_path: Path) -> None:
    # The check must be able to fail: a core module importing a role is reported.
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from service.roles.learn_loop import LearnLoop\n")
    deps = imports_of(fake, "service.core.x", {"service.roles.learn_loop", "service.core.x"})
    assert deps == {"service.roles.learn_loop"}
    assert layer_of("service.roles.learn_loop") not in ALLOWED["service.core"]
