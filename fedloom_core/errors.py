"""The error hierarchy: every failure a user can cause maps to one of the spec's error codes."""

from __future__ import annotations


class FedloomError(Exception):
    """An error with an HTTP status and one of the spec's error codes."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, details: str | None = None, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class InvalidRequest(FedloomError):
    status, code = 400, "INVALID_REQUEST"


class Unauthorized(FedloomError):
    status, code = 401, "UNAUTHORIZED"


class Forbidden(FedloomError):
    status, code = 403, "FORBIDDEN"


class NotFound(FedloomError):
    status, code = 404, "NOT_FOUND"


class Conflict(FedloomError):
    status, code = 409, "CONFLICT"


class ClientNotRegistered(FedloomError):
    status, code = 404, "CLIENT_NOT_REGISTERED"


class ExperimentNotActive(FedloomError):
    status, code = 409, "EXPERIMENT_NOT_ACTIVE"


class RoundNotActive(FedloomError):
    status, code = 409, "ROUND_NOT_ACTIVE"


class ModelValidationFailed(FedloomError):
    status, code = 400, "MODEL_VALIDATION_FAILED"


class InsufficientClients(FedloomError):
    status, code = 400, "INSUFFICIENT_CLIENTS"


class TrainingAlreadyRunning(FedloomError):
    status, code = 409, "TRAINING_ALREADY_RUNNING"


class ServiceUnavailable(FedloomError):
    status, code = 503, "SERVICE_UNAVAILABLE"


class PayloadTooLarge(FedloomError):
    status, code = 413, "INVALID_REQUEST"
