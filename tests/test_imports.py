"""Imports flow one way: cli → stages → core. No import cycle (module-level or inside a function), no private name
imported across modules, and the core modules import no stage. Static (ast): nothing is imported, so it runs in
well under a second."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import gradauth

ROOT = Path(gradauth.__file__).resolve().parent

# The core: plain objects, files, models and training primitives. The stages (pipeline, sweep, select, release, report,
# attack, status, search, bench, …) build on it; cli on them.
CORE = {"checkpoint", "compact", "config", "console", "data", "engine", "errors", "finetune", "fsutil", "importance", "knobs",
        "machine", "models", "prune", "raywatch", "registry", "rows", "rules", "rundir", "runlock", "schema",
        "sparsity", "trial", "slicing"}
ENTRY = {"cli", "__main__"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def analyse(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module → the package modules it imports, anywhere in its code; [(importer, module, private name)])."""
    mods = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != top:
                    continue
                for a in node.names:
                    t = f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target
                    if t in mods and t != m:
                        graph[m].add(t)
                    if a.name.startswith("_") and not a.name.startswith("__") and t != m:
                        private.append((m, t, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.name != m:
                        graph[m].add(a.name)
    return graph, private


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def _short(m: str) -> str:
    return m.split(".", 1)[1] if "." in m else ""


def test_no_import_cycle():
    graph, _ = analyse()
    assert cycle(graph) is None, f"import cycle: {' → '.join(cycle(graph))}"


def test_no_private_name_across_modules():
    _, private = analyse()
    assert private == [], f"private names imported across modules (make them public where shared): {private}"


def test_core_imports_no_stage():
    graph, _ = analyse()
    assert {_short(m).split(".")[0] for m in graph} >= CORE  # every core module exists (a rename must update CORE)
    wrong = {(_short(m), _short(t)) for m, ts in graph.items() if _short(m).split(".")[0] in CORE
             for t in ts if _short(t).split(".")[0] not in CORE}
    assert wrong == set(), f"core modules importing a stage: {sorted(wrong)}"


def test_only_the_entry_points_import_cli():
    graph, _ = analyse()
    assert {_short(m) for m, ts in graph.items() if "gradauth.cli" in ts} <= ENTRY


def test_no_submodule_imports_its_own_package():
    """slicing's submodules import slicer.py, not the package: its __init__ re-exports them and dispatches to stage."""
    graph, _ = analyse()
    wrong = {(m, t) for m, ts in graph.items() for t in ts if m.startswith(t + ".") and t != "gradauth"}
    assert wrong == set(), f"submodules importing their package's __init__: {sorted(wrong)}"


def test_the_analysis_sees_cycles_and_private_names(tmp_path):
    """The checks can fail: a two-module cycle through a function-level import, and a private name, are found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import helper\n")
    (pkg / "b.py").write_text("def helper():\n    from .sub.c import _secret\n    return _secret\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def _secret():\n    from ..a import helper\n")
    graph, private = analyse(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert sorted(cycle(graph)[:-1]) == ["pkg.a", "pkg.b", "pkg.sub.c"]
    assert private == [("pkg.b", "pkg.sub.c", "_secret")]
    (pkg / "sub" / "c.py").write_text("def secret():\n    pass\n")
    (pkg / "b.py").write_text("from .sub.c import secret\n")
    assert cycle(analyse(pkg)[0]) is None and analyse(pkg)[1] == []


if __name__ == "__main__":  # pragma: no cover - prints the layered graph (docs/design.md)
    g, _ = analyse()
    for name in sorted(g):
        print(_short(name) or "gradauth", "->", ", ".join(sorted(_short(t) for t in g[name])))
