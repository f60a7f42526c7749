"""The spec's own Python client example, unchanged but for indentation (lost in the spec's text), works."""

from __future__ import annotations

import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e

# --- from the spec, "SDK Examples / Python Client" ------------------------------------------------
import requests
import json
class FLClient:
    def __init__(self, server_url="http://localhost:8080", api_key=None):
        self.base_url = f"{server_url}/api/v1"
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {api_key}" if api_key else None
        }
    def register_client(self, client_id, config):
        """Register a new FL client."""
        payload = {
            "client_id": client_id,
            "client_config": config
        }
        response = requests.post(
            f"{self.base_url}/clients/register",
            headers=self.headers,
            json=payload
        )
        return response.json()
    def get_training_status(self):
        """Get current training status."""
        response = requests.get(
            f"{self.base_url}/training/status",
            headers=self.headers
        )
        return response.json()
    def upload_model_update(self, client_id, model_file, metrics):
        """Upload model update after local training."""
        files = {'model_file': model_file}
        data = {'metrics': json.dumps(metrics)}
        response = requests.post(
            f"{self.base_url}/model/update/{client_id}",
            headers={"Authorization": self.headers["Authorization"]},
            files=files,
            data=data
        )
        return response.json()
# --- end of the spec's example ---------------------------------------------------------------------


def test_spec_client_registers_and_reads_training_status(live_server: LiveServer) -> None:
    admin = FLClient(live_server.url, api_key=live_server.admin_key)
    reg = admin.register_client("client-001", {"batch_size": 32, "local_epochs": 3, "learning_rate": 0.01})
    assert reg["client_id"] == "client-001" and reg["status"] == "registered"
    assert reg["client_config"] == {"batch_size": 32, "local_epochs": 3, "learning_rate": 0.01}
    assert isinstance(reg["registration_id"], str) and isinstance(reg["assigned_round"], int)
    assert reg["timestamp"].endswith("Z")

    me = FLClient(live_server.url, api_key=reg["api_key"])
    status = me.get_training_status()
    assert {"experiment_id", "status", "current_round", "total_rounds", "progress"} <= status.keys()

    # No experiment runs, so the upload is refused in the spec's error format.
    answer = me.upload_model_update("client-001", b"not a model", {"data_samples": 10})
    assert answer["error"]["code"] == "EXPERIMENT_NOT_ACTIVE"
