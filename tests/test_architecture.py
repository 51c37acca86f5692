"""The shape of the library: arrows point down, and there is one training loop.

Layers, bottom to top (a module may import its own layer's leaf modules and anything below):

    errors, redact, progress, parallel, configs,     leaves (redact: credentials out of printed URIs)
    palette, lifecycle,                              lifecycle: the retraining policy, pure functions
    cluster
    storage
    data
    models
    evaluate                                          scoring is what training validates with
    train                                             the one engine and its objectives
    selfsl, adapt                                     objectives of that engine
    export
    tracking, registry                                registry: champion / challenger in MLflow's model registry
    stages
    launch                                            a stage in several processes (torchrun)
    orchestration, submit, cli                        submit: runs and schedules on a KFP server
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

LAYERS = [
    {"errors", "redact", "progress", "parallel", "configs", "palette", "lifecycle", "cluster"},
    {"storage"},
    {"data"},
    {"models"},
    {"evaluate"},
    {"train"},
    {"selfsl", "adapt"},
    {"export"},
    {"tracking", "registry"},
    {"stages"},
    {"launch"},
    {"orchestration", "submit", "cli"},
]
RANK = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "segflow" and len(parts) > 1 else None


def imports() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every segflow import, lazy ones included."""
    edges = []
    for path in sorted((REPO / "segflow").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        here = unit_of(".".join(parts))
        if here is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                there = unit_of(target)
                if there is not None and there != here and there in RANK:
                    edges.append((str(rel), here, there))
    return edges


def test_every_module_has_a_layer():
    folder = REPO / "segflow"
    units = {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    units |= {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    assert units <= set(RANK), f"give these a layer in this test: {sorted(units - set(RANK))}"


def test_no_module_imports_a_layer_above_it():
    upward = sorted({(f, a, b) for f, a, b in imports() if RANK[b] > RANK[a]})
    assert upward == [], "\n".join(f"{f}: {a} imports {b}" for f, a, b in upward)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for _, a, b in imports():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert [u for u in graph if reaches(u, u, {u})] == []


def module_imports() -> dict[str, set[str]]:
    """Module -> the segflow modules it imports (``from pkg import name`` counts as the module
    ``pkg.name`` when there is one), lazy imports included."""
    modules = {}
    for path in sorted((REPO / "segflow").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            else:
                continue
            graph.setdefault(name, set()).update(t for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycles_between_files():
    graph = module_imports()
    assert len(graph) > 40 and "segflow.data.manifest" in graph["segflow.data.importer"]  # the graph is real

    def cycle_from(start: str) -> list[str]:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return []

    cycles = [" -> ".join(c) for c in map(cycle_from, sorted(graph)) if c]
    assert cycles == [], "\n".join(cycles)


def test_one_training_loop():
    """Every kind of training goes through segflow/train/engine.py: one epoch loop, one backward."""
    loops, backwards = [], []
    for path in (REPO / "segflow").rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        loops += [rel for line in text.splitlines() if re.search(r"def pretrain|for epoch", line)]
        backwards += [rel for line in text.splitlines() if ".backward(" in line]
    assert loops == ["segflow/train/engine.py"], loops
    assert set(backwards) == {"segflow/train/engine.py"}, backwards


def test_components_and_pipelines_need_no_sys_path_edits():
    for path in [*Path(REPO / "components").glob("*.py"), *Path(REPO / "pipelines").glob("*.py")]:
        assert "sys.path" not in path.read_text(), path
