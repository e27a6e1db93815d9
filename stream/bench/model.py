"""Model-side benchmarks (no Kafka): step throughput, incremental vs full recompute, state size, training.

Each function measures one figure of ``demandstream bench`` (docs/ARCHITECTURE.md §Benchmark) in this process
and returns plain numbers, so :mod:`demandstream.stream.bench.runner` only has to arrange them into JSON and Markdown.

>>> events = bench_events(200, n_users=20)
>>> ckpt = make_checkpoint(events)
>>> state_record_bytes(ckpt) > 0
True
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.encoding import encode_log
from demandstream.model.core.events import Event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import HEADER_BYTES, pack
from demandstream.model.core.state_batch import StateBatch
from demandstream.model.data.eventlog import EventLog

logger = logging.getLogger(__name__)

#: Batch sizes of the Scorer.step_rows sweep: one user per round up to a large GPU-sized round.
STEP_BATCH_SIZES = (1, 4, 16, 64, 256, 1024, 4096)
#: History lengths at which one incremental step is compared with recomputing the whole history.
HISTORY_LENGTHS = (10, 100, 1000)
#: Users of the generated clickstream: the same population the Kafka measurements replay.
BENCH_USERS = 2000
#: Seed of every generated input, so two bench runs measure the same data.
BENCH_SEED = 4
#: Seed of the untrained benchmark model's weights (speed does not depend on training).
MODEL_SEED = 7
#: A timed loop repeats its call for at least this many calls, however slow each is.
MIN_CALLS = 3
#: Partitions of the simulated state store, as in a worker owning all of a 4-partition table.
STORE_PARTITIONS = 4
#: Users written per RocksDB write batch when filling the simulated store.
FILL_BATCH = 10_000
#: The step table's large-catalog column: a generated shop of departments x leaves per department,
#: and events enough to see most leaves (4,085 of the 5,000). The bench's own shop has ~170
#: categories; Taobao's UserBehavior log has ~9,400, and the step's [rows, C] passes grow with C.
LARGE_CATALOG_DEPARTMENTS = 50
LARGE_CATALOG_LEAVES = 100
LARGE_CATALOG_EVENTS = 40_000


def bench_events(n_events: int, n_users: int = BENCH_USERS, seed: int = BENCH_SEED) -> list[Event]:
    """The generated clickstream every measurement uses (``demandstream.model.data.synth``, time-ordered)."""
    from demandstream.model.data.synth import generate

    return list(generate(n_users, n_events, seed=seed))


def make_checkpoint(events: Sequence[Event]) -> Checkpoint:
    """An untrained DemandLSTM with the default :class:`ModelConfig` over the events' categories."""
    vocab = Vocabulary.build(e.category for e in events)
    torch.manual_seed(MODEL_SEED)
    net = DemandLSTM(ModelConfig(n_categories=len(vocab))).eval()
    return Checkpoint(net, vocab, "0b0b0b0b")


def large_catalog(seed: int = BENCH_SEED) -> tuple[Checkpoint, list[Event]]:
    """:func:`make_checkpoint` over a generated shop of thousands of categories, and its events (the
    largest step batch needs one event per row: at least max(STEP_BATCH_SIZES) of them)."""
    from demandstream.model.data.synth import SynthConfig, generate

    cfg = SynthConfig(n_departments=LARGE_CATALOG_DEPARTMENTS, leaves_per_department=LARGE_CATALOG_LEAVES)
    events = list(generate(BENCH_USERS, LARGE_CATALOG_EVENTS, seed=seed, config=cfg))
    return make_checkpoint(events), events


def save_model(path: Path, events: Sequence[Event]) -> Path:
    """Write :func:`make_checkpoint`'s model as a checkpoint file a worker can load."""
    from demandstream.model.core.checkpoint import save

    ckpt = make_checkpoint(events)
    save(path, ckpt.net, ckpt.vocab)
    return path


