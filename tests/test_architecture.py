"""The shape of the code: arrows point down, and there is one training loop.

Three tiers, bottom to top: the library (``segflow``, no kfp), the KFP layer (``segflow_kfp``:
components, local orchestration, compile / submit, cluster placement, the full ``segflow`` command)
and the pipelines (``pipelines/``, wiring only). Inside the library, bottom to top (a module may
import its own layer's leaf modules and anything below):

    errors, redact, progress, parallel, configs,     leaves (redact: credentials out of printed URIs)
    palette, lifecycle, results                      lifecycle: the retraining policy; results: what stages return
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
    cli                                               the stage commands
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = [
    {"errors", "redact", "progress", "parallel", "configs", "palette", "lifecycle", "results"},
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
    {"cli"},
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


def imported_names(path: Path) -> list[str]:
    """Every absolute import in a file, lazy ones included (``from pkg import name`` gives both
    ``pkg`` and ``pkg.name``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def module_imports() -> dict[str, set[str]]:
    """Module -> the modules of the library and the KFP layer it imports (``from pkg import name``
    counts as the module ``pkg.name`` when there is one), lazy imports included."""
    modules = {}
    for package in ("segflow", "segflow_kfp"):
        for path in sorted((REPO / package).rglob("*.py")):
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


def tier_of(name: str) -> int | None:
    top = name.split(".")[0]
    return {"segflow": 0, "kfp": 1, "segflow_kfp": 1, "pipelines": 2}.get(top)


def test_no_tier_imports_a_tier_above_it():
    """The library imports neither kfp nor the KFP layer; neither imports a pipeline."""
    files = [*(REPO / "segflow").rglob("*.py"), *(REPO / "segflow_kfp").rglob("*.py")]
    assert len(files) > 60
    upward = []
    for path in files:
        here = tier_of(str(path.relative_to(REPO)).replace("/", "."))
        upward += [f"{path.relative_to(REPO)} imports {n}" for n in imported_names(path) if (tier_of(n) or 0) > here]
    assert upward == [], "\n".join(sorted(set(upward)))


def test_no_import_cycles_between_files():
    graph = module_imports()
    assert len(graph) > 60 and "segflow.data.manifest" in graph["segflow.data.importer"]  # the graph is real
    assert "segflow_kfp.orchestration" in graph["segflow_kfp.cli"]

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


def training_loops(path: Path) -> list[str]:
    """The loops in a file that call ``.backward()`` or an optimiser's ``.step()``: training loops."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.For, ast.While)):
            calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]
            if any(c.func.attr == "backward" or "optimizer" in ast.unparse(c.func) for c in calls):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_one_training_loop():
    """Every kind of training goes through segflow/train/loop.py: one loop that steps optimisers,
    one backward, in the library and the KFP layer alike."""
    files = [*(REPO / "segflow").rglob("*.py"), *(REPO / "segflow_kfp").rglob("*.py")]
    loops = [loop for path in files for loop in training_loops(path)]
    backwards = {str(path.relative_to(REPO)) for path in files if ".backward(" in path.read_text()}
    assert loops and {loop.split(":")[0] for loop in loops} == {"segflow/train/loop.py"}, loops
    assert backwards == {"segflow/train/loop.py"}, backwards


def test_components_and_pipelines_need_no_sys_path_edits():
    for path in [*Path(REPO / "segflow_kfp").glob("*.py"), *Path(REPO / "pipelines").glob("*.py")]:
        assert "sys.path" not in path.read_text(), path
