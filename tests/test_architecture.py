"""The picture in docs/architecture.md, kept true: which part may import which, no import circle between files
(function-level imports included), a small top level, no module over 400 lines."""

import ast
from pathlib import Path

import pytest

from tests.helpers.common import ROOT

PACKAGE = ROOT / "glm_experiments"

# A part may import only parts of a lower layer (or itself). Top-level modules are parts of their own.
LAYERS = [
    {"errors", "constants", "compat", "discovery", "distributed"},  # foundations
    {"config", "metrics"},
    {"data", "tracking"},
    {"models"},
    {"methods"},
    {"migration", "compose"},  # THUDM artifacts onto our models and methods; the config as the CLI composes it
    {"recipe"},  # one training run
    {"scale", "study"},  # many runs: launching them, comparing them
    {"inference"},  # a finished run used: predict, merge, chat, the web page
    {"__main__", "chat", "compare", "convert", "merge", "predict", "web"},  # commands
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}
MAX_TOP_LEVEL = 12
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module of ours ``path`` imports, at any level (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glm_experiments"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("glm_experiments."))
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in MODULES if m != "glm_experiments"}
    assert parts <= set(LAYER_OF), f"parts missing from LAYERS (and docs/architecture.md): {parts - set(LAYER_OF)}"


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, outs in graph.items()
        for b in outs
        if a != "glm_experiments" and part_of(a) != part_of(b) and LAYER_OF[part_of(b)] >= LAYER_OF[part_of(a)]
    )


def test_parts_import_only_lower_layers():
    wrong = violations(GRAPH)
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_the_rule_reports_a_forbidden_arrow():
    graph = {"glm_experiments.models.loading": {"glm_experiments.methods.record", "glm_experiments.config.schema"}}
    assert violations(graph) == ["glm_experiments.models.loading -> glm_experiments.methods.record"]


def test_models_know_nothing_of_methods():
    assert not [(a, b) for a, outs in GRAPH.items() for b in outs
                if part_of(a) == "models" and part_of(b) in {"methods", "migration"}]


def test_no_import_circle_between_files():
    # Tarjan's strongly connected components over the file graph
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_top_level_is_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__"})
    assert len(top) <= MAX_TOP_LEVEL, top


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES
