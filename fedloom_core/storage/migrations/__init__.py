"""Alembic migrations of the fedloom database, configured in code (no alembic.ini).

``upgrade`` brings a database to the newest revision; ``fedloom_core.storage.db.create_schema`` calls it
under a lock at every start-up. A database created before migrations existed (it has the
``schema_version`` table but no ``alembic_version``) is first stamped at the baseline revision, whose
schema it already has. New revisions: ``python -m fedloom_core.storage.migrations revision
--autogenerate -m "what changes"`` against a database at head (``FEDLOOM_DATABASE_URL``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent
# Alembic lists every plugin it sets up at INFO, on every start-up of every process.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
# The revision holding the schema that databases created before migrations already have.
BASELINE = "0001"
# The table that only databases created before migrations have.
PRE_ALEMBIC_MARKER = "schema_version"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for these migrations; ``url`` is used only when no connection is given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if url:
        # ConfigParser interpolation would read a "%" in a password as a reference.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    """The newest revision."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def upgrade(connection: Connection) -> None:
    """Bring the database behind ``connection`` to head, stamping a pre-migrations database first.

    The caller holds the lock that keeps other processes out and commits the connection's transaction.
    """
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and PRE_ALEMBIC_MARKER in tables:
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, "head")
