"""``GET /clients/select`` (the dry run) and the workflow's ``select_clients`` activity take one path:
for the same clients, experiment and round they select and exclude the same clients for the same reasons."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio.testing import ActivityEnvironment

from activities.experiment import ExperimentActivities
from fedloom_core.messages import ExperimentInput
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.storage.candidates import load_selection_details
from fedloom_core.storage.db import Experiment, ExperimentClient
from fedloom_core.storage.repo import session_scope
from workflows import inputs

DENY_EU = {
    "id": "deny-eu",
    "name": "Deny EU region",
    "type": "client_selection",
    "priority": 100,
    "effect": "deny",
    "when": {"field": "location.region", "operator": "in", "value": ["eu-west-1"]},
}


def test_the_dry_run_selects_what_the_workflows_selection_activity_selects(local_app) -> None:  # type: ignore[no-untyped-def]
    admin = local_app()
    for i in range(1, 11):
        region = "eu-west-1" if i in (2, 5) else "us-east-1"
        body = {"client_id": f"site-{i}", "location": {"region": region}}
        assert admin.post("/clients/register", json=body).status_code == 200
    config = StartRequest.model_validate(
        {
            "experiment_config": {
                "experiment_id": "exp-sel",
                "rounds": 3,
                "min_clients": 2,
                "client_fraction": 0.5,
                "seed": 7,
            }
        }
    )
    policy = PolicyConfig.model_validate({"trust_threshold": 0.5, "rules": [DENY_EU]})
    engine = admin.app.state.engine
    with session_scope(engine) as s:
        s.add(
            Experiment(
                experiment_id="exp-sel",
                total_rounds=3,
                config=config.model_dump(mode="json"),
                policy_config=policy.model_dump(mode="json"),
            )
        )
        # Standing in this experiment: its trust, not the client's global one, is what counts.
        s.add(ExperimentClient(experiment_id="exp-sel", client_id="site-3", trust_score=0.3))
        s.add(ExperimentClient(experiment_id="exp-sel", client_id="site-4", status="inactive"))

    dry = admin.get("/clients/select", params={"experiment_id": "exp-sel", "round": 2}).json()
    assert dry["dry_run"] is True and dry["round"] == 2

    wf_input = ExperimentInput(
        experiment_id="exp-sel",
        config=config,
        input_shape=[8, 8, 1],
        num_classes=10,
        round_timeout_s=60,
        selection_timeout_s=5,
        policy=policy,
    )
    selection_input = inputs.select_clients(wf_input, 2, datetime.now(UTC))
    real = ActivityEnvironment().run(
        ExperimentActivities(engine, admin.app.state.blobs).select_clients, selection_input
    )

    # The activity's per-client details are in the blob store; the workflow carries their counts.
    excluded, policy_results = load_selection_details(admin.app.state.blobs, real.details_key)
    assert dry["selected_clients"] == real.selected
    assert dry["exclusion_reasons"] == excluded
    assert dry["policy_results"] == policy_results
    assert sum(real.exclusion_counts.values()) == len(excluded)
    # The rules, the experiment's trust and its status all took part, and the fraction sampled the rest.
    assert excluded["site-2"] == excluded["site-5"]
    assert excluded["site-2"].startswith("Denied by rule deny-eu")
    assert excluded["site-3"] == "Trust score below threshold (0.30 < 0.50)"
    assert excluded["site-4"] == "Client is inactive"
    assert dry["eligible_count"] == 6 and len(real.selected) == 3
