"""The examples in docstrings run as tests, each module imported by its installed name.

pytest's ``--doctest-modules`` imports a file by its path (``model/core/events.py`` as
``model.core.events``), which would load a second copy of every module beside the installed
``demandstream.model.core.events``; an example's exception would then carry the copy's module name.
Walking the installed packages keeps one copy and checks the names users see.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import demandstream.model
import demandstream.stream


def _modules() -> list[str]:
    names = []
    for pkg in (demandstream.model, demandstream.stream):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if not info.name.endswith(".__main__"):  # importing it runs the command line
                names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_every_layer_is_walked():
    # a packaging mistake (a subpackage missing from pyproject) would silently shrink the walk
    layers = {".".join(n.split(".")[:3]) for n in MODULES}
    assert {
        "demandstream.model.core",
        "demandstream.model.data",
        "demandstream.model.training",
        "demandstream.model.evaluation",
        "demandstream.stream.engine",
        "demandstream.stream.worker",
        "demandstream.stream.tools",
        "demandstream.stream.bench",
    } <= layers


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
