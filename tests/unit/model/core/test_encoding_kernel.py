"""model/core/encoding_kernel.py: the compiled batch encoder writes exactly the rows and leaves exactly the
states of the per-event Python specification (event_features, put_rows), whatever the corpus and
however the events are cut into micro-batches (issue #14 item 3)."""

from __future__ import annotations

import copy
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demandstream.model.core import encoding_kernel as kernel
from demandstream.model.core.encoding import (
    COLUMNS,
    FeatureBuffer,
    encode_batch,
    encode_event,
    encode_log,
    fresh_summaries,
    store_summaries,
    summary_arrays,
)
from demandstream.model.core.events import EVENT_TYPES, Event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.state import (
    COUNT_MAX,
    SESSION_GAP_S,
    SLOT_CART_MAX,
    SLOT_FIELDS,
    SUMMARY_FIELDS,
    new_state,
    pack,
    unpack,
)
from demandstream.model.data.eventlog import EventLog

CFG = ModelConfig(n_categories=4, hidden=8, history_slots=4, query_tokens=3)
VOCAB = Vocabulary(["<unk>", "shoes", "bags", "hats"])
T0 = 1.7e9

# more categories than history slots (evictions), some outside the vocabulary, and none
_CATEGORIES = st.sampled_from(["shoes", "bags", "hats", "gnomes", "kites", "owls", "", None])
# ties, seconds, a session gap, a day, and out-of-order times
_STEPS = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, SESSION_GAP_S, SESSION_GAP_S + 0.25, 86400.0, -30.0, -1e4]),
    st.floats(-500.0, 5e5, allow_nan=False),
)


@st.composite
def _event(draw, user: int, k: int, ts: float) -> Event:
    etype = draw(st.sampled_from(EVENT_TYPES))
    return Event(
        f"e{user}-{k}",
        f"u{user}",
        ts,
        etype,
        draw(st.one_of(st.none(), st.sampled_from(["i1", "i2", "i300", "ü-9"]))),
        draw(_CATEGORIES),
        draw(st.one_of(st.none(), st.sampled_from([0.0, 0.99, 1.0, 3.0, 1e6]), st.floats(0.0, 1e4))),
        draw(st.one_of(st.none(), st.sampled_from(["", "red shoes", "Red  Running-Shoes size 42 wide"]))),
    )


@st.composite
def corpora(draw) -> tuple[list[list[Event]], list[int], bool]:
    """Per user, its events in order; the micro-batch cut points; whether states start near their limits."""
    users = []
    for u in range(draw(st.integers(1, 5))):
        ts, events = T0 + draw(st.floats(0.0, 1e6)), []
        for k in range(draw(st.integers(1, 30))):
            ts += draw(_STEPS)
            events.append(draw(_event(u, k, ts)))
        users.append(events)
    longest = max(len(q) for q in users)
    cuts = sorted(set(draw(st.lists(st.integers(1, longest), max_size=4))))
    return users, cuts, draw(st.booleans())


def _near_limits(s) -> None:
    """Counters one short of saturating, so the next events test the clamps."""
    s.cart = s.session_adds = s.purchases = s.streak = COUNT_MAX - 1
    s.hist_counts = [COUNT_MAX - 1 if c > 0 else 0 for c in s.hist_cats]
    s.hist_session = [COUNT_MAX - 1 if c > 0 else 0 for c in s.hist_cats]
    s.hist_cart = [SLOT_CART_MAX - 1 if c > 0 else 0 for c in s.hist_cats]


def _starting_states(n: int, near_limits: bool):
    states = []
    for u in range(n):
        s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
        if near_limits:
            for k, cat in enumerate(["shoes", "gnomes", None]):
                encode_event(CFG, VOCAB, s, Event(f"w{k}", f"u{u}", T0 - 100 + k, "add_to_cart", "i", cat))
            _near_limits(s)
        states.append(s)
    return states


def _same_rows(a: FeatureBuffer, a_rows, b: FeatureBuffer, b_rows) -> None:
    for name in COLUMNS:
        x, y = a.cols[name][a_rows], b.cols[name][b_rows]
        assert np.array_equal(x, y, equal_nan=True), f"column {name} differs:\n{x}\n{y}"


