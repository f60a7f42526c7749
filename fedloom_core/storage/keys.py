"""Every blob key and model id in one place, so the API, the activities and the tests agree on them."""

from __future__ import annotations


def model_id_for(experiment_id: str, round: int) -> str:
    """The spec's model id: ``model_<experiment>_round_<n>``."""
    return f"model_{experiment_id}_round_{round}"


def model_key(experiment_id: str, round: int) -> str:
    """Blob key of an experiment's global model after ``round`` (0 is the initial model)."""
    return f"models/{experiment_id}/round-{round}.safetensors"


def state_key(experiment_id: str, round: int) -> str:
    """Blob key of the strategy's server state after ``round``."""
    return f"state/{experiment_id}/round-{round}.safetensors"


def update_key(experiment_id: str, round: int, client_id: str, digest: str) -> str:
    """Blob key of a client's update; the digest in the name keeps a re-upload from overwriting the first."""
    return f"updates/{experiment_id}/{round}/{client_id}-{digest[:32]}.safetensors"
