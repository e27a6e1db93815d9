"""What the worker writes, for any input: state keys outside Faust's keys."""

from __future__ import annotations

from faust.stores.rocksdb import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demandstream.model.core.events import MAX_ID_CHARS
from demandstream.stream.engine.records import state_key, user_of_state_key

#: Faust's RocksDB store keeps each table partition's changelog offset under this key.
FAUST_OFFSET_KEY = Store.offset_key
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_state_keys_never_address_faust_s_own_key():
    """The id that is Faust's offset key gets a key of its own, and no table key can start like Faust's."""
    uid = FAUST_OFFSET_KEY.decode()
    assert state_key(uid) != FAUST_OFFSET_KEY
    assert user_of_state_key(state_key(uid)) == uid
    assert user_of_state_key(FAUST_OFFSET_KEY) is None


@PROPERTY
@given(st.text(max_size=MAX_ID_CHARS))
def test_every_user_id_has_a_key_in_the_namespace_and_back(uid):
    key = state_key(uid)
    assert not key.startswith(b"__faust") and key != FAUST_OFFSET_KEY
    assert user_of_state_key(key) == uid
    assert state_key(uid + "x") != key  # distinct ids, distinct keys (the prefix is fixed)
