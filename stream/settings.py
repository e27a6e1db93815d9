"""Settings: one object, from flags, then ``DEMANDSTREAM_*`` environment, then defaults (docs/ARCHITECTURE.md
§CLI).

Nothing else in the code reads the environment; the CLI builds a :class:`Settings` and passes it down.

>>> s = Settings.from_env({"DEMANDSTREAM_BATCH_MAX": "512", "DEMANDSTREAM_GUARANTEE": "exactly_once"})
>>> s.batch_max, s.guarantee, s.broker
(512, 'exactly_once', 'kafka://127.0.0.1:9092')
>>> Settings.from_env({"DEMANDSTREAM_GUARANTEE": "maybe"})
Traceback (most recent call last):
...
demandstream.stream.settings.SettingsError: DEMANDSTREAM_GUARANTEE: must be one of at_least_once, exactly_once (got 'maybe')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from demandstream.model.errors import UserError

PREFIX = "DEMANDSTREAM_"
#: Where deploy/kafka/kafka.sh sits when this package runs from a checkout (editable install).
CHECKOUT_KAFKA_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"


class SettingsError(UserError, ValueError):
    """A setting with an invalid value; the message names the variable or flag."""


_CHOICES = {
    "guarantee": ("at_least_once", "exactly_once"),
    "store": ("rocksdb", "memory"),
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
}


@dataclass(frozen=True)
class Settings:
    """Every runtime setting of demandstream. Field ``x`` is read from ``DEMANDSTREAM_X``."""

    broker: str = "kafka://127.0.0.1:9092"
    model: str = ""
    app_id: str = "demandstream"
    data_dir: str = "var/data"
    web_host: str = "127.0.0.1"  # metrics and queries stay on loopback unless configured
    web_port: int = 6066
    guarantee: str = "at_least_once"
    device: str = "auto"
    topic_input: str = "clickstream"
    topic_signals: str = "demand-signals"
    topic_dlq: str = "clickstream-dlq"
    #: erasure requests (`demandstream forget`), the only ones obeyed: restrict writes to it by ACL
    topic_control: str = "clickstream-control"
    table: str = "user-state"
    partitions: int = 4
    replication: int = 1
    standby_replicas: int = 1
    store: str = "rocksdb"
    batch_max: int = 2000
    batch_within_ms: int = 50
    top_k: int = 5
    state_ttl_s: float = 0.0  # 0 = keep user state forever
    pseudonym_key: str = field(default="", repr=False)
    #: the key before the last rotation: `forget` also erases the state kept under the old pseudonym
    pseudonym_key_previous: str = field(default="", repr=False)
    #: bound on how long an erased or expired state stays in the changelog's log segments (1 day)
    changelog_max_compaction_lag_s: float = 86400.0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    log_level: str = "info"
    lag_interval_s: float = 5.0
    processes: int = 1  # worker processes on this machine (`worker --processes N`), one core each
    kafka_script: str = ""  # kafka.sh for `bench` and the demo; empty: the checkout's deploy/kafka/kafka.sh

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults, overridden by ``DEMANDSTREAM_*`` in ``env``, overridden by non-None ``overrides``."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name in env and env[name] != "":
                values[f.name] = _convert(name, f.type, env[name])
        for k, v in overrides.items():
            if v is not None:
                if k not in cls.__dataclass_fields__:
                    raise SettingsError(f"unknown setting {k!r}")
                values[k] = v
        s = cls(**values)
        s.validate()
        return s

    def with_(self, **changes) -> Settings:
        s = replace(self, **{k: v for k, v in changes.items() if v is not None})
        s.validate()
        return s

    def validate(self) -> None:
        for name, choices in _CHOICES.items():
            v = getattr(self, name)
            if v not in choices:
                raise SettingsError(
                    f"{PREFIX}{name.upper()}: must be one of {', '.join(choices)} (got {v!r})"
                )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError(f"{PREFIX}DEVICE: must be auto, cpu or cuda (got {self.device!r})")
        for name in ("partitions", "replication", "batch_max", "top_k", "processes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{PREFIX}{name.upper()}: must be at least 1")
        if self.changelog_max_compaction_lag_s <= 0:
            raise SettingsError(f"{PREFIX}CHANGELOG_MAX_COMPACTION_LAG_S: must be positive")
        if self.topic_control in (self.topic_input, self.topic_signals, self.topic_dlq):
            raise SettingsError(
                f"{PREFIX}TOPIC_CONTROL: must be a topic of its own (got {self.topic_control!r})"
            )
        if self.batch_within_ms < 0 or self.standby_replicas < 0 or self.state_ttl_s < 0:
            raise SettingsError("batch_within_ms, standby_replicas and state_ttl_s must not be negative")
        if not 0 < self.web_port < 65536:
            raise SettingsError(f"{PREFIX}WEB_PORT: not a port: {self.web_port}")

    # -- derived --------------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> list[str]:
        """``kafka://h1:9092,h2:9092`` -> ``["h1:9092", "h2:9092"]`` (for kafka-python tools)."""
        out = []
        for part in self.broker.split(","):
            part = part.strip()
            if "://" in part:
                part = part.split("://", 1)[1]
            if part:
                out.append(part.rstrip("/"))
        return out

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{b}" for b in self.bootstrap_servers)

    def kafka_script_path(self) -> Path:
        """The script `demandstream bench` and the demo start their own Kafka with.

        An installed package has no deploy/ folder: ``DEMANDSTREAM_KAFKA_SCRIPT`` then names the
        ``deploy/kafka/kafka.sh`` of a checkout; from a checkout it defaults to that checkout's script.
        """
        path = Path(self.kafka_script) if self.kafka_script else CHECKOUT_KAFKA_SCRIPT
        if not path.is_file():
            raise SettingsError(
                f"{PREFIX}KAFKA_SCRIPT: {path} not found; set it to deploy/kafka/kafka.sh of a demandstream "
                "checkout, or give --broker to use a running Kafka"
            )
        return path

    def kafka_python_security(self) -> dict:
        """Security keyword arguments for kafka-python clients (admin, replay, tail)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        kw: dict = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            kw.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL") and self.ssl_cafile:
            kw["ssl_cafile"] = self.ssl_cafile
        return kw


def _convert(name: str, typ, raw: str):
    t = typ if isinstance(typ, type) else {"int": int, "float": float, "str": str}.get(str(typ), str)
    try:
        return t(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected {t.__name__}, got {raw!r}") from None


#: Every environment variable the code reads (deploy manifests are checked against it).
ENV_VARS: tuple[str, ...] = tuple(PREFIX + f.name.upper() for f in fields(Settings))
