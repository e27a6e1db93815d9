"""Evaluation plots (``demandstream evaluate --plots DIR``): recall@K, propensity ROC, reliability.

matplotlib is an optional dependency (``pip install demandstream[plots]``); it is imported only when
plots are asked for, with the non-interactive Agg backend so that it works on servers without a display.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from demandstream.model.errors import MissingExtra
from demandstream.model.evaluation.metrics import ECE_BINS, recall_at_k_curve, reliability_curve, roc_curve

logger = logging.getLogger(__name__)

#: Recall@K is drawn for K = 1..MAX_K; 50 covers the cut-offs a recommender shelf or ad slot would use.
MAX_K = 50

#: Figure size in inches and resolution: readable in a report, a few tens of KB per PNG.
FIGSIZE = (6.0, 4.5)
DPI = 110

#: Name under which the model's results are passed; it is drawn bold so it stands out from baselines.
MODEL_NAME = "model"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtra(
            "plots need matplotlib, an optional dependency: pip install 'demandstream[plots]'"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict[str, Any]:
    return {"linewidth": 2.5, "zorder": 3} if name == MODEL_NAME else {"linewidth": 1.2, "alpha": 0.85}


def _has(result: Mapping[str, Any], key: str) -> bool:
    return result.get(key) is not None and np.asarray(result[key]).size > 0


def save_plots(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the evaluation plots as PNGs into ``out_dir`` and return their paths.

    Parameters
    ----------
    results : mapping of method name to a dict with optional keys
        ``ranks`` (target ranks at the test points, see :func:`demandstream.model.evaluation.metrics.target_rank`),
        ``p`` (purchase probabilities) and ``y`` (0/1 purchase labels, same length as ``p``).
        A method without ``ranks`` is left out of the recall@K plot, one without ``p`` out of the
        propensity plots (e.g. ``funnel`` has only ``p``/``y``, ``markov`` only ``ranks``).
    out_dir : str or Path
        Created if missing.

    Returns
    -------
    list of Path
        ``recall_at_k.png``, ``purchase_roc.png``, ``purchase_reliability.png``, each only when
        at least one method has the data it needs.

    Raises
    ------
    RuntimeError
        When matplotlib is not installed.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    ranked = {n: r for n, r in results.items() if _has(r, "ranks")}
    if ranked:
        ks = np.arange(1, MAX_K + 1)
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for name, r in ranked.items():
            ax.plot(ks, recall_at_k_curve(r["ranks"], ks), label=name, **_style(name))
        ax.set(xlabel="K", ylabel="recall@K", title="Next-category recall@K", xlim=(1, MAX_K), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        written.append(_save(fig, out_dir / "recall_at_k.png", plt))

    scored = {n: r for n, r in results.items() if _has(r, "p") and _has(r, "y")}
    both_classes = {n: r for n, r in scored.items() if 0 < np.asarray(r["y"]).sum() < np.asarray(r["y"]).size}
    if both_classes:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name, r in both_classes.items():
            fpr, tpr, _ = roc_curve(r["p"], r["y"])
            ax.plot(fpr, tpr, label=name, **_style(name))
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Purchase propensity ROC")
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        written.append(_save(fig, out_dir / "purchase_roc.png", plt))

    if scored:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
        for name, r in scored.items():
            conf, freq, counts = reliability_curve(r["p"], r["y"], ECE_BINS)
            full = counts > 0
            ax.plot(conf[full], freq[full], marker="o", markersize=3, label=name, **_style(name))
        ax.set(xlabel="mean predicted probability", ylabel="observed purchase rate")
        ax.set(title=f"Purchase propensity reliability ({ECE_BINS} bins)", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        written.append(_save(fig, out_dir / "purchase_reliability.png", plt))

    if not written:
        logger.warning("no plots written: no method has ranks or purchase probabilities")
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
