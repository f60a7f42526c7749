"""Invalid policies and strategies are refused up front, naming what is wrong."""

from __future__ import annotations

BASE = {
    "name": "p",
    "dataset_config": {"name": "digits"},
    "model_config": {"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10},
}


def test_invalid_rule_is_400_naming_rule_and_field(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    bad = {
        **BASE,
        "policy_config": {
            "rules": [
                {
                    "id": "r1",
                    "name": "bad field",
                    "type": "client_selection",
                    "effect": "deny",
                    "when": {"field": "shoe_size", "operator": "<", "value": 3},
                }
            ]
        },
    }
    resp = client.post("/experiments", json=bad)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "INVALID_REQUEST" and "r1" in err["details"] and "shoe_size" in err["details"]


def test_valid_rules_are_stored(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    rule = {
        "id": "deny-eu",
        "name": "EU",
        "type": "client_selection",
        "effect": "deny",
        "when": {"field": "location.region", "operator": "==", "value": "eu-west-1"},
    }
    resp = client.post("/experiments", json={**BASE, "experiment_id": "with-rules", "policy_config": {"rules": [rule]}})
    assert resp.status_code == 200, resp.text
    assert client.get("/experiments/with-rules").json()["policy_config"]["rules"][0]["id"] == "deny-eu"