def _same_state(a, b) -> None:
    for f in SUMMARY_FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    for f in ("last_ts", "last_add_ts"):
        x, y = getattr(a, f), getattr(b, f)
        assert x == y or (math.isnan(x) and math.isnan(y)), f


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_micro_batches_through_the_kernel_equal_the_per_event_specification(corpus):
    users, cuts, near_limits = corpus
    spec_states = _starting_states(len(users), near_limits)
    batch_states = copy.deepcopy(spec_states)
    bounds = [0, *cuts, max(len(q) for q in users)]
    spec = FeatureBuffer(CFG, 200, VOCAB)
    fast = FeatureBuffer(CFG, 200, VOCAB)
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        seqs = [q[lo:hi] for q in users]
        active = [u for u, q in enumerate(seqs) if q]
        rows = [encode_event(CFG, VOCAB, spec_states[u], e) for u in active for e in seqs[u]]
        spec.put_rows(0, rows)
        # between micro-batches a state is stored and read back, as the worker does
        stored = [unpack(pack(batch_states[u])) for u in active]
        encode_batch(fast, [seqs[u] for u in active], stored)
        for u, s in zip(active, stored, strict=True):
            batch_states[u] = s
        _same_rows(spec, slice(0, len(rows)), fast, slice(0, len(rows)))
    for a, b in zip(spec_states, batch_states, strict=True):
        _same_state(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_a_whole_log_through_the_kernel_equals_the_per_event_specification(corpus):
    users = corpus[0]
    log = EventLog.from_events([e for q in users for e in q]).sorted_by_user_time()
    offline = encode_log(log, CFG, VOCAB)
    spec = FeatureBuffer(CFG, len(log), VOCAB)
    for u in range(log.n_users):
        s = new_state(CFG.layers, 1, CFG.history_slots)
        rows = log.user_rows(u)
        spec.put_rows(rows.start, [encode_event(CFG, VOCAB, s, e) for e in log.user_events(u)])
    _same_rows(spec, slice(None), offline, slice(None))


def test_the_kernel_layout_is_the_state_layout():
    """The kernel's slot rows are the stored slot fields in stored order, and a fresh user's arrays
    are a fresh state's summary."""
    assert kernel.SLOT_ROWS == tuple(name for name, _ in SLOT_FIELDS)
    fresh = fresh_summaries(2, CFG.history_slots)
    made = summary_arrays([new_state(1, 1, CFG.history_slots)] * 2)
    for x, y in zip(fresh, made, strict=True):
        assert np.array_equal(x, y, equal_nan=True)


def test_without_a_writable_cache_the_kernel_compiles_per_process_and_says_so(monkeypatch, caplog):
    """A read-only install with no writable home (numba finds no cache location) costs a compilation
    per process, not the worker: the kernel still compiles, with one warning naming the fix."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def add_one(x):
        return x + 1

    with caplog.at_level("WARNING", logger=kernel.__name__):
        compiled = kernel._compiled(add_one)
    assert compiled(1) == 2
    assert "NUMBA_CACHE_DIR" in caplog.text


def test_summaries_are_stored_into_the_fields_they_name():
    """store_summaries assigns positionally (for speed): each array row must land in the field the
    kernel's layout names for it."""
    n_slots = CFG.history_slots
    s = new_state(CFG.layers, CFG.hidden, n_slots)
    arrays = fresh_summaries(1, n_slots)
    arrays.hist[0] = np.arange(len(kernel.SLOT_ROWS) * n_slots).reshape(len(kernel.SLOT_ROWS), n_slots)
    arrays.ints[0] = np.arange(100, 100 + len(kernel.INT_FIELDS))
    arrays.floats[0] = np.arange(len(kernel.FLOAT_FIELDS)) + 0.5
    store_summaries([s], arrays)
    for j, name in enumerate(kernel.SLOT_ROWS):
        assert getattr(s, name) == arrays.hist[0, j].tolist(), name
    for j, name in enumerate(kernel.INT_FIELDS):
        assert getattr(s, name) == arrays.ints[0, j], name
    for j, name in enumerate(kernel.FLOAT_FIELDS):
        assert getattr(s, name) == arrays.floats[0, j], name
