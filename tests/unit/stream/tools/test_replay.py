"""What `demandstream replay` sends, without a broker: records(paths, fmt) -> (key, value) pairs."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from demandstream.model.errors import DataError
from demandstream.stream.tools.replay import records

LINES = [
    orjson.dumps({"user_id": "u1", "event_type": "view", "ts": 1.0}),
    b"not json at all",
    orjson.dumps({"user_id": "u2", "event_type": "purchase", "ts": 2.0}),
]


def test_a_gzip_file_is_replayed_decompressed_whatever_its_name(tmp_path):
    # training reads a gzip file named .jsonl by its content; replay used to send its compressed bytes
    path = tmp_path / "events.jsonl"
    path.write_bytes(gzip.compress(b"\n".join(LINES) + b"\n"))
    assert list(records([path], "jsonl")) == [(b"u1", LINES[0]), (None, LINES[1]), (b"u2", LINES[2])]


def test_a_plain_file_is_sent_byte_for_byte_with_crlf_and_blank_lines_dropped(tmp_path):
    path = tmp_path / "events.jsonl.gz"  # a plain file with a misleading name
    path.write_bytes(LINES[0] + b"\r\n\r\n" + LINES[2] + b"\n")
    assert list(records([path], "jsonl")) == [(b"u1", LINES[0]), (b"u2", LINES[2])]


def test_auto_sends_a_jsonl_file_as_it_is_and_a_csv_as_events(tmp_path):
    """The default format: a JSONL file still goes byte for byte (its invalid lines too: the worker's
    dead letters are part of a replay), a REES46 CSV as the events it holds, in time order."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    assert list(records([path], "auto")) == list(records([path], "jsonl"))
    rees46 = Path(__file__).resolve().parents[3] / "fixtures" / "rees46_sample.csv"
    sent = list(records([rees46], "auto"))
    assert sent == list(records([rees46], "rees46")) and sent
    assert all(orjson.loads(v)["user_id"].encode() == k for k, v in sent)


def test_a_truncated_gzip_file_stops_the_replay_with_a_data_error(tmp_path):
    path = tmp_path / "events.jsonl.gz"
    whole = gzip.compress(b"\n".join(LINES * 200) + b"\n")
    path.write_bytes(whole[: len(whole) - 16])  # the end cut off (the trailer and some data)
    with pytest.raises(DataError, match="events.jsonl.gz: cannot be read to its end"):
        list(records([path], "jsonl"))
