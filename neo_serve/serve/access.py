"""Who may call the HTTP API, and how much they may send: an ASGI middleware on the router.

- API keys (optional): `Authorization: Bearer <key>`, keys read when the router starts from an
  environment variable (comma-separated) and/or a file (one per line); each comparison is
  constant-time (`hmac.compare_digest`). `/health` stays open for load balancers and probes,
  and so do the API's description (`/openapi.json`, `/docs`, `/redoc` and the pages' assets), which
  holds no secret.
- The playground (`/ui`) takes the same keys from a browser: a page that is not signed in is sent
  to `/ui/login`, whose form sets an HttpOnly, SameSite=Strict cookie scoped to `/ui`. The cookie
  holds a digest of the key, not the key, and opens only the playground (never `/v1`, so a
  cross-site form cannot spend it on the API); `/ui/logout` clears it.
- Request bodies above `max_body_bytes` are refused with 413, whether announced by
  Content-Length or streamed in chunks, before the router parses them.
Refusals are OpenAI-style error JSON (the login page is HTML).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

# Probes; the root only points on (router.py); the API's description and its pages (as vLLM
# leaves them open), where a user then gives a key with the page's Authorize button.
OPEN_PATHS = frozenset({"/health", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_ASSETS = "/docs/assets"  # those pages' scripts, styles and icon (open too)
UI_PREFIX = "/ui"
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
SESSION_COOKIE = "neo_serve_ui"
MAX_LOGIN_BODY = 4096


def _is_open(relative: str) -> bool:
    """Whether the app's path `relative` needs no key: probes, the API's description and pages."""
    if relative in OPEN_PATHS:
        return True
    # Only a file under the pages' assets (no `..` out of them: ASGI paths come unnormalized).
    return relative.startswith(DOCS_ASSETS + "/") and ".." not in relative.split("/")


def session_token(key: bytes) -> bytes:
    """What the playground's cookie holds for `key`: a digest, so the cookie is not the API key.
    Deterministic, so every router replica accepts it."""
    return hashlib.sha256(b"neo-serve playground session\0" + key).hexdigest().encode()


@functools.lru_cache(maxsize=8)
def _session_tokens(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The session tokens of a key set, computed once (every playground request checks them)."""
    return tuple(session_token(key) for key in keys)


def _matches(given: bytes, expected: tuple[bytes, ...]) -> bool:
    # Compare with every value (no early exit) so timing does not tell which one nearly matched.
    results = [hmac.compare_digest(given, value) for value in expected]
    return any(results)


def load_api_keys(env_var: str | None, file: str | None) -> tuple[bytes, ...]:
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys += os.environ[env_var].split(",")
    if file:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"router.api_keys_file: {file} does not exist")
        from_file = [key for key in path.read_text().splitlines() if key.strip()]
        if not from_file:
            # An empty file (say, a secret mounted before it was filled) would leave the API open.
            raise ValueError(f"router.api_keys_file: {file} holds no keys (one key per line)")
        keys += from_file
    return tuple(key.strip().encode() for key in keys if key.strip())


