"""The retention sweeper: the worker deletes what the keep rules let go, working from the database.

It runs beside the workflows, never inside them, so no workflow's command sequence changes. Each pass
applies the keep rules to the rounds committed since the last pass (fedloom_core/storage/retention.py);
every ``orphan_every`` passes it also lists the blob store for orphans. Several workers sweeping the
same store is harmless: every deletion is idempotent.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine

from fedloom_core.settings import Settings
from fedloom_core.storage import retention
from fedloom_core.storage.blobstore import BlobStore

log = logging.getLogger("fedloom.retention")


def orphan_every(settings: Settings) -> int:
    """How many passes apart orphans are collected: about four times per grace period, at most every pass."""
    return max(1, int(settings.orphan_grace_s / 4 / settings.retention_sweep_s))


def sweep_once(engine: Engine, blobs: BlobStore, settings: Settings, swept: dict[str, int], orphans: bool) -> int:
    """One pass; returns how many blobs it deleted."""
    deleted = len(retention.apply_retention(engine, blobs, settings, swept).deleted)
    if orphans:
        deleted += len(retention.collect_orphans(engine, blobs, settings.orphan_grace_s).deleted)
    if deleted:
        log.info("retention deleted %d blobs", deleted)
    return deleted


async def sweep(engine: Engine, blobs: BlobStore, settings: Settings) -> None:
    """Sweep every ``retention_sweep_s`` seconds until cancelled, orphans included on the first pass."""
    swept: dict[str, int] = {}
    passes = 0
    every = orphan_every(settings)
    while True:
        try:
            await asyncio.to_thread(sweep_once, engine, blobs, settings, swept, passes % every == 0)
        except Exception:  # noqa: BLE001 - a failed pass (database or store away) must not end the worker
            log.exception("retention pass failed")
        passes += 1
        await asyncio.sleep(settings.retention_sweep_s)
