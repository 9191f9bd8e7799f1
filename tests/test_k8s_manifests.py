"""The KubeRay manifests in k8s/, checked offline (no Kubernetes, no Ray cluster).

- Kubernetes: every ray.io document validates against KubeRay's CRD schemas from
  ../shared/k8s-schemas/ the way the apiserver does it (nulls pruned, defaults applied, then
  the openAPIV3Schema), plus what `kubectl --validate=strict` adds (unknown fields) and the
  list-map keys (no two containers, env vars or ports with one name). Core kinds are checked
  against the same CRD's embedded schemas (a PVC's spec is the pod volume claim template's).
- KubeRay operator rules the schema cannot express (ray-operator/.../utils/validation.go).
- Serve: each serveConfigV2 validates with Ray Serve's own ServeDeploySchema, without unknown
  keys; its import path resolves; its args build the application through Serve's own builder
  call (build_app only builds the graph: nothing starts).
- Resources: from the application that build_app really builds (placement bundles, replica
  bounds) and `neo_serve.plan.plan_pipeline` on ../shared/reference configs: the GPU worker
  groups at maxReplicas hold the most pipelines Serve may scale to, the routers fit on the head,
  and each stage's weights and KV cache fit the GPU memory the manifest states in its
  `neo-serve/gpu-memory` annotation; a pipeline's stages restarted after a fault can reload
  their weights from a slow shared volume within `recovery_timeout_s`.
- Wiring: weights from the PVC on every Pod that reads them, the optional Hub download init
  container (run here against a stand-in Hub), readiness on /health, images of the Ray version
  that deploy/Dockerfile builds.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import json
import math
import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_configs import scaled_app_args

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "k8s-schemas"
REFERENCE = SHARED / "reference"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
MANIFESTS = sorted(K8S.glob("*.yaml"))
GPU_MANIFEST = K8S / "gpt-neox-20b.rayservice.yaml"
DEMO_MANIFEST = K8S / "demo-cpu.rayservice.yaml"

GPU_MEMORY_ANNOTATION = "neo-serve/gpu-memory"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayJob": "ray.io_rayjobs.yaml"}
MAX_NAME = {"RayService": 47, "RayJob": 47, "RayCluster": 53}  # KubeRay's limits (DNS-1035 labels)
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
INT32_MAX = 2**31 - 1
# A slow shared weights volume, e.g. EFS in bursting mode or a basic Filestore tier.
SHARED_VOLUME_BYTES_PER_S = 100 * 2**20

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*")
QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
IMAGE = re.compile(r"(^|/)neo-serve:(?P<version>[^-:]+)-(?P<flavor>cpu|gpu)$")


@pytest.fixture(scope="module")
def shared_schemas() -> Path:
    # A missing ../shared fails these tests loudly: skipped, they would pass CI unchecked.
    if not SCHEMAS.is_dir():
        pytest.fail(f"{SCHEMAS} is missing: the KubeRay CRD schemas (../shared/k8s-schemas/ beside the "
                    f"repository) are needed to validate the manifests offline")
    return SCHEMAS


needs_schemas = pytest.mark.usefixtures("shared_schemas")
needs_reference = pytest.mark.usefixtures("reference_dir")  # conftest: fails when ../shared/reference is missing


# ---- YAML as kubectl reads it ---------------------------------------------------------------

class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """sigs.k8s.io/yaml's reading: timestamps stay strings, duplicate keys are an error."""


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


StrictLoader.add_constructor("tag:yaml.org,2002:map", _mapping_without_duplicates)


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=StrictLoader) if doc]


def ray_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in load_documents(path) if doc.get("apiVersion", "").startswith("ray.io/")]


def rayservice(path: Path) -> dict[str, Any]:
    (doc,) = [doc for doc in load_documents(path) if doc.get("kind") == "RayService"]
    return doc


# ---- Kubernetes schema validation -----------------------------------------------------------

@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=loader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


@functools.cache
def core_schema(kind: str) -> dict[str, Any]:
    """Core kinds, from the Kubernetes schemas the RayService CRD embeds (pod templates)."""
    pod = crd_schema("RayService")["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"][
        "headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
    if kind == "PersistentVolumeClaim":
        spec = pod["volumes"]["items"]["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"][
            "properties"]["spec"]
    else:
        raise KeyError(kind)
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"type": "string", "enum": ["v1"]}, "kind": {"type": "string"},
                           "metadata": {"type": "object"}, "spec": spec}}


def k8s_prepare(obj: Any, schema: dict[str, Any]) -> Any:
    """What the apiserver does before validating: drop nulls (unless nullable), apply defaults."""
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        obj = {k: v for k, v in obj.items() if v is not None or props.get(k, {}).get("nullable")}
        for key, sub in props.items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        return {k: k8s_prepare(v, props.get(k) or (extra if isinstance(extra, dict) else {})) for k, v in obj.items()}
    if isinstance(obj, list) and "items" in schema:
        return [k8s_prepare(item, schema["items"]) for item in obj]
    return obj


