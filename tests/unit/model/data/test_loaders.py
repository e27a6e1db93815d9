"""Tests of model/data/loaders.py on the small fixtures in tests/fixtures/ (expected counts by construction)."""

from __future__ import annotations

import gzip
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from demandstream.model.data.cleaning import CleaningConfig
from demandstream.model.data.loaders import (
    AUTO,
    FORMATS,
    LoadStats,
    detect_format,
    expand_paths,
    load_log,
    read_category_tree,
)
from demandstream.model.data.sampling import in_user_sample
from demandstream.model.errors import DataError, OptionError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = REPO / "tests" / "fixtures"
REES46 = FIXTURES / "rees46_sample.csv"
JSONL = FIXTURES / "events_sample.jsonl"
RR = FIXTURES / "retailrocket"
TAOBAO = FIXTURES / "taobao_sample.csv"
# CI clones the repo elsewhere with shared/ beside the clone, so shared is always <repo>/../shared.
SHARED_DATA = REPO.parent / "shared" / "data"

#: The fixture's bot (12 views in 11 s) trips a 10-event burst bound; its 15-item checkout must not.
SMALL_BURST = CleaningConfig(burst_max_events=10)
T0 = datetime(2019, 10, 1, tzinfo=UTC).timestamp()


def events_by_user(log):
    return {
        log.users[u]: log.user_events(u)
        for u in range(log.n_users)
        if log.user_rows(u).stop > log.user_rows(u).start
    }


# -- REES46 -------------------------------------------------------------------------------------


def test_rees46_counts_every_kind_of_reject_and_cleaning_step():
    stats = LoadStats()
    log = load_log(REES46, "rees46", clean=SMALL_BURST, stats=stats)
    assert stats.rows_read == 41
    assert dict(stats.malformed) == {
        "column_count": 1,
        "bad_number": 1,
        "bad_time": 1,
        "bad_type": 1,
        "missing_item": 1,
        "bad_price": 1,
    }
    assert stats.duplicates_dropped == 1
    assert (stats.users_dropped_rate, stats.events_dropped_rate) == (1, 12)
    assert stats.missing_category == 1
    assert stats.out_of_order_fixed == 1
    assert stats.rows_kept == len(log) == 41 - 6 - 1 - 12
    by_user = events_by_user(log)
    assert sorted(by_user) == ["u1", "u2", "u4"]
    assert len(by_user["u4"]) == 16  # the 15-item checkout is one action, not a bot


def test_rees46_maps_types_categories_prices_and_ids():
    log = load_log(REES46, "rees46", clean=SMALL_BURST)
    u1 = events_by_user(log)["u1"]
    assert [(e.event_id, e.type, e.ts - T0) for e in u1] == [
        ("rees46_sample:2", "view", 0.0),
        ("rees46_sample:3", "add_to_cart", 60.0),
        ("rees46_sample:5", "purchase", 120.0),
    ]
    assert {(e.item_id, e.category, e.price, e.session_id) for e in u1} == {
        ("100", "electronics.smartphone", 500.0, "s1")
    }
    u2 = events_by_user(log)["u2"]
    # Re-sorted into time order; category_id stands in for an empty category_code.
    assert [(e.ts - T0, e.type, e.item_id, e.category) for e in u2] == [
        (10.0, "view", "201", None),
        (30.0, "view", "200", "1487580005134238553"),
        (40.0, "remove_from_cart", "200", "1487580005134238553"),
    ]
    assert u2[0].price is None and u2[1].price == pytest.approx(2.62)
    assert [e.session_id for e in u2] == ["s2", "s2", None]


def test_rees46_gz_reads_the_same_as_plain():
    plain = load_log(REES46, "rees46")
    packed = load_log(REES46.with_suffix(".csv.gz"), "rees46")
    assert len(plain) == len(packed) == 34  # default bounds keep the fixture's small bot
    for col in ("user", "ts", "etype", "item", "category", "query"):
        np.testing.assert_array_equal(getattr(plain, col), getattr(packed, col))
    np.testing.assert_array_equal(plain.price, packed.price)
    assert plain.event_ids == packed.event_ids


