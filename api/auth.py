"""API keys: generation, hashing at rest, and resolving a request's key to a principal."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fedloom_core.admin_key import new_key
from fedloom_core.errors import Forbidden, Unauthorized
from fedloom_core.storage.db import ApiKey
from fedloom_core.storage.repo import session_scope


@dataclass(frozen=True)
class Principal:
    role: str  # admin | client
    client_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        """Raise FORBIDDEN unless this is the admin key."""
        if not self.is_admin:
            raise Forbidden("Insufficient permissions", "this operation needs the admin API key")

    def require_client(self, client_id: str) -> None:
        """Raise FORBIDDEN unless this is the admin key or ``client_id``'s own key."""
        if not self.is_admin and self.client_id != client_id:
            raise Forbidden("Insufficient permissions", f"this key may not act for client '{client_id}'")


def hash_key(key: str) -> str:
    """The sha256 of a key, which is all we store."""
    return hashlib.sha256(key.encode()).hexdigest()


def add_client_key(session: Session, client_id: str) -> str:
    """Add a new key for ``client_id`` to ``session`` (its hash only) and return the key, shown once.

    The caller's transaction commits it, together with whatever else it writes (the client row).
    """
    key = new_key()
    session.add(ApiKey(key_hash=hash_key(key), role="client", client_id=client_id))
    session.flush()
    return key


def revoke_client_keys(session: Session, client_id: str) -> int:
    """Mark every live key of ``client_id`` revoked in ``session``; the number revoked."""
    result = session.exec(  # type: ignore[call-overload]
        update(ApiKey)
        .where(ApiKey.client_id == client_id, ApiKey.revoked.is_(False))  # type: ignore[attr-defined]
        .values(revoked=True)
    )
    return int(result.rowcount or 0)


# Keys per query when checking many cached keys for revocation at once.
REVOKED_CHUNK = 500


def revoked_among(engine: Engine, digests: list[str]) -> set[str]:
    """Which of these key hashes are revoked (or no longer stored): one indexed query per chunk."""
    live: set[str] = set()
    with session_scope(engine) as s:
        for i in range(0, len(digests), REVOKED_CHUNK):
            chunk = digests[i : i + REVOKED_CHUNK]
            live.update(
                s.exec(
                    select(ApiKey.key_hash).where(ApiKey.key_hash.in_(chunk), ApiKey.revoked.is_(False))  # type: ignore[attr-defined]
                ).all()
            )
    return set(digests) - live


def unknown_key() -> Unauthorized:
    """The UNAUTHORIZED error for a key that is not known (or revoked)."""
    return Unauthorized("Missing or invalid authentication", "the API key is not known")


def resolve(engine: Engine, admin_key_hash: str, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer <key>`` header, or UNAUTHORIZED."""
    if not authorization:
        raise Unauthorized("Missing or invalid authentication", "send 'Authorization: Bearer <api-key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("Missing or invalid authentication", "the Authorization header must be 'Bearer <api-key>'")
    return resolve_key(engine, admin_key_hash, key)


def resolve_key(engine: Engine, admin_key_hash: str, key: str) -> Principal:
    """The principal owning ``key``, or UNAUTHORIZED."""
    digest = hash_key(key)
    if hmac.compare_digest(digest, admin_key_hash):
        return Principal("admin")
    with session_scope(engine) as s:
        row = s.exec(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked.is_(False))).first()  # type: ignore[attr-defined]
    if row is None:
        raise unknown_key()
    return Principal(row.role, row.client_id)
