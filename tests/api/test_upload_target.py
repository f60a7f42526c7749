"""Which experiment an update goes to when a client serves several: the one it names (in-process app)."""

from __future__ import annotations

from datetime import timedelta

from api.deps import get_temporal
from fedloom_core.storage.db import Experiment, Round, utcnow
from fedloom_core.storage.repo import session_scope
from tests.api.test_training_api import assert_error


def test_an_upload_goes_to_the_experiment_it_names(local_app) -> None:  # type: ignore[no-untyped-def]
    admin = local_app(max_running_experiments=2)
    # No upload here gets as far as signalling a workflow; Temporal only has to look connected.
    admin.app.dependency_overrides[get_temporal] = lambda: object()
    assert admin.post("/clients/register", json={"client_id": "site"}).status_code == 200
    now = utcnow()
    with session_scope(admin.app.state.engine) as s:
        # "newer" started last and its open round selected the site: an unnamed upload would go there.
        for exp_id, started, selected in (("older", now - timedelta(minutes=5), []), ("newer", now, ["site"])):
            s.add(Experiment(experiment_id=exp_id, status="running", started_at=started, current_round=1))
            s.add(Round(experiment_id=exp_id, round=1, selected_clients=selected, global_model_id=f"m-{exp_id}"))

    # Named, the target is checked before any body: "older" did not select the site.
    named = admin.post("/model/update/site", params={"experiment_id": "older"})
    assert_error(named, 409, "ROUND_NOT_ACTIVE")
    assert "'older'" in named.json()["error"]["details"]
    # Unnamed, it passes the target check (to "newer") and only then fails on the missing body.
    assert admin.post("/model/update/site").status_code == 400
    assert_error(admin.post("/model/update/site", params={"experiment_id": "gone"}), 409, "EXPERIMENT_NOT_ACTIVE")
    assert_error(admin.post("/model/update/site", params={"experiment_id": "../x"}), 400, "INVALID_REQUEST")
    session = admin.post("/model/update/site/sessions", json={"size": 10, "metrics": {}, "experiment_id": "older"})
    assert_error(session, 409, "ROUND_NOT_ACTIVE")
