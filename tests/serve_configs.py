"""The Serve configs this repository ships (deploy/*.yaml and the RayServices' serveConfigV2), read
as Serve reads them: app args with the `deployments:` overrides applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from neo_serve.serve.config import AppArgs, deployment_name, parse_app_args

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "deploy").glob("*.yaml")) + sorted((REPO / "k8s").glob("*.rayservice.yaml"))


def load_serve_config(path: Path) -> dict[str, Any]:
    """A Serve config file, or the serveConfigV2 of the RayService in a manifest."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "RayService":
            return yaml.safe_load(doc["spec"]["serveConfigV2"])
        if doc and "applications" in doc:
            return doc
    raise AssertionError(f"{path}: neither a Serve config nor a RayService")


def scaled_app_args(app: dict[str, Any]) -> AppArgs:
    """The app's args with each `deployments:` entry's `autoscaling_config` (or `num_replicas`) in
    place of the scaling its args give the pipeline or router it names: the scaling Serve runs.
    Validated by the args' own model (bounds, target under max_ongoing_requests)."""
    args = parse_app_args(app.get("args") or {})
    overrides = {d["name"]: d for d in app.get("deployments") or []}

    def scaled(part: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
        if override and override.get("autoscaling_config"):
            return {**part, "num_replicas": None, "autoscaling": override["autoscaling_config"]}
        if override and isinstance(override.get("num_replicas"), int):
            return {**part, "num_replicas": override["num_replicas"], "autoscaling": None}
        return part

    dumped = args.model_dump()
    dumped["models"] = [scaled(dumped_model, overrides.get(deployment_name(model, args.models)))
                        for model, dumped_model in zip(args.models, dumped["models"])]
    dumped["router"] = scaled(dumped["router"], overrides.get("Router"))
    return AppArgs.model_validate(dumped)
