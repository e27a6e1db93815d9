"""deploy/prometheus/: scrape config and alert rules, checked by promtool and against the metric contract."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from deploy_spec import PROMETHEUS_DIR, WEB_PORT, load_yaml_documents, promql_names, series_names

PROMTOOL = shutil.which("promtool")
#: promtool checks take well under a second; anything near this means it hangs.
PROMTOOL_TIMEOUT_S = 60

EXPECTED_ALERTS = {
    "DemandstreamWorkerDown",
    "ConsumerLagGrowing",
    "DeadLetterRateHigh",
    "SignalLatencyP99High",
    "NoSignalsWhileInputFlows",
    "CategoryQualityBelowOffline",
    "PurchaseLogLossAboveOffline",
}
SEVERITIES = {"critical", "warning"}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; `make` installs it on CI)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def _rules() -> list[dict]:
    (doc,) = load_yaml_documents(PROMETHEUS_DIR / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_expected_alerts_exist_with_severity_and_runbook() -> None:
    rules = _rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule.get("for"), f"{rule['alert']} would fire on a single evaluation"
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert f"Runbook: docs/OPERATIONS.md, {rule['alert']}." in annotations["description"]


def test_alert_expressions_use_only_exported_metrics_and_their_labels() -> None:
    known = series_names()
    for rule in _rules():
        metrics, labels = promql_names(rule["expr"])
        assert metrics, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert metrics <= known.keys(), f"{rule['alert']}: unknown metrics {metrics - known.keys()}"
        allowed = set().union(*(known[name] for name in metrics))
        assert labels <= allowed, f"{rule['alert']}: labels {labels - allowed} not on {metrics}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    (tests,) = load_yaml_documents(PROMETHEUS_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing, silent = set(), set()
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    assert firing == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


def test_scrape_config_targets_the_local_workers() -> None:
    (config,) = load_yaml_documents(PROMETHEUS_DIR / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    # alerts.yml selects up{job="demandstream"}: renaming the job silently disables the alert.
    assert job["job_name"] == "demandstream"
    assert 'job="demandstream"' in next(r["expr"] for r in _rules() if r["alert"] == "DemandstreamWorkerDown")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"127.0.0.1:{WEB_PORT}", f"127.0.0.1:{WEB_PORT + 1}"]
