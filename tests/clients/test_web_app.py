"""CORS and the dashboard's static files, on an in-process app (no Temporal, no browser)."""

from __future__ import annotations

from pathlib import Path

from api.routes.dashboard import CONTENT_TYPES, STATIC_DIR

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = "https://ops.example.com"


def _preflight(client, origin: str):  # type: ignore[no-untyped-def]
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return client.options("/training/start", headers=headers)


def test_cors_preflight_passes_for_an_allowed_origin_and_fails_for_another(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app(cors_origins=f"{ALLOWED}/, https://second.example.com")
    ok = _preflight(client, ALLOWED)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()

    refused = _preflight(client, "https://evil.example.net")
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers

    # A real request from the allowed origin can read the answer, an error's Retry-After included.
    status = client.get("/status", headers={"Origin": ALLOWED})
    assert status.status_code == 200 and status.headers["access-control-allow-origin"] == ALLOWED
    assert "retry-after" in status.headers["access-control-expose-headers"].lower()
    other = client.get("/status", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    answer = _preflight(client, ALLOWED)
    assert answer.status_code != 200
    assert "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in client.get("/status", headers={"Origin": ALLOWED}).headers


FILES = {
    "/dashboard": "text/html",
    "/dashboard/dashboard.js": "text/javascript",
    "/dashboard/fedloom-client.js": "text/javascript",
    "/dashboard/dashboard.css": "text/css",
    "/dashboard/vendor/uPlot.esm.js": "text/javascript",
    "/dashboard/vendor/uPlot.min.css": "text/css",
    "/dashboard/vendor/uPlot.LICENSE.txt": "text/plain",
}
OUTSIDE = [
    "../app.py",
    "..%2Fapp.py",
    "vendor/../../routes/dashboard.py",
    "nothing.js",
    "index.py",
    "a/b/c.js",
    "%2e%2e/x.js",
]


def test_dashboard_files_are_served_with_their_type_and_a_strict_csp_and_nothing_else(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    for path, content_type in FILES.items():
        answer = client.get(f"http://test{path}", headers={"Authorization": ""})  # the page itself needs no key
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-type"].startswith(content_type), path
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
    for name in OUTSIDE:
        answer = client.get(f"http://test/dashboard/{name}")
        assert answer.status_code == 404, name
        assert answer.json()["error"]["code"] == "NOT_FOUND"


def test_the_served_client_is_the_package_and_nothing_loads_from_elsewhere() -> None:
    source = (ROOT / "clients" / "js" / "src" / "index.js").read_text()
    assert (STATIC_DIR / "fedloom-client.js").read_text() == source, "run `npm run vendor` in clients/js"
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            assert path.suffix in CONTENT_TYPES, path
    page = (STATIC_DIR / "index.html").read_text() + (STATIC_DIR / "dashboard.js").read_text()
    assert "http://" not in page and "https://" not in page and "<script>" not in page
    assert (STATIC_DIR / "vendor" / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")


def test_scores_need_the_admin_key_and_a_valid_id(local_app) -> None:  # type: ignore[no-untyped-def]
    client = local_app()
    assert client.get("/metrics/scores", headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = client.get("/metrics/scores", params={"experiment_id": "../x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"
    missing = client.get("/metrics/scores", params={"experiment_id": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