def test_keep_ids_false_gives_the_same_columns_without_ids():
    full = load_log(REES46, "rees46")
    lean = load_log(REES46, "rees46", keep_ids=False)
    assert lean.event_ids is None and lean.session_ids is None
    np.testing.assert_array_equal(full.ts, lean.ts)
    np.testing.assert_array_equal(full.user, lean.user)
    assert full.categories == lean.categories


def test_clean_none_returns_valid_rows_in_file_order():
    stats = LoadStats()
    log = load_log(REES46, "rees46", clean=None, stats=stats)
    assert len(log) == stats.rows_kept == 35
    assert log.user_start is None
    assert log.event_ids[:3] == ["rees46_sample:2", "rees46_sample:3", "rees46_sample:4"]
    assert stats.duplicates_dropped == 0


def test_several_paths_and_globs_concatenate_in_order(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv.gz"
    shutil.copy(REES46, a)
    b.write_bytes(gzip.compress(REES46.read_bytes()))
    stats = LoadStats()
    log = load_log(str(tmp_path / "*.csv*"), "rees46", clean=None, stats=stats)
    assert stats.rows_read == 82 and len(log) == 70
    assert log.event_ids[0] == "a:2" and log.event_ids[35] == "b:2"
    assert stats.files == [str(a), str(b)]
    assert len(load_log([a, b], "rees46", clean=None)) == 70


def test_unsplittable_csv_lines_and_bad_bytes_are_counted_not_fatal(tmp_path):
    good = "2019-10-01 00:00:00 UTC,view,1,2,,b,1.00,u1,s1\n"
    huge = "2019-10-01 00:00:01 UTC,view,1,2,,b," + "9" * 200_000 + ",u1,s1\n"  # beyond csv's field limit
    latin1 = "2019-10-01 00:00:02 UTC,view,1,2,,caf\xe9,1.00,u1,s1\n".encode("latin-1")
    p = tmp_path / "messy.csv"
    p.write_bytes(REES46.read_text().splitlines(keepends=True)[0].encode() + (good + huge).encode() + latin1)
    stats = LoadStats()
    log = load_log(p, "rees46", clean=None, stats=stats)
    assert stats.rows_read == 3 and dict(stats.malformed) == {"bad_csv": 1}
    assert len(log) == 2  # the undecodable brand byte is replaced; the row is still good


# -- JSONL --------------------------------------------------------------------------------------


def test_jsonl_uses_the_topic_rules_and_reason_codes():
    stats = LoadStats()
    log = load_log(JSONL, "jsonl", stats=stats)
    assert stats.rows_read == 13  # the blank line is not a row
    assert dict(stats.malformed) == {
        "not_json": 1,
        "not_object": 1,
        "missing_field": 1,
        "bad_type": 1,
        "missing_item": 1,
        "bad_ts": 1,
    }
    assert stats.duplicates_dropped == 1  # j4 repeats j3 under another id
    assert stats.missing_category == 2
    assert stats.out_of_order_fixed == 1
    by_user = events_by_user(log)
    assert [(e.event_id, e.type) for e in by_user["u1"]] == [
        ("j1", "view"),
        ("j2", "search"),
        ("j3", "add_to_cart"),
        ("j5", "purchase"),
    ]
    assert by_user["u1"][1].query == "red shoes" and by_user["u1"][1].ts == 1700000010.0
    assert [(e.event_id, e.type, e.item_id) for e in by_user["u2"]] == [
        ("j7", "favorite", "i2"),
        ("j6", "view", "17"),
    ]


# -- RetailRocket ------------------------------------------------------------------------------


def test_retailrocket_discovers_side_files_and_uses_category_in_force():
    stats = LoadStats()
    log = load_log(RR / "events.csv", "retailrocket", stats=stats)
    assert stats.rows_read == 12
    assert dict(stats.malformed) == {"column_count": 1, "bad_number": 1, "bad_type": 1, "bad_ts": 1}
    assert stats.duplicates_dropped == 1
    assert stats.out_of_order_fixed == 1
    assert stats.missing_category == 1
    assert len(log) == 7
    assert any(f.endswith("item_properties_part2.csv") for f in stats.files)
    by_user = events_by_user(log)
    assert [(e.type, e.item_id, e.category) for e in by_user["1"]] == [
        ("view", "10", "1"),
        ("add_to_cart", "10", "1"),
        ("purchase", "10", "1"),
    ]
    assert by_user["1"][0].ts == 1433221000.0
    # Item 20 is category 2 until 1433300000000 ms, then 3; before its first record the earliest value.
    assert [(e.ts, e.item_id, e.category) for e in by_user["2"]] == [
        (1433200000.0, "20", "2"),
        (1433300000.0, "10", "1"),
        (1433400000.0, "20", "3"),
        (1433400060.0, "30", None),
    ]


def test_retailrocket_side_files_can_be_given_explicitly_or_left_out(tmp_path):
    shutil.copy(RR / "events.csv", tmp_path / "events.csv")
    bare = load_log(tmp_path / "events.csv", "retailrocket")
    assert bare.categories == []
    given = load_log(
        tmp_path / "events.csv",
        "retailrocket",
        item_properties=[RR / "item_properties_part1.csv"],
        category_tree=RR / "category_tree.csv",
    )
    # Only part 1 (item 20 -> 2): the later change to 3 is unknown.
    assert sorted(given.categories) == ["1", "2"]


def test_retailrocket_directory_input_routes_files_by_header():
    log = load_log(RR, "retailrocket")
    assert len(log) == 7 and sorted(log.categories) == ["1", "2", "3"]


def test_read_category_tree():
    assert read_category_tree(RR / "category_tree.csv") == {"1": "100", "2": "100", "3": None, "100": None}


# -- Taobao UserBehavior ----------------------------------------------------------------------------


def test_taobao_counts_rejects_and_maps_behaviors():
    stats = LoadStats()
    log = load_log(TAOBAO, "taobao", stats=stats)
    assert stats.rows_read == 40
    # a 4-column row, the unknown behavior "click", the timestamp "yesterday"
    assert dict(stats.malformed) == {"column_count": 1, "bad_type": 1, "bad_time": 1}
    assert stats.duplicates_dropped == 1  # user 1000's repeated view
    assert stats.out_of_order_fixed == 1  # user 100's cart is before the view above it
    assert stats.users_dropped_rate == 0 and stats.missing_category == 0
    assert stats.rows_kept == len(log) == 40 - 3 - 1
    by_user = events_by_user(log)
    assert sorted(by_user) == ["1", "100", "1000", "10000", "100001"]
    types = [e.type for evs in by_user.values() for e in evs]
    assert {t: types.count(t) for t in set(types)} == {
        "view": 23,
        "add_to_cart": 5,
        "favorite": 4,
        "purchase": 4,
    }
    u1 = by_user["1"]
    assert [(e.ts, e.type, e.item_id, e.category) for e in u1[5:9]] == [
        (1511544370.0, "add_to_cart", "4606018", "2735466"),
        (1511544430.0, "view", "230380", "411153"),
        (1511544490.0, "favorite", "3827899", "2920476"),
        (1511544550.0, "purchase", "4606018", "2735466"),
    ]
    assert u1[0].event_id == "taobao_sample:1" and u1[0].price is None and u1[0].session_id is None
    u100 = by_user["100"]
    assert [e.type for e in u100[:3]] == ["view", "add_to_cart", "view"]  # sorted back into time order
    assert u100[1].event_id == "taobao_sample:14"


def test_taobao_gz_reads_the_same_as_plain(tmp_path):
    gz = tmp_path / "UserBehavior.csv.gz"
    with TAOBAO.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = load_log(TAOBAO, "taobao", keep_ids=False)
    packed = load_log(gz, "taobao", keep_ids=False)
    assert len(packed) == len(plain) == 36
    assert np.array_equal(packed.ts, plain.ts) and np.array_equal(packed.etype, plain.etype)
    assert [e.category for e in packed.user_events(0)] == [e.category for e in plain.user_events(0)]


def test_gzip_is_told_by_content_not_by_name(tmp_path):
    disguised = tmp_path / "events.csv"  # gzip bytes under a plain name
    disguised.write_bytes(REES46.with_suffix(".csv.gz").read_bytes())
    plain_named_gz = tmp_path / "plain.csv.gz"  # plain bytes under a .gz name
    plain_named_gz.write_bytes(REES46.read_bytes())
    expected = load_log(REES46, "rees46", keep_ids=False)
    for p in (disguised, plain_named_gz):
        got = load_log(p, "rees46", keep_ids=False)
        assert np.array_equal(got.ts, expected.ts) and got.categories == expected.categories, p.name


@pytest.mark.parametrize("fmt", ["rees46", "auto"])
def test_a_truncated_or_corrupt_gzip_file_is_a_data_error_naming_it(tmp_path, fmt):
    # a download cut short used to end `train` in gzip's EOFError traceback, exit 1
    whole = REES46.with_suffix(".csv.gz").read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        DataError, match=r"cut\.csv\.gz: cannot be read to its end, the file is truncated or corrupt"
    ):
        load_log(cut, fmt)
    garbled = tmp_path / "garbled.csv.gz"  # the magic number, then nothing gzip can read
    garbled.write_bytes(whole[:2] + b"\xff" * 64)
    with pytest.raises(DataError, match=r"garbled\.csv\.gz: .* truncated or corrupt"):
        load_log(garbled, fmt)


