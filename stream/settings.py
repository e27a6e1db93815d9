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

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from demandstream.model.errors import UserError

PREFIX = "DEMANDSTREAM_"

logger = logging.getLogger(__name__)

#: Variables that no longer set anything, and why: a deployment that still carries one is told so
#: (a warning, not an error, so that the worker still starts from an old configuration).
REMOVED_ENV_VARS: dict[str, str] = {
    PREFIX + "BATCH_WITHIN_MS": (
        "a micro-batch is one fetch of the consumer (docs/ARCHITECTURE.md §Flow) and nothing waits to fill "
        "it; DEMANDSTREAM_BATCH_MAX bounds its size"
    ),
}
#: A user's state record keeps the last signal's top categories with their count in one byte
#: (demandstream.model.core.state.HEADER_FIELDS ``n_top``; tests/unit/stream/test_settings.py holds
#: the two equal); each costs the record 8 bytes.
TOP_K_MAX = 255
#: The ``why`` of a top category has at most one entry per reason (demandstream.model.core.explain.REASONS).
WHY_TOP_MAX = 10
#: Offset commits under exactly-once: each ends the open transactions, so a signal becomes visible to
#: read_committed consumers within about this long (Kafka Streams' ``commit.interval.ms`` under
#: exactly-once is 100 ms). Measured against 2.8 s (docs/BENCHMARKS.md, 2026-12-07): visibility p50 /
#: p99 1,019-1,037 / 2,789-2,832 ms at 2.8 s, 78-86 / 142-167 ms at 0.1 s, the drain no slower.
EXACTLY_ONCE_COMMIT_INTERVAL_S = 0.1
#: Faust's own default: under at-least-once a commit only bounds what a restart processes again.
AT_LEAST_ONCE_COMMIT_INTERVAL_S = 2.8
#: Where deploy/kafka/kafka.sh sits when this package runs from a checkout (editable install).
CHECKOUT_KAFKA_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"


class SettingsError(UserError, ValueError):
    """A setting with an invalid value; the message names the variable or flag."""


