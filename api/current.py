"""Which experiment a request means when it names none: the running one, refused while several run."""

from __future__ import annotations

from sqlmodel import Session, select

from fedloom_core.errors import InvalidRequest, TrainingAlreadyRunning
from fedloom_core.storage.db import Experiment
from fedloom_core.storage.repo import running_first, serialize_starts


def running_ids(session: Session) -> list[str]:
    """The running experiments' ids, the most recently started first."""
    return list(session.exec(running_first(select(Experiment.experiment_id))).all())


def check_unambiguous(session: Session, experiment_id: str | None, what: str) -> None:
    """Refuse (400) a request that names no experiment while several run: which one it means is unknown."""
    if experiment_id is not None:
        return
    running = running_ids(session)
    if len(running) > 1:
        raise InvalidRequest(
            "experiment_id is required",
            f"{len(running)} experiments are running ({', '.join(running)}); name one with experiment_id for {what}",
        )


def claim_start(session: Session, limit: int) -> None:
    """Refuse (409) a start or continue while ``limit`` experiments run; starts decide one at a time."""
    serialize_starts(session)
    running = running_ids(session)
    if len(running) >= limit:
        names = ", ".join(f"'{r}'" for r in running)
        raise TrainingAlreadyRunning(
            "Cannot start - training already in progress",
            f"experiment {names} is running; stop it first"
            if limit == 1
            else f"{len(running)} experiments are running ({names}), FEDLOOM_MAX_RUNNING_EXPERIMENTS is {limit}",
        )
