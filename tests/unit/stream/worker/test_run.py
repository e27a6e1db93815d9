"""The worker launcher's own checks, before Faust or Kafka are involved."""

from __future__ import annotations

import pytest

from demandstream.model.errors import UserError
from demandstream.stream.worker.run import prepare_data_dir


def test_a_data_dir_with_missing_parents_is_created(tmp_path):
    d = prepare_data_dir(str(tmp_path / "not" / "yet" / "there"))
    assert d.is_dir()
    assert prepare_data_dir(str(d)) == d  # idempotent: a restart finds it


def test_a_data_dir_that_cannot_exist_is_one_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError) as e:
        prepare_data_dir(str(blocker / "data"))
    msg = str(e.value)
    assert "DEMANDSTREAM_DATA_DIR" in msg and "\n" not in msg
