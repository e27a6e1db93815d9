"""The installed package is ``demandstream.*``: the bare names ``model`` and ``stream`` stay the user's.

Builds the wheel, installs it without dependencies into a fresh virtual environment, and imports from a
directory outside the checkout (the checkout's own folders would otherwise be found on ``sys.path``).
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("demandstream-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_holds_only_the_demandstream_namespace(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"demandstream"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "demandstream/model/core/scoring.py" in names
    assert "demandstream/stream/worker/agents.py" in names


@pytest.mark.slow
def test_import_model_fails_where_only_demandstream_is_installed(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    # model/errors.py needs nothing but the standard library, so it imports without the dependencies
    ok = subprocess.run(
        [str(py), "-c", "import demandstream.model.errors as e; print(e.UserError.__module__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "demandstream.model.errors"
    for bare in ("model", "stream"):
        r = subprocess.run(
            [str(py), "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (bare, r.stderr)
