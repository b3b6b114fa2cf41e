"""The package's import layers, read from the source with ``ast`` (nothing is imported): no import cycles, and the
numerical core never reaches orchestration, tracking or the command line.

Every import counts: module-level, function-level (the deferred imports that keep torch and MLflow out of light
commands) and ``if TYPE_CHECKING:`` ones, since each is a dependency of the module that writes it. Modules are
those of ``src/blendsign`` and of ``components/`` and ``pipelines/`` (installed as ``blendsign.components`` and
``blendsign.pipelines``, pyproject's ``[tool.setuptools]``).
"""

from __future__ import annotations

import ast
import functools
import graphlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The numerical core and the data's formats (DICOM, the ingested slices whose manifest data reads, labels, folds,
# checkpoints): pure functions of arrays, tensors, configs and files.
CORE = {"blendsign", "blendsign.config", "blendsign.errors", "blendsign.codecs", "blendsign.dicom", "blendsign.ingest",
        "blendsign.labels", "blendsign.folds", "blendsign.transforms", "blendsign.targets", "blendsign.model",
        "blendsign.losses", "blendsign.metrics", "blendsign.ood", "blendsign.baselines", "blendsign.checkpoint",
        "blendsign.data", "blendsign.engine", "blendsign.explain"}
# Helpers the core may use: atomic files and S3 paths, progress lines, keyed pseudonyms.
SUPPORT = {"blendsign.storage", "blendsign.progress", "blendsign.deid"}
# The stages and what they make (cohort, NIfTI import, training, evaluation, the served model): may log to MLflow.
STAGES = {"blendsign.synth", "blendsign.nifti", "blendsign.train", "blendsign.distill",
          "blendsign.evaluate", "blendsign.cv", "blendsign.plots", "blendsign.html_report", "blendsign.report",
          "blendsign.serving",
          "blendsign.predict", "blendsign.triage"}
# Orchestration, tracking and the registry: MLflow runs and models, pipeline steps, S3 staging, Kubeflow, KServe.
ORCHESTRATION = {"blendsign.tracking", "blendsign.run_tree", "blendsign.pipeline", "blendsign.remote",
                 "blendsign.credentials", "blendsign.registry", "blendsign.retrain", "blendsign.head_to_head",
                 "blendsign.model_package", "blendsign.model_server", "blendsign.deploy"}
# The front ends: the command line and the Kubeflow components and pipeline; nothing below them imports them.
FRONT_ENDS = {"blendsign.cli", "blendsign.components", "blendsign.pipelines"}
# Third-party packages of orchestration, tracking and the command line: never reached from the core.
OUTSIDE_THE_CORE = {"mlflow", "kfp", "kubernetes", "kserve", "argparse"}
# Imports that would close a cycle and stay, each with why (importer, imported): none.
KNOWN_CYCLE_IMPORTS: set[tuple[str, str]] = set()


def _front_end(module: str) -> bool:
    return any(module == f or module.startswith(f"{f}.") for f in FRONT_ENDS)


@functools.cache
def _sources() -> dict[str, Path]:
    """Module name → file, for every package that ``[tool.setuptools]`` installs."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    out = {}
    for package in setuptools["packages"]:
        folder = ROOT / dirs[package] if package in dirs else ROOT / dirs[""] / package.replace(".", "/")
        for path in folder.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every module that ``module`` imports anywhere in its source (for ``from m import n``: ``m.n`` when that is
    a module of ours, else ``m``)."""
    ours = _sources()
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            out |= {f"{source}.{a.name}" if f"{source}.{a.name}" in ours else source for a in node.names}
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    """Module → the modules it imports (ours and third-party, top-level names for the latter)."""
    ours = _sources()
    return {m: {i if i in ours else i.split(".")[0] for i in _imports(m, p)} - {m} for m, p in ours.items()}


def _internal() -> dict[str, set[str]]:
    graph = _graph()
    return {m: deps & graph.keys() for m, deps in graph.items()}


def _reach(module: str) -> dict[str, list[str]]:
    """Everything ``module`` imports directly or through our modules, each with one import chain to it."""
    graph, chains, todo = _graph(), {module: [module]}, [module]
    while todo:
        current = todo.pop()
        for dep in sorted(graph.get(current, ())):
            if dep not in chains:
                chains[dep] = [*chains[current], dep]
                todo.append(dep)
    return chains


def test_every_module_has_one_layer() -> None:
    layers = [CORE, SUPPORT, STAGES, ORCHESTRATION]
    for module in _sources():
        placed = [layer for layer in layers if module in layer] + ([FRONT_ENDS] if _front_end(module) else [])
        assert len(placed) == 1, f"{module} must be in exactly one layer of tests/test_layers.py"


def test_no_import_cycles() -> None:
    graph = _internal()
    for importer, imported in KNOWN_CYCLE_IMPORTS:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it from KNOWN_CYCLE_IMPORTS"
        graph[importer].discard(imported)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle (each imports the next): {' → '.join(reversed(exc.args[1]))}")


@pytest.mark.parametrize("module", sorted((CORE | SUPPORT) & _sources().keys()))
def test_the_core_never_reaches_orchestration_tracking_or_the_cli(module: str) -> None:
    """Nor the stages: the core imports, directly or through our modules, only the core and its helpers."""
    def outside(m: str) -> bool:
        return m in OUTSIDE_THE_CORE or (m in _sources() and m not in CORE | SUPPORT)

    exits = [chain for m, chain in _reach(module).items() if outside(m) and not outside(chain[-2])]
    assert not exits, "imports leaving the core: " + "; ".join(" → ".join(chain) for chain in sorted(exits))


def test_only_front_ends_import_front_ends() -> None:
    bad = {(m, dep) for m, deps in _internal().items() if not _front_end(m) for dep in deps if _front_end(dep)}
    assert not bad, f"imports of the CLI or the Kubeflow code from below them: {sorted(bad)}"
