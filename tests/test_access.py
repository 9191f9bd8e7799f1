"""The router's access middleware on raw ASGI requests (no Ray, no HTTP client, which would
normalize the paths that the middleware must judge as they come)."""

from __future__ import annotations

import asyncio

import pytest

from neo_serve.serve.access import AccessMiddleware


class Settings:
    api_keys = (b"the-key",)
    max_body_bytes = 1024
    playground = False


async def _inner_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"reached"})


def status_of(path: str, root_path: str = "") -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": [],
             "query_string": b""}
    asyncio.run(AccessMiddleware(_inner_app, Settings())(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize("path, root_path, status", [
    ("/docs", "", 200), ("/redoc", "", 200), ("/openapi.json", "", 200), ("/health", "", 200),
    # The API pages' scripts and styles are open as the pages are, under a route prefix too.
    ("/docs/assets/swagger-ui-bundle.js", "", 200), ("/secure/docs/assets/swagger-ui.css", "/secure", 200),
    # The API is not, nor is anything reached by climbing out of the assets.
    ("/v1/models", "", 401), ("/docs/assets/../../v1/models", "", 401), ("/docs/assets/..", "", 401),
    ("/docs/assetsX/file.js", "", 401), ("/secure/v1/completions", "/secure", 401),
])
def test_only_the_api_description_and_its_pages_need_no_key(path, root_path, status):
    assert status_of(path, root_path) == status
