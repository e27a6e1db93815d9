"""Settings from the environment: counts that must be positive are refused in one line."""

from __future__ import annotations

import pytest

from demandstream.stream.settings import Settings, SettingsError


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1e3", " "])
def test_a_standby_buffer_that_is_not_a_positive_count_is_refused(value):
    with pytest.raises(SettingsError, match="DEMANDSTREAM_STANDBY_BUFFER") as e:
        Settings.from_env({"DEMANDSTREAM_STANDBY_BUFFER": value})
    assert "\n" not in str(e.value)


def test_the_standby_buffer_defaults_to_fausts_and_takes_a_positive_count():
    assert Settings.from_env({}).standby_buffer == 1000
    assert Settings.from_env({"DEMANDSTREAM_STANDBY_BUFFER": "1"}).standby_buffer == 1


@pytest.mark.parametrize("value", ["-1", "11", "three"])
def test_why_top_outside_zero_to_ten_is_refused(value):
    with pytest.raises(SettingsError, match="DEMANDSTREAM_WHY_TOP") as e:
        Settings.from_env({"DEMANDSTREAM_WHY_TOP": value})
    assert "\n" not in str(e.value)


def test_why_is_off_by_default():
    assert Settings.from_env({}).why_top == 0
    assert Settings.from_env({"DEMANDSTREAM_WHY_TOP": "3"}).why_top == 3


def test_a_removed_variable_is_reported_and_ignored(caplog):
    """DEMANDSTREAM_BATCH_WITHIN_MS never changed anything (a micro-batch is one fetch): a deployment
    that still sets it starts, and its log says why the variable does nothing."""
    with caplog.at_level("WARNING", logger="demandstream.stream.settings"):
        s = Settings.from_env({"DEMANDSTREAM_BATCH_WITHIN_MS": "50", "DEMANDSTREAM_BATCH_MAX": "7"})
    assert s.batch_max == 7
    assert not hasattr(s, "batch_within_ms")
    assert "DEMANDSTREAM_BATCH_WITHIN_MS is ignored: a micro-batch is one fetch" in caplog.text
    caplog.clear()
    Settings.from_env({})
    assert caplog.text == ""


def test_the_removed_flag_is_refused_by_the_command_line():
    from demandstream.stream import cli

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["worker", "--batch-within-ms", "50"])
    assert exc.value.code == 2


def test_the_partitioner_is_murmur2_by_default_and_offers_the_known_ones():
    from demandstream.stream.partitioner import PARTITIONERS
    from demandstream.stream.settings import _CHOICES

    assert Settings.from_env({}).partitioner == "murmur2"
    assert _CHOICES["partitioner"] == tuple(PARTITIONERS)
    assert Settings.from_env({"DEMANDSTREAM_PARTITIONER": "crc32"}).partitioner == "crc32"
    with pytest.raises(SettingsError, match="DEMANDSTREAM_PARTITIONER: must be one of murmur2, crc32, fnv1a"):
        Settings.from_env({"DEMANDSTREAM_PARTITIONER": "consistent_random"})


def test_inference_is_eager_by_default_and_offers_the_models_modes():
    from demandstream.model.core.compiled import INFERENCE_MODES
    from demandstream.stream.settings import _CHOICES

    assert Settings.from_env({}).inference == "eager"
    assert _CHOICES["inference"] == INFERENCE_MODES
    assert Settings.from_env({"DEMANDSTREAM_INFERENCE": "compiled"}).inference == "compiled"
    with pytest.raises(SettingsError, match="DEMANDSTREAM_INFERENCE: must be one of eager, compiled"):
        Settings.from_env({"DEMANDSTREAM_INFERENCE": "jit"})


@pytest.mark.parametrize("value", ["-1", "3601", "soon", "nan", "inf", " "])
def test_a_commit_interval_outside_zero_to_an_hour_is_refused(value):
    with pytest.raises(SettingsError, match="DEMANDSTREAM_COMMIT_INTERVAL_S"):
        Settings.from_env({"DEMANDSTREAM_COMMIT_INTERVAL_S": value})


@pytest.mark.parametrize(
    ("guarantee", "given", "expected"),
    [
        ("at_least_once", "", 2.8),
        ("exactly_once", "", 0.1),
        ("exactly_once", "1.5", 1.5),
        ("at_least_once", "0.5", 0.5),
    ],
)
def test_the_worker_commits_at_the_interval_its_guarantee_needs_unless_told(
    guarantee, given, expected, tmp_path
):
    # under exactly-once a commit ends the transactions: it is how soon read_committed consumers see a signal
    from demandstream.stream.worker.app import create_app

    s = Settings.from_env(
        {"DEMANDSTREAM_COMMIT_INTERVAL_S": given},
        guarantee=guarantee,
        store="memory",
        data_dir=str(tmp_path),
    )
    assert s.commit_interval == expected
    assert create_app(s).app.conf.broker_commit_interval == expected