def seconds_per_call(fn: Callable[[], object], min_s: float) -> float:
    """Mean wall time of ``fn()`` over at least ``min_s`` seconds and :data:`MIN_CALLS` calls (one warm-up).

    >>> seconds_per_call(lambda: None, 0.001) < 0.01
    True
    """
    fn()  # warm-up: first calls allocate buffers and pick kernels
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= MIN_CALLS and elapsed >= min_s:
            return elapsed / calls


def step_events_per_s(
    ckpt: Checkpoint,
    events: Sequence[Event],
    device: str = "cpu",
    batch_sizes: Sequence[int] = STEP_BATCH_SIZES,
    min_s: float = 0.3,
    inference: str = "eager",
) -> dict[str, float]:
    """Events per second through :meth:`Scorer.step_rows`, the worker's step on states held as arrays
    (:class:`~demandstream.model.core.state_batch.StateBatch`), for each batch size (one event per
    distinct user). Decoding and encoding the records is the engine's, not the step's. ``inference``
    as the worker's setting (compiling, when asked, happens before the timing, as in the worker).

    The states are stepped again and again, so the history summary fills as it does in a live worker.
    """
    scorer = Scorer(ckpt, device, max_batch=max(batch_sizes), inference=inference)
    out: dict[str, float] = {}
    for b in batch_sizes:
        evs = list(events[:b])
        if len(evs) < b:
            raise ValueError(f"need {b} events for batch size {b}, got {len(evs)}")
        states = StateBatch.from_states([scorer.new_state() for _ in range(b)])
        seqs, rows = [[e] for e in evs], range(b)

        def step(seqs=seqs, states=states, rows=rows):
            return scorer.step_rows(seqs, states, rows)

        out[str(b)] = b / seconds_per_call(step, min_s)
    return out


#: Users advanced together when comparing incremental and recompute costs: the worker steps users in
#: micro-batches, and a recompute service would batch users too, so both sides get the same batching.
SPEEDUP_BATCH = 256


def incremental_speedup(
    ckpt: Checkpoint,
    events: Sequence[Event],
    lengths: Sequence[int] = HISTORY_LENGTHS,
    min_s: float = 0.3,
    batch: int = SPEEDUP_BATCH,
) -> dict[str, dict[str, float]]:
    """Cost per new event: one step (:meth:`Scorer.step_rows`, as the worker) vs recomputing the user's
    whole history.

    Both sides process ``batch`` users at once (a new event for each): incremental = one ``step``
    over the batch, including feature encoding and the state update; recompute = the full-sequence
    forward over ``batch`` histories of length ``L`` plus the last position's distribution. A
    stateless recompute must also encode each raw history, so ``ratio`` includes that encoding
    (``recompute_us``); ``ratio_network_only`` leaves it out, which flatters recomputing.
    Reported per event.
    """
    scorer = Scorer(ckpt, "cpu", max_batch=batch)
    net = scorer.net
    out: dict[str, dict[str, float]] = {}
    for L in lengths:
        if len(events) < L:
            raise ValueError(f"need {L} events for history length {L}")
        history = [replace(e, user_id="bench-user") for e in events[:L]]
        log = EventLog.from_events(history).sorted_by_user_time()
        feats = encode_log(log, scorer.cfg, scorer.vocab)
        idx = np.tile(np.arange(L)[None, :], (batch, 1))  # batch users with this history

        @torch.inference_mode()
        def recompute(feats=feats, idx=idx):
            f = feats.tensors(idx)
            heads, _ = net(f)
            last = {k: v[:, -1] for k, v in heads.items()}
            return net.category_top(last, {k: v[:, -1] for k, v in f.items()}, scorer.top_k)  # as the step

        state = scorer.new_state()
        for e in history[:-1]:  # bring the state to history length L - 1 first
            scorer.step([e], [state])
        states = StateBatch.from_states([copy.deepcopy(state) for _ in range(batch)])
        h0, c0 = states.h.copy(), states.c.copy()
        new = [[history[-1]] for _ in range(batch)]

        def incremental(new=new, states=states, h0=h0, c0=c0):
            # same starting point every call; copying costs far less than a step
            states.h[:], states.c[:] = h0, c0
            return scorer.step_rows(new, states, range(batch))

        step_s = seconds_per_call(incremental, min_s) / batch
        net_s = seconds_per_call(recompute, min_s) / batch
        encode_s = seconds_per_call(lambda log=log: encode_log(log, scorer.cfg, scorer.vocab), min_s)
        full_s = net_s + encode_s
        out[str(L)] = {
            "step_us": step_s * 1e6,
            "recompute_us": full_s * 1e6,
            "ratio": full_s / step_s,
            "recompute_network_only_us": net_s * 1e6,
            "ratio_network_only": net_s / step_s,
            "batch": batch,
        }
    return out


