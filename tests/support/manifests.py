"""Offline checks of the deployment manifests in cluster/ and k8s/: each `check_*` function raises
ManifestError saying where and what is wrong (tests/test_deploy_manifests.py runs them on the files and on
copies broken in known ways).

Structure comes from schemas: Ray's cluster launcher schema (ray/autoscaler/ray-schema.json), Serve's
ServeDeploySchema (with the key names checked here, as it ignores unknown ones), the KubeRay v1.7.0 CRDs'
openAPIV3Schema in ../shared/schemas/ (made strict: a misspelt key fails), kubernetes-validate for
built-in kinds, promtool for PromQL and rule files, and a strict subset of the Prometheus operator's
fields (no CRD of it ships here). What no schema can say is checked by hand: import paths and deployment
names, the application's args, and how pods and the Serve config fit together (ports, GPU and CPU
arithmetic for expert workers and gateways, token authentication, the model's volume).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shutil
import subprocess
import tempfile
import typing
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
K8S = ROOT / "k8s"
KUBERAY = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
KUBERAY_CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")
BUILTIN_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "ServiceAccount",
                 "NetworkPolicy"}
MONITORING_KINDS = {"PodMonitor", "ScrapeConfig", "PrometheusRule"}
SD_PORT_NAME = "moe-sd"  # the head container port of the controller's Prometheus http_sd endpoint


class ManifestError(Exception):
    """A manifest is invalid; the message says where and why."""


# ---------------------------------------------------------------------------------------------- loading

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are ~18k lines each


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def kustomization() -> dict:
    return load_one(K8S / "kustomization.yaml")


def k8s_objects() -> list[dict]:
    """Every object of the kustomization's resources, in order."""
    return [d for res in kustomization()["resources"] for d in load_docs(K8S / res)]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [d for d in k8s_objects() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def head_container(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]  # KubeRay: Ray runs in the first


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def ray_cpus(group: dict) -> float:
    """The logical CPUs of one Ray pod of a group: num-cpus, else KubeRay's default, the container's CPU limit."""
    value = group.get("rayStartParams", {}).get("num-cpus")
    if value is None:
        value = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("cpu", 0)
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def ray_resources_param(value: str) -> dict[str, float]:
    """rayStartParams `resources` as KubeRay's docs write it: '"{\\"name\\": 1}"' (a shell-quoted JSON string)."""
    text = value.strip()
    if text.startswith('"'):
        text = json.loads(text)
    return json.loads(text)


# ------------------------------------------------------------------------------ Ray cluster launcher

@functools.cache
def ray_launcher_schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def check_launcher_config(cfg: dict) -> None:
    """Ray's launcher schema, Ray's own config checks, and a GPU node type for expert workers."""
    try:
        jsonschema.Draft7Validator(ray_launcher_schema()).validate(cfg)
    except jsonschema.ValidationError as e:
        raise ManifestError(f"cluster launcher config at {_where(e)}: {e.message}") from None
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private API: its absence costs only the extra checks
        pass
    else:
        try:
            validate_config(prepare_config(copy.deepcopy(cfg)))
        except Exception as e:
            raise ManifestError(f"Ray rejects the cluster launcher config: {e}") from None
    types = cfg["available_node_types"]
    if cfg["head_node_type"] not in types:
        raise ManifestError(f"head_node_type {cfg['head_node_type']!r} is not one of {sorted(types)}")
    if "expert_worker" in types[cfg["head_node_type"]]["resources"]:
        raise ManifestError("the head node type must not offer `expert_worker`: experts belong on GPU nodes")
    # token authentication on every node, with a token kept outside the repository
    run_options = " ".join((cfg.get("docker") or {}).get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options or "RAY_AUTH_TOKEN_PATH=" not in run_options:
        raise ManifestError("docker.run_options must set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH on every node")
    token_path = run_options.split("RAY_AUTH_TOKEN_PATH=", 1)[1].split()[0]
    source = (cfg.get("file_mounts") or {}).get(token_path)
    if source is None or not source.startswith(("~", "/")):
        raise ManifestError(f"file_mounts must copy the auth token to {token_path} from outside the repository "
                            f"(a path from ~ or /), got {source!r}")
    gpu_types = [n for n, t in types.items() if t["resources"].get("expert_worker") and t["resources"].get("GPU")]
    if not gpu_types:
        raise ManifestError("no node type offers both GPUs and the `expert_worker` resource")
    for name in gpu_types:
        t = types[name]
        if not t.get("min_workers", 0) <= t.get("max_workers", 0) <= cfg["max_workers"]:
            raise ManifestError(f"{name}: need min_workers <= max_workers <= the global max_workers")


def check_launcher_wiring(cfg: dict, serve_cfg: dict) -> None:
    """The GPU node types can hold the application's expert workers, up to its autoscaling maximum."""
    svc = service_config(serve_cfg)
    types = cfg["available_node_types"]
    capacity = 0
    for name, t in types.items():
        fits = workers_per_node(svc, t["resources"], t["resources"].get("GPU", 0), t["resources"].get("CPU"), name)
        capacity += t.get("max_workers", 0) * fits
    if capacity == 0:
        raise ManifestError(f"no node type offers the expert workers' resources {svc.worker_resources}")
    check_worker_capacity(svc, capacity, "the GPU node types")
    gateways = sum(t.get("max_workers", 1 if name == cfg["head_node_type"] else 0)
                   * gateways_per_node(svc, t["resources"], t["resources"].get("GPU", 0), t["resources"].get("CPU"))
                   for name, t in types.items())
    check_gateway_capacity(svc, gateways, "the node types")


def service_config(serve_cfg: dict):
    """The moe application's args as a ServiceConfig (its defaults filled in)."""
    from moe_service.serving.config import ServiceConfig

    return ServiceConfig.from_dict(_app_args(serve_cfg))


def workers_per_node(svc, resources: dict, gpus: float, cpus: float | None, name: str) -> int:
    """How many expert workers a node (or pod) offering these Ray resources holds; 0 if it is not for them."""
    wanted = svc.worker_resources
    if not (wanted and all(resources.get(k, 0) >= v for k, v in wanted.items())):
        return 0
    fits = min(int(resources[k] // v) for k, v in wanted.items())
    if svc.gpus_per_worker * fits > gpus:
        raise ManifestError(f"{name}: {fits} expert workers x {svc.gpus_per_worker} GPU exceed its {gpus} GPU(s)")
    if cpus is not None and svc.cpus_per_worker * fits > float(cpus):
        raise ManifestError(f"{name}: {fits} expert workers x cpus_per_worker {svc.cpus_per_worker} exceed its "
                            f"{cpus} CPU(s)")
    return fits


def gateways_per_node(svc, resources: dict, gpus: float, cpus: float | None) -> int:
    """How many gateway replicas a node (or pod) offering these Ray resources holds."""
    wanted = dict(svc.gateway_resources)
    if not all(resources.get(k, 0) >= v for k, v in wanted.items()):
        return 0
    fits = [int(resources[k] // v) for k, v in wanted.items()]
    if svc.gateway_gpus:
        fits.append(int(float(gpus) // svc.gateway_gpus))
    if svc.gateway_num_cpus and cpus is not None:
        fits.append(int(float(cpus) // svc.gateway_num_cpus))
    return min(fits) if fits else 1 << 30


def check_gateway_capacity(svc, capacity: int, where: str) -> None:
    most = (svc.gateway_autoscaling or {}).get("max_replicas", svc.gateway_replicas)
    if capacity < most:
        raise ManifestError(f"{where} hold at most {capacity} gateway replicas (gateway_gpus {svc.gateway_gpus}, "
                            f"gateway_num_cpus {svc.gateway_num_cpus}, gateway_resources {svc.gateway_resources}); "
                            f"the app may want {most}")


def check_worker_capacity(svc, capacity: int, where: str) -> None:
    most = svc.workers
    if svc.autoscaling:
        auto = svc.autoscaling
        if not auto["min_workers"] <= svc.workers <= auto["max_workers"]:
            raise ManifestError(f"workers ({svc.workers}) must lie within autoscaling min_workers..max_workers "
                                f"({auto['min_workers']}..{auto['max_workers']})")
        most = max(most, auto["max_workers"])
    if capacity < most:
        raise ManifestError(f"{where} hold at most {capacity} expert workers; the app may want {most}")


# ------------------------------------------------------------------------------------- Serve configs

def _where(e: jsonschema.ValidationError) -> str:
    return "/" + "/".join(str(p) for p in e.absolute_path)


def schema_errors(validator: jsonschema.Draft7Validator, doc: dict) -> str | None:
    """All violations, one per line (the most specific one alone can hide a misspelt key)."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return "\n".join(f"  at {_where(e)}: {e.message}" for e in errors[:10]) or None


def _app_args(serve_cfg: dict) -> dict:
    (app,) = [a for a in serve_cfg["applications"] if a.get("name") == "moe"]
    return app.get("args") or {}


def _model_fields(model: type) -> dict[str, Any]:
    fields = getattr(model, "model_fields", None)
    if fields is not None:  # pydantic 2
        return {(f.alias or n): f.annotation for n, f in fields.items()}
    return {(f.alias or n): f.outer_type_ for n, f in model.__fields__.items()}  # pydantic 1


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and (hasattr(t, "model_fields") or hasattr(t, "__fields__"))


def _nested_models(annotation: Any) -> list[type]:
    """The pydantic models a field's value (or each item of a list value) must match."""
    if _is_model(annotation):
        return [annotation]
    if typing.get_origin(annotation) in (dict, typing.Dict):  # free-form mapping (e.g. `args`)
        return []
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def check_keys(value: Any, model: type, where: str) -> None:
    """Unknown keys fail, recursively (Serve's schemas silently ignore them)."""
    if not isinstance(value, dict):
        return
    fields = _model_fields(model)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; {model.__name__} accepts {sorted(fields)}")
    for key, sub in value.items():
        for inner in _nested_models(fields[key]):
            items = sub if isinstance(sub, list) else [sub]
            for i, item in enumerate(items):
                check_keys(item, inner, f"{where}.{key}" + (f"[{i}]" if isinstance(sub, list) else ""))


def resolve(path: str) -> Any:
    """An import path as Serve reads it: 'package.module:attr' or 'package.module.attr'."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ManifestError(f"{path!r}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ManifestError(f"{path!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def deployment_names(app: Any) -> set[str]:
    """Names of the deployments of a bound Serve application (the ingress and any it binds)."""
    from ray.serve.deployment import Application

    names, todo = set(), [app]
    while todo:
        bound = todo.pop()._bound_deployment
        names.add(bound.name)
        args = [*bound.init_args, *bound.init_kwargs.values()]
        for a in args + [x for a in args if isinstance(a, (list, tuple)) for x in a] + \
                [x for a in args if isinstance(a, dict) for x in a.values()]:
            if isinstance(a, Application):
                todo.append(a)
    return names


def check_serve_config(cfg: dict, where: str = "serve config") -> None:
    """ServeDeploySchema plus what it does not check: key names, import paths, deployment names, app args."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from moe_service.serving.config import ServiceConfig

    check_keys(cfg, ServeDeploySchema, where)
    try:
        (getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj)(cfg)
    except Exception as e:  # pydantic's ValidationError (either major version)
        raise ManifestError(f"{where}: ServeDeploySchema rejects it: {e}") from None
    for fn in (cfg.get("grpc_options") or {}).get("grpc_servicer_functions", []):
        if not callable(resolve(fn)):
            raise ManifestError(f"{where}: grpc servicer function {fn!r} is not callable")
    for i, app_cfg in enumerate(cfg["applications"]):
        at = f"{where}.applications[{i}] ({app_cfg.get('name')})"
        args = app_cfg.get("args") or {}
        target = resolve(app_cfg["import_path"])
        if app_cfg["import_path"].startswith("moe_service."):
            try:
                ServiceConfig.from_dict(args)
            except (ValueError, TypeError) as e:
                raise ManifestError(f"{at}: bad args: {e}") from None
            if args.get("autoscaling"):
                from moe_service.placement import AutoscaleSettings

                try:
                    AutoscaleSettings(**args["autoscaling"])
                except (TypeError, ValueError) as e:
                    raise ManifestError(f"{at}.args.autoscaling: {e}") from None
            autoscaling = args.get("gateway_autoscaling")
            if autoscaling:
                check_keys(autoscaling, AutoscalingConfig, f"{at}.args.gateway_autoscaling")
                try:
                    AutoscalingConfig(**autoscaling)
                except Exception as e:
                    raise ManifestError(f"{at}.args.gateway_autoscaling: {e}") from None
        if isinstance(target, Application):
            app = target
        else:
            try:
                app = target(args)
            except Exception as e:
                raise ManifestError(f"{at}: the application builder {app_cfg['import_path']!r} failed: {e}") from None
        known = deployment_names(app)
        for d in app_cfg.get("deployments") or []:
            if d.get("name") not in known:
                raise ManifestError(f"{at}: deployment {d.get('name')!r} is not in the application "
                                    f"(it has {sorted(known)})")


# --------------------------------------------------------------------------------------- KubeRay CRDs

def strict_schema(node: dict) -> dict:
    """A CRD's openAPIV3Schema made fit for jsonschema, rejecting unknown keys.

    Kubernetes int-or-string becomes anyOf integer/string; every object schema with `properties` and no
    x-kubernetes-preserve-unknown-fields gets additionalProperties: false (the API server would prune
    unknown keys silently, so a misspelt key would go unnoticed).
    """
    node = dict(node)
    if (node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string") and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        node["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict_schema(s) for s in node[key]]
    if isinstance(node.get("not"), dict):
        node["not"] = strict_schema(node["not"])
    return node


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = load_one(KUBERAY / KUBERAY_CRDS[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def check_kuberay_object(doc: dict) -> None:
    """A RayService / RayCluster against its v1.7.0 CRD; a RayService's cluster also as a RayCluster."""
    kind = doc.get("kind")
    if kind not in KUBERAY_CRDS or doc.get("apiVersion") != "ray.io/v1":
        raise ManifestError(f"expected apiVersion ray.io/v1 and kind RayService or RayCluster, got "
                            f"{doc.get('apiVersion')} {kind}")
    errors = schema_errors(crd_validator(kind), doc)
    if errors:
        raise ManifestError(f"{kind} {doc['metadata'].get('name')} does not match the KubeRay CRD:\n{errors}")
    if kind == "RayService":
        as_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "check"},
                      "spec": doc["spec"]["rayClusterConfig"]}
        check_kuberay_object(as_cluster)


def check_rayservice(doc: dict, crds: bool = True) -> None:
    """The CRD, the Serve config inside, and how the two are wired together."""
    if crds:
        check_kuberay_object(doc)
    try:
        serve_cfg = serve_config_of(doc)
    except yaml.YAMLError as e:
        raise ManifestError(f"serveConfigV2 is not YAML: {e}") from None
    check_serve_config(serve_cfg, "serveConfigV2")
    check_rayservice_wiring(doc, serve_cfg)


def check_rayservice_wiring(doc: dict, serve_cfg: dict) -> None:
    """Ports, resources and volumes of the Ray pods match what the Serve config asks for."""
    cluster = doc["spec"]["rayClusterConfig"]
    head = head_container(cluster)
    ports = container_ports(head)
    svc = service_config(serve_cfg)
    proxy_port = (serve_cfg.get("http_options") or {}).get("port", 8000)
    if svc.http_api and proxy_port == svc.http_port:
        raise ManifestError(f"http_options.port and args.http_port are both {proxy_port}: Serve's own HTTP proxy and "
                            "the HTTP front cannot share a port")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        raise ManifestError("rayClusterConfig.authOptions.mode must be token: Ray's token authentication")
    if not cluster.get("enableInTreeAutoscaling"):
        raise ManifestError("enableInTreeAutoscaling must be true: GPU pods are added for pending expert workers")
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    if "expert_worker" in ray_resources_param(head_params.get("resources", "{}")):
        raise ManifestError("the head group must not offer `expert_worker`")
    # gateways go where their CPUs, GPUs and resources are: the head (num-gpus 0) or a worker group
    def pod_gateways(group: dict) -> int:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        return gateways_per_node(svc, ray_resources_param(params.get("resources", "{}")), gpus, ray_cpus(group))

    gateways = pod_gateways(cluster["headGroupSpec"]) + sum(
        g["maxReplicas"] * pod_gateways(g) for g in cluster["workerGroupSpecs"])
    check_gateway_capacity(svc, gateways, "the head's and the worker groups' Ray nodes")
    # the front is sized by the gateways' limits, checked once those are known to fit
    grpc_port = (serve_cfg.get("grpc_options") or {}).get("port", 9000)
    front = check_grpc_front(cluster, grpc_port, svc)
    want = {"serve": svc.http_port if svc.http_api else proxy_port,  # KubeRay's serve service
            "grpc": front or grpc_port, "metrics": 8080, SD_PORT_NAME: svc.sd_port}
    for name, port in want.items():
        if ports.get(name) != port:
            raise ManifestError(f"head container: port named {name!r} must be {port} "
                                f"(the head's ports: {ports})")

    capacity = 0
    for group in cluster.get("workerGroupSpecs", []):
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        fits = workers_per_node(svc, ray_resources_param(params.get("resources", "{}")),
                                float(limits.get("nvidia.com/gpu", 0)), params.get("num-cpus"),
                                f"worker group {group['groupName']}")
        if fits and not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            raise ManifestError(f"worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas")
        capacity += group["maxReplicas"] * fits
    if capacity == 0:
        raise ManifestError(f"no worker group offers the expert workers' resources {svc.worker_resources} "
                            "in rayStartParams")
    check_worker_capacity(svc, capacity, "the worker groups")

    model = svc.model
    annotated = (cluster["headGroupSpec"]["template"]["metadata"].get("annotations") or {}).get("moe-service/model")
    if annotated != Path(model).name:
        raise ManifestError(f"the head pod annotation moe-service/model ({annotated!r}) must name the model "
                            f"{model!r}, so that a new model rolls out on a new Ray cluster")
    if model.startswith("/"):
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for name, group in groups:
            pod = group["template"]["spec"]
            volumes = {v["name"] for v in pod.get("volumes", [])}
            mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in volumes]
            if not any(model == m["mountPath"] or model.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts):
                raise ManifestError(f"{name}: the model path {model} is on no mounted volume of the Ray container")


def check_grpc_front(cluster: dict, grpc_port: int, svc) -> int | None:
    """The head pod's grpc-front container, if any: HAProxy (`moe-service front`) in front of Serve's gRPC
    port, admitting what the gateways admit at their most replicas. Returns the port clients use."""
    from moe_service.serving.front import gateway_capacity

    containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    front = next((c for c in containers if c["name"] == "grpc-front"), None)
    if front is None:
        return None
    cmd = front.get("command", []) + front.get("args", [])
    if cmd[:2] != ["moe-service", "front"]:
        raise ManifestError(f"grpc-front: the command must be `moe-service front ...`, not {cmd}")
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    target, listen = opts.get("--target", "127.0.0.1:9001"), opts.get("--listen", "0.0.0.0:9000")
    if int(target.rsplit(":", 1)[1]) != grpc_port:
        raise ManifestError(f"grpc-front: --target {target} must be Serve's gRPC port, grpc_options.port {grpc_port}")
    if int(listen.rsplit(":", 1)[1]) == grpc_port:
        raise ManifestError(f"grpc-front: --listen {listen} is Serve's gRPC port too")
    if int(opts.get("--limit", 0)) != gateway_capacity(svc):
        raise ManifestError(f"grpc-front: --limit must be what the gateways admit at their most replicas, "
                            f"{gateway_capacity(svc)}, not {opts.get('--limit')}")
    return int(listen.rsplit(":", 1)[1])


# ------------------------------------------------------------------------- built-in Kubernetes kinds

def check_builtin(doc: dict) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        raise ManifestError(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {e.message} "
                            f"at {_where(e)}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestError(f"not a built-in Kubernetes kind: {e}") from None
    if doc["kind"] == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith(".json"):
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"ConfigMap {doc['metadata']['name']}: {key} is not JSON: {e}") from None


# ------------------------------------------------------------------------- Prometheus operator objects
# No CRD schemas ship for these: a subset of the operator's fields (monitoring.coreos.com types), strict.

def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STR, _BOOL, _INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = _obj({"sourceLabels": {"type": "array", "items": _STR}, "separator": _STR, "targetLabel": _STR,
                 "regex": _STR, "modulus": _INT, "replacement": _STR,
                 "action": {"enum": [c for a in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop",
                                                 "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal")
                                     for c in (a, a[0].upper() + a[1:])] + ["HashMod", "LabelMap", "LabelDrop",
                                                                             "LabelKeep", "KeepEqual", "DropEqual"]}})
_RELABELS = {"type": "array", "items": _RELABEL, "minItems": 1}
_SELECTOR = _obj({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}})
_METADATA = _obj({"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP}, ("name",))
_RULE = _obj({"alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]}, "for": _DURATION,
              "keep_firing_for": _DURATION, "labels": _STR_MAP, "annotations": _STR_MAP}, ("expr",))
MONITORING_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _obj({
        "jobLabel": _STR, "podTargetLabels": {"type": "array", "items": _STR}, "selector": _SELECTOR,
        "namespaceSelector": _obj({"any": _BOOL, "matchNames": {"type": "array", "items": _STR}}),
        "sampleLimit": _INT, "targetLimit": _INT, "scrapeClass": _STR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _obj({
            "port": _STR, "portNumber": _INT, "path": _STR, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": _BOOL, "honorTimestamps": _BOOL,
            "params": {"type": "object"}, "relabelings": _RELABELS, "metricRelabelings": _RELABELS,
            "enableHttp2": _BOOL, "filterRunning": _BOOL})},
    }, ("selector", "podMetricsEndpoints")),
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"): _obj({
        "jobName": _STR, "metricsPath": _STR, "scrapeInterval": _DURATION, "scrapeTimeout": _DURATION,
        "scheme": {"enum": ["HTTP", "HTTPS"]}, "honorLabels": _BOOL, "honorTimestamps": _BOOL,
        "relabelings": _RELABELS, "metricRelabelings": _RELABELS, "sampleLimit": _INT, "scrapeClass": _STR,
        "staticConfigs": {"type": "array", "items": _obj({"targets": {"type": "array", "items": _STR},
                                                         "labels": _STR_MAP}, ("targets",))},
        "httpSDConfigs": {"type": "array", "items": _obj({
            "url": {"type": "string", "pattern": "^http(s)?://.+$"}, "refreshInterval": _DURATION,
            "followRedirects": _BOOL, "enableHTTP2": _BOOL}, ("url",))},
    }),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _obj({
        "groups": {"type": "array", "items": _obj({
            "name": _STR, "interval": _DURATION, "query_offset": _DURATION, "limit": _INT, "labels": _STR_MAP,
            "partial_response_strategy": _STR, "rules": {"type": "array", "items": _RULE}}, ("name",))},
    }, ("groups",)),
}


def check_monitoring(doc: dict) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in MONITORING_SCHEMAS:
        raise ManifestError(f"unknown Prometheus operator object {key}; expected one of {sorted(MONITORING_SCHEMAS)}")
    schema = _obj({"apiVersion": _STR, "kind": _STR, "metadata": _METADATA, "spec": MONITORING_SCHEMAS[key]},
                  ("apiVersion", "kind", "metadata", "spec"))
    errors = schema_errors(jsonschema.Draft7Validator(schema), doc)
    if errors:
        raise ManifestError(f"{key[1]} {doc.get('metadata', {}).get('name')}:\n{errors}")
    if key[1] == "PrometheusRule":
        check_rules({"groups": doc["spec"]["groups"]})


def check_rules(rule_file: dict) -> None:
    """`promtool check rules` on a rule file's content (PromQL, durations, templates, field names)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(rule_file, f)
        f.flush()
        r = subprocess.run([PROMTOOL, "check", "rules", f.name], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise ManifestError(f"promtool check rules: {r.stdout}{r.stderr}")


def check_alert_metrics(rule_file: dict, exported: set[str]) -> None:
    """Every moe_ metric the rules query is one the service's processes export (`exported`, series names)."""
    exprs = " ".join(str(r["expr"]) for g in rule_file["groups"] for r in g["rules"])
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m) for m in re.findall(r"\bmoe_[a-z0-9_]+", exprs)}
    if not used:
        raise ManifestError("the alert rules query none of the service's metrics")
    unknown = sorted(used - exported)
    if unknown:
        raise ManifestError(f"alert rules use metrics the package does not export: {unknown}")


# ------------------------------------------------------------------------------------- kustomization

def check_kustomization(k: dict) -> None:
    """Every object file is listed, every listed file exists, every Ray image has a setting."""
    listed = set(k["resources"])
    for res in listed:
        if not (K8S / res).is_file():
            raise ManifestError(f"kustomization resource {res} does not exist")
    for path in sorted(K8S.rglob("*.yaml")):
        rel = path.relative_to(K8S).as_posix()
        if rel != "kustomization.yaml" and rel not in listed and any("kind" in d for d in load_docs(path)):
            raise ManifestError(f"k8s/{rel} holds Kubernetes objects but is not in the kustomization's resources")
    image_names = {i["name"] for i in k.get("images", [])}
    for doc in (d for res in listed for d in load_docs(K8S / res) if d["kind"] == "RayService"):
        cluster = doc["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
        for c in (c for p in pods for c in p["template"]["spec"]["containers"]):
            if c["image"] not in image_names:
                raise ManifestError(f"container {c['name']} image {c['image']!r} has no entry in `images`")
