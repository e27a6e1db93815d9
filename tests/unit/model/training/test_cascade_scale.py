"""The cascade start's scale fit (model/training/cascade_scale.py)."""

import torch

from demandstream.model.training.train import TrainConfig, train
from tests.unit.model.training.test_train import ANY_VALID, TINY_MODEL, tiny_log


def test_the_cascade_scale_fit_takes_fewer_points_when_the_shop_has_many_categories(monkeypatch, caplog):
    """The fit holds points x (C + K) float64 logits several times over: with 20,000 points a shop of
    3,600 categories took 4 GB there, one of 50,000 would not fit; the budget bounds the product."""
    import re

    from demandstream.model.training import cascade_scale

    log = tiny_log(1500)
    n_columns = (
        len({c for c in log.categories}) + 1 + TINY_MODEL.history_slots
    )  # vocabulary (with "unknown") + slots
    monkeypatch.setattr(cascade_scale, "SCALE_FIT_FLOATS", n_columns * 50)
    tcfg = TrainConfig(epochs=1, lanes=16, bptt=16, threads=1, refit=False, **ANY_VALID)
    with caplog.at_level("INFO", logger="demandstream.model.training.cascade_scale"):
        res = train(log, tcfg, TINY_MODEL, progress=False)
    budget_points = n_columns * 50 // (len(res.vocab) + TINY_MODEL.history_slots)
    (fitted,) = [r.getMessage() for r in caplog.records if "cascade scale fitted" in r.getMessage()]
    n_points = int(re.search(r"on (\d+) training points", fitted).group(1))
    assert 0 < n_points <= budget_points < res.metrics["n_train_events"] // 2  # the budget did bite


def test_the_cascade_scale_fit_in_chunks_finds_the_scale_of_the_whole_matrix(monkeypatch, caplog):
    """A large catalog's fit scores its points in chunks so that no float64 copy of the whole matrix is
    made (it was the peak of training at 5,730 categories); the scale must not depend on the chunking."""
    import re

    from demandstream.model.training import cascade_scale

    log = tiny_log(1500)
    tcfg = TrainConfig(epochs=0, lanes=16, bptt=16, threads=1, refit=False, **ANY_VALID)

    def fitted(whole: int, chunk: int):
        monkeypatch.setattr(cascade_scale, "SCALE_FIT_WHOLE_FLOATS", whole)
        monkeypatch.setattr(cascade_scale, "SCALE_FIT_CHUNK_FLOATS", chunk)
        caplog.clear()
        with caplog.at_level("INFO", logger="demandstream.model.training.cascade_scale"):
            net = train(log, tcfg, TINY_MODEL, progress=False).net  # no epoch: the scaled cascade start
        (line,) = [r.getMessage() for r in caplog.records if "cascade scale fitted" in r.getMessage()]
        return int(re.search(r"on (\d+) training points", line).group(1)), net.vocab_w0.detach().clone()

    n_whole, w_whole = fitted(1 << 30, 1 << 21)
    columns = len({c for c in log.categories}) + 1 + TINY_MODEL.history_slots
    for rows_per_chunk in (1, 7, 100):  # one point a chunk, chunks that cut a batch, one per batch
        n, w = fitted(0, columns * rows_per_chunk)
        assert n == n_whole > 100
        assert torch.allclose(w, w_whole, rtol=1e-9, atol=0)
