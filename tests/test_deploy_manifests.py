"""The deployment manifests in cluster/ and k8s/, checked offline with tests/support/manifests.py.

The tests run the checks on the files; test_check_catches_mutation runs them on copies broken in known
ways (a misspelt key, a wrong type, a bad import path, an unknown deployment, broken PromQL, ...), so
every check is shown able to fail. No cluster, Ray instance or network is needed; a missing schema or
tool skips its tests and says so.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable

import jsonschema
import pytest
import yaml

from tests.support.manifests import (
    BUILTIN_KINDS,
    CLUSTER,
    K8S,
    KUBECTL,
    KUBERAY,
    KUBERAY_CRDS,
    MONITORING_KINDS,
    PROMTOOL,
    SD_PORT_NAME,
    ManifestError,
    check_alert_metrics,
    check_builtin,
    check_kuberay_object,
    check_kustomization,
    check_launcher_config,
    check_launcher_wiring,
    check_monitoring,
    check_rayservice,
    check_rules,
    check_serve_config,
    check_worker_capacity,
    container_ports,
    head_container,
    k8s_object,
    k8s_objects,
    kustomization,
    load_one,
    serve_config_of,
    service_config,
    strict_schema,
    workers_per_node,
)
from tests.support.metrics import exported_names

needs_kuberay = pytest.mark.skipif(
    not all((KUBERAY / f).is_file() for f in KUBERAY_CRDS.values()),
    reason=f"KubeRay v1.7.0 CRD schemas not found in {KUBERAY} (shared/schemas/ beside the repository)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (for `kubectl kustomize`)")


def test_aws_launcher_config():
    cfg = load_one(CLUSTER / "aws.yaml")
    check_launcher_config(cfg)
    check_launcher_wiring(cfg, load_one(CLUSTER / "serve-config-aws.yaml"))


@pytest.mark.parametrize("name", ["serve-config.yaml", "serve-config-aws.yaml"])
def test_serve_deploy_config(name):
    check_serve_config(load_one(CLUSTER / name), name)


def test_local_multinode_script():
    script = CLUSTER / "local-multinode.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    nodes = int(re.search(r"MOE_WORKER_NODES:-(\d+)", text).group(1))
    gpus = int(re.search(r"MOE_GPUS_PER_NODE:-(\d+)", text).group(1))
    svc = service_config(load_one(CLUSTER / "serve-config.yaml"))
    for resource in svc.worker_resources:
        assert f'\\"{resource}\\": $GPUS' in text, f"worker nodes must declare the {resource} resource"
    fits = workers_per_node(svc, {k: gpus for k in svc.worker_resources}, gpus, 1, "a local worker node")
    check_worker_capacity(svc, nodes * fits, "the default local cluster's worker nodes")


@needs_kuberay
def test_kuberay_objects_match_crds():
    docs = [d for d in k8s_objects() if d["kind"] in KUBERAY_CRDS]
    assert [d["kind"] for d in docs] == ["RayService"]
    for doc in docs:
        check_kuberay_object(doc)


def test_rayservice_serve_config_and_wiring():
    check_rayservice(k8s_object("RayService"), crds=False)


def test_builtin_kinds_validate():
    docs = [d for d in k8s_objects() if d["kind"] not in set(KUBERAY_CRDS) | MONITORING_KINDS]
    assert {d["kind"] for d in docs} <= BUILTIN_KINDS, "an object of a kind this test does not know"
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    for doc in docs:
        check_builtin(doc)


def test_network_policy_opens_what_the_service_serves_and_no_more():
    """Every Ray pod is selected; Prometheus may reach exactly the metrics ports the RayService configures;
    the internal planes (expert workers' gRPC) are open only inside the RayService."""
    policy = k8s_object("NetworkPolicy")
    check_builtin(policy)
    rs = k8s_object("RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"a Ray pod the policy does not cover: {labels}"
    svc = service_config(serve_config_of(rs))
    assert svc.expert_port_range and svc.metrics_port_range, "fixed port ranges let the policy name the ports"
    rules = policy["spec"]["ingress"]
    own = [r for r in rules if r.get("from") == [{"podSelector": {"matchLabels": selector}}]]
    assert own and "ports" not in own[0], "traffic between the RayService's pods (Ray's own) must stay open"

    def opened(rule: dict) -> set[int]:
        return {p for x in rule.get("ports", []) for p in range(x["port"], x.get("endPort", x["port"]) + 1)}

    prometheus = next(r for r in rules if any("namespaceSelector" in f and f["namespaceSelector"]["matchLabels"].get(
        "kubernetes.io/metadata.name") == "monitoring" for f in r.get("from", [])))
    metrics = set(range(svc.metrics_port_range[0], svc.metrics_port_range[1] + 1)) | {8080, svc.sd_port}
    assert opened(prometheus) == metrics
    to_anyone = set().union(*(opened(r) for r in rules if "from" not in r))
    assert to_anyone == {9000, 8000}, "only the client API is open to every source"
    experts = set(range(svc.expert_port_range[0], svc.expert_port_range[1] + 1))
    assert not experts & set().union(*(opened(r) for r in rules if r not in own))


def test_grafana_dashboard_configmap():
    cm = k8s_object("ConfigMap", "moe-grafana-dashboard")
    check_builtin(cm)
    dashboard = json.loads(cm["data"]["moe-service.json"])
    assert dashboard["title"] == "moe-service"


@needs_promtool
def test_monitoring_objects():
    docs = [d for d in k8s_objects() if d["kind"] in MONITORING_KINDS]
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PodMonitor", "PrometheusRule", "ScrapeConfig"]
    for doc in docs:
        check_monitoring(doc)


def test_monitoring_wiring():
    """The PodMonitors select the Ray pods' labels and ports; the ScrapeConfig reaches the controller."""
    rs = k8s_object("RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    pods = {"head": [cluster["headGroupSpec"]], "worker": cluster["workerGroupSpecs"]}
    for pm in (d for d in k8s_objects() if d["kind"] == "PodMonitor"):
        labels = dict(pm["spec"]["selector"]["matchLabels"])
        node_type = labels.pop("ray.io/node-type")  # KubeRay sets it on every Ray pod
        for group in pods[node_type]:
            template = group["template"]
            assert labels.items() <= template["metadata"]["labels"].items(), pm["metadata"]["name"]
            names = container_ports(template["spec"]["containers"][0])
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in names, f"{pm['metadata']['name']}: no port named {ep['port']} on {node_type}"
    sd_port = container_ports(head_container(cluster))[SD_PORT_NAME]
    url = f"http://{rs['metadata']['name']}-head-svc.{kustomization()['namespace']}.svc:{sd_port}/targets"
    (sd,) = k8s_object("ScrapeConfig")["spec"]["httpSDConfigs"]
    assert sd["url"] == url, "the ScrapeConfig must point at the head service's moe-sd port in this namespace"


@needs_promtool
def test_alert_rules():
    alerts = load_one(K8S / "prometheus" / "alerts.yaml")
    check_rules(alerts)
    assert k8s_object("PrometheusRule")["spec"]["groups"] == alerts["groups"], \
        "k8s/prometheus/prometheusrule.yaml and alerts.yaml must hold the same rules"
    r = subprocess.run([PROMTOOL, "test", "rules", str(K8S / "prometheus" / "alerts_test.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_prometheus_config_for_ray_clusters():
    r = subprocess.run([PROMTOOL, "check", "config", str(CLUSTER / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_metrics_are_defined_by_the_package():
    check_alert_metrics(load_one(K8S / "prometheus" / "alerts.yaml"), exported_names())


def test_kustomization():
    check_kustomization(kustomization())


@needs_kubectl
def test_kustomize_build():
    r = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    k = kustomization()
    assert len(docs) == len(k8s_objects())
    wanted = {f"{i['newName']}:{i['newTag']}" for i in k["images"]}
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = rs["spec"]["rayClusterConfig"]
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == wanted, "kustomize did not set the Ray pods' images"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == k["namespace"]
        if d["kind"] in BUILTIN_KINDS:
            check_builtin(d)


@needs_kuberay
def test_strict_crd_schema_keeps_int_or_string():
    translated = strict_schema({"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True}}})
    validator = jsonschema.Draft7Validator(translated)
    assert validator.is_valid({"q": 1}) and validator.is_valid({"q": "1"}) and not validator.is_valid({"q": 1.5})
    assert not validator.is_valid({"q": 1, "extra": 2})
    rs = copy.deepcopy(k8s_object("RayService"))
    limits = _gpu_group(rs)["template"]["spec"]["containers"][0]["resources"]
    limits["limits"]["nvidia.com/gpu"] = 1  # a Kubernetes quantity may be an integer
    limits["requests"]["cpu"] = 8
    check_kuberay_object(rs)


# ---------------------------------------------------------------------------------------- mutations

def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _serve_v2(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """A mutation of the Serve config inside a RayService."""
    def mutate(rs: dict) -> None:
        cfg = serve_config_of(rs)
        edit(cfg)
        rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    return mutate


def _app(cfg: dict) -> dict:
    return cfg["applications"][0]


def _cluster(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]


def _gpu_group(rs: dict) -> dict:
    """The expert workers' group."""
    return next(g for g in _cluster(rs)["workerGroupSpecs"] if g["groupName"] == "gpu-experts")


def _rule(doc: dict, name: str) -> dict:
    groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
    return next(r for g in groups for r in g["rules"] if r.get("alert") == name)


def _monitoring(kind: str) -> tuple[dict, Callable[[dict], None]]:
    return copy.deepcopy(k8s_object(kind)), check_monitoring


TARGETS: dict[str, Callable[[], tuple[dict, Callable[[dict], None]]]] = {
    "aws": lambda: (load_one(CLUSTER / "aws.yaml"), lambda c: (
        check_launcher_config(c), check_launcher_wiring(c, load_one(CLUSTER / "serve-config-aws.yaml")))),
    "serve": lambda: (load_one(CLUSTER / "serve-config.yaml"), check_serve_config),
    "serve-aws": lambda: (load_one(CLUSTER / "serve-config-aws.yaml"), check_serve_config),
    "rayservice": lambda: (copy.deepcopy(k8s_object("RayService")),
                           lambda d: check_rayservice(d, crds=KUBERAY.is_dir())),
    "configmap": lambda: (copy.deepcopy(k8s_object("ConfigMap")), check_builtin),
    "pvc": lambda: (copy.deepcopy(k8s_object("PersistentVolumeClaim")), check_builtin),
    "podmonitor": lambda: (copy.deepcopy(k8s_object("PodMonitor", "moe-ray-head")), check_monitoring),
    "scrapeconfig": lambda: _monitoring("ScrapeConfig"),
    "prometheusrule": lambda: _monitoring("PrometheusRule"),
    "alerts": lambda: (load_one(K8S / "prometheus" / "alerts.yaml"), check_rules),
    "alert-metrics": lambda: (load_one(K8S / "prometheus" / "alerts.yaml"),
                              lambda d: check_alert_metrics(d, exported_names())),
    "kustomization": lambda: (kustomization(), check_kustomization),
}

# (case id, target, mutation, what the error must mention, tools needed)
MUTATIONS = [
    # Ray cluster launcher
    ("launcher-misspelt-key", "aws",
     lambda c: _rename(c["available_node_types"]["worker.gpu"], "min_workers", "min_worker"), "min_worker", ()),
    ("launcher-wrong-type", "aws", lambda c: c.__setitem__("max_workers", "eight"), "eight", ()),
    ("launcher-fractional-resource", "aws",
     lambda c: c["available_node_types"]["worker.gpu"]["resources"].__setitem__("GPU", 0.5), "0.5", ()),
    ("launcher-unknown-head-type", "aws", lambda c: c.__setitem__("head_node_type", "head.gpu"), "head_node_type",
     ()),
    ("launcher-no-expert-resource", "aws",
     lambda c: c["available_node_types"]["worker.gpu"]["resources"].pop("expert_worker"), "expert_worker", ()),
    # `serve deploy` configs
    ("serve-misspelt-top-key", "serve", lambda c: _rename(c, "grpc_options", "grpc_option"), "grpc_option", ()),
    ("serve-misspelt-app-key", "serve", lambda c: _rename(_app(c), "import_path", "import_paht"), "import_paht", ()),
    ("serve-misspelt-deployment-key", "serve",
     lambda c: _rename(_app(c)["deployments"][0], "graceful_shutdown_timeout_s", "graceful_shutdown_timeout"),
     "graceful_shutdown_timeout", ()),
    ("serve-wrong-type", "serve", lambda c: c["http_options"].__setitem__("port", "eighty"), "port", ()),
    ("serve-bad-import-attr", "serve",
     lambda c: _app(c).__setitem__("import_path", "moe_service.serving.gateway.app:build_ap"), "build_ap", ()),
    ("serve-bad-import-module", "serve",
     lambda c: _app(c).__setitem__("import_path", "moe_service.serving.ap:build_app"), "moe_service.serving.ap", ()),
    ("serve-bad-servicer", "serve",
     lambda c: c["grpc_options"]["grpc_servicer_functions"].__setitem__(
         0, "moe_service.transport.pb.moe_pb2_grpc.add_InferenceServicer_to_serve"), "add_InferenceServicer", ()),
    ("serve-unknown-deployment", "serve",
     lambda c: _app(c)["deployments"][0].__setitem__("name", "MoEGatway"), "MoEGatway", ()),
    ("serve-unknown-arg", "serve", lambda c: _rename(_app(c)["args"], "workers", "num_workers"), "num_workers", ()),
    ("serve-bad-arg-value", "serve", lambda c: _app(c)["args"].__setitem__("workers", 0), "workers", ()),
    ("serve-unknown-scheduler-key", "serve-aws",
     lambda c: _rename(_app(c)["args"]["scheduler"], "max_queue", "queue_size"), "queue_size", ()),
    ("serve-bad-worker-autoscaling", "serve-aws",
     lambda c: _rename(_app(c)["args"]["autoscaling"], "max_workers", "max_worker"), "max_worker", ()),
    ("serve-misspelt-autoscaling-key", "serve-aws",
     lambda c: _rename(_app(c)["args"]["gateway_autoscaling"], "max_replicas", "max_replica"), "max_replica", ()),
    # RayService: CRD
    ("rayservice-misspelt-key", "rayservice",
     lambda r: _rename(_cluster(r), "workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec", ("kuberay",)),
    ("rayservice-wrong-type", "rayservice", lambda r: _gpu_group(r).__setitem__("maxReplicas", "8"), "'8'",
     ("kuberay",)),
    ("rayservice-misspelt-container-key", "rayservice",
     lambda r: head_container(_cluster(r)).__setitem__("imagePullPolice", "Always"), "imagePullPolice", ("kuberay",)),
    ("rayservice-missing-required", "rayservice", lambda r: _gpu_group(r).pop("groupName"), "groupName",
     ("kuberay",)),
    ("rayservice-bad-quantity", "rayservice",
     lambda r: _gpu_group(r)["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__(
         "nvidia.com/gpu", "one"), "one", ("kuberay",)),
    # RayService: serveConfigV2
    ("serveconfigv2-misspelt-key", "rayservice",
     _serve_v2(lambda c: _rename(c, "proxy_location", "proxy_locaton")), "proxy_locaton", ()),
    ("serveconfigv2-bad-import", "rayservice",
     _serve_v2(lambda c: _app(c).__setitem__("import_path", "moe_service.serving.gateway.app:app")), "moe_service", ()),
    ("serveconfigv2-unknown-deployment", "rayservice",
     _serve_v2(lambda c: _app(c)["deployments"][0].__setitem__("name", "Gateway")), "Gateway", ()),
    ("serveconfigv2-unknown-arg", "rayservice",
     _serve_v2(lambda c: _app(c)["args"].__setitem__("gpu_per_worker", 1)), "gpu_per_worker", ()),
    # RayService: wiring between the pods and the Serve config
    ("wiring-grpc-port-name", "rayservice",
     lambda r: next(p for p in head_container(_cluster(r))["ports"] if p["name"] == "grpc").__setitem__(
         "name", "grpc-api"), "'grpc'", ()),
    ("wiring-grpc-port-number", "rayservice",
     _serve_v2(lambda c: c["grpc_options"].__setitem__("port", 9002)), "9002", ()),
    ("wiring-grpc-front-limit", "rayservice",
     _serve_v2(lambda c: _app(c)["args"]["scheduler"].__setitem__("max_queue", 512)), "1632", ()),
    ("wiring-no-expert-resource", "rayservice",
     lambda r: _gpu_group(r)["rayStartParams"].pop("resources"), "expert_worker", ()),
    ("wiring-model-not-mounted", "rayservice",
     _serve_v2(lambda c: _app(c)["args"].__setitem__("model", "/data/DeepSeek-V2-Lite")), "/data/DeepSeek-V2-Lite",
     ()),
    ("wiring-model-changed-in-place", "rayservice",
     _serve_v2(lambda c: _app(c)["args"].__setitem__("model", "/models/DeepSeek-V2-Lite-Chat")),
     "moe-service/model", ()),
    ("wiring-too-few-gpu-pods", "rayservice", lambda r: _gpu_group(r).update(maxReplicas=6, replicas=4), "at most",
     ()),
    ("wiring-gateways-exceed-pods", "rayservice",
     _serve_v2(lambda c: _app(c)["args"]["gateway_autoscaling"].__setitem__("max_replicas", 5)), "at most 3 gateway",
     ()),
    ("wiring-gpu-limit", "rayservice",
     _serve_v2(lambda c: _app(c)["args"].__setitem__("gpus_per_worker", 2)), "exceed its 1.0 GPU", ()),
    ("wiring-gateway-gpus-nowhere", "rayservice",
     lambda r: _cluster(r)["workerGroupSpecs"].pop(0), "at most 0 gateway replicas", ()),
    ("wiring-no-token-auth", "rayservice", lambda r: _cluster(r).pop("authOptions"), "authOptions.mode", ()),
    ("launcher-no-token-auth", "aws", lambda c: c["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"),
     "RAY_AUTH_MODE=token", ()),
    ("launcher-token-in-repo", "aws", lambda c: c["file_mounts"].__setitem__("/home/ray/.ray/auth_token", "auth_token"),
     "outside the repository", ()),
    ("launcher-gateway-gpus-nowhere", "aws",
     lambda c: c["available_node_types"].pop("worker.gateway"), "at most 0 gateway replicas", ()),
    # built-in kinds
    ("configmap-misspelt-key", "configmap", lambda d: _rename(d, "data", "dat"), "dat", ()),
    ("configmap-dashboard-not-json", "configmap",
     lambda d: d["data"].__setitem__("moe-service.json", "{title: moe-service"), "moe-service.json", ()),
    ("pvc-wrong-type", "pvc", lambda d: d["spec"].__setitem__("accessModes", "ReadWriteMany"), "ReadWriteMany", ()),
    # Prometheus operator objects and rules
    ("podmonitor-misspelt-key", "podmonitor",
     lambda d: _rename(d["spec"], "podMetricsEndpoints", "podMetricEndpoints"), "podMetricEndpoints", ()),
    ("scrapeconfig-misspelt-key", "scrapeconfig", lambda d: _rename(d["spec"], "httpSDConfigs", "httpSDConfig"),
     "httpSDConfig", ()),
    ("scrapeconfig-url-without-scheme", "scrapeconfig",
     lambda d: d["spec"]["httpSDConfigs"][0].__setitem__("url", "moe-head-svc:9095/targets"), "moe-head-svc", ()),
    ("prometheusrule-wrong-api-version", "prometheusrule",
     lambda d: d.__setitem__("apiVersion", "monitoring.coreos.com/v2"), "monitoring.coreos.com/v2", ()),
    ("prometheusrule-broken-promql", "prometheusrule",
     lambda d: _rule(d, "MoEServerErrors").__setitem__("expr", "sum(rate(moe_requests_total[5m])"), "parse",
     ("promtool",)),
    ("prometheusrule-bad-duration", "prometheusrule",
     lambda d: _rule(d, "MoEExpertWorkerDown").__setitem__("for", "5 minutes"), "5 minutes", ()),
    ("alerts-broken-promql", "alerts",
     lambda d: _rule(d, "MoEExpertWorkerDown").__setitem__("expr", "moe_worker_up =="), "parse", ("promtool",)),
    ("alerts-misspelt-key", "alerts", lambda d: _rename(_rule(d, "MoELayerImbalanced"), "expr", "expresion"),
     "expresion", ("promtool",)),
    ("alerts-bad-template", "alerts",
     lambda d: _rule(d, "MoEExpertWorkerDown")["annotations"].__setitem__("summary", "{{ $labels.worker "),
     "summary", ("promtool",)),
    ("alerts-unknown-metric", "alert-metrics",
     lambda d: _rule(d, "MoEExpertWorkerDown").__setitem__("expr", "moe_worker_upp == 0"), "moe_worker_upp", ()),
    ("alerts-no-service-metric", "alert-metrics",
     lambda d: [r.__setitem__("expr", "up == 0") for g in d["groups"] for r in g["rules"]], "none of", ()),
    # kustomization
    ("kustomization-missing-file", "kustomization", lambda k: k["resources"].append("service.yaml"),
     "service.yaml", ()),
    ("kustomization-unset-image", "kustomization", lambda k: k["images"].pop(), "moe-service-gpu", ()),
]


@pytest.mark.parametrize("target, mutate, expect, needs", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_check_catches_mutation(target, mutate, expect, needs):
    if "kuberay" in needs and not KUBERAY.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRD schemas not found in {KUBERAY}")
    if ("promtool" in needs or target in ("prometheusrule", "alerts")) and PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    doc, check = TARGETS[target]()
    mutate(doc)
    with pytest.raises(ManifestError, match=re.escape(expect)):
        check(doc)
