"""model/core/checkpoint.py: a checkpoint loads back to the same model and version, the version follows
weights, config and vocabulary, and every unusable file is one CheckpointError with one line to read."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
import torch

from demandstream.model.core import checkpoint
from demandstream.model.core.checkpoint import FORMAT, CheckpointError, load, model_version, save
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.errors import UserError

VOCAB = Vocabulary(["<unk>", "shoes", "bags", "hats"])


def small_net(seed: int = 0) -> DemandLSTM:
    torch.manual_seed(seed)
    return DemandLSTM(ModelConfig(n_categories=len(VOCAB), hidden=8, history_slots=4))


def payload_of(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_save_and_load_round_trip(tmp_path):
    net = small_net()
    path = tmp_path / "nested" / "dir" / "model.pt"  # missing parents are created
    version = save(path, net, VOCAB, metrics={"mrr": np.float32(0.25), "split": {"train_end": 10.0}})
    assert re.fullmatch(r"[0-9a-f]{8}", version)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    ck = load(path)
    assert ck.model_version == version == model_version(net.state_dict(), net.cfg, VOCAB)
    assert ck.vocab.names == VOCAB.names and ck.cfg == net.cfg
    assert not ck.net.training  # loaded for inference
    sd, loaded = net.state_dict(), ck.net.state_dict()
    assert sd.keys() == loaded.keys()
    for k in sd:
        assert torch.equal(sd[k], loaded[k]), k
    assert ck.metrics == {"mrr": 0.25, "split": {"train_end": 10.0}}  # numpy scalars stored as floats
    assert ck.created_at > 0


def test_model_version_is_stable_and_follows_weights_config_and_vocabulary(tmp_path):
    net = small_net()
    v = save(tmp_path / "a.pt", net, VOCAB)
    assert save(tmp_path / "b.pt", net, VOCAB) == v  # saving again (another time) changes nothing
    assert model_version(net.state_dict(), net.cfg.to_dict(), VOCAB) == v  # config as stored or as object
    assert model_version(small_net(0).state_dict(), net.cfg, VOCAB) == v  # same seed, same weights
    assert model_version(small_net(1).state_dict(), net.cfg, VOCAB) != v
    assert model_version(net.state_dict(), net.cfg, Vocabulary(["<unk>", "shoes", "bags", "caps"])) != v
    other_cfg = {**net.cfg.to_dict(), "dropout": 0.5}  # a config field the weights do not show
    assert model_version(net.state_dict(), other_cfg, VOCAB) != v
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] += 1e-3
    assert model_version(net.state_dict(), net.cfg, VOCAB) != v


def test_a_checkpoint_written_before_a_config_field_existed_still_verifies(tmp_path):
    """The version is computed over the config exactly as stored, so adding a defaulted ModelConfig
    field does not invalidate older files."""
    net = small_net()
    save(tmp_path / "m.pt", net, VOCAB)
    p = payload_of(tmp_path / "m.pt")
    del p["config"]["lstm_terms"]  # as if written before the switch existed (its default is True)
    p["model_version"] = model_version(p["state_dict"], p["config"], VOCAB)
    torch.save(p, tmp_path / "old.pt")
    ck = load(tmp_path / "old.pt")
    assert ck.model_version == p["model_version"] and ck.cfg.lstm_terms is True


# -- unusable files -------------------------------------------------------------------------------


def rewrite(path, change) -> None:
    p = payload_of(path)
    change(p)
    torch.save(p, path)


def tampered_weight(p: dict) -> None:
    k = sorted(p["state_dict"])[0]
    p["state_dict"][k] = p["state_dict"][k] + 1.0


class NotATensor:
    pass


CASES = {
    "missing": (lambda path: path.unlink(), "model checkpoint not found"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:200]), "cannot read model checkpoint"),
    # bytes that are neither a zip nor a pickle (a data file given as --model): not "refusing" them as
    # a foreign pickle, which torch alone would, but saying they are no PyTorch file
    "garbage": (lambda path: path.write_bytes(b"not a checkpoint\n" * 10), "it is no PyTorch file"),
    "gzip data file": (
        lambda path: path.write_bytes(gzip.compress(b"event_time,event_type\n")),
        "no PyTorch file",
    ),
    "empty": (lambda path: path.write_bytes(b""), "cannot read model checkpoint"),
    "other format": (
        lambda path: rewrite(path, lambda p: p.update(format="something-else/1")),
        f"is not a demandstream checkpoint \\({FORMAT}\\)",
    ),
    "plain tensor": (lambda path: torch.save(torch.zeros(3), path), "is not a demandstream checkpoint"),
    "tampered weight": (lambda path: rewrite(path, tampered_weight), "fails its integrity check"),
    "edited vocabulary": (
        lambda path: rewrite(path, lambda p: p["vocab"].__setitem__(1, "boots")),
        "fails its integrity check",
    ),
    "missing weight": (
        lambda path: rewrite(path, lambda p: p["state_dict"].pop(sorted(p["state_dict"])[0])),
        "is inconsistent",
    ),
    "bad vocabulary": (lambda path: rewrite(path, lambda p: p.update(vocab=["shoes"])), "is inconsistent"),
    "pickled object": (
        lambda path: rewrite(path, lambda p: p["metrics"].update(x=NotATensor())),
        "refusing model checkpoint .* pickled objects",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_checkpoint_is_one_clear_user_error(tmp_path, case):
    path = tmp_path / "model.pt"
    save(path, small_net(), VOCAB)
    spoil, says = CASES[case]
    spoil(path)
    with pytest.raises(CheckpointError, match=says) as err:
        load(path)
    e = err.value
    assert isinstance(e, UserError) and isinstance(e, ValueError)  # the CLI prints it as one line, exit 2
    first = str(e).splitlines()[0]  # the CLI folds the message onto one line; the reason comes first
    assert str(path) in first and re.search(says, first)
    assert "weights_only" not in str(e)  # torch's advice to unpickle anyway is never passed on
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)  # no chained traceback


def test_metrics_are_stored_as_plain_json(tmp_path):
    path = tmp_path / "m.pt"
    save(path, small_net(), VOCAB, metrics={"history": [{"loss": np.float64(1.5)}], "n": 3})
    assert json.dumps(payload_of(path)["metrics"]) == '{"history": [{"loss": 1.5}], "n": 3}'
    assert checkpoint.load(path).metrics["history"][0]["loss"] == 1.5
