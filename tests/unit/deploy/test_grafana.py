"""deploy/grafana/: the dashboard and its provisioning files."""

from __future__ import annotations

import json
import re

from deploy_spec import (
    DASHBOARD,
    GRAFANA_DIR,
    METRIC_FAMILIES,
    load_yaml_documents,
    promql_names,
    series_names,
)

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "demandstream"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_expressions_use_only_exported_metrics_and_their_labels() -> None:
    known = series_names()
    for title, expr in _exprs(_dashboard()):
        metrics, labels = promql_names(expr)
        assert metrics, f"{title}: no metric in {expr!r}"
        assert metrics <= known.keys(), f"{title}: unknown metrics {metrics - known.keys()}"
        allowed = set().union(*(known[name] for name in metrics))
        assert labels <= allowed, f"{title}: labels {labels - allowed} not on {metrics}"


def test_dashboard_shows_every_metric_family() -> None:
    used = set().union(*(promql_names(expr)[0] for _, expr in _exprs(_dashboard())))
    for family in METRIC_FAMILIES:
        assert any(name == family or name.startswith(f"{family}_") for name in used), family


def test_variables_query_exported_metrics() -> None:
    known = series_names()
    variables = {var["name"]: var for var in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    query = variables["instance"]["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
    assert label in known[metric]


def test_provisioning_points_at_the_dashboard_folder_and_prometheus() -> None:
    (datasources,) = load_yaml_documents(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"
    (providers,) = load_yaml_documents(GRAFANA_DIR / "provisioning" / "dashboards" / "demandstream.yml")
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
