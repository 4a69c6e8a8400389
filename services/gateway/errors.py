"""Errors a client sees: one kind per status, rendered as OpenAI error JSON or a gRPC status."""

from __future__ import annotations

import enum
from typing import Any

import grpc


class ErrorKind(enum.Enum):
    """(HTTP status, OpenAI error type, gRPC status code) of each way a request can be refused."""

    INVALID_REQUEST = (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    UNAUTHENTICATED = (401, "invalid_request_error", grpc.StatusCode.UNAUTHENTICATED)
    NOT_FOUND = (404, "invalid_request_error", grpc.StatusCode.NOT_FOUND)
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", grpc.StatusCode.UNIMPLEMENTED)
    TOO_LARGE = (413, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    OVERLOADED = (429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    INTERNAL = (500, "server_error", grpc.StatusCode.INTERNAL)
    UNAVAILABLE = (503, "service_unavailable_error", grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED)

    def __init__(self, http_status: int, error_type: str, grpc_code: grpc.StatusCode) -> None:
        self.http_status = http_status
        self.error_type = error_type
        self.grpc_code = grpc_code

    @classmethod
    def from_http_status(cls, status: int) -> ErrorKind:
        return next((k for k in cls if k.http_status == status), cls.INVALID_REQUEST)


class ApiError(Exception):
    """A refused request. Raised anywhere before or while serving; the HTTP and gRPC edges render it."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code

    @property
    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind.error_type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(ErrorKind.INVALID_REQUEST, message, param, code)


class GenerationError(Exception):
    """The cluster gave up on a request (FINISH_REASON_ERROR), or stopped answering it (kind
    TIMEOUT); the message says why."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        super().__init__(message)
        self.kind = kind
