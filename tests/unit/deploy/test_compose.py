"""deploy/docker-compose.yml: structure, ports, volumes and settings (no container engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

from deploy_spec import DEPLOY, PROMETHEUS_DIR, dockerfile_env, load_yaml_documents

WORKERS = ("worker-1", "worker-2")


def _compose() -> dict:
    (compose,) = load_yaml_documents(DEPLOY / "docker-compose.yml")
    return compose


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source (named volume or host path) of a service's volumes."""
    mounts = {}
    for spec in service.get("volumes", []):
        # The source may hold ":" itself (${MODEL_DIR:-../out}), so split from the right.
        head, _, mode = spec.rpartition(":")
        source, _, target = (head if mode in ("ro", "rw") else spec).rpartition(":")
        mounts[target] = source
    return mounts


def test_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"kafka", *WORKERS, "prometheus", "grafana"}
    # One config for dev and compose works only if everything shares the host's loopback.
    assert all(service["network_mode"] == "host" for service in services.values())


def test_kafka_is_a_single_kraft_node_of_apache_kafka_4() -> None:
    kafka = _compose()["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@127.0.0.1:9093"
    assert _mounts(kafka)["/var/lib/kafka/data"] == "kafka-data"
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def test_workers_reach_the_broker_it_advertises() -> None:
    services = _compose()["services"]
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in WORKERS:
        broker = services[name]["environment"]["DEMANDSTREAM_BROKER"]
        assert broker == "kafka://" + advertised.removeprefix("PLAINTEXT://")
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_worker_ports_are_the_scrape_targets() -> None:
    services = _compose()["services"]
    ports = {int(services[name]["environment"]["DEMANDSTREAM_WEB_PORT"]) for name in WORKERS}
    (config,) = load_yaml_documents(PROMETHEUS_DIR / "prometheus.yml")
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {int(target.rsplit(":", 1)[1]) for target in targets} == ports
    # On the host network a worker on 0.0.0.0 would be reachable from the whole LAN.
    assert all(services[name]["environment"]["DEMANDSTREAM_WEB_HOST"] == "127.0.0.1" for name in WORKERS)


def test_each_worker_has_its_own_data_volume_at_the_data_dir() -> None:
    compose = _compose()
    data_dir = dockerfile_env()["DEMANDSTREAM_DATA_DIR"]
    volumes = []
    for name in WORKERS:
        worker = compose["services"][name]
        assert worker["environment"]["DEMANDSTREAM_DATA_DIR"] == data_dir
        volumes.append(_mounts(worker)[data_dir])
    assert len(set(volumes)) == len(WORKERS)
    assert set(volumes) <= set(compose["volumes"])


def test_workers_load_the_model_from_the_mounted_folder() -> None:
    for name in WORKERS:
        worker = _compose()["services"][name]
        model = Path(worker["environment"]["DEMANDSTREAM_MODEL"])
        assert str(model.parent) in _mounts(worker)
        assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_prometheus_and_grafana_mount_files_that_exist() -> None:
    services = _compose()["services"]
    prometheus = _mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    # prometheus.yml names its rule file relatively: it must sit next to the config.
    assert prometheus["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    grafana = _mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert (
        grafana["/var/lib/grafana/dashboards/demandstream-dashboard.json"]
        == "./grafana/demandstream-dashboard.json"
    )
    for service in ("prometheus", "grafana"):
        for source in _mounts(services[service]).values():
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
