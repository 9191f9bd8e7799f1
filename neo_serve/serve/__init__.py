"""The service: pipeline deployments of stage workers behind an OpenAI-compatible router.

- `config`: build args (pydantic) -> deployment options (placement bundles, scaling).
- `pipeline`: the pipeline deployment (continuous batching over stages, per-request streams).
- `stages`: step runners (in-process for one stage, a chain of stage actors for several).
- `router`: the FastAPI ingress (`/v1/completions`, `/v1/models`, `/health`, `generate`).
- `completions`, `protocol`, `outputs`: the OpenAI protocol and the stream format between them.
- `metrics`: Ray Serve custom metrics. `launcher`: `neo-serve up`; `ingress`: its HTTP front door
  (Serve's HAProxy ingress or Python proxy) on a cluster it starts.

The application builder is `neo_serve.app:build_app`.
"""