class AccessMiddleware:
    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        self.settings = settings  # object with .api_keys (tuple[bytes]), .max_body_bytes and .playground

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        settings = self.settings
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        # The app's own path; "" is its root too (`/prefix` without the slash).
        relative = (path[len(root):] if root and path.startswith(root) else path) or "/"
        in_ui = relative == UI_PREFIX or relative.startswith(UI_PREFIX + "/")
        signs_in = settings.api_keys and settings.playground  # the playground's sign-in form
        if signs_in and scope["type"] == "http" and relative in (LOGIN_PATH, LOGOUT_PATH):
            return await self._login(scope, receive, send, settings.api_keys, root, logout=relative == LOGOUT_PATH)
        if settings.api_keys and not _is_open(relative) and not self._authorized(scope, settings.api_keys, in_ui):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            if signs_in and in_ui and scope.get("method") == "GET" and "text/html" in (_header(scope, b"accept") or ""):
                target = root + LOGIN_PATH + "?next=" + quote(path + _query(scope), safe="")
                return await _redirect(send, target)
            return await _refuse(send, 401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"})
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        limit = settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                                 "invalid_request_error", "request_too_large")
        body = await _read_body(receive, limit)
        if body is None:
            return await _refuse(send, 413, f"request body exceeds the limit of {limit} bytes",
                                 "invalid_request_error", "request_too_large")
        if body is _DISCONNECTED:
            return  # the client went away
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later messages: http.disconnect

        await self.app(scope, replay, send)

    @staticmethod
    def _authorized(scope: dict, keys: tuple[bytes, ...], in_ui: bool) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token:
            return _matches(token.strip().encode(), keys)
        if in_ui:  # the browser's playground session
            cookie = _cookie(scope, SESSION_COOKIE)
            return cookie is not None and _matches(cookie.encode(), _session_tokens(keys))
        return False

    async def _login(self, scope: dict, receive: Any, send: Any, keys: tuple[bytes, ...], root: str, *,
                     logout: bool) -> None:
        """GET: the sign-in form; POST: check the key, set the session cookie, go on to `next`."""
        cookie_path = (root or "") + UI_PREFIX
        if logout:
            return await _redirect(send, root + LOGIN_PATH, cookie=f"{SESSION_COOKIE}=; Path={cookie_path}; "
                                                                  "Max-Age=0; HttpOnly; SameSite=Strict")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("method") != "POST":
            return await _login_page(send, 200, query.get("next", [""])[0], root, error=None)
        body = await _read_body(receive, MAX_LOGIN_BODY)
        if body is None or body is _DISCONNECTED:
            return await _refuse(send, 413, "sign-in form too large", "invalid_request_error", "request_too_large")
        form = parse_qs(bytes(body).decode("utf-8", "replace"))
        key = form.get("api_key", [""])[0].strip().encode()
        next_url = form.get("next", [""])[0]
        if not key or not _matches(key, keys):
            return await _login_page(send, 401, next_url, root, error="That key is not valid.")
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = (f"{SESSION_COOKIE}={session_token(key).decode()}; Path={cookie_path}; HttpOnly; "
                  f"SameSite=Strict{secure}")
        # Only back into this playground: never an open redirect.
        in_playground = next_url == cookie_path or next_url.startswith(cookie_path + "/")
        if not in_playground or next_url.startswith(root + LOGIN_PATH):
            next_url = cookie_path + "/"
        # Percent-encoded as a URL: raw non-ASCII cannot go in a header, and CR/LF would split it.
        return await _redirect(send, quote(next_url, safe=":/?#[]@!$&'()*+,;=%"), cookie=cookie)


_DISCONNECTED = object()


async def _read_body(receive: Any, limit: int) -> Any:
    """The whole request body, None past `limit`, `_DISCONNECTED` if the client went away. Read
    here, up to the limit, and replayed: chunked uploads are capped too."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return _DISCONNECTED
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            return None
    return body


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: dict, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            cookie_name, _, cookie_value = part.strip().partition("=")
            if cookie_name == name:
                return cookie_value
    return None


def _query(scope: dict) -> str:
    query = scope.get("query_string", b"")
    return "?" + query.decode("latin-1") if query else ""


async def _redirect(send: Any, location: str, *, cookie: str | None = None) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0"),
               (b"cache-control", b"no-store")]
    if cookie is not None:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>neo-serve playground: sign in</title>
<style>
 body {{ font-family: system-ui, sans-serif; background: #f6f7f9; display: flex; justify-content: center;
        align-items: center; min-height: 100vh; margin: 0; }}
 form {{ background: #fff; padding: 2rem 2.5rem; border-radius: 10px; box-shadow: 0 2px 12px rgba(0,0,0,.08);
        width: 22rem; }}
 h1 {{ font-size: 1.25rem; margin: 0 0 .5rem; }} p {{ color: #555; font-size: .9rem; }}
 input[type=password] {{ width: 100%; box-sizing: border-box; padding: .6rem; font-size: 1rem; margin: .5rem 0 1rem;
        border: 1px solid #ccc; border-radius: 6px; }}
 button {{ width: 100%; padding: .6rem; font-size: 1rem; border: 0; border-radius: 6px; background: #4f46e5;
        color: #fff; cursor: pointer; }}
 .error {{ color: #b91c1c; }}
</style></head>
<body><form method="post" action="{action}">
<h1>neo-serve playground</h1>
<p>This server requires an API key. Sign in with one of its keys to use the playground.</p>
{error}<label for="api_key">API key</label>
<input id="api_key" name="api_key" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button id="sign-in" type="submit">Sign in</button>
</form></body></html>
"""


async def _login_page(send: Any, status: int, next_url: str, root: str, *, error: str | None) -> None:
    page = LOGIN_PAGE.format(action=html.escape(root + LOGIN_PATH), next=html.escape(next_url),
                             error=f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else "")
    body = page.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Any, status: int, message: str, error_type: str, code: str,
                  extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
