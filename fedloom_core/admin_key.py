"""The admin API key file: read or created (mode 0600) in the data dir.

Kept free of the database and web stacks: ``fedloom serve``'s supervisor reads the key at start-up
and should not load them (their memory would count against the server for its whole life).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ADMIN_KEY_FILE = "admin_api_key"


def new_key(prefix: str = "fl") -> str:
    """A fresh random API key."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def load_or_create_admin_key(data_dir: Path, configured: str | None) -> tuple[str, bool]:
    """The admin key: the configured one, else the one in the data dir, else a new one saved there (0600).

    Returns the key and whether it was created now.
    """
    if configured:
        return configured, False
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    key = new_key("fladmin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, True
