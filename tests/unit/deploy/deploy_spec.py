"""What the deployment artifacts in deploy/ are checked against.

The worker's contract (docs/ARCHITECTURE.md §CLI and §Metrics) written once for the tests in this folder: the
settings it reads, the metrics it exports with their label names, and a small PromQL scanner that lists
the metric and label names an expression uses.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
K8S_DIR = DEPLOY / "k8s"
DASHBOARD = GRAFANA_DIR / "demandstream-dashboard.json"

#: The worker's default web port (metrics, probes, user views).
WEB_PORT = 6066

#: Settings the worker documents (ops brief); demandstream.stream.settings.ENV_VARS must contain at least these.
DOCUMENTED_ENV_VARS: frozenset[str] = frozenset(
    {
        "DEMANDSTREAM_BROKER",
        "DEMANDSTREAM_MODEL",
        "DEMANDSTREAM_APP_ID",
        "DEMANDSTREAM_DATA_DIR",
        "DEMANDSTREAM_WEB_HOST",
        "DEMANDSTREAM_WEB_PORT",
        "DEMANDSTREAM_WEB_ADVERTISED_URL",
        "DEMANDSTREAM_WEB_TOKEN",
        "DEMANDSTREAM_WEB_TOKEN_FILE",
        "DEMANDSTREAM_GUARANTEE",
        "DEMANDSTREAM_DEVICE",
        "DEMANDSTREAM_TOPIC_INPUT",
        "DEMANDSTREAM_TOPIC_SIGNALS",
        "DEMANDSTREAM_TOPIC_DLQ",
        "DEMANDSTREAM_TOPIC_CONTROL",
        "DEMANDSTREAM_TABLE",
        "DEMANDSTREAM_PARTITIONS",
        "DEMANDSTREAM_PARTITIONER",
        "DEMANDSTREAM_REPLICATION",
        "DEMANDSTREAM_STANDBY_REPLICAS",
        "DEMANDSTREAM_STORE",
        "DEMANDSTREAM_BATCH_MAX",
        "DEMANDSTREAM_TOP_K",
        "DEMANDSTREAM_STATE_TTL_S",
        "DEMANDSTREAM_PSEUDONYM_KEY",
        "DEMANDSTREAM_SECURITY_PROTOCOL",
        "DEMANDSTREAM_SASL_MECHANISM",
        "DEMANDSTREAM_SASL_USERNAME",
        "DEMANDSTREAM_SASL_PASSWORD",
        "DEMANDSTREAM_SSL_CAFILE",
        "DEMANDSTREAM_LOG_LEVEL",
    }
)

#: Exported metric families (docs/ARCHITECTURE.md §Metrics) -> their own label names.
METRIC_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "demandstream_events_total": ("counter", frozenset({"result"})),
    "demandstream_signals_total": ("counter", frozenset()),
    "demandstream_dead_letters_total": ("counter", frozenset({"reason"})),
    "demandstream_batch_size": ("histogram", frozenset()),
    "demandstream_inference_seconds": ("histogram", frozenset()),
    "demandstream_event_to_signal_seconds": ("histogram", frozenset()),
    # each phase of a micro-batch (issue #14: what sets the latency p99)
    "demandstream_batch_phase_seconds": ("histogram", frozenset({"phase"})),
    "demandstream_state_users": ("gauge", frozenset()),
    "demandstream_consumer_lag": ("gauge", frozenset({"partition"})),
    "demandstream_model_info": ("gauge", frozenset({"model_version", "device", "hidden", "categories"})),
    # states deleted by the inactivity TTL (issue #5)
    "demandstream_expired_states_total": ("counter", frozenset()),
    # stored states that could not be decoded and were reset (issue #13 item 7)
    "demandstream_undecodable_states_total": ("counter", frozenset()),
    "demandstream_misrouted_records_total": ("counter", frozenset()),
    # live model quality (issue #15 item 1): prequential counts per model version
    "demandstream_quality_category_points_total": ("counter", frozenset({"model_version"})),
    "demandstream_quality_category_hits_total": ("counter", frozenset({"model_version", "k"})),
    "demandstream_quality_category_reciprocal_rank_total": ("counter", frozenset({"model_version"})),
    "demandstream_quality_purchase_points_total": ("counter", frozenset({"model_version"})),
    "demandstream_quality_purchase_positives_total": ("counter", frozenset({"model_version"})),
    "demandstream_quality_purchase_logloss_total": ("counter", frozenset({"model_version"})),
    "demandstream_quality_calibration_points_total": ("counter", frozenset({"model_version", "bucket"})),
    "demandstream_quality_calibration_predicted_total": ("counter", frozenset({"model_version", "bucket"})),
    "demandstream_quality_calibration_positives_total": ("counter", frozenset({"model_version", "bucket"})),
    "demandstream_quality_purchase_unresolved_total": ("counter", frozenset({"model_version", "reason"})),
    "demandstream_quality_purchase_pending": ("gauge", frozenset()),
    "demandstream_quality_offline": ("gauge", frozenset({"model_version", "metric"})),
    "demandstream_quality_drift_margin": ("gauge", frozenset()),
}

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: Bucket bound label of histogram series.
HISTOGRAM_LABEL = "le"


def series_names() -> dict[str, frozenset[str]]:
    """Every series name a query may use -> the label names it carries.

    >>> sorted(series_names()["demandstream_batch_size_bucket"])
    ['instance', 'job', 'le']
    >>> "demandstream_batch_size" in series_names()
    False
    """
    names: dict[str, frozenset[str]] = {"up": TARGET_LABELS}
    for family, (kind, labels) in METRIC_FAMILIES.items():
        labels = labels | TARGET_LABELS
        if kind == "histogram":
            names[f"{family}_bucket"] = labels | {HISTOGRAM_LABEL}
            names[f"{family}_sum"] = labels
            names[f"{family}_count"] = labels
        else:
            names[family] = labels
    return names


def code_env_vars() -> frozenset[str] | None:
    """The DEMANDSTREAM_* names the worker really reads, or None while demandstream.stream.settings is not written."""
    try:
        from demandstream.stream.settings import ENV_VARS
    except ImportError:
        return None
    return frozenset(ENV_VARS)


_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
_LABEL_NAME = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names used by a PromQL expression.

    A scanner, not a parser: enough for the expressions in deploy/, which tests keep honest by
    checking every name it returns. Grafana variables ($instance, $__rate_interval) are ignored.

    >>> metrics, labels = promql_names(
    ...     'sum by (le) (rate(demandstream_batch_size_bucket{instance=~"$i"}[5m])) > 0.5')
    >>> sorted(metrics), sorted(labels)
    (['demandstream_batch_size_bucket'], ['instance', 'le'])
    >>> metrics, labels = promql_names('up{job="demandstream"} == 0 unless on (instance) foo offset 5m')
    >>> sorted(metrics), sorted(labels)
    (['foo', 'up'], ['instance', 'job'])
    """
    strings_removed = _STRING.sub('""', expr)
    labels: set[str] = set()
    for match in _MATCHERS.finditer(strings_removed):
        labels.update(_LABEL_NAME.findall(match.group(1)))
    without_matchers = _MATCHERS.sub(" ", strings_removed)
    for match in _GROUPING.finditer(without_matchers):
        labels.update(name.strip() for name in match.group(2).split(",") if name.strip())
    without_grouping = _GROUPING.sub(" ", without_matchers)
    without_ranges = _RANGE.sub(" ", without_grouping)
    metrics = set()
    for match in _IDENT.finditer(without_ranges):
        name = match.group(0)
        is_call = without_ranges[match.end() :].lstrip().startswith("(")
        if not is_call and name.lower() not in _KEYWORDS:
            metrics.add(name)
    return metrics, labels


def load_yaml_documents(path: Path) -> list[dict]:
    """All YAML documents of a file, empty documents dropped."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def env_names_in_text(text: str) -> set[str]:
    """Every DEMANDSTREAM_* token in a file, comments included: a stale name in a comment misleads too.

    >>> sorted(env_names_in_text("DEMANDSTREAM_BROKER: x  # see DEMANDSTREAM_WEB_PORT"))
    ['DEMANDSTREAM_BROKER', 'DEMANDSTREAM_WEB_PORT']
    """
    return set(re.findall(r"\bDEMANDSTREAM_[A-Z0-9_]*[A-Z0-9]", text))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def dockerfile_env() -> dict[str, str]:
    """Variables set by ENV instructions (KEY=VALUE form)."""
    env = {}
    for args in (args for keyword, args in dockerfile_instructions() if keyword == "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env
