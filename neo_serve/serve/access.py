"""Who may call the HTTP API, and how much they may send: an ASGI middleware on the router.

- API keys (optional): `Authorization: Bearer <key>`, keys read when the router starts from an
  environment variable (comma-separated) and/or a file (one per line); each comparison is
  constant-time (`hmac.compare_digest`). `/health` stays open for load balancers and probes.
- Request bodies above `max_body_bytes` are refused with 413, whether announced by
  Content-Length or streamed in chunks, before the router parses them.
Refusals are OpenAI-style error JSON.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

OPEN_PATHS = frozenset({"/health"})


def load_api_keys(env_var: str | None, file: str | None) -> tuple[bytes, ...]:
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys += os.environ[env_var].split(",")
    if file:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"router.api_keys_file: {file} does not exist")
        keys += path.read_text().splitlines()
    return tuple(key.strip().encode() for key in keys if key.strip())


class AccessMiddleware:
    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        self.settings = settings  # object with .api_keys (tuple[bytes]) and .max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        relative = path[len(root):] if root and path.startswith(root) else path
        if settings.api_keys and relative not in OPEN_PATHS and not self._authorized(scope, settings.api_keys):
            return await _refuse(send, 401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"})
        limit = settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                                 "invalid_request_error", "request_too_large")
        # Read the body here, up to the limit, then replay it: chunked uploads are capped too.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _refuse(send, 413, f"request body exceeds the limit of {limit} bytes",
                                     "invalid_request_error", "request_too_large")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later messages: http.disconnect

        await self.app(scope, replay, send)

    @staticmethod
    def _authorized(scope: dict, keys: tuple[bytes, ...]) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Compare with every key (no early exit) so timing does not tell which one nearly matched.
        matches = [hmac.compare_digest(given, key) for key in keys]
        return any(matches)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _refuse(send: Any, status: int, message: str, error_type: str, code: str,
                  extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
