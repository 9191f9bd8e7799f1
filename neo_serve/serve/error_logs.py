"""A client's mistake in a replica's log: one line, not an error with a traceback.

Ray Serve logs every exception a replica's method raises as "Request failed." at ERROR, with the
traceback. A prompt longer than the context window (refused in the pipeline replica) or a handle
caller's bad parameter (refused in the router) is the client's mistake, answered with a 4xx: as
an ERROR with thirty lines of traceback it floods the logs and trips alerts on error lines. The
filter below turns those records into one INFO line naming the status, error type and field;
never the message, which may quote what the client sent (prompts stay out of the logs). Server
errors keep their tracebacks.
"""

from __future__ import annotations

import logging

from neo_serve.errors import InvalidRequestError
from neo_serve.serve.protocol import APIError

SERVE_LOGGER = "ray.serve"  # the logger Serve's replicas log requests on


def describe_client_error(error: BaseException) -> str | None:
    """'400 invalid_request_error (field)' for a client's mistake, None for anything else; a Ray
    task error is described by the error it wraps."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    if isinstance(error, InvalidRequestError):
        return f"400 invalid_request_error ({error.field})" if error.field else "400 invalid_request_error"
    if isinstance(error, APIError) and error.status < 500:
        described = f"{error.status} {error.type}"
        described += f" ({error.param})" if error.param else ""
        return described + (f" [{error.code}]" if error.code else "")
    return None


class ClientErrorsAsOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        described = describe_client_error(error) if error is not None else None
        if described is not None:
            record.msg, record.args = "Request refused: %s", (described,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def log_client_errors_as_one_line() -> None:
    """Install the filter on Serve's logger in this process (a replica's), once."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorsAsOneLine) for f in logger.filters):
        logger.addFilter(ClientErrorsAsOneLine())
