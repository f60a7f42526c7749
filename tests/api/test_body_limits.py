"""Every request body has a cap that answers 413 before the body is parsed (in-process app)."""

from __future__ import annotations

from collections.abc import Iterator

from tests.api.test_training_api import assert_error


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b" " * piece


def test_a_declared_json_body_over_the_cap_is_refused_unread(local_app) -> None:  # type: ignore[no-untyped-def]
    http = local_app(max_json_kb=64)
    err = assert_error(
        http.post(
            "/clients/register", content=b"{" + b" " * 100_000 + b"}", headers={"Content-Type": "application/json"}
        ),
        413,
        "INVALID_REQUEST",
    )
    assert "65536 bytes" in err["details"]
    # Under the cap the same route works.
    assert http.post("/clients/register", json={"client_id": "small"}).status_code == 200


def test_a_streamed_json_body_is_cut_off_at_the_cap(local_app) -> None:  # type: ignore[no-untyped-def]
    """No Content-Length (chunked): the cap is counted as the body arrives (with a wrong key, none of
    it is read: 401 first, see tests/security/test_auth.py)."""
    http = local_app(max_json_kb=64)
    resp = http.post("/clients/register", content=_chunks(1_000_000), headers={"Content-Type": "application/json"})
    assert_error(resp, 413, "INVALID_REQUEST")
    resp = http.post(
        "/clients/register",
        content=_chunks(1_000_000),
        headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"},
    )
    assert_error(resp, 401, "UNAUTHORIZED")


def test_an_upload_declared_over_the_upload_limit_is_refused_unread(local_app) -> None:  # type: ignore[no-untyped-def]
    http = local_app(max_upload_mb=1)
    resp = http.post(
        "/model/update/c1",
        content=b"x" * 3_000_000,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error(resp, 413, "INVALID_REQUEST")
    resp = http.put("/experiments/e1/initial_model", content=b"x" * 3_000_000)
    assert_error(resp, 413, "INVALID_REQUEST")


def test_huge_integers_in_query_strings_are_400_not_500(local_app) -> None:  # type: ignore[no-untyped-def]
    """Integers past the database's range are refused by validation instead of overflowing in a query."""
    http = local_app()
    huge = str(10**20)
    for path, params in [
        ("/experiments", {"offset": huge}),
        ("/model/global", {"round": "1" * 37, "experiment_id": "e1"}),
        ("/clients", {"round": huge}),
        ("/clients/select", {"round": huge}),
        ("/metrics/training", {"from_round": huge}),
    ]:
        err = assert_error(http.get(path, params=params), 400, "INVALID_REQUEST")
        assert "less than or equal" in err["details"], (path, err)