def test_taobao_non_finite_and_out_of_range_times_are_bad_ts(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,2,3,pv,nan\n1,2,3,pv,inf\n1,2,3,pv,-1\n1,2,3,Buy,1511544070\n1,2,3,pv,1511544070.5\n")
    stats = LoadStats()
    log = load_log(p, "taobao", stats=stats, clean=None)
    # "Buy" is not a Taobao behavior (they are lower case), although the topic would take the alias
    assert dict(stats.malformed) == {"bad_ts": 3, "bad_type": 1}
    assert log.ts.tolist() == [1511544070.5]


# -- errors -----------------------------------------------------------------------------------


def test_unknown_format_and_missing_files_raise_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'parquet'") as info:
        load_log(REES46, "parquet")
    assert str(info.value).endswith("expected one of " + ", ".join((AUTO, *FORMATS)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_log(tmp_path / "nope.csv", "rees46")
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_log(str(tmp_path / "*.csv"), "rees46")


def test_a_file_of_another_format_is_a_clear_error():
    with pytest.raises(ValueError, match="expected header event_time") as info:
        load_log(RR / "events.csv", "rees46")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a RetailRocket file"):
        load_log(REES46, "retailrocket")


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (REES46, "rees46"),
        (FIXTURES / "rees46_sample.csv.gz", "rees46"),
        (JSONL, "jsonl"),
        (TAOBAO, "taobao"),
        (RR, "retailrocket"),
    ],
)
def test_auto_tells_each_format_by_its_first_line_and_loads_what_the_format_loads(path, fmt):
    """A new user's first command names no format: every format is told from its files (a RetailRocket
    directory by its events file and its side files alike), and the load equals the named format's."""
    assert detect_format(path) == fmt
    named, auto = load_log(path, fmt, clean=None), load_log(path, AUTO, clean=None)
    assert len(auto) == len(named) > 0
    assert np.array_equal(auto.ts, named.ts) and list(auto.categories) == list(named.categories)


def test_auto_refuses_a_file_it_cannot_tell_or_files_of_two_formats(tmp_path):
    (tmp_path / "odd.csv").write_text("\n\nuser;item;when\n1;2;3\n")
    with pytest.raises(
        ValueError, match=r"odd.csv: cannot tell its format from its first line 'user;item;when"
    ) as info:
        load_log(tmp_path / "odd.csv", AUTO)
    assert "\n" not in str(info.value) and "--format jsonl|rees46|retailrocket|taobao" in str(info.value)
    with pytest.raises(
        ValueError, match="different formats .*is rees46.*is taobao|different formats .*is taobao.*is rees46"
    ):
        load_log([REES46, TAOBAO], AUTO)
    (tmp_path / "empty.jsonl").write_text("")
    assert detect_format([tmp_path / "empty.jsonl", TAOBAO]) == "taobao"  # an empty file says nothing


def test_auto_reads_a_bounded_first_line_and_answers_hostile_files_in_one_line(tmp_path, monkeypatch):
    """Detection reads a file's first line only, and at most SNIFF_CHARS of it: a multi-megabyte line
    with no end, control characters, NULs and binary bytes (gzipped too) are one-line refusals."""
    import demandstream.model.data.loaders as loaders

    huge = tmp_path / "huge.jsonl"
    huge.write_text("x" * (4 * loaders.SNIFF_CHARS))  # no newline at all
    reads = []
    real = loaders._first_line

    def counting(path):
        line = real(path)
        reads.append(len(line or ""))
        return line

    monkeypatch.setattr(loaders, "_first_line", counting)
    with pytest.raises(ValueError, match="huge.jsonl: cannot tell its format") as info:
        detect_format(huge)
    assert reads == [loaders.SNIFF_CHARS] and "\n" not in str(info.value)
    hostile = tmp_path / "ctl.csv"
    hostile.write_bytes(b"\x00\x1b[2J\rEVENT_TIME\x07,\xff\xfe\n" + bytes(range(256)))
    packed = tmp_path / "ctl.csv.gz"
    packed.write_bytes(gzip.compress(hostile.read_bytes()))
    for path in (hostile, packed):
        with pytest.raises(ValueError, match="cannot tell its format") as info:
            load_log(path, AUTO)
        text = str(info.value)
        assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x00" not in text


def test_retailrocket_routing_reads_a_bounded_first_line(tmp_path, monkeypatch):
    """Routing RetailRocket files by header reads at most SNIFF_CHARS of a file's first line: a file with
    no line end among the inputs is a one-line refusal, not a whole-file read."""
    import demandstream.model.data.loaders as loaders

    huge = tmp_path / "huge.csv"
    huge.write_text("timestamp," * (loaders.SNIFF_CHARS // 5))  # 2 x SNIFF_CHARS, no newline
    seen = []
    real = loaders._split_header
    monkeypatch.setattr(loaders, "_split_header", lambda text: seen.append(len(text)) or real(text))
    with pytest.raises(ValueError, match=r"huge.csv: not a RetailRocket file") as info:
        load_log([RR / "events.csv", huge], "retailrocket")
    detail = str(info.value)
    assert "\n" not in detail and len(detail) < 300
    assert max(seen) == loaders.SNIFF_CHARS


def test_rows_none_of_which_is_valid_name_the_format_the_file_looks_like(tmp_path):
    """`--format jsonl` on a REES46 file read every row as malformed JSON and failed later as an empty
    log; now the load says so and what to pass instead."""
    with pytest.raises(
        ValueError, match=r"none of the 42 rows read is a valid jsonl event \(not_json 42\)"
    ) as info:
        load_log(REES46, "jsonl")
    assert str(info.value).endswith("looks like rees46: pass --format rees46 (or auto)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_id": "e1"}\n{"user_id": "u1"}\n')
    with pytest.raises(ValueError, match="none of the 2 rows read is a valid jsonl event .missing_field 2.$"):
        load_log(bad, AUTO)
    (tmp_path / "empty.jsonl").write_text("")
    assert len(load_log(tmp_path / "empty.jsonl", AUTO)) == 0  # nothing read is not an error here


def test_expand_paths_of_a_directory_lists_data_files_only(tmp_path):
    (tmp_path / "b.csv").write_text("x")
    (tmp_path / "a.jsonl.gz").write_bytes(b"")
    (tmp_path / "README.md").write_text("x")
    assert [p.name for p in expand_paths(tmp_path)] == ["a.jsonl.gz", "b.csv"]


def test_summary_reports_the_counts():
    stats = LoadStats()
    load_log(REES46, "rees46", clean=SMALL_BURST, stats=stats)
    text = stats.summary()
    assert "read 41 rows from 1 files" in text and "kept 22 events" in text
    assert "bad_number 1" in text and "bot users dropped: 1 (12 events)" in text


# -- a stable sample of users ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"), [(REES46, "rees46"), (JSONL, "jsonl"), (TAOBAO, "taobao"), (RR, "retailrocket")]
)
def test_a_user_sample_keeps_whole_users_and_counts_the_rest(path, fmt):
    full_stats, half_stats = LoadStats(), LoadStats()
    full = events_by_user(load_log(path, fmt, clean=None, stats=full_stats).sorted_by_user_time())
    half = events_by_user(
        load_log(path, fmt, clean=None, stats=half_stats, user_sample=0.5).sorted_by_user_time()
    )
    assert 0 < len(half) < len(full)
    for user, events in half.items():  # every kept user keeps every one of their events, in order
        assert [e.event_id for e in events] == [e.event_id for e in full[user]]
    dropped = sum(len(events) for user, events in full.items() if user not in half)
    # every row read is kept, malformed or another user's; the other users' rows are not validated,
    # so their malformed rows count as outside the sample, and only theirs
    assert half_stats.rows_read == full_stats.rows_read
    assert not half_stats.malformed - full_stats.malformed
    unvalidated = full_stats.malformed_total - half_stats.malformed_total
    assert half_stats.rows_outside_sample == dropped + unvalidated
    assert "user sample 0.5: rows of other users dropped unvalidated" in half_stats.summary()
    assert "user sample" not in full_stats.summary()


def test_a_user_sample_validates_its_own_users_rows_only(tmp_path):
    """Rows of users outside the sample are dropped before parsing (validating them was most of a
    sampled load); a sampled user's malformed row is still rejected with its reason."""
    users = [f"u{i}" for i in range(40)]
    inside = [u for u in users if in_user_sample(u, 0.5)]
    outside = [u for u in users if not in_user_sample(u, 0.5)]
    header = REES46.read_text().splitlines()[0]
    rows = [header]
    for u in (inside[0], outside[0]):
        rows.append(f"2019-10-01 00:00:00 UTC,view,p1,17,,acme,2.50,{u},s1")
        rows.append(f"not a time,view,p1,17,,acme,2.50,{u},s1")
        rows.append(f"2019-10-01 00:00:01 UTC,view,p1,17,,acme,twelve,{u},s1")
    rows.append("2019-10-01 00:00:02 UTC,view,p1,17,,acme,2.50,,s1")  # no user: validated, rejected
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(rows) + "\n")
    stats = LoadStats()
    log = load_log(path, "rees46", clean=None, stats=stats, user_sample=0.5)
    assert set(events_by_user(log.sorted_by_user_time())) == {inside[0]}
    assert stats.malformed == {"bad_time": 1, "bad_number": 1, "bad_id": 1}
    assert stats.rows_outside_sample == 3 and stats.rows_read == 7


def test_a_user_sample_is_the_same_when_its_memo_of_users_overflows(monkeypatch):
    from demandstream.model.data import loaders

    expected = events_by_user(load_log(JSONL, "jsonl", clean=None, user_sample=0.5).sorted_by_user_time())
    monkeypatch.setattr(loaders, "SAMPLE_MEMO_USERS", 2)  # forgotten every second user
    got = events_by_user(load_log(JSONL, "jsonl", clean=None, user_sample=0.5).sorted_by_user_time())
    assert {u: [e.event_id for e in es] for u, es in got.items()} == {
        u: [e.event_id for e in es] for u, es in expected.items()
    }


def test_a_smaller_user_sample_is_a_subset_of_a_larger_one():
    users = {
        f: set(events_by_user(load_log(JSONL, "jsonl", clean=None, user_sample=f).sorted_by_user_time()))
        for f in (0.3, 0.6, 1.0)
    }
    assert users[0.3] <= users[0.6] <= users[1.0]


def test_a_user_sample_outside_0_1_or_keeping_nobody_is_one_clear_error(tmp_path):
    with pytest.raises(OptionError, match=r"fraction in \(0, 1\], got 1.5"):
        load_log(JSONL, "jsonl", user_sample=1.5)
    one = tmp_path / "one.csv"  # one user, whose hash lands outside a tiny sample
    one.write_text(
        REES46.read_text().splitlines()[0] + "\n2019-10-01 00:00:00 UTC,view,p1,17,,acme,2.50,u1,s1\n"
    )
    with pytest.raises(DataError, match="kept none of the 1 rows' users"):
        load_log(one, "rees46", user_sample=1e-9)


def test_a_user_sample_takes_hostile_ids_as_any_other(tmp_path):
    """Ids the sample hashes come out of validation: odd ones are rejected or hashed, never a crash."""
    rows = [
        '{"event_id":"e1","user_id":"\\ud800x","ts":1700000000,"type":"view","item_id":"i","category":"c"}',
        '{"event_id":"e2","user_id":"u\\u0000\\u001b","ts":1700000001,"type":"view","item_id":"i","category":"c"}',
        '{"event_id":"e3","user_id":"","ts":1700000002,"type":"view","item_id":"i","category":"c"}',
        # a sampled load peeks at user_id before parsing: neither a huge row nor a non-object slips by
        '{"event_id":"e4","user_id":"u1","ts":1700000003,"type":"view","item_id":"i","category":"'
        + "c" * 20_000
        + '"}',
        '["user_id", "u1"]',
        '{"event_id":"e5","user_id":["u1"],"ts":1700000004,"type":"view","item_id":"i","category":"c"}',
    ]
    # ids that look like internal keys, an over-long one and a non-ASCII one
    for k, uid in enumerate(["__all__", "user-state-changelog", "-1", "x" * 200, "ユーザー", "0"] * 10):
        rows.append(
            f'{{"event_id":"k{k}","user_id":"{uid}","ts":{1700000100 + k},"type":"view","item_id":"i","category":"c"}}'
        )
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_text("\n".join(rows) + "\n")
    full_stats, half_stats = LoadStats(), LoadStats()
    full = load_log(hostile, "jsonl", clean=None, stats=full_stats)
    half = load_log(hostile, "jsonl", clean=None, stats=half_stats, user_sample=0.5)
    # a lone surrogate is not JSON; an empty id and the 200-character ones are bad ids; control
    # characters pass validation (its rule, not the sample's) and are hashed like any id
    assert (
        full_stats.malformed
        == {"not_json": 1, "bad_id": 11, "too_large": 1, "not_object": 1, "bad_field_type": 1}
        == half_stats.malformed
    )
    assert len(half) + half_stats.rows_outside_sample == len(full) == 51
    assert 0 < len(half) < len(full)


# -- the real REES46 samples in shared/ ------------------------------------------------------------


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_shared_cosmetics_sample_loads_cleanly():
    path = SHARED_DATA / "rees46" / "cosmetics_2019-oct-nov.csv.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    stats = LoadStats()
    started = time.perf_counter()
    log = load_log(path, "rees46", keep_ids=False, stats=stats)
    assert time.perf_counter() - started < 20  # about 0.5 s here; a generous bound for slow CI
    assert stats.rows_read == 42_359  # documented in shared/data/README.md
    assert stats.malformed_total == 0
    assert stats.duplicates_dropped > 0  # REES46 logs many rows twice
    assert stats.missing_category > 0  # some November rows lost their category_id
    assert stats.users_dropped_rate == 0  # no real shopper there is a bot by the default bounds
    assert len(log) == stats.rows_kept == stats.rows_read - stats.duplicates_dropped
    assert np.all(np.diff(log.user_start) >= 0) and log.user_start[-1] == len(log)
