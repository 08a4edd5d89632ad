"""One exception type per failure a caller can act on, each mapped to one HTTP status (api/app.py)."""
from __future__ import annotations

import math


def error_body(status: int, message: str, kind: str) -> dict:
    """``detail`` for humans and FastAPI clients, ``error`` in the OpenAI shape for its client."""
    return {"detail": message, "error": {"message": message, "type": kind, "code": status}}


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """Response headers the status asks for (Retry-After on a 429)."""
        return {}


class InvalidInput(ServiceError):
    status_code = 422


class PayloadTooLarge(ServiceError):
    status_code = 413


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Unauthorized(ServiceError):
    status_code = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """A valid key without the route's scope, or a cross-site browser request to a mutating route."""

    status_code = 403


class Overloaded(ServiceError):
    """Too much at once: the generation queue is full (retry in a second), or a rate limit is spent
    (retry when the caller's bucket holds enough again)."""

    status_code = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class NotReady(ServiceError):
    status_code = 503


class StorageUnavailable(ServiceError):
    """The store refused a write (disk full, read-only, unreachable): nothing was recorded; retry later."""

    status_code = 507
