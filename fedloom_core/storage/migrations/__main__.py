"""Alembic's command line for these migrations, e.g. ``python -m fedloom_core.storage.migrations history``."""

from __future__ import annotations

import logging

from alembic.config import CommandLine

from fedloom_core.settings import Settings
from fedloom_core.storage.migrations import alembic_config


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # alembic reports each step at INFO
    cli = CommandLine(prog="python -m fedloom_core.storage.migrations")
    options = cli.parser.parse_args()
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments")
    cli.run_cmd(alembic_config(Settings().database_url), options)


if __name__ == "__main__":
    main()
