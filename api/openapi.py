"""OpenAPI documentation: the error schema, and the spec's examples attached to the routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_DESCRIPTIONS = {
    400: "INVALID_REQUEST, or an FL-specific 400 (INSUFFICIENT_CLIENTS, MODEL_VALIDATION_FAILED)",
    401: "UNAUTHORIZED: missing or invalid API key",
    403: "FORBIDDEN: the key may not do this",
    404: "NOT_FOUND or CLIENT_NOT_REGISTERED",
    408: "INVALID_REQUEST: the upload stalled, or came slower than FEDLOOM_UPLOAD_MIN_RATE_KBPS",
    409: "CONFLICT, TRAINING_ALREADY_RUNNING, EXPERIMENT_NOT_ACTIVE or ROUND_NOT_ACTIVE",
    413: "INVALID_REQUEST: the upload is too large",
    429: "RATE_LIMITED: see Retry-After and the X-RateLimit-* headers",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE: the database, blob store or Temporal is down",
}


class ErrorBody(BaseModel):
    code: str
    message: str
    details: str
    timestamp: str


class ErrorResponse(BaseModel):
    """Every error answer has this shape."""

    error: ErrorBody


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


# Every authenticated route can answer these.
COMMON_ERRORS = errors(401, 403, 429, 500, 503)


def ok(example: dict[str, Any], *error_statuses: int) -> dict[int | str, dict[str, Any]]:
    """A 200 response with the spec's example, plus error statuses."""
    return {200: {"content": {"application/json": {"example": example}}}, **errors(*error_statuses)}


def body(example: dict[str, Any]) -> dict[str, Any]:
    """``openapi_examples`` for a request body: the spec's example."""
    return {"spec": {"summary": "The spec's example", "value": example}}


# -- the spec's examples --------------------------------------------------------------------------

