"""The application builder: `build_app(args) -> serve.Application`.

One builder for every way of deploying neo-serve:

    serve run neo_serve.app:build_app checkpoint=/models/pythia-160m num_stages=2
    serve deploy deploy/demo-cpu.yaml             # import_path: neo_serve.app:build_app
    neo-serve up /models/pythia-160m --stages 2
    serve.run(build_app({"models": [{"name": "neo", "checkpoint": "/models/neo", "num_stages": 2}]}))

The graph: a `Router` ingress deployment (FastAPI) holding a handle to one pipeline deployment
per model (`Pipeline-<name>`) and, unless `playground: false`, to the one-replica
`Playground` deployment (Gradio, at /ui) which calls the same pipelines through their handles;
see neo_serve/serve/, ui/ (neo_serve.ui), docs/serving.md and docs/playground.md.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from neo_serve.serve.config import AppArgs, AppConfigError, ModelArgs, deployment_name, parse_app_args
from neo_serve.serve.pipeline import pipeline_deployment
from neo_serve.serve.router import router_deployment
from neo_serve.ui.deployment import playground_deployment

__all__ = ["build_app", "AppArgs", "AppConfigError"]


def build_app(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """Build the neo-serve application from `args` (see `AppArgs`; a flat dict of `ModelArgs`
    fields means one model, no args the bundled demo model). Raises `AppConfigError` naming the
    field when the args, or with `verify_checkpoints` the checkpoints, cannot be served."""
    app_args = parse_app_args(args)
    cards = []
    for index, model in enumerate(app_args.models):
        card: dict[str, Any] = {"id": model.served_name, "root": model.checkpoint_path,
                                "num_stages": model.num_stages}
        if app_args.verify_checkpoints:
            card["max_model_len"] = verify_model(model, index)
        cards.append(card)
    # Each model's context window as far as the build knows it. Unverified, only if the args set
    # it (the pipeline refuses a larger one at load); the router then asks a pipeline replica when
    # a request needs it.
    windows = [card.get("max_model_len", model.max_model_len) for model, card in zip(app_args.models, cards)]
    names = [deployment_name(model, app_args.models) for model in app_args.models]
    pipelines = {model.served_name: pipeline_deployment(model, name).bind(model)
                 for model, name in zip(app_args.models, names)}
    relayed_timeout_s = max(model.graceful_shutdown_timeout_s for model in app_args.models)
    playground = None
    if app_args.playground.enabled:
        models = [{"name": card["id"], "deployment": name, "num_stages": model.num_stages,
                   "max_model_len": window, "request_timeout_s": model.request_timeout_s}
                  for model, card, name, window in zip(app_args.models, cards, names, windows)]
        playground = playground_deployment(app_args.playground, relayed_timeout_s).bind(pipelines, models,
                                                                                        app_args.playground)
    limits = {model.served_name: model.route_limits(window) for model, window in zip(app_args.models, windows)}
    return router_deployment(app_args.router, relayed_timeout_s).bind(pipelines, cards, app_args.router, playground,
                                                                    limits)


def verify_model(model: ModelArgs, index: int) -> int:
    """Open the checkpoint's config and tokenizer and check the engine limits, without loading
    weights. Returns the context window. Raises AppConfigError naming the field."""
    from neo_serve.engine.llm_engine import LLMEngine
    from neo_serve.serve.stages import UnloadedExecutor

    where = f"models[{index}] ({model.served_name})"
    try:
        config = model.engine_config()
    except ValueError as exc:
        raise AppConfigError(f"{where}: {exc}") from None
    try:
        engine = LLMEngine(config, executor=UnloadedExecutor())  # reads config.json and the tokenizer only
    except FileNotFoundError as exc:
        raise AppConfigError(f"{where}.checkpoint: {exc}") from None
    except Exception as exc:  # ConfigError, CheckpointError, partition errors: the message says which limit
        field = "num_stages" if "num_stages" in str(exc) else "checkpoint"
        for name in ("kv_cache_tokens", "max_model_len"):
            if name in str(exc):
                field = name
                break
        raise AppConfigError(f"{where}.{field}: {exc}") from None
    return engine.max_model_len
