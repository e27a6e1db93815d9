"""deploy/k8s/: manifests checked structurally (no cluster here): wiring, ports, probes, data volume, the web
token and advertised URL, the NetworkPolicy."""

from __future__ import annotations

from deploy_spec import K8S_DIR, WEB_PORT, load_yaml_documents

MANIFESTS = ("configmap.yaml", "service.yaml", "statefulset.yaml", "pdb.yaml", "networkpolicy.yaml")


def _objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for name in MANIFESTS:
        for doc in load_yaml_documents(K8S_DIR / name):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _by_kind(kind: str) -> list[dict]:
    return [doc for (doc_kind, _), doc in _objects().items() if doc_kind == kind]


def _statefulset() -> dict:
    (statefulset,) = _by_kind("StatefulSet")
    return statefulset


def _worker() -> dict:
    (container,) = _statefulset()["spec"]["template"]["spec"]["containers"]
    return container


def _config() -> dict[str, str]:
    (config,) = _by_kind("ConfigMap")
    return config["data"]


def test_manifests_are_namespace_agnostic_and_listed_in_kustomization() -> None:
    objects = _objects()
    assert {kind for kind, _ in objects} == {
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for (kind, name), doc in objects.items():
        assert "namespace" not in doc["metadata"], f"{kind}/{name}"
    (kustomization,) = load_yaml_documents(K8S_DIR / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    assert "namespace" not in kustomization


def test_configmap_values_are_strings() -> None:
    # Kubernetes rejects a ConfigMap whose data holds a YAML number or boolean.
    assert all(isinstance(value, str) for value in _config().values())


def test_worker_takes_settings_from_the_configmap_and_listens_on_all_interfaces() -> None:
    (config,) = _by_kind("ConfigMap")
    worker = _worker()
    assert worker["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    env = {item["name"]: item for item in worker["env"]}
    assert env["DEMANDSTREAM_WEB_HOST"]["value"] == "0.0.0.0"
    for secret_var in ("DEMANDSTREAM_SASL_USERNAME", "DEMANDSTREAM_SASL_PASSWORD"):
        assert secret_var not in config["data"]
        assert env[secret_var]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_ports_agree() -> None:
    statefulset = _statefulset()
    assert _config()["DEMANDSTREAM_WEB_PORT"] == str(WEB_PORT)
    (port,) = _worker()["ports"]
    assert (port["name"], port["containerPort"]) == ("web", WEB_PORT)
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(WEB_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    for service in _by_kind("Service"):
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == WEB_PORT
        assert service_port["targetPort"] == "web"


def test_probes() -> None:
    worker = _worker()
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "web"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    assert worker["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_data_dir_is_the_claimed_volume() -> None:
    statefulset = _statefulset()
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in _worker()["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == _config()["DEMANDSTREAM_DATA_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_model_path_is_on_the_model_volume_filled_by_the_init_container() -> None:
    model_path = _config()["DEMANDSTREAM_MODEL"]
    mounts = {mount["mountPath"]: mount for mount in _worker()["volumeMounts"]}
    model_dir = model_path.rsplit("/", 1)[0]
    assert mounts[model_dir]["readOnly"] is True
    (init,) = _statefulset()["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == model_path
    assert [mount["mountPath"] for mount in init["volumeMounts"]] == [model_dir]


def test_selectors_match_the_pods() -> None:
    statefulset = _statefulset()
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selectors = [statefulset["spec"]["selector"]["matchLabels"]]
    selectors += [pdb["spec"]["selector"]["matchLabels"] for pdb in _by_kind("PodDisruptionBudget")]
    selectors += [policy["spec"]["podSelector"]["matchLabels"] for policy in _by_kind("NetworkPolicy")]
    selectors += [service["spec"]["selector"] for service in _by_kind("Service")]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()


def test_statefulset_is_governed_by_the_headless_service() -> None:
    services = {service["metadata"]["name"]: service for service in _by_kind("Service")}
    headless = services[_statefulset()["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


def test_pods_run_as_the_image_user() -> None:
    pod = _statefulset()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] != 0


def test_each_worker_advertises_its_headless_service_name_not_its_bind_address() -> None:
    # Faust forwards a request for a user another worker owns to that worker's advertised URL; with the
    # bind address 0.0.0.0 advertised, every pod would think every user is its own (404 for the others').
    env = {item["name"]: item for item in _worker()["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    url = env["DEMANDSTREAM_WEB_ADVERTISED_URL"]["value"]
    service = _statefulset()["spec"]["serviceName"]
    assert url == f"http://$(POD_NAME).{service}:$(DEMANDSTREAM_WEB_PORT)"
    # $(VAR) is expanded only from variables defined before it (envFrom first, then env in order)
    names = [item["name"] for item in _worker()["env"]]
    assert names.index("POD_NAME") < names.index("DEMANDSTREAM_WEB_ADVERTISED_URL")
    assert "DEMANDSTREAM_WEB_PORT" in _config()


def test_the_web_token_is_a_file_from_a_required_secret() -> None:
    env = {item["name"]: item for item in _worker()["env"]}
    assert "DEMANDSTREAM_WEB_TOKEN" not in env and "DEMANDSTREAM_WEB_TOKEN" not in _config()
    token_file = env["DEMANDSTREAM_WEB_TOKEN_FILE"]["value"]
    mounts = {mount["mountPath"]: mount for mount in _worker()["volumeMounts"]}
    mount = mounts[token_file.rsplit("/", 1)[0]]
    assert mount["readOnly"] is True
    volumes = {volume["name"]: volume for volume in _statefulset()["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "demandstream-web"
    assert secret.get("optional", False) is False  # no Secret, no pod: never an open API by accident
    assert secret["defaultMode"] & 0o007 == 0  # not world-readable
    assert token_file.rsplit("/", 1)[1] == "token"


def _policy() -> dict:
    (policy,) = _by_kind("NetworkPolicy")
    return policy["spec"]


def test_network_policy_opens_only_the_web_port_to_the_namespace_ingress_and_prometheus() -> None:
    spec = _policy()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "web", "protocol": "TCP"}]
    peers = rule["from"]
    assert {"podSelector": {}} in peers  # this namespace's pods (no namespaceSelector: same namespace)
    assert all("ipBlock" not in peer for peer in peers)
    others = [peer for peer in peers if "namespaceSelector" in peer]
    assert {tuple(p["namespaceSelector"]["matchLabels"].values()) for p in others} == {
        ("ingress-nginx",),
        ("monitoring",),
    }
    (prometheus,) = [
        p
        for p in others
        if p["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    ]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_network_policy_lets_workers_reach_kafka_dns_and_each_other() -> None:
    egress = _policy()["egress"]
    ports = [(port["port"], port.get("protocol", "TCP")) for rule in egress for port in rule["ports"]]
    broker_port = int(_config()["DEMANDSTREAM_BROKER"].rsplit(":", 1)[1])
    assert (broker_port, "TCP") in ports
    assert (53, "UDP") in ports and (53, "TCP") in ports
    (to_workers,) = [rule for rule in egress if rule["ports"] == [{"port": "web", "protocol": "TCP"}]]
    pod_labels = _statefulset()["spec"]["template"]["metadata"]["labels"]
    (peer,) = to_workers["to"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