_CHOICES = {
    "guarantee": ("at_least_once", "exactly_once"),
    # demandstream.model.core.compiled.INFERENCE_MODES, spelled out so settings import no torch
    # (tests/unit/stream/test_settings.py holds the two equal)
    "inference": ("eager", "compiled"),
    "store": ("rocksdb", "memory"),
    "fault_at": ("", "after_signals", "mid_transaction", "after_state"),
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
    # demandstream.stream.partitioner.PARTITIONERS (tests/unit/stream/test_settings.py holds the two equal)
    "partitioner": ("murmur2", "crc32", "fnv1a"),
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
    #: the URL other workers reach this one at (Faust's canonical URL: requests for users another worker
    #: owns are forwarded there); empty: http://web_host:web_port, refused when web_host is a wildcard
    web_advertised_url: str = ""
    #: bearer token that /users/{id}/demand requires; empty: none. Prefer web_token_file (a mounted Secret)
    web_token: str = field(default="", repr=False)
    web_token_file: str = ""
    guarantee: str = "at_least_once"
    device: str = "auto"
    #: how the model's heads run: eager, or compiled by torch.compile when the worker starts (needs a
    #: C++ compiler; ~50 s the first time on 2 cores, ~10 s from the cache; small batches ~20-30 %
    #: faster, docs/BENCHMARKS.md)
    inference: str = "eager"
    topic_input: str = "clickstream"
    topic_signals: str = "demand-signals"
    topic_dlq: str = "clickstream-dlq"
    #: erasure requests (`demandstream forget`), the only ones obeyed: restrict writes to it by ACL
    topic_control: str = "clickstream-control"
    #: closed windows of category demand, per source partition (docs/ARCHITECTURE.md §Category demand)
    topic_demand: str = "category-demand"
    table: str = "user-state"
    partitions: int = 4
    #: how the shop's producers map a user's key to a partition (murmur2: Kafka's default; crc32:
    #: librdkafka's; fnv1a: Sarama's): `forget` and /users/{id}/demand reach a user's state through it
    #: (stream/partitioner.py; docs/OPERATIONS.md §4, "Producers' partitioner")
    partitioner: str = "murmur2"
    #: replication factor of the topics the worker (and Faust) create; 0, the default: the cluster's own
    #: ``default.replication.factor`` (created with -1, KIP-464), learnt back from the input topic for the
    #: changelog Faust creates. The former default, 1, left every topic of a production cluster without a
    #: copy: the states' changelog, and the signals, lost with one broker's disk
    replication: int = 0
    standby_replicas: int = 1
    #: changelog records a standby copy buffers per partition before writing them to its disk (Faust's
    #: default): how far a standby's disk may trail, an erasure included, until promotion or stop
    standby_buffer: int = 1000
    store: str = "rocksdb"
    batch_max: int = 2000
    #: seconds between offset commits (Faust's ``broker_commit_interval``); 0 (the default): 0.1 under
    #: exactly-once, 2.8 (Faust's default) under at-least-once. Under exactly-once each commit ends the
    #: open transactions, so this is also how long a signal can wait before a read_committed consumer
    #: sees it; Kafka Streams commits every 100 ms under exactly-once for the same reason
    #: (docs/OPERATIONS.md §4; measured in docs/BENCHMARKS.md)
    commit_interval_s: float = 0.0
    top_k: int = 5
    #: per top category, the signal's ``why`` lists this many named contributions (docs/ARCHITECTURE.md
    #: §Signals); 0, the default, leaves ``why`` out and keeps the signal small
    why_top: int = 0
    state_ttl_s: float = 0.0  # 0 = keep user state forever
    #: live model quality (docs/OPERATIONS.md §8): the evaluation report (`demandstream evaluate`) of the
    #: loaded model whose prequential figures the drift alert compares with (empty: none); the relative
    #: drop below them the alert allows; open purchase propensities kept per partition (memory: ~250
    #: bytes each); and the event-time silence of a partition that censors the windows it falls in
    #: (demandstream.model.data.labels.DEFAULT_GAP_S, the offline evaluation's)
    quality_report: str = ""
    quality_drift_margin: float = 0.1
    quality_pending_max: int = 50000
    quality_gap_s: float = 3600.0
    #: category demand: tumbling event-time window (0 = off, the default: set 300 for 5-minute windows),
    #: how long after its end a window still takes events, and when a category is marked rising
    #: (docs/ARCHITECTURE.md §Category demand). Off by default because a window emits one record per
    #: category and partition: live, thousands of events share one; a replay of a month-long log in
    #: minutes closes thousands of windows and emits more demand records than signals (measured:
    #: 1.8 per event, half the worker's throughput; docs/BENCHMARKS.md)
    demand_window_s: int = 0
    demand_lateness_s: float = 60.0
    demand_rising_ratio: float = 1.5
    demand_rising_windows: int = 3
    demand_rising_min: float = 1.0
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
    #: a client certificate (PEM) for brokers that authenticate clients by TLS (mutual TLS), and its key
    #: (PEM, unencrypted; empty: in the certificate's file)
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    log_level: str = "info"
    lag_interval_s: float = 5.0
    processes: int = 1  # worker processes on this machine (`worker --processes N`), one core each
    kafka_script: str = ""  # kafka.sh for `bench` and the demo; empty: the checkout's deploy/kafka/kafka.sh
    # Fault tests only (tests/integration/test_faults_steps.py): exit at this step of the batch protocol,
    # once this many batches have completed. Empty (the default) disables the failpoints.
    fault_at: str = ""
    fault_after_batches: int = 3

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults, overridden by ``DEMANDSTREAM_*`` in ``env``, overridden by non-None ``overrides``."""
        env = os.environ if env is None else env
        for name, why in REMOVED_ENV_VARS.items():
            if env.get(name):
                logger.warning("%s is ignored: %s", name, why)
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
        for name in ("partitions", "standby_buffer", "batch_max", "top_k", "processes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{PREFIX}{name.upper()}: must be at least 1")
        if self.top_k > TOP_K_MAX:
            raise SettingsError(
                f"{PREFIX}TOP_K: at most {TOP_K_MAX} (a user's state keeps the last top categories; "
                f"got {self.top_k})"
            )
        if not 0 <= self.why_top <= WHY_TOP_MAX:
            raise SettingsError(
                f"{PREFIX}WHY_TOP: must be between 0 (off) and {WHY_TOP_MAX} (got {self.why_top})"
            )
        if self.demand_window_s < 0 or self.demand_lateness_s < 0 or self.demand_rising_min < 0:
            raise SettingsError(
                f"{PREFIX}DEMAND_WINDOW_S, {PREFIX}DEMAND_LATENESS_S and {PREFIX}DEMAND_RISING_MIN must not be negative"
            )
        if self.demand_rising_ratio <= 1 or self.demand_rising_windows < 1:
            raise SettingsError(
                f"{PREFIX}DEMAND_RISING_RATIO must be above 1 and {PREFIX}DEMAND_RISING_WINDOWS at least 1"
            )
        if self.topic_demand in (self.topic_input, self.topic_signals, self.topic_dlq, self.topic_control):
            raise SettingsError(
                f"{PREFIX}TOPIC_DEMAND: must be a topic of its own (got {self.topic_demand!r})"
            )
        for name, ok, rule in (
            ("QUALITY_DRIFT_MARGIN", 0 <= self.quality_drift_margin < 1, "must be in [0, 1)"),
            ("QUALITY_PENDING_MAX", self.quality_pending_max >= 0, "must not be negative"),
            ("QUALITY_GAP_S", self.quality_gap_s > 0, "must be positive"),
            # a Faust timer of interval 0 runs back to back: the gauges would take a core
            ("LAG_INTERVAL_S", self.lag_interval_s > 0, "must be positive"),
            ("STANDBY_REPLICAS", self.standby_replicas >= 0, "must not be negative"),
            ("REPLICATION", self.replication >= 0, "must not be negative (0: the cluster's default)"),
            ("STATE_TTL_S", self.state_ttl_s >= 0, "must not be negative (0: keep states forever)"),
        ):
            if not ok:
                raise SettingsError(f"{PREFIX}{name}: {rule} (got {getattr(self, name.lower())})")
        if not 0 <= self.commit_interval_s <= 3600:
            raise SettingsError(
                f"{PREFIX}COMMIT_INTERVAL_S: must be between 0 (automatic) and 3600 seconds (got {self.commit_interval_s})"
            )
        if self.changelog_max_compaction_lag_s <= 0:
            raise SettingsError(f"{PREFIX}CHANGELOG_MAX_COMPACTION_LAG_S: must be positive")
        if self.topic_control in (self.topic_input, self.topic_signals, self.topic_dlq):
            raise SettingsError(
                f"{PREFIX}TOPIC_CONTROL: must be a topic of its own (got {self.topic_control!r})"
            )
        if not 0 < self.web_port < 65536:
            raise SettingsError(f"{PREFIX}WEB_PORT: not a port: {self.web_port}")
        _check_broker(self.broker)
        self._check_tls_files()
        if self.web_advertised_url:
            _check_advertised_url(self.web_advertised_url)
        if self.web_token and self.web_token_file:
            raise SettingsError(f"{PREFIX}WEB_TOKEN and {PREFIX}WEB_TOKEN_FILE: set one of them, not both")
        if self.web_token:
            _check_token(f"{PREFIX}WEB_TOKEN", self.web_token)

    # -- derived --------------------------------------------------------------------------------

    @property
    def commit_interval(self) -> float:
        """Seconds between offset commits: ``commit_interval_s``, or when it is 0 the guarantee's default.

        >>> Settings().commit_interval, Settings(guarantee="exactly_once").commit_interval
        (2.8, 0.1)
        >>> Settings(guarantee="exactly_once", commit_interval_s=1.0).commit_interval
        1.0
        """
        if self.commit_interval_s > 0:
            return self.commit_interval_s
        return (
            EXACTLY_ONCE_COMMIT_INTERVAL_S
            if self.guarantee == "exactly_once"
            else AT_LEAST_ONCE_COMMIT_INTERVAL_S
        )

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

    def web_url(self) -> str:
        """The URL this worker advertises to the others (Faust's ``canonical_url``); the router forwards
        a request for a user this worker does not own to the owner's advertised URL, and treats a request
        as its own when the owner's URL is this one. The bind address (``web_host``) is separate: a
        wildcard such as ``0.0.0.0`` is no address another worker can reach, and advertising it would
        make every worker answer every user itself (404 for the users of the others), so it needs an
        explicit ``web_advertised_url``.

        >>> Settings(web_port=7000).web_url()
        'http://127.0.0.1:7000'
        >>> Settings(web_host="0.0.0.0", web_advertised_url="http://w-0.w-headless:6066/").web_url()
        'http://w-0.w-headless:6066'
        >>> Settings(web_host="::1").web_url()
        'http://[::1]:6066'
        """
        if self.web_advertised_url:
            return self.web_advertised_url.rstrip("/")
        if self.web_host.strip("[]") in WILDCARD_HOSTS:
            raise SettingsError(
                f"{PREFIX}WEB_HOST is {self.web_host!r}, which no other worker can reach: set "
                f"{PREFIX}WEB_ADVERTISED_URL to the URL other workers reach this one at "
                f"(e.g. http://<pod>.<headless service>:{self.web_port}; http://localhost:{self.web_port} "
                "for a single worker)"
            )
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        return f"http://{host}:{self.web_port}"

    def read_web_token(self) -> bytes | None:
        """The bearer token /users/{id}/demand requires, or None when none is configured.

        Read once, at start (restart the worker to rotate it). A file's surrounding whitespace (the
        newline of ``echo token > file``) is dropped. The token itself never appears in a message.
        """
        if self.web_token:
            return self.web_token.encode("ascii")
        if not self.web_token_file:
            return None
        name = f"{PREFIX}WEB_TOKEN_FILE"
        try:
            raw = Path(self.web_token_file).read_bytes()
        except OSError as e:
            raise SettingsError(f"{name}: cannot read {self.web_token_file!r}: {e.strerror}") from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SettingsError(f"{name}: {self.web_token_file!r} is not an ASCII token") from None
        _check_token(f"{name} ({self.web_token_file})", token)
        return token.encode("ascii")

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

    def _check_tls_files(self) -> None:
        """A TLS file that is set must be readable, and a client certificate needs TLS: the worker's TLS
        context and kafka-python would end in a traceback, or the certificate be silently unused."""
        if (self.ssl_certfile or self.ssl_keyfile) and not self.security_protocol.endswith("SSL"):
            raise SettingsError(
                f"{PREFIX}SSL_CERTFILE / {PREFIX}SSL_KEYFILE: a client certificate needs {PREFIX}SECURITY_PROTOCOL "
                f"SSL or SASL_SSL (got {self.security_protocol})"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise SettingsError(
                f"{PREFIX}SSL_KEYFILE: set {PREFIX}SSL_CERTFILE, the certificate it belongs to"
            )
        if not self.security_protocol.endswith("SSL"):
            return
        for name in TLS_FILES:
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise SettingsError(f"{PREFIX}{name.upper()}: cannot read {path!r}")

    @property
    def principal(self) -> str:
        """Who the cluster's ACLs see, as error lines name it (a certificate's subject is not read).

        >>> Settings(sasl_username="shop").principal
        'user shop'
        """
        return f"user {self.sasl_username}" if self.sasl_username else "this connection's principal"

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
        if self.security_protocol.endswith("SSL"):
            for name in TLS_FILES:
                if getattr(self, name):
                    kw[name] = getattr(self, name)
        return kw


#: The settings that name TLS files, as kafka-python's keywords name them.
TLS_FILES = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
#: Bind addresses that mean "every interface": never an address to advertise.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
#: A bearer token (RFC 6750 ``b64token``) of at least this many characters.
TOKEN_MIN_LEN = 16
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _check_token(name: str, token: str) -> None:
    """A token is one RFC 6750 word of at least 16 characters; the message never shows it."""
    if not _TOKEN.fullmatch(token) or len(token) < TOKEN_MIN_LEN:
        raise SettingsError(
            f"{name}: the token must be at least {TOKEN_MIN_LEN} characters of A-Z a-z 0-9 - . _ ~ + / "
            "(e.g. `openssl rand -hex 32`)"
        )


def _check_broker(broker: str) -> None:
    """``kafka://host:port``, several joined by commas, the scheme optional after the first (as
    :attr:`Settings.bootstrap_servers` reads it). Another scheme (``http://``, ``PLAINTEXT://``) used
    to be dropped in silence, and the command then waited 30 s to report an unreachable broker.

    >>> _check_broker("kafka://k1:9092,k2:9092"), _check_broker("127.0.0.1:19092"), _check_broker("[::1]:9092")
    (None, None, None)
    >>> _check_broker("http://k1:9092")
    Traceback (most recent call last):
    ...
    demandstream.stream.settings.SettingsError: --broker / DEMANDSTREAM_BROKER: must be kafka://host:port, several joined by commas (got 'http://k1:9092'); security is set by DEMANDSTREAM_SECURITY_PROTOCOL
    """
    bad = SettingsError(
        f"--broker / {PREFIX}BROKER: must be kafka://host:port, several joined by commas (got {broker!r}); "
        f"security is set by {PREFIX}SECURITY_PROTOCOL"
    )
    parts = [p.strip() for p in broker.split(",")]
    if not all(parts):
        raise bad
    for part in parts:
        try:
            url = urlsplit(part if "://" in part else "kafka://" + part)
            url.port  # noqa: B018  (raises ValueError on a port that is no number in range)
        except ValueError:
            raise bad from None
        if url.scheme != "kafka" or not url.hostname or url.username is not None or url.path not in ("", "/"):
            raise bad
        if url.query or url.fragment:
            raise bad


def _check_advertised_url(url: str) -> None:
    """``http://host:port``, nothing else: Faust routes to the host and port, and keeps the request's path.

    >>> _check_advertised_url("http://demandstream-0.demandstream-headless:6066")
    >>> _check_advertised_url("http://0.0.0.0:6066")
    Traceback (most recent call last):
    ...
    demandstream.stream.settings.SettingsError: DEMANDSTREAM_WEB_ADVERTISED_URL: must be http://host:port with a host other workers can reach (got 'http://0.0.0.0:6066')
    """
    bad = SettingsError(
        f"{PREFIX}WEB_ADVERTISED_URL: must be http://host:port with a host other workers can reach (got {url!r})"
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    if (
        parts.scheme != "http"
        or not parts.hostname
        or parts.hostname in WILDCARD_HOSTS
        or port is None
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise bad


def _convert(name: str, typ, raw: str):
    t = typ if isinstance(typ, type) else {"int": int, "float": float, "str": str}.get(str(typ), str)
    try:
        return t(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected {t.__name__}, got {raw!r}") from None


#: Every environment variable the code reads (deploy manifests are checked against it).
ENV_VARS: tuple[str, ...] = tuple(PREFIX + f.name.upper() for f in fields(Settings))
