"""Self-registration with an enrollment token (off unless FEDLOOM_ENROLLMENT_TOKEN is set)."""

from __future__ import annotations


def test_enrollment_token_registers_clients_only(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app(enrollment_token="enroll-me")
    token = {"Authorization": "Bearer enroll-me"}
    resp = client.post("/clients/register", json={"client_id": "self-1"}, headers=token)
    assert resp.status_code == 200, resp.text
    own_key = resp.json()["api_key"]
    assert own_key and own_key != "enroll-me"
    # The token does nothing else.
    assert client.get("/status", headers=token).json()["error"]["code"] == "UNAUTHORIZED"
    wrong = client.post("/clients/register", json={"client_id": "self-2"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # The client's own key works, and may not register others.
    mine = {"Authorization": f"Bearer {own_key}"}
    assert client.get("/clients/self-1", headers=mine).status_code == 200
    assert client.post("/clients/register", json={"client_id": "self-3"}, headers=mine).status_code == 403


def test_without_a_configured_token_only_the_admin_registers(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    resp = client.post("/clients/register", json={"client_id": "x"}, headers={"Authorization": "Bearer "})
    assert resp.status_code == 401
    assert client.post("/clients/register", json={"client_id": "x"}).status_code == 200
