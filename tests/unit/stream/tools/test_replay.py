"""What `demandstream replay` sends, without a broker: records(paths, fmt) -> (key, value) pairs."""

from __future__ import annotations

import gzip

import orjson

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
