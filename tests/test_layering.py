"""The package's imports point one way (data -> model -> train -> eval -> orchestration): no cycles, even through
imports inside functions, and every eval module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import astrolom

SRC = Path(astrolom.__file__).parent
# lower layers never import higher ones; names are package-relative module prefixes
LAYERS = [
    "layout",
    "log",
    "config",
    "data",
    "mock",  # the simulator: beside data/ (it may import data/), imported by nothing in the library but the demo
    "model",
    "train",
    "eval",
    "interop",
    "finetune",
    "align",
    "search",
    "serve",
    "demo",
    "cli",
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(packages: bool = False) -> dict[str, set[str]]:
    """Module -> astrolom modules it imports anywhere in its body (module level or inside functions); with
    `packages`, imports of a package itself (`from astrolom.mock import x`) count as well."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from astrolom.eval import figures` imports astrolom.eval.figures
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("astrolom") and t != "astrolom":
                    deps.add(t)
        graph[name] = {d for d in deps if packages or not modules[d].name == "__init__.py"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_and_layers_point_one_way():
    graph = import_graph()
    assert "astrolom.eval.embeddings" in graph and "astrolom.model.pretrained" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))

    def layer(mod: str) -> int:
        parts = mod.split(".")
        return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1

    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(m) >= 0 and layer(d) > layer(m)]
    assert upward == [], upward
    # the eval chain: embeddings <- probes <- baselines <- figures <- orchestration
    order = ["embeddings", "probes", "baselines", "figures", ("probe_cli", "report", "scaling")]
    for i, low in enumerate(order[:-1]):
        for high in [*order[i + 1 : -1], *order[-1]]:
            assert f"astrolom.eval.{high}" not in graph[f"astrolom.eval.{low}"], (low, high)
    assert not any(d.startswith("astrolom.train") for d in graph["astrolom.model.pretrained"])
    assert not any(
        d.startswith("astrolom.eval") or d.startswith("astrolom.demo") for d in graph["astrolom.train.trainer"]
    )


def test_the_mock_is_a_simulator_beside_data_that_only_the_demo_imports():
    """The library reads data; it never imports the simulator (its facts come from the data set's metadata)."""
    graph = import_graph(packages=True)
    mock = {m for m in graph if m == "astrolom.mock" or m.startswith("astrolom.mock.")}
    assert {"astrolom.mock.catalogue", "astrolom.mock.writer", "astrolom.mock.cli"} <= mock
    importers = sorted(m for m, deps in graph.items() if m not in mock and any(d in mock for d in deps))
    assert importers == ["astrolom.demo"]
    below = ("astrolom.data", "astrolom.log", "astrolom.layout", "astrolom.config", "astrolom.mock")
    reaches = sorted({d for m in mock for d in graph[m] if not d.startswith(below)})
    assert reaches == []
    # the CLI maps `astrolom survey` to the mock by name (imported only when that command runs)
    from astrolom.cli import COMMANDS

    assert COMMANDS["survey"][0] == "astrolom.mock.cli"


EVAL_MODULES = sorted(_module_name(p) for p in (SRC / "eval").glob("*.py") if p.name != "__init__.py")


@pytest.mark.slow  # one interpreter per module, each importing torch: 20-90 s on a loaded 2-core machine
def test_each_eval_module_imports_alone_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    procs = {
        m: subprocess.Popen([sys.executable, "-c", f"import {m}"], env=env, stderr=subprocess.PIPE, text=True)
        for m in EVAL_MODULES
    }
    failed = {m: p.communicate()[1].strip().splitlines()[-1:] for m, p in procs.items() if p.wait() != 0}
    assert failed == {}
    assert len(procs) >= 9


@pytest.mark.parametrize("module", ["astrolom.eval.probes", "astrolom.eval.embeddings"])
def test_the_probe_library_does_not_pull_in_plots_or_models(module):
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'astrolom.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
