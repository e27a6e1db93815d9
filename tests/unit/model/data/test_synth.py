"""model/data/synth.py: a deterministic generator whose output has the structure real logs have."""

import bisect
import collections
import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from demandstream.model.core import events as events_module
from demandstream.model.core.events import EVENT_TYPES, Event
from demandstream.model.core.features import PURCHASE_HORIZON_S
from demandstream.model.data.synth import SynthConfig, build_catalog, generate, write_jsonl

ROOT = Path(__file__).resolve().parents[4]
START = 1_730_000_000.0


@pytest.fixture(scope="module")
def sample() -> list[Event]:
    """~20k events of 1000 users: big enough for the statistics below, quick to make."""
    return list(generate(1000, 20_000, seed=3))


@pytest.fixture(scope="module")
def by_user(sample) -> dict[str, list[Event]]:
    out = collections.defaultdict(list)
    for e in sample:
        out[e.user_id].append(e)
    return out


def digest(events) -> str:
    h = hashlib.sha256()
    for e in events:
        h.update(orjson.dumps(e.to_dict()))
    return h.hexdigest()


# -- contract: count, order, determinism, schema -----------------------------------------------------


@pytest.mark.parametrize(("n_users", "n_events"), [(1, 1), (10, 3), (50, 1234), (7, 0)])
def test_yields_exactly_n_events(n_users, n_events):
    assert sum(1 for _ in generate(n_users, n_events, seed=1)) == n_events


def test_every_user_gets_an_event_when_there_are_enough():
    users = {e.user_id for e in generate(40, 400, seed=2)}
    assert users == {f"u{i}" for i in range(40)}


def test_same_seed_same_output_other_seed_other_output():
    a = list(generate(30, 2000, seed=11))
    assert a == list(generate(30, 2000, seed=11))
    assert digest(a) != digest(generate(30, 2000, seed=12))


def test_same_output_in_another_process_with_another_hash_seed():
    code = (
        "import hashlib, orjson; from demandstream.model.data.synth import generate; h = hashlib.sha256()\n"
        "for e in generate(20, 500, seed=5): h.update(orjson.dumps(e.to_dict()))\n"
        "print(h.hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(generate(20, 500, seed=5))


def test_time_order_window_and_unique_ids(sample):
    ts = [e.ts for e in sample]
    assert ts == sorted(ts)
    assert START <= ts[0] and ts[-1] <= START + 30 * 86_400
    assert len({e.event_id for e in sample}) == len(sample)
    assert (ts[-1] - ts[0]) > 20 * 86_400  # spread over the window, not bunched at its start


def test_days_and_start_ts_bound_the_timestamps():
    ts = [e.ts for e in generate(20, 3000, seed=4, start_ts=1.6e9, days=2.0)]
    assert 1.6e9 <= min(ts) and max(ts) <= 1.6e9 + 2 * 86_400


def test_every_event_passes_validation(sample):
    validate = getattr(events_module, "validate_event", None)
    for e in sample:
        if validate is not None:
            assert validate(e.to_dict(), now=START + 40 * 86_400) == e
        assert e.type in EVENT_TYPES
        assert 1 <= len(e.event_id) <= 128 and 1 <= len(e.user_id) <= 128
        if e.type == "search":
            assert e.item_id is None and e.query and len(e.query) <= 512 and e.price is None
        else:
            assert e.item_id and e.item_id.startswith("i") and e.query is None
        assert e.price is None or e.price >= 0
        assert e.category is None or e.category.count(".") == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"n_users": -1, "n_events": 5}, {"n_users": 0, "n_events": 5}, {"n_users": 3, "n_events": 5, "days": 0}],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        generate(**kwargs)  # refused at the call, not at the first next()


# -- structure: catalog ------------------------------------------------------------------------------


def test_default_catalog_shape():
    cat = build_catalog()
    assert 100 <= len(cat.categories) <= 200
    assert len(set(cat.categories)) == len(cat.categories)
    assert {"electronics.smartphone", "electronics.phone_case", "apparel.dress"} <= set(cat.categories)
    assert {"electronics.phone_case", "electronics.charger"} <= set(
        cat.complements_of("electronics.smartphone")
    )
    assert all(len(c) >= SynthConfig().min_complements for c in cat.complements)
    assert len(set(cat.item_ids)) == len(cat.item_ids)


def test_catalog_sizes_are_configurable():
    cat = build_catalog(config=SynthConfig(n_departments=14, leaves_per_department=20, items_per_category=5))
    assert len(cat.categories) == 14 * 20
    assert "electronics.product_20" in cat.categories and cat.categories[-1].startswith("department14.")
    small = build_catalog(config=SynthConfig(n_departments=2, leaves_per_department=3))
    assert small.categories == [
        "electronics.smartphone", "electronics.phone_case", "electronics.charger",
        "apparel.dress", "apparel.heels", "apparel.handbag",
    ]  # fmt: skip
    events = list(generate(5, 300, seed=1, config=SynthConfig(n_departments=2, leaves_per_department=3)))
    assert {e.category for e in events} - {None} <= set(small.categories)


