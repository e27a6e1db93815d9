"""The layers of docs/ARCHITECTURE.md §Layout, checked on every import of the source tree.

Imports point one way: the model's runtime core imports nothing of data, training or evaluation (the
worker loads it alone); the stream's Kafka-free engine imports neither Faust nor the worker; ``model``
never imports ``stream``, Faust or Kafka; the worker launcher, which the demo and the bench load, imports
only the standard library and prometheus_client. Imports under ``if TYPE_CHECKING:`` are annotations, not
dependencies, and are not counted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: layer -> the layers (and third-party roots) it may import. A layer is the installed dotted prefix.
ALLOWED: dict[str, set[str]] = {
    "demandstream.model.errors": set(),
    "demandstream.model.core": {"demandstream.model.errors", "demandstream.model.core"},
    "demandstream.model.data": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.model.data",
    },
    "demandstream.model.evaluation": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.model.data",
        "demandstream.model.evaluation",
    },
    "demandstream.model.training": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.model.data",
        # the start's history window is chosen by the evaluation's own cascade_recent (train.py)
        "demandstream.model.evaluation",
        "demandstream.model.training",
    },
    "demandstream.stream.settings": {"demandstream.model.errors"},
    "demandstream.stream.admin": {"demandstream.model.errors", "demandstream.stream.settings"},
    "demandstream.stream.acls": {
        "demandstream.model.errors",
        "demandstream.stream.settings",
        "demandstream.stream.admin",
    },
    "demandstream.stream.partitioner": set(),
    "demandstream.stream.engine": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.stream.engine",
    },
    # The launcher is a leaf the bench and the demo load without Faust: standard library and
    # prometheus_client only (LAUNCHER_THIRD_PARTY).
    "demandstream.stream.worker.launcher": set(),
    "demandstream.stream.worker": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.stream.settings",
        "demandstream.stream.admin",
        "demandstream.stream.acls",
        "demandstream.stream.partitioner",
        "demandstream.stream.engine",
        "demandstream.stream.worker",
    },
    "demandstream.stream.tools": {
        "demandstream.model.errors",
        "demandstream.model.core",
        "demandstream.model.data",
        "demandstream.model.training",  # the demo trains its model
        "demandstream.stream.settings",
        "demandstream.stream.admin",
        "demandstream.stream.partitioner",
        "demandstream.stream.engine",
        "demandstream.stream.worker.launcher",  # the demo starts its worker
        "demandstream.stream.tools",
    },
}
#: Third-party packages the model layer must never import (docs/ARCHITECTURE.md: model/ is Kafka-free).
STREAMING_ONLY = ("faust", "aiokafka", "kafka", "mode", "demandstream.stream")
#: The Kafka-free engine runs without Faust or a Kafka client.
ENGINE_FORBIDDEN = ("faust", "aiokafka", "kafka", "mode")
#: The only third-party package the worker launcher imports.
LAUNCHER_THIRD_PARTY = {"prometheus_client"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "demandstream." + ".".join(parts)


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Absolute module names imported outside ``if TYPE_CHECKING:`` blocks."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _layer(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


SOURCES = sorted(p for top in ("model", "stream") for p in (REPO / top).rglob("*.py"))


def test_the_tree_is_read():
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_one_way(path):
    name = _module_name(path)
    imports = _runtime_imports(ast.parse(path.read_text(), str(path)))
    bad = [i for i in imports if i.split(".")[0] in ("model", "stream")]
    assert not bad, (
        f"{name} imports the bare package name(s) {bad}; use demandstream.model / demandstream.stream"
    )
    if name.startswith("demandstream.model"):
        leaks = [i for i in imports if i.startswith(STREAMING_ONLY)]
        assert not leaks, f"{name} (model layer) imports {leaks}"
    if name.startswith("demandstream.stream.engine"):
        leaks = [i for i in imports if i.split(".")[0] in ENGINE_FORBIDDEN]
        assert not leaks, f"{name} (Kafka-free engine) imports {leaks}"
    if name == "demandstream.stream.worker.launcher":
        roots = {i.split(".")[0] for i in imports} - set(sys.stdlib_module_names) - LAUNCHER_THIRD_PARTY
        assert not roots, (
            f"{name} (the launcher) imports {sorted(roots)}: standard library and prometheus_client only"
        )
    layer = _layer(name)
    if layer is None:  # cli, bench, __main__, package roots: the top, allowed to use every layer
        return
    wrong = [i for i in imports if i.startswith("demandstream.") and _layer(i) not in ALLOWED[layer]]
    assert not wrong, f"{name} ({layer}) imports {wrong}, against the layering"
