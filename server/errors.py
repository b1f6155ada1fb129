"""The product's exception hierarchy; each class carries the gRPC status it maps to."""

from __future__ import annotations

import grpc


class ShadowServeError(Exception):
    """Base of every error the gateway reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(ShadowServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ShadowServeError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ShadowServeError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ShadowServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unsupported(ShadowServeError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(ShadowServeError):
    """A configured limit was reached; the message names it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendError(ShadowServeError):
    """A backend failed; `code` is the status the backend itself reported."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class BackendTimeout(BackendError):
    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.DEADLINE_EXCEEDED)


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the key."""