def test_prices_follow_the_category_scale():
    cat = build_catalog()
    i_phone = cat.category_index["electronics.smartphone"]
    i_case = cat.category_index["electronics.phone_case"]
    median = {
        c: sorted(cat.item_price[i] for i in cat.category_items[c])[len(cat.category_items[c]) // 2]
        for c in (i_phone, i_case)
    }
    assert median[i_phone] > 10 * median[i_case]


def test_item_popularity_is_heavy_tailed(sample):
    views = collections.Counter(e.item_id for e in sample if e.type == "view")
    counts = sorted(views.values(), reverse=True)
    top = sum(counts[: len(counts) // 100 or 1])
    assert top / sum(counts) > 0.05  # the top 1 % of items gets well over 1 % of views


# -- behaviour: the statistics a model must be able to learn ------------------------------------------


def test_broad_statistics(sample, by_user):
    share = collections.Counter(e.type for e in sample)
    n = len(sample)
    assert 0.005 <= share["purchase"] / n <= 0.05
    assert share["search"] > 0 and share["favorite"] > 0 and share["remove_from_cart"] > 0
    assert 0.01 <= share["add_to_cart"] / share["view"] <= 0.1  # cart after view: a few %
    assert 0.15 <= share["purchase"] / share["add_to_cart"] <= 0.5
    pairs = [(a.category, b.category) for es in by_user.values() for a, b in zip(es, es[1:], strict=False)]
    pairs = [(a, b) for a, b in pairs if a and b]
    repeat = sum(a == b for a, b in pairs) / len(pairs)
    assert 0.4 <= repeat <= 0.75
    assert 0 < sum(e.category is None for e in sample) / n < 0.05
    assert any(e.price is None and e.item_id for e in sample)


def test_users_with_few_events_exist_and_activity_is_heavy_tailed(by_user):
    lengths = sorted(len(es) for es in by_user.values())
    assert sum(k <= 3 for k in lengths) / len(lengths) > 0.1
    assert lengths[-1] > 20 * lengths[len(lengths) // 2]


def test_sessions_have_short_gaps_inside_and_long_gaps_between(by_user):
    inside, between = [], []
    for es in by_user.values():
        for a, b in zip(es, es[1:], strict=False):
            (inside if a.session_id == b.session_id else between).append(b.ts - a.ts)
    assert inside and between
    assert sorted(inside)[len(inside) // 2] < 300
    assert min(between) >= 0 and sorted(between)[len(between) // 2] > 3600


def test_purchases_follow_the_funnel(by_user):
    bought = carted_before = 0
    for es in by_user.values():
        carted: set[str] = set()
        for e in es:
            if e.type == "add_to_cart":
                carted.add(e.item_id)
            elif e.type == "purchase":
                bought += 1
                carted_before += e.item_id in carted
    assert bought > 50 and carted_before / bought > 0.8


def test_purchase_within_horizon_depends_on_the_funnel(by_user):
    hits = collections.defaultdict(lambda: [0, 0])
    for es in by_user.values():
        buys = [e.ts for e in es if e.type == "purchase"]
        for e in es:
            j = bisect.bisect_right(buys, e.ts)
            hits[e.type][0] += j < len(buys) and buys[j] <= e.ts + PURCHASE_HORIZON_S
            hits[e.type][1] += 1
    rate = {t: a / b for t, (a, b) in hits.items()}
    assert rate["add_to_cart"] > 3 * rate["view"]


def test_a_purchase_raises_its_complements_in_the_next_session(sample, by_user):
    cat = build_catalog(3)
    sessions: dict[str, set] = collections.defaultdict(set)
    for e in sample:
        sessions[e.session_id].add(e.category)
    order = {u: list(dict.fromkeys(e.session_id for e in es)) for u, es in by_user.items()}
    after, base, n = 0, 0.0, 0
    for u, es in by_user.items():
        for e in es:
            if e.type != "purchase" or e.category is None:
                continue
            comps = set(cat.complements_of(e.category))
            k = order[u].index(e.session_id)
            if k + 1 < len(order[u]):
                n += 1
                after += bool(sessions[order[u][k + 1]] & comps)
                base += sum(bool(s & comps) for s in sessions.values()) / len(sessions)
    assert n > 30
    assert after / n > 2 * base / n


def test_the_same_category_is_rarely_bought_again_soon(by_user):
    again = n = 0
    for es in by_user.values():
        buys = [e for e in es if e.type == "purchase" and e.category]
        for a in buys:
            n += 1
            again += any(
                b.category == a.category and b.session_id != a.session_id and 0 < b.ts - a.ts < 7 * 86_400
                for b in buys
            )
    assert n > 50 and again / n < 0.1


def test_intent_drifts_over_time(by_user):
    changed = heavy = 0
    for es in by_user.values():
        if len(es) >= 60:
            third = len(es) // 3
            early = collections.Counter(e.category for e in es[:third]).most_common(1)[0][0]
            late = collections.Counter(e.category for e in es[-third:]).most_common(1)[0][0]
            heavy += 1
            changed += early != late
    assert heavy >= 20 and changed / heavy > 0.3


def test_search_queries_come_from_the_category_vocabulary(sample):
    searches = [e for e in sample if e.type == "search" and e.category]
    assert searches
    for e in searches[:200]:
        noun = e.category.split(".")[1].replace("_", " ")
        assert e.query.endswith(noun)


# -- writing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_jsonl_round_trips(tmp_path, name):
    events = list(generate(8, 150, seed=9))
    path = tmp_path / name
    assert write_jsonl(events, path) == 150
    raw = gzip.open(path, "rb").read() if name.endswith(".gz") else path.read_bytes()
    lines = raw.splitlines()
    assert [orjson.loads(x) for x in lines] == [e.to_dict() for e in events]
