"""Checkpoints: save, load and verify a trained model with its config and category vocabulary.

A checkpoint is a ``torch.save`` of plain containers and tensors only, loaded with
``weights_only=True``: loading never unpickles arbitrary objects, so a tampered file cannot run code.
``model_version`` is derived from the weights, config and vocabulary; :func:`load` recomputes it, so a
truncated or edited file fails with one clear :class:`CheckpointError` instead of predicting garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.errors import UserError

FORMAT = "demandstream-checkpoint/1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used (missing, truncated, tampered or of another format)."""


@dataclass
class Checkpoint:
    net: DemandLSTM
    vocab: Vocabulary
    model_version: str
    metrics: dict = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def cfg(self) -> ModelConfig:
        return self.net.cfg


def model_version(state_dict: dict, cfg: ModelConfig | dict, vocab: Vocabulary) -> str:
    """8 hex digits of a SHA-256 over config, vocabulary and every weight (in key order).

    ``cfg`` may be the config dict exactly as stored, so that a newer ModelConfig with an added,
    defaulted field still verifies checkpoints written before it existed.
    """
    h = hashlib.sha256()
    h.update(json.dumps(cfg if isinstance(cfg, dict) else cfg.to_dict(), sort_keys=True).encode())
    h.update("\x00".join(vocab.names).encode())
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def save(path: str | Path, net: DemandLSTM, vocab: Vocabulary, metrics: dict | None = None) -> str:
    """Write a checkpoint atomically (temp file + rename); returns its model_version."""
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    version = model_version(sd, net.cfg, vocab)
    payload = {
        "format": FORMAT,
        "config": net.cfg.to_dict(),
        "vocab": list(vocab.names),
        "state_dict": sd,
        "model_version": version,
        "metrics": json.loads(json.dumps(metrics or {}, default=float)),
        "created_at": time.time(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return version


#: How a pickle of protocol 2 or later begins (a torch.save file that is not a zip archive).
PICKLE_PROTO = b"\x80"


def _could_be_torch_file(path: Path) -> bool:
    """Whether ``path`` has the shape of what ``torch.save`` writes: a zip archive (PyTorch >= 1.6) or a
    pickle (older). An empty file passes, and torch says why it cannot be read. Without this, torch
    reads any other bytes as a legacy pickle and refuses them like a pickle of foreign objects, which
    sends the user looking for a tampered file instead of a wrong path."""
    with path.open("rb") as f:
        head = f.read(1)
    return not head or head == PICKLE_PROTO or zipfile.is_zipfile(path)


def load(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; the network is in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    if not _could_be_torch_file(path):
        raise CheckpointError(
            f"cannot read model checkpoint {path}: it is no PyTorch file (neither a torch.save archive nor "
            "a pickle); is it the model, and not a data or report file?"
        )
    try:
        with warnings.catch_warnings():  # torch warns on stderr about pickle protocols: one line is ours
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, exactly what must not be done with an
        # untrusted file; say what happened instead.
        raise CheckpointError(
            f"refusing model checkpoint {path}: it contains pickled objects other than tensors and plain "
            "containers (demandstream never unpickles arbitrary objects)"
        ) from None
    except Exception as exc:  # torch raises many types for truncated/garbage files
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a demandstream checkpoint ({FORMAT})")
    try:
        cfg = ModelConfig.from_dict(payload["config"])
        vocab = Vocabulary(list(payload["vocab"]))
        net = DemandLSTM(cfg)
        net.load_state_dict(payload["state_dict"])
    except Exception as exc:
        raise CheckpointError(f"model checkpoint {path} is inconsistent: {exc}") from None
    version = model_version(payload["state_dict"], payload["config"], vocab)
    if version != payload.get("model_version"):
        raise CheckpointError(
            f"model checkpoint {path} fails its integrity check (stored version "
            f"{payload.get('model_version')}, computed {version}): the file was modified or corrupted"
        )
    net.to(device).eval()
    return Checkpoint(
        net, vocab, version, payload.get("metrics") or {}, float(payload.get("created_at", 0.0))
    )
