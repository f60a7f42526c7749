"""A round's update validation as both the workflow's activity and the validate dry run run it.

Each update's blob is first opened and its layout compared with the global model's: one that is
missing, fails its digest or cannot be parsed is rejected (``UPDATE_UNREADABLE``) instead of failing
the round. The readable ones are measured and judged by ``policy.validation`` with the policy's
bounds and the clients' standing in the experiment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.weights import WeightsFormatError, compare_structure, structure
from fedloom_core.messages import UpdateRef
from fedloom_core.policy.selection import Candidate
from fedloom_core.policy.validation import Verdict, judge_updates, measure_round
from fedloom_core.schemas import PolicyConfig
from fedloom_core.storage.blobstore import BlobIntegrityError, BlobNotFoundError, BlobStore, InvalidBlobKeyError
from fedloom_core.storage.db import Client, ExperimentClient
from fedloom_core.storage.repo import session_scope

UNREADABLE = "UPDATE_UNREADABLE"
# What a stored update can be that no retry will mend; other blob-store errors (an S3 outage) are raised.
_UNREADABLE_ERRORS = (
    BlobNotFoundError,
    BlobIntegrityError,
    InvalidBlobKeyError,
    WeightsFormatError,
    FileNotFoundError,
)


def standing(engine: Engine, experiment_id: str) -> dict[str, Candidate]:
    """Every client's status and its trust in this experiment, for update_validation rules."""
    with session_scope(engine) as s:
        clients = s.exec(select(Client)).all()
        own = {
            e.client_id: e
            for e in s.exec(select(ExperimentClient).where(ExperimentClient.experiment_id == experiment_id))
        }
    found = {}
    for c in clients:
        e = own.get(c.client_id)
        found[c.client_id] = Candidate(
            c.client_id,
            c.status,
            e.trust_score if e else c.trust_score,
            capabilities=c.capabilities,
            location=c.location,
            reliability=(e.deliveries / e.selections) if e and e.selections else None,
            recent_failures=e.failures if e else 0,
        )
    return found


def update_files(refs: Sequence[UpdateRef]) -> list[UpdateFile]:
    """The kernels' view of the updates (the path is the blob key; the opener resolves it)."""
    return [UpdateFile(u.client_id, Path(u.blob_key), u.num_samples) for u in refs]


def opener_for(blobs: BlobStore, refs: Sequence[UpdateRef], local: Mapping[str, Path] | None = None):  # type: ignore[no-untyped-def]
    """Open each update's blob by client id; ``local`` gives files of updates not in the store."""
    keys = {u.client_id: u.blob_key for u in refs}
    files = dict(local or {})

    @contextmanager
    def opener(update) -> Iterator[Path]:  # type: ignore[no-untyped-def]
        if update.client_id in files:
            yield files[update.client_id]
            return
        with blobs.open_local(keys[update.client_id]) as path:
            yield path

    return opener


def unreadable(global_path: Path, refs: Sequence[UpdateRef], opener) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Client id -> why its update cannot be used, for every update that cannot be opened or parsed."""
    expected = structure(global_path)
    found = {}
    for ref, file in zip(refs, update_files(refs), strict=True):
        try:
            with opener(file) as path:
                problems = compare_structure(structure(path), expected)
        except _UNREADABLE_ERRORS as exc:
            found[ref.client_id] = f"{UNREADABLE}: the stored update cannot be read ({exc})"
            continue
        if problems:
            found[ref.client_id] = (
                f"{UNREADABLE}: the stored update does not match the model ({'; '.join(problems[:5])})"
            )
    return found


def judge_round(
    engine: Engine,
    blobs: BlobStore,
    *,
    experiment_id: str,
    round: int,
    global_key: str,
    updates: Sequence[UpdateRef],
    policy: PolicyConfig,
    hour_utc: int,
    weekday: int,
    local: Mapping[str, Path] | None = None,
) -> Verdict:
    """The round's verdict: unreadable updates rejected, the others measured and judged by the policy."""
    opener = opener_for(blobs, updates, local)
    with blobs.open_local(global_key) as global_path:
        rejected = unreadable(Path(global_path), updates, opener)
        readable = [u for u in updates if u.client_id not in rejected]
        stats = measure_round(Path(global_path), update_files(readable), opener, policy)
    verdict = judge_updates(
        stats,
        {u.client_id: u.num_samples for u in readable},
        policy,
        standing(engine, experiment_id) if policy.rules else {},
        round=round,
        hour_utc=hour_utc,
        weekday=weekday,
    )
    verdict.rejected.update(rejected)
    return verdict
