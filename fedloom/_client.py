"""FLClient: the spec's client calls over HTTP (httpx)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from fedloom._resumable import RESUMABLE_THRESHOLD, upload_initial_resumable, upload_resumable

DEFAULT_TIMEOUT = 60.0
# Initial weights: a state_dict, a file path, or a file's bytes.
InitialModel = Mapping[str, Any] | str | Path | bytes


class FLAPIError(Exception):
    """An error answer from the server, in the spec's format."""

    def __init__(self, status: int, code: str, message: str, details: str = "", retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message} ({details})")
        self.status, self.code, self.message, self.details = status, code, message, details
        # Seconds to wait before retrying, from a 429's Retry-After header.
        self.retry_after = retry_after


class FLClient:
    """A client of the FL Framework API at ``server_url`` (without ``/api/v1``)."""

    def __init__(
        self,
        server_url: str = "http://localhost:8080",
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.base_url = f"{self.server_url}/api/v1"
        self.api_key = api_key
        self._timeout, self._transport = timeout, transport
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def with_key(self, api_key: str) -> FLClient:
        """A client of the same server (timeout and transport too) that uses ``api_key``."""
        return FLClient(self.server_url, api_key, self._timeout, self._transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FLClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers(), **(headers or {})}
        response = self._http.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._request(method, path, **kwargs).json()

    # -- server --------------------------------------------------------------------------
    def get_status(self) -> dict[str, Any]:
        """The server's status and configuration."""
        return self._json("GET", "/status")

    def get_health(self) -> dict[str, Any]:
        """Health of the server and its components."""
        return self._json("GET", "/health")

    # -- clients ---------------------------------------------------------------------------
    def register_client(
        self,
        client_id: str,
        config: dict[str, Any] | None = None,
        capabilities: dict[str, Any] | None = None,
        location: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a client (admin key); the answer's ``api_key`` is the client's own key."""
        payload: dict[str, Any] = {"client_id": client_id, "client_config": config or {}}
        if capabilities:
            payload["capabilities"] = capabilities
        if location:
            payload["location"] = location
        return self._json("POST", "/clients/register", json=payload)

    def get_client(self, client_id: str) -> dict[str, Any]:
        """A client's status and scores."""
        return self._json("GET", f"/clients/{client_id}")

    def revoke_client(self, client_id: str) -> dict[str, Any]:
        """Revoke every API key of a client (admin key); the answer has ``client_id`` and ``revoked``."""
        return self._json("POST", f"/clients/{client_id}/revoke")

    def rotate_client_key(self, client_id: str) -> str:
        """Revoke a client's keys and return its new API key (admin key); the server keeps only its hash."""
        return str(self._json("POST", f"/clients/{client_id}/rotate-key")["api_key"])

    def get_task(self, client_id: str, wait: float = 0.0) -> dict[str, Any]:
        """What the client should do now: ``train``, ``evaluate``, ``wait``, ``idle`` or ``done``.

        The server holds the request up to ``wait`` seconds while there is nothing to do.
        """
        return self._json("GET", f"/clients/{client_id}/task", params={"wait": wait} if wait else None)

    def upload_evaluation(
        self, client_id: str, experiment_id: str, round: int, metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """Report how a round's global model did on this client's data (``data_samples``, ``loss``, ...)."""
        body = {"experiment_id": experiment_id, "round": round, "metrics": metrics}
        return self._json("POST", f"/model/evaluation/{client_id}", json=body)

    # -- experiments -----------------------------------------------------------------------
    def create_experiment(self, body: dict[str, Any], initial_model: InitialModel | None = None) -> dict[str, Any]:
        """Create an experiment (the spec's ``POST /experiments`` body); returns it, with its ``experiment_id``.

        ``initial_model`` (a state_dict, or the path of a safetensors or ``torch.save`` state_dict file)
        becomes its round-0 global model; a model the server does not know needs one.
        """
        experiment = self._json("POST", "/experiments", json=body)
        if initial_model is not None:
            self.upload_initial_model(experiment["experiment_id"], initial_model)
        return experiment

    def upload_initial_model(
        self, experiment_id: str, model: InitialModel, resumable: bool | None = None
    ) -> dict[str, Any]:
        """Store an experiment's round-0 weights: a state_dict, a file path or the file's bytes.

        A file is sent as it is (the server reads safetensors and ``torch.save`` state_dicts); a
        state_dict is serialised as safetensors, which needs torch and safetensors. ``resumable`` sends
        it through a resumable session (chunks, resumed from the server's offset after a dropped
        connection); by default files of ``RESUMABLE_THRESHOLD`` (64 MiB) or more are.
        """
        path = f"/experiments/{experiment_id}/initial_model"
        headers = {"Content-Type": "application/octet-stream"}
        if not isinstance(model, (str, Path, bytes, bytearray, memoryview)):
            model = state_dict_bytes(model)
        if resumable is None:
            resumable = _size_of(model) >= RESUMABLE_THRESHOLD
        if resumable:
            return upload_initial_resumable(self, experiment_id, model)
        if isinstance(model, (str, Path)):
            with open(model, "rb") as fh:
                return self._json("PUT", path, content=fh, headers=headers)
        return self._json("PUT", path, content=bytes(model), headers=headers)

    def continue_experiment(self, experiment_id: str, rounds: int) -> dict[str, Any]:
        """Run a stopped or completed experiment for ``rounds`` more rounds, from its last model."""
        return self._json("POST", f"/experiments/{experiment_id}/continue", json={"rounds": rounds})

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        """An experiment's configuration and status."""
        return self._json("GET", f"/experiments/{experiment_id}")

    def get_training_metrics(self, experiment_id: str | None = None) -> dict[str, Any]:
        """Per-round metrics (``global_accuracy``, ``federated_metrics``, ...) of an experiment."""
        params = {"experiment_id": experiment_id} if experiment_id else None
        return self._json("GET", "/metrics/training", params=params)

    # -- training --------------------------------------------------------------------------
    def start_training(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start an experiment with the spec's ``POST /training/start`` body."""
        return self._json("POST", "/training/start", json=body)

    def stop_training(self, reason: str = "manual_stop", experiment_id: str | None = None) -> dict[str, Any]:
        """Stop the running experiment."""
        payload: dict[str, Any] = {"reason": reason}
        if experiment_id:
            payload["experiment_id"] = experiment_id
        return self._json("POST", "/training/stop", json=payload)

    def get_training_status(self) -> dict[str, Any]:
        """Progress of the current or last experiment."""
        return self._json("GET", "/training/status")

    # -- models ----------------------------------------------------------------------------
    def get_global_model(
        self, round: int | None = None, format: str | None = None, experiment_id: str | None = None
    ) -> dict[str, Any]:
        """Metadata of a global model (of the latest experiment unless ``experiment_id`` is given)."""
        given = {"round": round, "format": format, "experiment_id": experiment_id}
        params = {k: v for k, v in given.items() if v is not None}
        return self._json("GET", "/model/global", params=params)

    def download_model(self, model_id: str, dest: str | Path, format: str = "safetensors") -> dict[str, str]:
        """Stream a model file to ``dest``; returns its sha256 as sent by the server."""
        url = f"{self.base_url}/model/download/{model_id}"
        with self._http.stream("GET", url, params={"format": format}, headers=self._headers()) as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            with open(dest, "wb") as fh:
                fh.writelines(response.iter_bytes())
            return {"sha256": response.headers.get("x-model-sha256", "")}

    def upload_model_update(
        self,
        client_id: str,
        model_file: str | Path | bytes | BinaryIO,
        metrics: dict[str, Any],
        resumable: bool | None = None,
        experiment_id: str | None = None,
    ) -> dict[str, Any]:
        """Upload a locally trained model with its training metrics.

        ``experiment_id`` names the experiment whose task it answers (needed when the client serves
        several at once). ``resumable`` sends it through a resumable session (chunks, resumed from the
        server's offset after a dropped connection); by default files of ``RESUMABLE_THRESHOLD`` (64 MiB)
        or more are.
        """
        if resumable is None:
            resumable = _size_of(model_file) >= RESUMABLE_THRESHOLD
        if resumable:
            return upload_resumable(self, client_id, model_file, metrics, experiment_id=experiment_id)
        data = {"metrics": json.dumps(metrics)}
        url = f"/model/update/{client_id}"
        params = {"experiment_id": experiment_id} if experiment_id else None
        if isinstance(model_file, (str, Path)):
            with open(model_file, "rb") as fh:
                return self._json(
                    "POST", url, files={"model_file": ("model.safetensors", fh)}, data=data, params=params
                )
        return self._json(
            "POST", url, files={"model_file": ("model.safetensors", model_file)}, data=data, params=params
        )


def _size_of(model_file: str | Path | bytes | BinaryIO) -> int:
    """The upload's size in bytes, or 0 for a stream that is not a plain file."""
    if isinstance(model_file, (str, Path)):
        return os.path.getsize(model_file)
    if isinstance(model_file, (bytes, bytearray, memoryview)):
        return len(model_file)
    try:
        return os.fstat(model_file.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return 0


def state_dict_bytes(state: Mapping[str, Any]) -> bytes:
    """A state_dict as safetensors bytes (tensors copied to the CPU, so shared or strided ones serialise)."""
    from safetensors.torch import save

    return save({name: t.detach().cpu().clone().contiguous() for name, t in state.items()})


def _error(response: httpx.Response) -> FLAPIError:
    retry = response.headers.get("retry-after")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    try:
        err = response.json()["error"]
        return FLAPIError(response.status_code, err["code"], err["message"], err.get("details", ""), retry_after)
    except (ValueError, KeyError, TypeError):
        return FLAPIError(response.status_code, "HTTP_ERROR", response.text[:200], "", retry_after)
