"""``GET /metrics`` on an in-process app: who may read it, the database's series on seeded rows,
request durations by route template, and open WebSockets."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.prometheus import reason_label
from fedloom_core.storage.db import Event, Experiment, RoundMetrics, Update
from fedloom_core.storage.repo import session_scope
from tests.conftest import LOCAL_ADMIN_KEY

pytestmark = pytest.mark.unit


def scrape(http) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    """(sample name, sorted labels) -> value, read with prometheus-client's parser."""
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def at(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def http(local_app):  # type: ignore[no-untyped-def]
    client = local_app()
    client.base_url = client.base_url.copy_with(path="/")
    return client


def _update(n: int, status: str, size: int, reason: str | None = None) -> Update:
    return Update(
        update_id=f"u{n}",
        experiment_id="e1",
        round=1 + n // 3,
        client_id=f"c{n}",
        blob_key=f"k{n}",
        sha256="0" * 64,
        size_bytes=size,
        num_samples=10,
        validation_status=status,
        reason=reason,
    )


def test_only_the_admin_key_reads_metrics(http) -> None:  # type: ignore[no-untyped-def]
    anonymous = http.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "UNAUTHORIZED"
    registered = http.post("/api/v1/clients/register", json={"client_id": "site1"})
    assert registered.status_code == 200, registered.text
    client_key = registered.json()["api_key"]
    forbidden = http.get("/metrics", headers={"Authorization": f"Bearer {client_key}"})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "FORBIDDEN"
    assert http.get("/metrics", headers={"Authorization": f"Bearer {LOCAL_ADMIN_KEY}"}).status_code == 200


def test_database_series_match_the_rows(http) -> None:  # type: ignore[no-untyped-def]
    engine = http.app.state.engine
    with session_scope(engine) as s:
        s.add(Experiment(experiment_id="e1", status="running", current_round=3))
        s.add(Experiment(experiment_id="e0", status="completed", current_round=7))
        for rnd, duration in ((1, 0.8), (2, 4.0), (3, 700.0)):
            s.add(
                RoundMetrics(
                    experiment_id="e1", round=rnd, participating_clients=2, round_duration=duration, aggregation_time=0
                )
            )
        s.add(_update(0, "accepted", 1000))
        s.add(_update(1, "accepted", 2000))
        s.add(_update(2, "rejected", 300, "update norm 41.2 exceeds max_update_norm 10"))
        s.add(
            _update(
                3, "rejected", 400, "cosine similarity -0.412 to the other updates is below min_cosine_similarity 0"
            )
        )
        s.add(_update(4, "rejected", 500, "site in blocked region"))
        s.add(_update(5, "pending", 600))
        # Three rounds' rejections announced, and one upload refused on arrival (no update row).
        for _ in range(4):
            s.add(Event(type="update_rejected", payload={}))
    got = scrape(http)
    assert at(got, "fedloom_rounds_completed_total", experiment_id="e1") == 3
    assert at(got, "fedloom_current_round", experiment_id="e1", status="running") == 3
    assert at(got, "fedloom_current_round", experiment_id="e0", status="completed") == 7
    assert at(got, "fedloom_experiments", status="running") == 1
    assert at(got, "fedloom_round_duration_seconds_count") == 3
    assert at(got, "fedloom_round_duration_seconds_sum") == pytest.approx(704.8)
    assert at(got, "fedloom_round_duration_seconds_bucket", le="1.0") == 1
    assert at(got, "fedloom_round_duration_seconds_bucket", le="5.0") == 2
    assert at(got, "fedloom_round_duration_seconds_bucket", le="600.0") == 2
    assert at(got, "fedloom_round_duration_seconds_bucket", le="+Inf") == 3
    assert at(got, "fedloom_updates_received_total", result="accepted") == 2
    assert at(got, "fedloom_updates_received_total", result="rejected") == 3
    assert at(got, "fedloom_updates_received_total", result="pending") == 1
    assert at(got, "fedloom_upload_bytes_total") == 4800
    assert at(got, "fedloom_update_rejections_total", reason="max_update_norm") == 1
    assert at(got, "fedloom_update_rejections_total", reason="cosine_similarity") == 1
    assert at(got, "fedloom_update_rejections_total", reason="rule") == 1
    assert at(got, "fedloom_update_rejections_total", reason="invalid_upload") == 1


def test_reasons_become_bounded_labels() -> None:
    assert reason_label("update norm is 3.20x the round median, above max_norm_ratio 3") == "norm_ratio"
    assert reason_label(None) == "rule"


def test_requests_are_timed_by_route_template(http) -> None:  # type: ignore[no-untyped-def]
    route = "/api/v1/clients/{client_id}"
    before = scrape(http)
    for cid in ("zz1", "zz2", "zz3"):
        assert http.get(f"/api/v1/clients/{cid}").status_code == 404
    assert http.get("/no/such/path/42").status_code == 404
    assert http.request("BREW", "/api/v1/status").status_code == 405
    after = scrape(http)
    name = "fedloom_http_request_duration_seconds_count"
    assert (
        at(after, name, route=route, method="GET", status="404")
        - at(before, name, route=route, method="GET", status="404")
        == 3
    )
    assert at(after, name, route="<unmatched>", method="GET", status="404") > at(
        before, name, route="<unmatched>", method="GET", status="404"
    )
    assert not [labels for (_n, labels) in after if any("zz1" in v or "/42" in v or v == "BREW" for _k, v in labels)]
    assert at(after, name, route="/api/v1/status", method="OTHER", status="405") == 1 + at(
        before, name, route="/api/v1/status", method="OTHER", status="405"
    )


def test_open_websockets_are_counted(http) -> None:  # type: ignore[no-untyped-def]
    before = at(scrape(http), "fedloom_websocket_listeners")
    with http.websocket_connect(f"/ws/events?api_key={LOCAL_ADMIN_KEY}"):
        assert at(scrape(http), "fedloom_websocket_listeners") == before + 1
    assert at(scrape(http), "fedloom_websocket_listeners") == before
    # A refused connection (unknown key) is accepted only to be closed with 4401, and not left counted.
    with http.websocket_connect("/ws/events", headers={"Authorization": "Bearer fl_unknown"}) as ws:
        assert ws.receive()["code"] == 4401
    assert at(scrape(http), "fedloom_websocket_listeners") == before


def test_replicas_on_one_database_report_the_same_database_series(local_app) -> None:  # type: ignore[no-untyped-def]
    first, second = local_app(), local_app()
    for client in (first, second):
        client.base_url = client.base_url.copy_with(path="/")
    with session_scope(first.app.state.engine) as s:
        s.add(
            RoundMetrics(experiment_id="e9", round=1, participating_clients=1, round_duration=2.0, aggregation_time=0)
        )
    shared = ("fedloom_rounds_completed_total", "fedloom_round_duration_seconds_count", "fedloom_upload_bytes_total")
    views = [{key: v for key, v in scrape(c).items() if key[0] in shared} for c in (first, second)]
    assert views[0] == views[1] and at(views[1], "fedloom_rounds_completed_total", experiment_id="e9") == 1
