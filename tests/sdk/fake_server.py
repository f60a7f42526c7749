"""A fake fedloom server for the SDK's unit tests: the contract's client endpoints over httpx.MockTransport."""

from __future__ import annotations

import json
import re
from collections import deque
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import httpx

ADMIN = "admin-key"


def error(status: int, code: str, message: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "details": ""}}, headers=headers)


def form_parts(request: httpx.Request) -> dict[str, bytes]:
    """The parts of a multipart/form-data body, by field name."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.content)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


class FakeServer:
    """Clients, their keys, a queue of tasks (then ``done``), model files; records what clients send."""

    def __init__(self, enrollment_token: str | None = None) -> None:
        self.enrollment_token = enrollment_token
        self.keys: dict[str, str] = {}  # client id -> its own key
        self.tasks: deque[dict[str, Any]] = deque()
        self.models: dict[str, bytes] = {}
        self.failures: deque[tuple[str, httpx.Response]] = deque()  # (path pattern, answer) served once
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, key
        self.registered: list[str] = []
        self.updates: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.uploads: list[tuple[str, bytes, str]] = []
        self.transport = httpx.MockTransport(self.handle)

    def register(self, client_id: str) -> str:
        self.keys[client_id] = f"own-{client_id}"
        return self.keys[client_id]

    def who(self, key: str | None) -> str | None:
        if key == ADMIN:
            return "admin"
        return next((f"client:{cid}" for cid, k in self.keys.items() if k == key), None)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        key = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        self.requests.append((request.method, path, key))
        for i, (pattern, answer) in enumerate(self.failures):
            if re.fullmatch(pattern, path):
                del self.failures[i]
                return answer
        if request.method == "POST" and path == "/clients/register":
            return self._register(request, key)
        principal = self.who(key)
        if principal is None:
            return error(401, "UNAUTHORIZED", "Invalid API key")
        if m := re.fullmatch(r"/clients/([\w-]+)(/task)?", path):
            cid = m.group(1)
            if principal not in ("admin", f"client:{cid}"):
                return error(403, "FORBIDDEN", "Insufficient permissions")
            if cid not in self.keys:
                return error(404, "CLIENT_NOT_REGISTERED", "Client ID not found")
            if m.group(2):
                return httpx.Response(200, json=self.tasks.popleft() if self.tasks else {"status": "done"})
            return httpx.Response(200, json={"client_id": cid, "status": "active"})
        if m := re.fullmatch(r"/model/download/([\w-]+)", path):
            return httpx.Response(200, content=self.models[m.group(1)])
        if m := re.fullmatch(r"/model/update/([\w-]+)", path):
            parts = form_parts(request)
            self.updates.append(
                {
                    "client_id": m.group(1),
                    "experiment_id": request.url.params.get("experiment_id"),
                    "metrics": json.loads(parts["metrics"]),
                    "model": parts["model_file"],
                }
            )
            return httpx.Response(200, json={"status": "received"})
        if m := re.fullmatch(r"/model/evaluation/([\w-]+)", path):
            self.evaluations.append({"client_id": m.group(1), **json.loads(request.content)})
            return httpx.Response(200, json={"status": "received"})
        if request.method == "POST" and path == "/experiments":
            return httpx.Response(200, json={"experiment_id": "exp_1", **json.loads(request.content)})
        if m := re.fullmatch(r"/experiments/([\w-]+)/initial_model", path):
            self.uploads.append((m.group(1), request.read(), request.headers["content-type"]))
            return httpx.Response(200, json={"experiment_id": m.group(1), "round": 0})
        if m := re.fullmatch(r"/experiments/([\w-]+)/continue", path):
            return httpx.Response(200, json={"experiment_id": m.group(1), **json.loads(request.content)})
        return error(404, "NOT_FOUND", path)

    def _register(self, request: httpx.Request, key: str | None) -> httpx.Response:
        if key != ADMIN and (self.enrollment_token is None or key != self.enrollment_token):
            return error(403, "FORBIDDEN", "Insufficient permissions") if self.who(key) else error(401, "UNAUTHORIZED")
        cid = json.loads(request.content)["client_id"]
        if cid in self.keys:
            return error(409, "CONFLICT", "Client already registered")
        self.registered.append(cid)
        return httpx.Response(200, json={"client_id": cid, "api_key": self.register(cid)})


def train_task(round: int, model_id: str, experiment_id: str = "exp_1", **extra: Any) -> dict[str, Any]:
    return {
        "status": "train",
        "experiment_id": experiment_id,
        "experiment_status": "running",
        "round": round,
        "model_id": model_id,
        "dataset": "blobs",
        "model_architecture": "custom",
        "model_config": {},
        "training_config": {"local_epochs": 1, "learning_rate": 0.1, **extra},
    }


def evaluate_task(round: int, model_id: str, experiment_id: str = "exp_1") -> dict[str, Any]:
    return {**train_task(round, model_id, experiment_id), "status": "evaluate"}


def done(experiment_id: str = "exp_1") -> dict[str, Any]:
    return {"status": "done", "experiment_id": experiment_id, "experiment_status": "completed"}
