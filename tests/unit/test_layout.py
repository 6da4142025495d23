"""The house's shape: dependencies point one way (flows -> ops -> pipelines -> models), no import
cycle between modules or between pipelines' sub-packages, lazy imports inside functions included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "ops", "pipelines", "models")
# who may import whom: a layer imports only itself and the layers below it
LAYERS = {"flows": {"flows", "ops", "pipelines", "models"}, "ops": {"ops", "pipelines"},
          "pipelines": {"pipelines", "models"}, "models": {"models"}}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _unit(module: str) -> str:
    """A module's package-level unit: pipelines.<sub-package or top-level module>, else its package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" and len(parts) > 1 else parts[0]


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ is imported on the way to any of its modules: only module edges count."""
    return {m: {d for d in deps if not (d in graph and (ROOT / d.replace(".", "/")).is_dir())}
            for m, deps in graph.items()}


def test_no_upward_import():
    bad = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps
           if d.split(".")[0] not in LAYERS[m.split(".")[0]]]
    assert not bad, bad


def test_no_cycle_between_modules():
    assert _cycle(_without_packages(_graph())) is None


def test_no_cycle_between_pipelines_sub_packages():
    units: dict[str, set[str]] = {}
    for m, deps in _without_packages(_graph()).items():
        if m.startswith("pipelines."):
            units.setdefault(_unit(m), set()).update(_unit(d) for d in deps if d.startswith("pipelines."))
    assert _cycle({u: d - {u} for u, d in units.items()}) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_pipelines_top_level_is_small():
    modules = [p.name for p in (ROOT / "pipelines").glob("*.py")]
    assert len(modules) <= 8, modules


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a dated measurement belongs in docs/results.md or git"
    assert not re.search(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text), "a commit belongs in git"
    for guide in ("steward.md", "reviewer.md", "operator.md", "results.md"):
        assert (ROOT / "docs" / guide).is_file(), guide