STATUS = {
    "status": "running",
    "version": "1.0.0",
    "current_round": 5,
    "total_rounds": 10,
    "active_clients": 8,
    "registered_clients": 12,
    "experiment_id": "exp_2025_001",
    "model_config": {"architecture": "CNN", "dataset": "CIFAR-10", "batch_size": 32},
    "training_config": {"rounds": 10, "min_clients": 5, "client_fraction": 0.8, "local_epochs": 3},
    "timestamp": "2025-01-16T10:30:00Z",
}
HEALTH = {
    "status": "healthy",
    "timestamp": "2025-01-16T10:30:00Z",
    "uptime": 3600,
    "memory_usage": "512MB",
    "cpu_usage": "25%",
    "components": {"database": "up", "blob_store": "up", "temporal": "up"},
}
REGISTER_REQUEST = {
    "client_id": "client-001",
    "client_config": {"batch_size": 32, "local_epochs": 3, "learning_rate": 0.01},
    "capabilities": {"compute_power": "high", "memory": "8GB", "network_bandwidth": "100Mbps"},
    "location": {"ip_address": "192.168.141.100", "region": "us-east-1"},
}
REGISTER_RESPONSE = {
    "client_id": "client-001",
    "registration_id": "reg_12345",
    "status": "registered",
    "assigned_round": 1,
    "client_config": {"batch_size": 32, "local_epochs": 3, "learning_rate": 0.01},
    "api_key": "fl_...",
    "timestamp": "2025-01-16T10:30:00Z",
}
REVOKE_RESPONSE = {
    "client_id": "client-001",
    "revoked": True,
    "revoked_keys": 1,
    "timestamp": "2025-01-16T10:30:00Z",
}
ROTATE_RESPONSE = {
    "client_id": "client-001",
    "api_key": "fl_...",
    "revoked_keys": 1,
    "timestamp": "2025-01-16T10:30:00Z",
}
CLIENT_STATUS = {
    "client_id": "client-001",
    "status": "active",
    "current_round": 5,
    "last_update": "2025-01-16T10:28:30Z",
    "performance_metrics": {
        "local_accuracy": 0.78,
        "training_time": 45.2,
        "communication_time": 3.1,
        "data_size": 1000,
    },
    "trust_score": 0.95,
    "contribution_score": 0.87,
}
START_REQUEST = {
    "experiment_config": {
        "experiment_id": "exp_2025_001",
        "rounds": 10,
        "min_clients": 5,
        "client_fraction": 0.8,
        "dataset": "CIFAR-10",
        "model_architecture": "CNN",
    },
    "training_config": {"local_epochs": 3, "batch_size": 32, "learning_rate": 0.01, "optimizer": "SGD"},
    "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": 5},
}
START_RESPONSE = {
    "experiment_id": "exp_2025_001",
    "status": "started",
    "start_time": "2025-01-16T10:30:00Z",
    "total_rounds": 10,
    "current_round": 1,
    "selected_clients": ["client-001", "client-003", "client-007"],
    "estimated_duration": "45 minutes",
}
INITIAL_MODEL = {
    "experiment_id": "exp_2025_001",
    "model_id": "model_exp_2025_001_round_0",
    "round": 0,
    "format": "safetensors",
    "size_bytes": 90552,
    "sha256": "3f5a...",
    "parameters_count": 22602,
    "tensors": 6,
}
STOP_REQUEST = {"experiment_id": "exp_2025_001", "reason": "manual_stop"}
TRAINING_STATUS = {
    "experiment_id": "exp_2025_001",
    "status": "running",
    "current_round": 5,
    "total_rounds": 10,
    "progress": 0.5,
    "start_time": "2025-01-16T09:30:00Z",
    "estimated_completion": "2025-01-16T10:15:00Z",
    "selected_clients": ["client-001", "client-003", "client-007"],
    "round_metrics": {"accuracy": 0.78, "loss": 0.45, "round_duration": 120, "participating_clients": 8},
}
GLOBAL_MODEL = {
    "model_id": "model_exp_2025_001_round_5",
    "round": 5,
    "accuracy": 0.78,
    "loss": 0.45,
    "parameters_count": 1234567,
    "model_size_mb": 45.2,
    "created_at": "2025-01-16T10:25:00Z",
    "download_url": "/model/download/model_exp_2025_001_round_5",
}
UPLOAD_RESPONSE = {
    "update_id": "update_12345",
    "client_id": "client-001",
    "round": 5,
    "status": "received",
    "model_size_mb": 45.2,
    "received_at": "2025-01-16T10:28:00Z",
    "validation_status": "pending",
}
UPLOAD_METRICS = {
    "local_accuracy": 0.82,
    "local_loss": 0.35,
    "training_time": 45.2,
    "data_samples": 1000,
    "epochs_completed": 3,
}
CLIENTS_LIST = {
    "clients": [
        {"client_id": "client-001", "status": "active", "current_round": 5, "trust_score": 0.95},
        {"client_id": "client-002", "status": "inactive", "current_round": 4, "trust_score": 0.82},
    ],
    "total_count": 12,
    "active_count": 8,
    "timestamp": "2025-01-16T10:30:00Z",
}
SELECTION = {
    "selected_clients": ["client-001", "client-003", "client-007"],
    "policy_results": {
        "client-001": {
            "trust_score": 0.95,
            "compliance": True,
            "policies_applied": ["trust_threshold", "resource_requirements"],
        }
    },
    "excluded_clients": ["client-002"],
    "exclusion_reasons": {"client-002": "Trust score below threshold (0.65 < 0.70)"},
}
TRAINING_METRICS = {
    "experiment_id": "exp_2025_001",
    "rounds": [
        {
            "round": 1,
            "global_accuracy": 0.45,
            "global_loss": 0.89,
            "federated_metrics": {"accuracy": 0.47, "loss": 0.87, "data_samples": 8000},
            "participating_clients": 8,
            "round_duration": 125,
            "aggregation_time": 5.2,
            "client_metrics": {
                "client-001": {"local_accuracy": 0.48, "local_loss": 0.85, "training_time": 42.1, "data_samples": 1000}
            },
        }
    ],
    "summary": {"total_rounds": 5, "best_accuracy": 0.78, "convergence_rate": 0.12, "avg_round_duration": 120},
}
CLIENT_PERFORMANCE = {
    "client_id": "client-001",
    "performance_history": [{"round": 1, "local_accuracy": 0.48, "training_time": 42.1, "communication_time": 3.2}],
    "statistics": {
        "avg_accuracy": 0.76,
        "avg_training_time": 43.5,
        "total_rounds_participated": 5,
        "reliability_score": 0.95,
        "contribution_score": 0.87,
    },
}
CREATE_EXPERIMENT = {
    "name": "CIFAR-10 CNN Experiment",
    "description": "Federated learning experiment with CNN on CIFAR-10",
    "dataset_config": {"name": "CIFAR-10", "split_strategy": "iid", "clients_count": 10},
    "model_config": {"architecture": "CNN", "input_shape": [32, 32, 3], "num_classes": 10},
    "training_config": {"rounds": 10, "local_epochs": 3, "batch_size": 32, "learning_rate": 0.01},
    "policy_config": {"min_clients": 5, "max_client_failures": 2, "trust_threshold": 0.7},
}
EXPERIMENT_CREATED = {
    "experiment_id": "exp_2025_001",
    "name": "CIFAR-10 CNN Experiment",
    "status": "created",
    "created_at": "2025-01-16T10:30:00Z",
    "estimated_duration": "45 minutes",
    "resource_requirements": {"min_clients": 5, "estimated_compute": "high", "network_bandwidth": "100Mbps"},
}
EXPERIMENTS_LIST = {
    "experiments": [
        {
            "experiment_id": "exp_2025_001",
            "name": "CIFAR-10 CNN Experiment",
            "status": "running",
            "created_at": "2025-01-16T09:30:00Z",
            "progress": 0.5,
        }
    ],
    "total_count": 15,
    "has_more": True,
}
EVALUATION_REQUEST = {
    "experiment_id": "exp_2025_001",
    "round": 3,
    "metrics": {"data_samples": 1000, "loss": 0.42, "accuracy": 0.87, "f1": 0.85},
}
EVALUATION_RESPONSE = {
    "status": "received",
    "client_id": "client-001",
    "experiment_id": "exp_2025_001",
    "round": 3,
    "data_samples": 1000,
    "received_at": "2025-01-16T10:31:00Z",
}