@pytest.mark.parametrize(
    "broker",
    ["http://k1:9092", "PLAINTEXT://k1:9092", "kafka://k1:notaport", "kafka://k1:9092,,k2:9092", "kafka://"],
)
def test_a_broker_that_is_no_kafka_url_is_refused_at_once(broker):
    # the scheme used to be dropped in silence, and the tools waited 30 s to say "cannot reach Kafka"
    with pytest.raises(SettingsError, match="--broker / DEMANDSTREAM_BROKER: must be kafka://host:port") as e:
        Settings.from_env({"DEMANDSTREAM_BROKER": broker})
    assert "\n" not in str(e.value)


def test_kafka_urls_and_bare_host_ports_are_brokers():
    s = Settings.from_env({"DEMANDSTREAM_BROKER": "kafka://k1:9092,k2:9093,[::1]:9094"})
    assert s.bootstrap_servers == ["k1:9092", "k2:9093", "[::1]:9094"]
    bare = Settings.from_env({"DEMANDSTREAM_BROKER": "127.0.0.1:19092"})
    assert bare.bootstrap_servers == ["127.0.0.1:19092"]


def test_top_k_is_bounded_by_what_a_state_record_can_keep():
    import struct

    from demandstream.model.core.state import HEADER_FIELDS
    from demandstream.stream.settings import TOP_K_MAX

    n_top = dict(HEADER_FIELDS)["n_top"]
    assert TOP_K_MAX == 2 ** (8 * struct.calcsize(n_top)) - 1  # the header's count of stored tops
    assert Settings.from_env({"DEMANDSTREAM_TOP_K": str(TOP_K_MAX)}).top_k == TOP_K_MAX
    with pytest.raises(SettingsError, match="DEMANDSTREAM_TOP_K: at most 255"):
        Settings.from_env({"DEMANDSTREAM_TOP_K": "256"})


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("LAG_INTERVAL_S", "0", "must be positive"),
        ("LAG_INTERVAL_S", "-1", "must be positive"),
        ("STANDBY_REPLICAS", "-1", "must not be negative"),
        ("STATE_TTL_S", "-5", "must not be negative"),
        ("REPLICATION", "-1", "must not be negative"),
    ],
)
def test_intervals_and_counts_out_of_range_are_refused_naming_the_variable(name, value, rule):
    with pytest.raises(SettingsError, match=f"DEMANDSTREAM_{name}: {rule}"):
        Settings.from_env({f"DEMANDSTREAM_{name}": value})


def test_replication_defaults_to_the_clusters_own():
    from demandstream.stream.admin import replication_factor

    assert Settings.from_env({}).replication == 0
    assert replication_factor(Settings()) == -1  # CreateTopics' "the broker's default" (KIP-464)
    assert replication_factor(Settings(replication=3)) == 3


def test_a_client_certificate_reaches_kafka_python_and_needs_tls(tmp_path):
    """Mutual TLS: the certificate and key go to every kafka-python client; a certificate without TLS,
    a key without its certificate and a file that cannot be read are refused, naming the variable
    (the real broker: tests/integration/test_security.py)."""
    cert, key, ca = (tmp_path / n for n in ("client.pem", "client.key", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text("-----BEGIN-----\n")
    s = Settings(security_protocol="SSL", ssl_cafile=str(ca), ssl_certfile=str(cert), ssl_keyfile=str(key))
    assert s.kafka_python_security() == {
        "security_protocol": "SSL",
        "ssl_cafile": str(ca),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
    }
    assert "ssl_keyfile" not in s.with_(ssl_keyfile="").kafka_python_security()  # the key in the cert's file
    s.validate()
    with pytest.raises(SettingsError, match="a client certificate needs DEMANDSTREAM_SECURITY_PROTOCOL SSL"):
        s.with_(security_protocol="SASL_PLAINTEXT")
    with pytest.raises(SettingsError, match="DEMANDSTREAM_SSL_KEYFILE: set DEMANDSTREAM_SSL_CERTFILE"):
        s.with_(ssl_certfile="")
    with pytest.raises(SettingsError, match="DEMANDSTREAM_SSL_CAFILE: cannot read"):
        s.with_(ssl_cafile=str(tmp_path / "missing.pem"))
