"""/health answers 503 SERVICE_UNAVAILABLE, naming the component, when one is down."""

from __future__ import annotations

import shutil


def test_health_is_503_when_temporal_is_unreachable(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()  # no Temporal client in this app
    resp = client.get("/health", headers={})
    assert resp.status_code == 503
    body = resp.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE" and "temporal" in body["error"]["details"]
    assert body["components"]["database"] == "up" and body["components"]["blob_store"] == "up"
    assert body["components"]["temporal"].startswith("down")
    assert body["status"] == "unhealthy" and isinstance(body["uptime"], int)


def test_health_reports_a_missing_blob_store(local_app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    shutil.rmtree(tmp_path / "blobs", ignore_errors=True)
    (tmp_path / "blobs").write_text("not a directory")
    body = client.get("/health", headers={}).json()
    assert body["components"]["blob_store"].startswith("down")