def structural_problems(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What jsonschema does not see: unknown fields (`kubectl --validate=strict` rejects them,
    the apiserver silently drops them) and duplicate keys of x-kubernetes-list-type map/set lists."""
    problems: list[str] = []
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                problems += structural_problems(value, props[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                problems += structural_problems(value, extra, f"{path}/{key}")
            elif extra is not True:
                problems.append(f"{path}/{key}: unknown field")
    elif isinstance(obj, list) and "items" in schema:
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("map", "set"):
            map_keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in map_keys) if list_type == "map" and isinstance(item, dict)
                    else json.dumps(item, sort_keys=True) for item in obj]
            for duplicate in sorted({str(key) for key in seen if seen.count(key) > 1}):
                problems.append(f"{path}: duplicate entries {duplicate} (list keyed by {map_keys or 'value'})")
        for index, item in enumerate(obj):
            problems += structural_problems(item, schema["items"], f"{path}/{index}")
    return problems


def qualified_name_problems(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    problems = []
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        problems.append(f"key {key!r}: prefix must be a DNS-1123 subdomain")
    if len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        problems.append(f"key {key!r}: name must be <= 63 alphanumerics, '-', '_' or '.'")
    return problems


def metadata_problems(doc: Any, path: str = "") -> list[str]:
    """ObjectMeta rules the CRD's bare `metadata: {type: object}` leaves to the apiserver, for
    the document's metadata and every Pod template's."""
    problems: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "metadata" and isinstance(value, dict):
                for field in ("labels", "annotations"):
                    for k, v in (value.get(field) or {}).items():
                        problems += [f"{path}/metadata/{field}: {p}" for p in qualified_name_problems(str(k))]
                        if not isinstance(v, str):
                            problems.append(f"{path}/metadata/{field}/{k}: value must be a string, got {v!r}")
                        elif field == "labels" and v and (len(v) > 63 or not QUALIFIED_NAME.fullmatch(v)):
                            problems.append(f"{path}/metadata/labels/{k}: invalid label value {v!r}")
            else:
                problems += metadata_problems(value, f"{path}/{key}")
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            problems += metadata_problems(item, f"{path}/{index}")
    return problems


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """Everything the apiserver (with strict field validation) would reject in one document."""
    from jsonschema import Draft7Validator

    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api == "ray.io/v1" and kind in CRD_FILES:
        schema = crd_schema(kind)
    elif api == "v1" and kind == "PersistentVolumeClaim":
        schema = core_schema(kind)
    else:
        return [f"{api} {kind}: no offline schema; extend tests/test_k8s_manifests.py before adding this kind"]
    prepared = k8s_prepare(doc, schema)
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in Draft7Validator(schema).iter_errors(prepared)]
    problems += structural_problems({k: v for k, v in prepared.items() if k != "metadata"}, schema)
    metadata = doc.get("metadata") or {}
    name = metadata.get("name", "")
    if not name or len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
        problems.append(f"metadata/name: {name!r} is not a lowercase RFC 1123 subdomain")
    problems += [f"metadata/{key}: unknown field" for key in metadata
                 if key not in ("name", "namespace", "labels", "annotations")]
    return problems + metadata_problems(doc)


# ---- KubeRay operator rules -----------------------------------------------------------------

def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayService": lambda: spec["rayClusterConfig"], "RayCluster": lambda: spec,
            "RayJob": lambda: spec.get("rayClusterSpec") or {}}[doc["kind"]]()


def worker_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return cluster.get("workerGroupSpecs") or []


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def autoscaler_v2(cluster: dict[str, Any]) -> bool:
    env = {e["name"]: e.get("value") for e in ray_container(cluster["headGroupSpec"]).get("env") or []}
    return ((cluster.get("autoscalerOptions") or {}).get("version") == "v2"
            or env.get("RAY_enable_autoscaler_v2") in ("1", "true"))


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Rules the KubeRay operator (or Pod admission) enforces that the CRD schema cannot."""
    kind, problems = doc["kind"], []
    name = (doc.get("metadata") or {}).get("name", "")
    if len(name) > MAX_NAME[kind] or not DNS1035.fullmatch(name):
        problems.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    cluster = cluster_spec(doc)
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    head_env = {e["name"]: e.get("value") for e in ray_container(cluster["headGroupSpec"]).get("env") or []}
    if "RAY_enable_autoscaler_v2" in head_env:
        if not autoscaling and head_env["RAY_enable_autoscaler_v2"] in ("1", "true"):
            problems.append("RAY_enable_autoscaler_v2 is set but enableInTreeAutoscaling is false")
        if (cluster.get("autoscalerOptions") or {}).get("version"):
            problems.append("set autoscalerOptions.version or RAY_enable_autoscaler_v2, not both")
    v2 = autoscaling and autoscaler_v2(cluster)
    for managed_by in (doc["spec"].get("managedBy"), cluster.get("managedBy")):
        if managed_by is not None and managed_by not in MANAGED_BY:
            problems.append(f"managedBy {managed_by!r} must be one of {MANAGED_BY}")
    groups = [("head", cluster["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in worker_groups(cluster)]
    for group_name, group in groups:
        start = group.get("rayStartParams") or {}
        if any(start.get(key) for key in RAY_START_RESOURCES) and group.get("resources"):
            problems.append(f"{group_name}: resources set both in rayStartParams and in the group's resources")
        if "labels" in start:
            problems.append(f"{group_name}: rayStartParams['labels'] is not supported; use the group's labels")
        pod = group["template"].get("spec") or {}
        if v2 and pod.get("restartPolicy") not in (None, "Never"):
            problems.append(f"{group_name}: restartPolicy must be Never or unset with autoscaler v2")
        for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for key in sorted(k for k in set(requests) | set(limits) if k.endswith("gpu")):
                if key not in limits:
                    problems.append(f"{group_name}/{container['name']}: {key} needs a limit")
                elif key in requests and str(requests[key]) != str(limits[key]):
                    problems.append(f"{group_name}/{container['name']}: {key} request {requests[key]} "
                                    f"!= limit {limits[key]} (Pods are rejected)")
    for group in worker_groups(cluster):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", INT32_MAX)
        if low > high:
            problems.append(f"{group['groupName']}: minReplicas {low} > maxReplicas {high}")
        elif group.get("replicas") is not None and not low <= group["replicas"] <= high:
            problems.append(f"{group['groupName']}: replicas {group['replicas']} outside [{low}, {high}] "
                            f"(the operator clamps it)")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            problems.append(f"{group['groupName']}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    if kind == "RayService":
        spec = doc["spec"]
        if ((cluster["headGroupSpec"].get("headService") or {}).get("metadata") or {}).get("name"):
            problems.append("headGroupSpec.headService.metadata.name must not be set in a RayService")
        if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
            problems.append("rayClusterDeletionDelaySeconds must be >= 0")
        strategy = spec.get("upgradeStrategy") or {}
        if strategy.get("type") is not None and strategy["type"] not in UPGRADE_TYPES:
            problems.append(f"upgradeStrategy.type {strategy['type']!r} must be one of {UPGRADE_TYPES}")
        if strategy.get("type") == "NewClusterWithIncrementalUpgrade":
            options = strategy.get("clusterUpgradeOptions")
            if not autoscaling:
                problems.append("NewClusterWithIncrementalUpgrade needs enableInTreeAutoscaling: true")
            if not options:
                problems.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
            else:
                surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
                if not options.get("gatewayClassName"):
                    problems.append("clusterUpgradeOptions.gatewayClassName is required")
                if step is None or not 0 <= step <= 100 or not 0 <= surge <= 100 or step > surge:
                    problems.append("clusterUpgradeOptions: need 0 <= stepSizePercent <= maxSurgePercent <= 100")
                if (options.get("intervalSeconds") or 0) <= 0:
                    problems.append("clusterUpgradeOptions.intervalSeconds must be > 0")
    return problems


# ---- Serve config ---------------------------------------------------------------------------

def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.load(doc["spec"]["serveConfigV2"], Loader=StrictLoader)


def set_serve_config(doc: dict[str, Any], config: dict[str, Any]) -> None:
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """ServeDeploySchema, plus the unknown keys it silently ignores."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"serveConfigV2: {error['loc']}: {error['msg']}" for error in exc.errors()]
    problems = [f"serveConfigV2/{key}: unknown key" for key in config if key not in ServeDeploySchema.model_fields]
    problems += [f"serveConfigV2/http_options/{key}: unknown key" for key in config.get("http_options") or {}
                 if key not in HTTPOptionsSchema.model_fields]
    for app in config["applications"]:
        problems += [f"serveConfigV2/{app['name']}/{key}: unknown key" for key in app
                     if key not in ServeApplicationSchema.model_fields]
        for deployment in app.get("deployments") or []:
            problems += [f"serveConfigV2/{app['name']}/deployments/{deployment.get('name')}/{key}: unknown key"
                         for key in deployment if key not in DeploymentSchema.model_fields]
    return problems


def import_attr(path: str) -> Any:
    """Serve's import_path: `module:attr` or `module.attr`."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class OfflineCheckpoints:
    """Stand-ins for the checkpoints a manifest names (e.g. /models/gpt-neox-20b on the PVC): the
    model's real config.json from ../shared/reference/<name>.config.json plus a tokenizer, so
    build_app's checkpoint verification (engine limits against the model's shape) runs here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, str] = {}

    def path_for(self, checkpoint: str) -> str:
        if checkpoint not in self.paths:
            config = reference_config(checkpoint)
            target = self.root / str(len(self.paths)) / Path(checkpoint).name  # same served name
            target.mkdir(parents=True)
            shutil.copy(config, target / "config.json")
            from neo_serve.serve.config import DEMO_CHECKPOINT

            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(DEMO_CHECKPOINT / name, target / name)
            self.paths[checkpoint] = str(target)
        return self.paths[checkpoint]


def reference_config(checkpoint: str | None) -> Path:
    """The config.json the manifest's model has: the bundled demo's, or ../shared/reference's."""
    if checkpoint is None:
        from neo_serve.serve.config import DEMO_CHECKPOINT

        return DEMO_CHECKPOINT / "config.json"
    path = REFERENCE / f"{Path(checkpoint).name}.config.json"
    if not path.is_file():
        raise LookupError(f"no reference config for checkpoint {checkpoint}: expected {path}")
    return path


@dataclass(frozen=True)
class Demand:
    """What one Serve deployment asks the cluster for at its largest."""

    app: str
    name: str
    max_replicas: int
    bundles: tuple[dict[str, float], ...]  # () for a deployment without a placement group
    actor: dict[str, float]
    strategy: str
    model: Any  # the ModelArgs of a pipeline deployment, else None

    @property
    def gpus_per_replica(self) -> float:
        if self.bundles:
            return sum(b.get("GPU", 0) for b in self.bundles)
        return self.actor.get("num_gpus") or 0

    @property
    def cpus_per_replica(self) -> float:
        if self.bundles:
            return sum(b.get("CPU", 0) for b in self.bundles)
        return self.actor.get("num_cpus", 1)


def build_serve_applications(doc: dict[str, Any], checkpoints: OfflineCheckpoints) -> list[tuple[dict, Any, Any]]:
    """Each app of serveConfigV2 as Serve builds it: (app config, AppArgs, BuiltApplication)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as build_serve_app

    from neo_serve.serve.config import AppArgs

    built = []
    for app in serve_config(doc)["applications"]:
        builder = import_attr(app["import_path"])
        app_args = AppArgs.model_validate(app.get("args") or {})  # typos fail here (extra="forbid")
        models = [m.model_copy(update={"checkpoint": checkpoints.path_for(m.checkpoint)}) if m.checkpoint else m
                  for m in app_args.models]
        offline_args = app_args.model_copy(update={"models": models}).model_dump()
        application = call_user_app_builder_with_args_if_necessary(builder, offline_args)
        built.append((app, app_args, build_serve_app(application, name=app["name"])))
    return built


def serve_demands(doc: dict[str, Any], checkpoints: OfflineCheckpoints) -> list[Demand]:
    """Every deployment's largest footprint, with serveConfigV2's `deployments:` overrides applied."""
    from ray.serve.config import AutoscalingConfig

    from neo_serve.serve.config import deployment_name

    demands = []
    for app, app_args, built in build_serve_applications(doc, checkpoints):
        models = {deployment_name(m, app_args.models): m for m in app_args.models}
        overrides = {d["name"]: d for d in app.get("deployments") or []}
        for deployment in built.deployments:
            config, replica = deployment._deployment_config, deployment._replica_config
            override = overrides.get(deployment.name, {})
            if "num_replicas" in override and isinstance(override["num_replicas"], int):
                max_replicas = override["num_replicas"]
            elif override.get("autoscaling_config"):
                max_replicas = AutoscalingConfig(**override["autoscaling_config"]).max_replicas
            elif config.autoscaling_config is not None:
                max_replicas = config.autoscaling_config.max_replicas
            else:
                max_replicas = config.num_replicas
            bundles = override.get("placement_group_bundles", replica.placement_group_bundles) or ()
            demands.append(Demand(
                app=app["name"], name=deployment.name, max_replicas=max_replicas,
                bundles=tuple(dict(b) for b in bundles),
                actor=dict(override.get("ray_actor_options", replica.ray_actor_options) or {}),
                strategy=override.get("placement_group_strategy", replica.placement_group_strategy) or "PACK",
                model=models.get(deployment.name)))
    return demands


# ---- Resources ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PodShape:
    """A Ray node as the autoscaler sees it: logical CPUs/GPUs of one Pod of a group."""

    group: str
    cpus: float
    gpus: float
    max_replicas: int
    gpu_memory: str | None


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_shape(group: dict[str, Any], *, head: bool = False) -> PodShape:
    """What KubeRay passes to `ray start`: rayStartParams first, then the group's resources,
    then the Ray container's limits (CPU: else its request), rounded up as KubeRay does."""
    start, resources = group.get("rayStartParams") or {}, group.get("resources") or {}
    container = ray_container(group).get("resources") or {}
    limits, requests = container.get("limits") or {}, container.get("requests") or {}
    cpus = start.get("num-cpus") or resources.get("CPU") or limits.get("cpu") or requests.get("cpu") or 0
    gpus = start.get("num-gpus") or resources.get("GPU") or next(
        (v for k, v in limits.items() if k.endswith("gpu")), 0)
    annotations = (group["template"].get("metadata") or {}).get("annotations") or {}
    return PodShape(group=group.get("groupName", "head"), cpus=float(math.ceil(cpu_quantity(cpus))),
                    gpus=float(gpus), max_replicas=1 if head else group.get("maxReplicas", INT32_MAX),
                    gpu_memory=annotations.get(GPU_MEMORY_ANNOTATION))


def fits(free: list[float], bundle: dict[str, float]) -> bool:
    return bundle.get("CPU", 0) <= free[0] + 1e-9 and bundle.get("GPU", 0) <= free[1] + 1e-9


def take(free: list[float], bundle: dict[str, float]) -> None:
    free[0] -= bundle.get("CPU", 0)
    free[1] -= bundle.get("GPU", 0)


def place_replica(nodes: list[list[float]], bundles: tuple[dict[str, float], ...], strategy: str) -> bool:
    """Reserve one replica's placement group (PACK: one node if any holds it all, else spread)."""
    whole = {"CPU": sum(b.get("CPU", 0) for b in bundles), "GPU": sum(b.get("GPU", 0) for b in bundles)}
    if strategy in ("PACK", "STRICT_PACK"):
        for node in nodes:
            if fits(node, whole):
                take(node, whole)
                return True
        if strategy == "STRICT_PACK":
            return False
    trial = [list(node) for node in nodes]
    used: set[int] = set()
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        index = next((i for i, node in enumerate(trial)
                      if fits(node, bundle) and not (strategy == "STRICT_SPREAD" and i in used)), None)
        if index is None:
            return False
        take(trial[index], bundle)
        used.add(index)
    nodes[:] = trial
    return True


@functools.cache
def cached_plan(config_path: Path, num_stages: int, gpu_memory: str, dtype: str):
    from neo_serve.config import load_model_config
    from neo_serve.plan import plan_pipeline

    return plan_pipeline(load_model_config(config_path), num_stages=num_stages, gpu_memory=gpu_memory, dtype=dtype)


def resource_problems(doc: dict[str, Any], checkpoints: OfflineCheckpoints) -> list[str]:
    """Whether the cluster can hold what Serve may scale to, and each stage's GPU its weights.

    - GPUs: per pipeline x the most pipelines Serve may scale to <= sum of GPU groups'
      maxReplicas x GPUs per Pod; then every replica's bundles are placed on the Pods at
      maxReplicas (CPUs too), as Ray's placement groups would.
    - Deployments without a placement group (the router) fit on the head at their max, so they
      never pin a worker (which could then not scale down) or make the autoscaler add one.
    - Each GPU stage: `plan_pipeline` on the model's reference config with the GPU memory of the
      groups' `neo-serve/gpu-memory` annotation: weights fit, and kv_cache_tokens <= the
      pipeline's KV capacity.
    """
    cluster = cluster_spec(doc)
    head = pod_shape(cluster["headGroupSpec"], head=True)
    pods = [pod_shape(group) for group in worker_groups(cluster)]
    demands = serve_demands(doc, checkpoints)
    problems: list[str] = []

    gpu_needed = sum(d.gpus_per_replica * d.max_replicas for d in demands)
    gpu_room = head.gpus + sum(p.gpus * p.max_replicas for p in pods)
    if gpu_needed > gpu_room:
        needs = ", ".join(f"{d.name}: {d.gpus_per_replica:g} GPUs x max {d.max_replicas} replicas"
                          for d in demands if d.gpus_per_replica)
        room = ", ".join(f"{p.group}: maxReplicas {p.max_replicas} x {p.gpus:g} GPUs" for p in pods if p.gpus)
        problems.append(f"not enough GPUs: Serve may scale to {gpu_needed:g} GPUs ({needs}) but the worker "
                        f"groups hold at most {gpu_room:g} ({room or 'no GPU group'})")

    unplaced = [d for d in demands if not d.bundles]
    head_cpus = sum(d.cpus_per_replica * d.max_replicas for d in unplaced)
    if head_cpus > head.cpus or any(d.gpus_per_replica for d in unplaced):
        problems.append(f"the head's {head.cpus:g} logical CPUs (rayStartParams num-cpus) do not hold "
                        + ", ".join(f"{d.name} ({d.cpus_per_replica:g} CPU x max {d.max_replicas})" for d in unplaced)
                        + ": they would land on worker Pods and keep them from scaling down")

    nodes = [[max(0.0, head.cpus - head_cpus), head.gpus]]
    nodes += [[p.cpus, p.gpus] for p in pods for _ in range(min(p.max_replicas, 64))]
    for demand in (d for d in demands if d.bundles):
        for replica in range(demand.max_replicas):
            if not place_replica(nodes, demand.bundles, demand.strategy):
                problems.append(f"{demand.name}: replica {replica + 1} of max {demand.max_replicas} does not fit: "
                                f"bundles {list(demand.bundles)} ({demand.strategy}) on Pods of "
                                + ", ".join(f"{p.group} ({p.cpus:g} CPU, {p.gpus:g} GPU) x {p.max_replicas}"
                                            for p in pods))
                break

    memories = [p.gpu_memory for p in pods if p.gpus]
    for group in (p.group for p in pods if p.gpus and not p.gpu_memory):
        problems.append(f"{group}: GPU group without the {GPU_MEMORY_ANNOTATION} annotation (the memory of one "
                        f"GPU its sizing assumes, e.g. 22GiB)")
    for demand in (d for d in demands if d.model is not None and d.gpus_per_replica):
        from neo_serve.models.attention import FlashAttentionBackend
        from neo_serve.plan import parse_bytes

        if any(b.get("GPU", 0) != 1 for b in demand.bundles):
            problems.append(f"{demand.name}: every stage bundle should hold exactly one GPU: {list(demand.bundles)}")
        if not all(memories):
            continue
        gpu_memory = min(memories, key=parse_bytes)
        try:
            config_path = reference_config(demand.model.checkpoint)
        except LookupError as exc:
            problems.append(f"{demand.name}: {exc}")
            continue
        plan = cached_plan(config_path, demand.model.num_stages, gpu_memory, demand.model.dtype)  # plan resolves auto
        for stage in plan.stages:
            if not stage.fits:
                problems.append(f"{demand.name}: stage {stage.index}'s weights ({stage.weight_bytes / 2**30:.2f} GiB) "
                                f"do not fit a {gpu_memory} GPU ({plan.usable_bytes / 2**30:.2f} GiB usable); "
                                f"neo-serve plan --gpus {demand.model.num_stages} --gpu-memory {gpu_memory}")
        if plan.fits and demand.model.kv_cache_tokens > plan.kv_tokens:
            problems.append(f"{demand.name}: kv_cache_tokens {demand.model.kv_cache_tokens} > the {plan.kv_tokens} "
                            f"tokens that fit beside the weights on a {gpu_memory} GPU")
        # After a stage fault every stage restarts and reloads its weights at once, from the same
        # shared volume; past recovery_timeout_s the pipeline gives up and Serve replaces it.
        reload_s = sum(stage.weight_bytes for stage in plan.stages) / SHARED_VOLUME_BYTES_PER_S
        if demand.model.recovery_timeout_s < reload_s:
            problems.append(f"{demand.name}: recovery_timeout_s {demand.model.recovery_timeout_s:g} is shorter than "
                            f"the {reload_s:.0f} s its stages take to reload their weights together from a shared "
                            f"volume at {SHARED_VOLUME_BYTES_PER_S / 2**20:.0f} MiB/s")
        pages = demand.model.kv_cache_tokens // FlashAttentionBackend.PAGE_MULTIPLE
        if demand.model.max_num_seqs > pages:
            problems.append(f"{demand.name}: max_num_seqs {demand.model.max_num_seqs} > the {pages} flash-attn pages of "
                            f"kv_cache_tokens {demand.model.kv_cache_tokens} (each running sequence holds one)")
    return problems


# ---- Fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> OfflineCheckpoints:
    return OfflineCheckpoints(tmp_path_factory.mktemp("k8s-checkpoints"))


@pytest.fixture
def gpu_doc() -> dict[str, Any]:
    return rayservice(GPU_MANIFEST)


def edit_args(doc: dict[str, Any], edit) -> dict[str, Any]:
    config = serve_config(doc)
    edit(config["applications"][0]["args"])
    set_serve_config(doc, config)
    return doc


def edit_scaling(doc: dict[str, Any], deployment: str, **bounds) -> dict[str, Any]:
    """Change a deployment's autoscaling bounds where the manifest keeps them: `deployments:`."""
    config = serve_config(doc)
    [override] = [d for d in config["applications"][0]["deployments"] if d["name"] == deployment]
    override["autoscaling_config"].update(bounds)
    set_serve_config(doc, config)
    return doc


def gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    (group,) = [g for g in worker_groups(cluster_spec(doc)) if pod_shape(g).gpus]
    return group


# ---- Tests: Kubernetes ----------------------------------------------------------------------

def test_the_manifests_are_there():
    assert GPU_MANIFEST in MANIFESTS and DEMO_MANIFEST in MANIFESTS
    for path in MANIFESTS:
        kinds = [doc.get("kind") for doc in load_documents(path)]
        assert kinds.count("RayService") == 1, f"{path.name}: one RayService per file, got {kinds}"


@needs_schemas
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kuberay_crds(path):
    for doc in load_documents(path):
        assert schema_problems(doc) == [], f"{path.name}: {doc.get('kind')} {doc['metadata'].get('name')}"


@needs_schemas
def test_schema_check_applies_defaults_and_prunes_nulls_like_the_apiserver(gpu_doc):
    group = gpu_group(gpu_doc)
    del group["minReplicas"], group["maxReplicas"]  # required, but defaulted (0 and 2**31-1)
    group["template"]["metadata"] = None               # pruned
    assert schema_problems(gpu_doc) == []


@needs_schemas
@pytest.mark.parametrize("mistake, expected", [
    (lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoScaling=True),
     "rayClusterConfig/enableInTreeAutoScaling: unknown field"),
    (lambda d: gpu_group(d)["rayStartParams"].update({"num-cpus": 9}), "is not of type 'string'"),
    (lambda d: ray_container(gpu_group(d))["resources"]["requests"].update(cpu=0.5), "is not valid under any"),
    (lambda d: ray_container(gpu_group(d))["resources"]["limits"].update(memory="64GB "), "does not match"),
    (lambda d: ray_container(gpu_group(d)).update(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
     "duplicate entries ('A',)"),
    (lambda d: gpu_group(d)["template"]["metadata"]["annotations"].update({GPU_MEMORY_ANNOTATION: 22}),
     "is not of type 'string'"),
    (lambda d: d["metadata"].update(name="GPT_NeoX"), "RFC 1123"),
], ids=["typo", "int-in-string-map", "float-quantity", "bad-quantity", "duplicate-env", "int-annotation", "bad-name"])
def test_schema_check_reports_mistakes(gpu_doc, mistake, expected):
    mistake(gpu_doc)
    problems = schema_problems(gpu_doc)
    assert any(expected in p for p in problems), problems


@needs_schemas
def test_core_kinds_are_validated_too():
    (pvc,) = [doc for doc in load_documents(GPU_MANIFEST) if doc["kind"] == "PersistentVolumeClaim"]
    assert schema_problems(pvc) == []
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    assert any("accesModes: unknown field" in p for p in schema_problems(pvc))
    assert "no offline schema" in schema_problems({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})[0]


def test_yaml_is_read_as_kubectl_reads_it():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=StrictLoader)
    assert yaml.load("t: 2026-01-02\n", Loader=StrictLoader) == {"t": "2026-01-02"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_operator_rules(path):
    for doc in ray_documents(path):
        assert kuberay_problems(doc) == []


@pytest.mark.parametrize("mistake, expected", [
    (lambda d: gpu_group(d).update(minReplicas=3), "minReplicas 3 > maxReplicas 2"),
    (lambda d: ray_container(gpu_group(d))["resources"]["requests"].update({"nvidia.com/gpu": "2"}),
     "request 2 != limit 4"),
    (lambda d: ray_container(gpu_group(d))["resources"]["limits"].pop("nvidia.com/gpu"), "needs a limit"),
    (lambda d: gpu_group(d).update(resources={"CPU": "9"}), "both in rayStartParams and in the group's resources"),
    (lambda d: d["metadata"].update(name="gpt-neox-20b-float16-four-stages-on-a10g-and-l4-gpus"), "at most 47"),
    (lambda d: d["spec"]["upgradeStrategy"].update(type="Rolling"), "must be one of"),
    (lambda d: d["spec"]["upgradeStrategy"].update(type="NewClusterWithIncrementalUpgrade"),
     "needs clusterUpgradeOptions"),
    (lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v1"), "needs autoscalerOptions"),
    (lambda d: gpu_group(d)["template"]["spec"].update(restartPolicy="Always"), "restartPolicy must be Never"),
], ids=["min-over-max", "gpu-request-not-limit", "gpu-no-limit", "resources-twice", "long-name", "upgrade-type",
        "incremental-without-options", "idle-timeout-v1", "restart-policy"])
def test_kuberay_rules_report_mistakes(gpu_doc, mistake, expected):
    mistake(gpu_doc)
    problems = kuberay_problems(gpu_doc)
    assert any(expected in p for p in problems), problems


def test_incremental_upgrade_rules(gpu_doc):
    gpu_doc["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 25, "intervalSeconds": 60, "maxSurgePercent": 50}}
    assert kuberay_problems(gpu_doc) == []
    gpu_doc["spec"]["upgradeStrategy"]["clusterUpgradeOptions"].update(stepSizePercent=75, intervalSeconds=0)
    problems = kuberay_problems(gpu_doc)
    assert any("stepSizePercent <= maxSurgePercent" in p for p in problems)
    assert any("intervalSeconds must be > 0" in p for p in problems)


# ---- Tests: Serve ---------------------------------------------------------------------------

@needs_reference  # build_app verifies the checkpoints against their real config.json
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_validates_and_builds_the_app(path, checkpoints):
    doc = rayservice(path)
    config = serve_config(doc)
    assert serve_config_problems(config) == []
    assert [app["import_path"] for app in config["applications"]] == ["neo_serve.app:build_app"]
    from neo_serve.app import build_app

    assert import_attr("neo_serve.app:build_app") is build_app
    (app, app_args, built) = build_serve_applications(doc, checkpoints)[0]
    names = {d.name for d in built.deployments}
    # The router, one pipeline deployment per model, and the playground (unless disabled).
    expected = 1 + len(app_args.models) + (1 if app_args.playground.enabled else 0)
    assert built.ingress_deployment_name == "Router" and len(names) == expected
    # Serve autoscales whole pipelines (the bounds sit in `deployments:`, where an edit does not
    # restart the app: test_serve_config.py).
    assert all(m.autoscaling is not None for m in scaled_app_args(app).models)


@needs_reference
def test_serve_config_checks_report_mistakes(gpu_doc, checkpoints):
    config = serve_config(gpu_doc)
    config["applications"][0]["deployments"] = [{"name": "Router", "num_replicas": 2, "bogus": 1,
                                                 "autoscaling_config": {"max_replicas": 2}}]
    problems = serve_config_problems(config)
    assert any("Manually setting num_replicas is not allowed" in p for p in problems), problems
    del config["applications"][0]["deployments"][0]["num_replicas"]
    assert serve_config_problems(config) == ["serveConfigV2/neo-serve/deployments/Router/bogus: unknown key"]
    from neo_serve.serve.config import AppConfigError

    edit_args(gpu_doc, lambda args: args["models"][0].update(num_stage=4))  # a typo in the args
    with pytest.raises(Exception, match="num_stage"):
        build_serve_applications(gpu_doc, checkpoints)
    gpu_doc = rayservice(GPU_MANIFEST)
    edit_args(gpu_doc, lambda args: args["models"][0].update(num_stages=45))  # more stages than layers
    with pytest.raises(AppConfigError, match="num_stages"):
        build_serve_applications(gpu_doc, checkpoints)


# ---- Tests: resources -----------------------------------------------------------------------

@needs_reference
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_resources_agree(path, checkpoints):
    assert resource_problems(rayservice(path), checkpoints) == []


@needs_reference
def test_gpu_manifest_is_sized_by_the_plan(gpu_doc, checkpoints):
    """The figures the manifest's comments quote are the planner's."""
    (pipeline,) = [d for d in serve_demands(gpu_doc, checkpoints) if d.model is not None]
    shape = pod_shape(gpu_group(gpu_doc))
    assert (pipeline.gpus_per_replica, pipeline.max_replicas, pipeline.model.dtype) == (4, 2, "float16")
    assert (shape.gpus, shape.max_replicas, shape.cpus) == (4, 2, pipeline.cpus_per_replica)
    plan = cached_plan(REFERENCE / "gpt-neox-20b.config.json", 4, shape.gpu_memory, "float16")
    assert [round(s.weight_bytes / 2**30, 2) for s in plan.stages] == [9.86, 9.28, 9.28, 9.86]
    assert 32768 == pipeline.model.kv_cache_tokens <= plan.kv_tokens
    # A hung CUDA call restarts the stages instead of stalling every stream of the pipeline (and
    # the autoscaler renting another GPU Pod for the requests stuck in it).
    assert pipeline.model.step_timeout_s is not None


@needs_reference
@pytest.mark.parametrize("edit, expected", [
    (lambda d: edit_args(d, lambda a: a["models"][0].update(num_stages=8)), "not enough GPUs: Serve may scale to 16"),
    (lambda d: edit_scaling(d, "Pipeline-gpt-neox-20b", max_replicas=3), "not enough GPUs: Serve may scale to 12"),
    (lambda d: gpu_group(d).update(maxReplicas=1), "hold at most 4"),
    (lambda d: [ray_container(gpu_group(d))["resources"][k].update({"nvidia.com/gpu": "2"})
                for k in ("requests", "limits")], "hold at most 4"),
], ids=["num_stages-8", "max_replicas-3", "maxReplicas-1", "2-gpus-per-pod"])
def test_resource_check_fails_without_the_gpus(gpu_doc, checkpoints, edit, expected):
    edit(gpu_doc)
    problems = resource_problems(gpu_doc, checkpoints)
    assert any(expected in p for p in problems), problems


@needs_reference
def test_resource_check_sees_autoscaling_in_args_too(gpu_doc, checkpoints):
    config = serve_config(gpu_doc)  # the bounds moved from `deployments:` into the model's args
    app = config["applications"][0]
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Pipeline-gpt-neox-20b"]
    app["args"]["models"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    set_serve_config(gpu_doc, config)
    assert any("Serve may scale to 12" in p for p in resource_problems(gpu_doc, checkpoints))


@needs_reference
def test_resource_check_places_bundles_on_pods(gpu_doc, checkpoints):
    # 8 stages on 8-GPU Pods: 16 GPUs for 16, but a pipeline's 17 CPUs need more than one Pod's 9,
    # so the first pipeline takes both Pods and the second has nowhere to go.
    edit_args(gpu_doc, lambda a: a["models"][0].update(num_stages=8))
    for kind in ("requests", "limits"):
        ray_container(gpu_group(gpu_doc))["resources"][kind]["nvidia.com/gpu"] = "8"
    problems = resource_problems(gpu_doc, checkpoints)
    assert not any("not enough GPUs" in p for p in problems)
    assert any("replica 2 of max 2 does not fit" in p for p in problems), problems


@needs_reference
@pytest.mark.parametrize("edit, expected", [
    (lambda d: edit_args(d, lambda a: a["models"][0].update(num_stages=2)),  # 19.1 GiB a stage on 22GiB GPUs
     "stage 0's weights (19.14 GiB) do not fit a 22GiB GPU"),
    (lambda d: gpu_group(d)["template"]["metadata"]["annotations"].update({GPU_MEMORY_ANNOTATION: "12GiB"}),
     "do not fit a 12GiB GPU"),
    (lambda d: edit_args(d, lambda a: a["models"][0].update(kv_cache_tokens=40000)), "kv_cache_tokens 40000 >"),
    (lambda d: gpu_group(d)["template"]["metadata"]["annotations"].clear(), "without the neo-serve/gpu-memory"),
    (lambda d: edit_args(d, lambda a: a["models"][0].update(recovery_timeout_s=300)),  # 38 GiB at 100 MiB/s
     "recovery_timeout_s 300 is shorter than the 39"),
], ids=["2-stages-on-22GiB", "12GiB-gpus", "kv-too-big", "no-annotation", "recovery-too-short"])
def test_resource_check_fails_when_the_weights_do_not_fit(gpu_doc, checkpoints, edit, expected):
    edit(gpu_doc)
    problems = resource_problems(gpu_doc, checkpoints)
    assert any(expected in p for p in problems), problems


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """A group's custom Ray resources from rayStartParams `resources`, read as Ray's autoscaler
    on KubeRay reads it ('"{\\"name\\": 8}"' in YAML): outer quotes dropped, backslashes removed."""
    text = (group.get("rayStartParams") or {}).get("resources")
    if not text:
        return {}
    assert text[0] == text[-1] == '"', f"rayStartParams resources must be a quoted JSON object: {text!r}"
    return json.loads(text[1:-1].replace("\\", ""))


@needs_reference
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_router_and_playground_can_only_be_placed_on_the_head(path, checkpoints):
    # Serve spreads replicas without a placement group over the nodes; CPUs alone leave room for
    # a router on a worker Pod, which then could not scale down. A resource that only the head
    # offers, and that they ask for, keeps them there.
    doc = rayservice(path)
    cluster = cluster_spec(doc)
    head = custom_resources(cluster["headGroupSpec"])
    on_workers = {name for group in worker_groups(cluster) for name in custom_resources(group)}
    unplaced = [d for d in serve_demands(doc, checkpoints) if not d.bundles]
    assert {d.name for d in unplaced} == {"Router", "Playground"}
    needed: dict[str, float] = {}
    for demand in unplaced:
        resources = demand.actor.get("resources") or {}
        assert resources, f"{demand.name}: no custom resource keeps it on the head"
        for name, amount in resources.items():
            assert name in head and name not in on_workers, (demand.name, name, head, on_workers)
            needed[name] = needed.get(name, 0) + amount * demand.max_replicas
    assert all(head[name] >= amount for name, amount in needed.items()), (head, needed)


@needs_reference
def test_routers_stay_on_the_head(gpu_doc, checkpoints):
    edit_scaling(gpu_doc, "Router", max_replicas=4)
    problems = resource_problems(gpu_doc, checkpoints)
    assert any("head's 2 logical CPUs" in p and "Router" in p for p in problems), problems


# ---- Tests: wiring --------------------------------------------------------------------------

def ray_groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = cluster_spec(doc)
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in worker_groups(cluster)]


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    return next((m for m in container.get("volumeMounts") or []
                 if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")), None)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_that_reads_the_weights_mounts_them_from_the_pvc(path):
    docs = load_documents(path)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    doc = rayservice(path)
    for app in serve_config(doc)["applications"]:
        models = (app.get("args") or {}).get("models") or []
        for checkpoint in (m["checkpoint"] for m in models if m.get("checkpoint")):
            for group_name, group in ray_groups(doc):  # build_app verifies on the head, stages load on workers
                pod = group["template"]["spec"]
                mount = mount_for(ray_container(group), checkpoint)
                assert mount, f"{group_name}: {checkpoint} is not on a volume of the Ray container"
                volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                assert volume["persistentVolumeClaim"]["claimName"] in claims
                assert mount.get("readOnly") is True, f"{group_name}: serving Pods mount the weights read-only"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_readiness_is_left_to_kuberays_proxy_probe(path):
    # KubeRay adds its own probes only where a container sets none: on a RayService worker they
    # check the Pod's raylet and its Serve proxy (/-/healthz), which fails while the proxy drains
    # for a scale-down. A probe of the app's /health (answered for the whole app by whichever
    # router the request reaches) would keep such a Pod in the Serve Service until it refused.
    doc = rayservice(path)
    port = (serve_config(doc).get("http_options") or {}).get("port", 8000)
    for group_name, group in ray_groups(doc):
        container = ray_container(group)
        assert "readinessProbe" not in container and "livenessProbe" not in container, group_name
        assert {"serve": port, "metrics": 8080}.items() <= {
            p["name"]: p["containerPort"] for p in container["ports"]}.items(), group_name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_a_deleted_pod_hands_its_pipeline_over_first(path):
    """Every Pod that can hold a pipeline drains before it stops (`neo-serve drain`, which
    tests/test_drain.py runs on a real cluster): the drain's deadline leaves Serve time to start a
    replacement and then the pipelines' graceful_shutdown_timeout_s for the streams, and
    Kubernetes waits for the hook longer than that deadline."""
    from neo_serve.cli import build_parser
    from neo_serve.serve.config import AppArgs

    doc = rayservice(path)
    graceful = max(model.graceful_shutdown_timeout_s for app in serve_config(doc)["applications"]
                   for model in AppArgs.model_validate(app.get("args") or {}).models)
    for group in worker_groups(cluster_spec(doc)):
        pod = group["template"]["spec"]
        command = ray_container(group)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["neo-serve", "drain"], (group["groupName"], command)
        deadline = build_parser().parse_args(command[1:]).deadline_s  # flags the CLI knows
        assert deadline >= graceful + 60, f"{group['groupName']}: {deadline} s leaves no time for the replacement"
        # After the hook: its own start (imports, the GCS) and Ray's SIGTERM handling (up to 30 s).
        assert pod["terminationGracePeriodSeconds"] >= deadline + 60, group["groupName"]


def test_hub_download_is_optional_and_writes_where_the_app_reads(gpu_doc):
    head = cluster_spec(gpu_doc)["headGroupSpec"]
    (fetch,) = head["template"]["spec"]["initContainers"]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
    (model,) = serve_config(gpu_doc)["applications"][0]["args"]["models"]
    assert env["CHECKPOINT_DIR"]["value"] == model["checkpoint"]
    assert env["HF_REPO_ID"]["value"] == "EleutherAI/gpt-neox-20b"
    mount = mount_for(fetch, model["checkpoint"])
    assert mount and not mount.get("readOnly") and mount["name"] == mount_for(ray_container(head), model["checkpoint"])[
        "name"]
    assert fetch["image"] == ray_container(head)["image"]


def dockerfile_text() -> str:
    """deploy/Dockerfile with its ARG defaults substituted (`FROM rayproject/ray:${RAY_VERSION}-py311`)."""
    text = DOCKERFILE.read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=\"?([^\"\s]*)\"?", text, re.M))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def test_the_image_imports_the_installed_package_where_its_processes_run(tmp_path):
    """Replay the Dockerfile's files: COPY, the package's pip install (into a scratch site dir),
    rm, WORKDIR; then run its import check in its working directory, as `docker build` would. A
    source tree left there shadows the installed package for Python and for every Ray process
    started there (the playground ships from ui/ as `neo_serve.ui`, which neo_serve/ lacks)."""
    import os
    import site
    import subprocess

    root, site_dir = tmp_path / "image", tmp_path / "site-packages"
    here = lambda container_path: root / container_path.lstrip("/")  # noqa: E731
    workdir, checks = "/", []
    for instruction, args in dockerfile_instructions():
        if instruction == "WORKDIR":
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
            here(workdir).mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = [a for a in args.split() if not a.startswith("--")]
            dest_path = here(dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}")
            for source in sources:
                target = dest_path / Path(source).name if dest.endswith("/") or len(sources) > 1 else dest_path
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (REPO / source).is_dir() else shutil.copy)(REPO / source, target)
        elif instruction == "RUN":
            for command in re.split(r"\s*&&\s*", args):
                if package := re.match(r'pip install [^"]*"(/[^"$]+|\.)', command):  # the package, not a PyPI name
                    source = package[1] if package[1].startswith("/") else workdir
                    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                    "--no-build-isolation", "--target", str(site_dir), str(here(source))],
                                   check=True, capture_output=True, timeout=300)
                elif removed := re.match(r"rm -rf (/\S+)$", command):
                    shutil.rmtree(here(removed[1]))
                elif check := re.match(r'python -c "([^"]+)"$', command):
                    checks.append((check[1], workdir))
    assert site_dir.is_dir() and checks, f"{DOCKERFILE}: expected a pip install of the package and an import check"
    # -S: only the installed copy, not this checkout's editable install (its finder is a .pth);
    # the interpreter's own site-packages stay reachable for torch, ray and gradio.
    path = os.pathsep.join([str(site_dir), *site.getsitepackages()])
    for code, directory in checks:
        result = subprocess.run([sys.executable, "-S", "-c", code], cwd=here(directory), capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": path}, timeout=300)
        assert result.returncode == 0, f"{DOCKERFILE}: `python -c {code!r}` in {directory}:\n{result.stderr[-2000:]}"
    assert workdir == checks[-1][1], "the last import check runs where the image's processes start"


def test_the_gpu_image_fails_to_build_when_flash_attn_does_not_load():
    # flash_attn_available() takes an ImportError (e.g. an extension built against another
    # torch) for "not installed", and every stage would then run SDPA without a word.
    gpu_checks = [args for instruction, args in dockerfile_instructions()
                  if instruction == "RUN" and '"${NEO_SERVE_EXTRAS}" = "gpu"' in args and "python -c" in args]
    assert any("import flash_attn, flash_attn_2_cuda" in args for args in gpu_checks), gpu_checks


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_images_are_the_neo_serve_image_of_the_clusters_ray(path):
    import ray

    match = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", dockerfile_text(), re.M)
    assert match, f"{DOCKERFILE}: expected FROM rayproject/ray:<version>-py3XX..."
    doc = rayservice(path)
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == match.group(1) == ray.__version__
    versions = set()
    for group_name, group in ray_groups(doc):
        pod = group["template"]["spec"]
        for container in (pod.get("initContainers") or []) + pod["containers"]:
            image = IMAGE.search(container["image"])
            assert image, f"{group_name}/{container['name']}: {container['image']} is not a neo-serve:<v>-cpu|gpu"
            versions.add(image["version"])
        flavor = IMAGE.search(ray_container(group)["image"])["flavor"]
        assert flavor == ("gpu" if pod_shape(group, head=group_name == "head").gpus else "cpu"), group_name
    assert len(versions) == 1, f"one neo-serve build for every Pod: {versions}"


# ---- Tests: the Hub download init container, against a stand-in Hub ------------------------

class StandInHub:
    """`huggingface_hub.list_repo_files` / `snapshot_download` over local files (fnmatch
    patterns, as the real one filters)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.calls = files, []

    def module(self) -> types.ModuleType:
        module = types.ModuleType("huggingface_hub")
        module.list_repo_files = lambda repo, *, revision=None, token=None, repo_type=None: sorted(self.files)
        module.snapshot_download = self.snapshot_download
        return module

    def snapshot_download(self, repo, *, revision=None, token=None, local_dir, allow_patterns=None,
                          ignore_patterns=None, **_):
        self.calls.append({"repo": repo, "revision": revision, "token": token})
        for name, source in self.files.items():
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            if ignore_patterns and any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                continue
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, Path(local_dir) / name)
        return str(local_dir)


def run_fetch(doc: dict[str, Any], hub: StandInHub, target: Path, monkeypatch) -> None:
    (fetch,) = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert fetch["command"] == ["python", "-c"]
    for entry in fetch["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
    monkeypatch.setenv("CHECKPOINT_DIR", str(target))
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub.module())
    exec(compile(fetch["args"][0], "<fetch-weights>", "exec"), {"__name__": "__main__"})


@pytest.fixture
def demo_files() -> dict[str, Path]:
    from neo_serve.serve.config import DEMO_CHECKPOINT

    return {p.name: p for p in DEMO_CHECKPOINT.iterdir() if p.is_file()}


def test_fetch_keeps_safetensors_validates_and_runs_once(gpu_doc, demo_files, tmp_path, monkeypatch):
    decoy = tmp_path / "pytorch_model.bin"
    decoy.write_bytes(b"not to be downloaded")
    hub = StandInHub({**demo_files, "pytorch_model.bin": decoy, "pytorch_model.bin.index.json": decoy})
    target = tmp_path / "models" / "gpt-neox-20b"
    run_fetch(gpu_doc, hub, target, monkeypatch)
    assert hub.calls == [{"repo": "EleutherAI/gpt-neox-20b", "revision": "main", "token": "hf_stand_in"}]
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.bin*"))
    assert (target / ".neo-serve-verified").read_text() == "EleutherAI/gpt-neox-20b@main\n"
    with pytest.raises(SystemExit) as done:  # the next Pod start finds the marker
        run_fetch(gpu_doc, hub, target, monkeypatch)
    assert done.value.code == 0 and len(hub.calls) == 1


def test_fetch_converts_a_pickle_only_repository(gpu_doc, demo_files, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    pickle = tmp_path / "pytorch_model.bin"
    torch.save(load_file(demo_files.pop("model.safetensors")), pickle)
    target = tmp_path / "models" / "gpt-neox-20b"
    run_fetch(gpu_doc, StandInHub({**demo_files, "pytorch_model.bin": pickle}), target, monkeypatch)
    assert sorted(p.name for p in target.glob("*.safetensors*")) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert not list(target.glob("*.bin")) and not target.with_name("gpt-neox-20b.pickle-download").exists()
    assert (target / ".neo-serve-verified").is_file()


def test_fetch_refuses_a_truncated_or_mismatched_checkpoint(gpu_doc, demo_files, tmp_path, monkeypatch):
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(demo_files["model.safetensors"].read_bytes()[:5_000_000])
    target = tmp_path / "a" / "gpt-neox-20b"
    with pytest.raises(SystemExit, match="incomplete metadata|not fully covered|cannot read"):
        run_fetch(gpu_doc, StandInHub({**demo_files, "model.safetensors": truncated}), target, monkeypatch)
    assert not (target / ".neo-serve-verified").exists()

    config = json.loads(demo_files["config.json"].read_text())
    config["num_hidden_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = tmp_path / "b" / "gpt-neox-20b"
    with pytest.raises(SystemExit, match="does not match its config.json"):
        run_fetch(gpu_doc, StandInHub({**demo_files, "config.json": tmp_path / "config.json"}), target, monkeypatch)
    assert not (target / ".neo-serve-verified").exists()
