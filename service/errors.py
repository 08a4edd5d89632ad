"""One exception type per failure a caller can act on, each mapped to one HTTP status (api/app.py)."""
from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


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


class Overloaded(ServiceError):
    status_code = 429


class NotReady(ServiceError):
    status_code = 503