def state_record_bytes(ckpt: Checkpoint) -> int:
    """Length of one packed ``user-state`` record after a step (history and last top-k filled)."""
    return len(filled_record(ckpt)[0])


def rocksdb_bytes_per_user(ckpt: Checkpoint, n_users: int, directory: str | Path | None = None) -> dict:
    """On-disk bytes per user of ``n_users`` packed states in RocksDB opened as the worker's store does.

    Faust's own :class:`~faust.stores.rocksdb.RocksDBOptions` opens one database per table partition;
    each user gets its own random h and c (real states are as incompressible), then the databases are
    flushed and compacted and the directory measured.
    """
    from faust.stores.rocksdb import RocksDBOptions
    from rocksdict import WriteBatch

    record, hc_off, hc_len = filled_record(ckpt)
    template = bytearray(record)
    rng = np.random.default_rng(BENCH_SEED)
    with tempfile.TemporaryDirectory(prefix="ds-bench-rocks-", dir=directory) as tmp:
        dbs = [RocksDBOptions().open(Path(tmp) / f"user-state-{p}.db") for p in range(STORE_PARTITIONS)]
        t0 = time.perf_counter()
        for start in range(0, n_users, FILL_BATCH):
            n = min(FILL_BATCH, n_users - start)
            hc = rng.standard_normal((n, hc_len // 4), dtype=np.float32).tobytes()
            batches = [WriteBatch(raw_mode=True) for _ in dbs]
            for j in range(n):
                key = f"u{start + j}".encode()
                template[hc_off : hc_off + hc_len] = hc[j * hc_len : (j + 1) * hc_len]
                batches[zlib.crc32(key) % STORE_PARTITIONS].put(key, bytes(template))
            for db, wb in zip(dbs, batches, strict=True):
                db.write(wb)
        for db in dbs:
            db.flush()
            db.compact_range(None, None)
        fill_s = time.perf_counter() - t0
        for db in dbs:
            db.close()
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {"users": n_users, "bytes": size, "bytes_per_user": size / n_users, "fill_seconds": fill_s}


def filled_record(ckpt: Checkpoint) -> tuple[bytes, int, int]:
    """A packed state after one step, plus the offset and length of its h and c bytes.

    The h/c block follows the header (docs/ARCHITECTURE.md §State): offset ``HEADER_BYTES``, length
    ``8 * h.size`` (float32 h and c).
    """
    scorer = Scorer(ckpt, "cpu", max_batch=1)
    s = scorer.new_state()
    e = Event("e1", "u1", 1.7e9, "view", "i1", ckpt.vocab.names[-1], 10.0)
    scorer.step([e], [s])
    s.partition, s.offset = 0, 123_456
    return pack(s), HEADER_BYTES, 8 * s.h.size


def train_events_per_s(events: Sequence[Event], epochs: int = 1) -> dict:
    """Training throughput of :func:`demandstream.model.training.train.train` (default configs) on ``events``, ``epochs`` epochs."""
    from demandstream.model.training.train import TrainConfig, train

    log = EventLog.from_events(events, keep_ids=False)
    t0 = time.perf_counter()
    res = train(log, TrainConfig(epochs=epochs), progress=False)
    m = res.metrics
    return {
        "events_per_s": m["train_events_per_s"],
        "n_train_events": m["n_train_events"],
        "train_seconds": m["train_seconds"],
        "encode_seconds": m["encode_seconds"],
        "total_seconds": time.perf_counter() - t0,
        "threads": m["threads"],
        "device": m["device"],
        "cpu_count": os.cpu_count(),
    }
