"""Tests for model/evaluation/plots.py: the PNGs are written, non-empty, and methods without data are skipped."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from demandstream.model.evaluation.plots import save_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results() -> dict:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    return {
        "model": {
            "ranks": rng.integers(1, 60, 300),
            "p": np.clip(y * 0.4 + rng.random(300) * 0.5, 0, 1),
            "y": y,
        },
        "markov": {"ranks": rng.integers(1, 80, 300)},
        "funnel": {"p": rng.random(300), "y": y},
    }


def test_save_plots_writes_three_pngs(tmp_path):
    paths = save_plots(_results(), tmp_path / "plots")
    assert sorted(p.name for p in paths) == [
        "purchase_reliability.png",
        "purchase_roc.png",
        "recall_at_k.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_save_plots_skips_what_no_method_has(tmp_path):
    paths = save_plots({"markov": {"ranks": np.array([1, 2, 3]), "p": None}}, tmp_path)
    assert [p.name for p in paths] == ["recall_at_k.png"]


def test_save_plots_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(RuntimeError, match="matplotlib"):
        save_plots(_results(), tmp_path)
