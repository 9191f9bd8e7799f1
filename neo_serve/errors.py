"""Exceptions a user can act on: each names the field, file or limit at fault."""

from __future__ import annotations


class NeoServeError(Exception):
    """Base class of every error neo-serve raises on purpose."""


class ConfigError(NeoServeError, ValueError):
    """A checkpoint's config.json cannot be served (bad value, missing key)."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one neo-serve implements."""


class CheckpointError(NeoServeError):
    """A checkpoint directory is incomplete, corrupted or in a refused format."""


class PipelineFailed(RuntimeError):
    """The pipeline cannot run steps any more (a stage died); the replica must be replaced.
    (Here rather than beside the pipeline's loop: the router catches it without loading torch.)"""


class InvalidRequestError(NeoServeError, ValueError):
    """A request (prompt or sampling parameters) is invalid; `field` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
