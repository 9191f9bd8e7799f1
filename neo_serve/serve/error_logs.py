"""A client's mistake in a replica's log: one line, not an error with a traceback.

Ray Serve logs every exception a replica's method raises as "Request failed." at ERROR, with the
traceback. A prompt longer than the context window (refused in the pipeline replica) or a handle
caller's bad parameter (refused in the router) is the client's mistake, answered with a 4xx: as
an ERROR with thirty lines of traceback it floods the logs and trips alerts on error lines. The
filter below turns those records into one INFO line naming the status, error type and field (a
field the API knows; never the message, which may quote what the client sent: prompts stay out
of the logs). Server errors keep their tracebacks, and so do a full queue (429) and a missed
deadline (408), which say something about the server too.
"""

from __future__ import annotations

import logging

from neo_serve.serve.access import UI_PREFIX
from neo_serve.serve.completions import as_api_error
from neo_serve.serve.protocol import CompletionRequest

SERVE_LOGGER = "ray.serve"  # the logger Serve's replicas log requests on
SERVE_FAILURE_MESSAGE = "Request failed."  # what Serve logs a method's exception with
NOT_THE_CLIENTS_MISTAKE = frozenset({408, 429})  # a missed deadline, a full queue


def _known_field(name: str | None) -> str | None:
    """`name` if it is a field of the API ("stop", "stop[2]", "stream_options.include_usage"),
    else a placeholder: an unknown field's name is whatever the client sent."""
    if not name:
        return None
    root = name.split(".", 1)[0].split("[", 1)[0]
    return name if root in CompletionRequest.model_fields and len(name) <= 64 and name.isprintable() else "unknown field"


def describe_client_error(error: BaseException) -> str | None:
    """'400 invalid_request_error (field)' for a client's mistake, None for anything else: the
    answer the client gets (`as_api_error`, which also reads a Ray task error's cause), when it
    is a 4xx that is the client's alone."""
    answer = as_api_error(error)
    if answer is None or answer.status >= 500 or answer.status in NOT_THE_CLIENTS_MISTAKE:
        return None
    field = _known_field(answer.param)
    return (f"{answer.status} {answer.type}" + (f" ({field})" if field else "")
            + (f" [{answer.code}]" if answer.code else ""))


class ClientErrorsAsOneLine(logging.Filter):
    """Rewrites Serve's "Request failed." records whose exception is a client's mistake; passes
    every record, and any other untouched (neo-serve's own logs on this logger included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if record.msg != SERVE_FAILURE_MESSAGE or not isinstance(record.exc_info, tuple):
                return True
            described = describe_client_error(record.exc_info[1]) if record.exc_info[1] is not None else None
            if described is not None:
                record.msg, record.args = "Request refused: %s", (described,)
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        except Exception:  # noqa: BLE001 - a logging filter must never fail the request it logs
            pass
        return True


def log_client_errors_as_one_line() -> None:
    """Install the filter on Serve's logger in this process (a replica's), once."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorsAsOneLine) for f in logger.filters):
        logger.addFilter(ClientErrorsAsOneLine())


class QuietPlaygroundAssets(logging.Filter):
    """Drops Serve's access-log lines for the playground's successful GETs: a page load fetches
    about 65 files, each an INFO line in the `neo-serve up` terminal. Its failed requests, its
    POSTs (a run's start) and every API request keep their lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if not getattr(record, "serve_access_log", False):
                return True
            route = str(getattr(record, "route", "") or "")
            if route != UI_PREFIX and not route.startswith(UI_PREFIX + "/"):  # not the playground's
                return True
            words = record.getMessage().split()  # "[client] GET /ui/{path:path} 200 29.0ms"
            return not (len(words) >= 4 and words[-4] == "GET" and words[-2][:1] in ("2", "3"))
        except Exception:  # noqa: BLE001 - a logging filter must never fail the request it logs
            return True


def quiet_playground_asset_logs() -> None:
    """Install the filter on Serve's logger in this process (the router's), once."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, QuietPlaygroundAssets) for f in logger.filters):
        logger.addFilter(QuietPlaygroundAssets())
