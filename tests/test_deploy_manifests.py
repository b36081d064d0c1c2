"""Offline checks of the deployment manifests in cluster/ and k8s/.

Each `check_*` function raises ManifestError saying what is wrong; the tests run them on the files, and
test_check_catches_mutation runs them on copies broken in known ways (a misspelt key, a wrong type, a bad
import path, an unknown deployment, broken PromQL, ...), so every check is shown able to fail.

Sources of truth: Ray's cluster launcher schema (ray/autoscaler/ray-schema.json), Serve's ServeDeploySchema,
ServiceConfig.from_dict, the KubeRay v1.7.0 CRDs in ../shared/schemas/ (made strict: a misspelt key
fails), kubernetes-validate for built-in kinds, promtool for PromQL and rule files. No cluster, Ray
instance or network is needed; a missing schema or tool skips its tests and says so.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = ROOT / "k8s"
KUBERAY = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay-v1.7.0"
KUBERAY_CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")
BUILTIN_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "ServiceAccount",
                 "NetworkPolicy"}
MONITORING_KINDS = {"PodMonitor", "ScrapeConfig", "PrometheusRule"}
SD_PORT_NAME = "moe-sd"  # the head container port of the controller's Prometheus http_sd endpoint

needs_kuberay = pytest.mark.skipif(
    not all((KUBERAY / f).is_file() for f in KUBERAY_CRDS.values()),
    reason=f"KubeRay v1.7.0 CRD schemas not found in {KUBERAY} (shared/schemas/ beside the repository)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (for `kubectl kustomize`)")


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
    want = {"serve": (serve_cfg.get("http_options") or {}).get("port", 8000),  # KubeRay's serve service
            "grpc": (serve_cfg.get("grpc_options") or {}).get("port", 9000),
            "metrics": 8080, SD_PORT_NAME: svc.sd_port}
    for name, port in want.items():
        if ports.get(name) != port:
            raise ManifestError(f"head container: port named {name!r} must be {port} "
                                f"(the head's ports: {ports})")
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


# ================================================================================================ tests

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
    exprs = " ".join(r["expr"] for g in load_one(K8S / "prometheus" / "alerts.yaml")["groups"] for r in g["rules"])
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m) for m in re.findall(r"\bmoe_[a-z0-9_]+", exprs)}
    source = " ".join(p.read_text() for p in (ROOT / "moe_service").rglob("*.py"))
    defined = {m for m in used if re.search(rf"[\"']{m}(_total|_bucket|_count|_sum)?[\"']", source)}
    if not defined:
        pytest.skip("the package defines none of the alerts' metrics yet")
    assert defined == used, f"alerts use metrics the package does not define: {sorted(used - defined)}"


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
     _serve_v2(lambda c: c["grpc_options"].__setitem__("port", 9001)), "9001", ()),
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
