"""How the operator commands print: rich tables for people, JSON for scripts, errors in the spec's terms."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from fedloom._client import FLAPIError

# Exit codes of the operator commands (watch adds its own for how the run ended).
EXIT_ERROR = 1
EXIT_USAGE = 2


def console():  # type: ignore[no-untyped-def]
    """A rich console on stdout that keeps long ids whole when stdout is not a terminal."""
    from rich.console import Console

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(out.width, 160))
    return out


def cell(value: Any, digits: int = 4) -> str:
    """One value as table text: ``-`` for none, floats rounded, lists and dicts as compact JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value) if value else "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def print_json(body: Any) -> None:
    """``body`` as indented JSON on stdout."""
    print(json.dumps(body, indent=2, sort_keys=False))


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], footer: str = "") -> None:
    """A table with ``columns``, one line per row; ``footer`` below it."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_lines=False)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell(v)) for v in row))
    out = console()
    out.print(table)
    if footer:
        out.print(Text(footer))


def print_fields(title: str | None, fields: Iterable[tuple[str, Any]]) -> None:
    """A two-column table of field names and values."""
    print_table(title, ("field", "value"), fields)


def print_rounds(rounds: list[dict[str, Any]]) -> None:
    """The per-round table of ``GET /metrics/training``."""
    rows = [
        (
            r["round"],
            r["global_accuracy"],
            r["global_loss"],
            (r.get("federated_metrics") or {}).get("accuracy"),
            r["participating_clients"],
            f"{r['round_duration']:.1f}s" if r.get("round_duration") is not None else None,
        )
        for r in rounds
    ]
    print_table("rounds", ("round", "accuracy", "loss", "federated accuracy", "clients", "duration"), rows)


def show(body: Any, as_json: bool, title: str | None = None, fields: Sequence[str] | None = None) -> None:
    """``body`` as JSON, or its ``fields`` (default: all) as a field table."""
    if as_json:
        print_json(body)
        return
    names = fields if fields is not None else list(body)
    print_fields(title, ((name, body.get(name)) for name in names))


def error_line(command: str, exc: BaseException) -> str:
    """What a failed command says on stderr: the spec's code and message for an API error."""
    if isinstance(exc, FLAPIError):
        details = f": {exc.details}" if exc.details else ""
        retry = f" (retry after {exc.retry_after:g}s)" if exc.retry_after is not None else ""
        return f"{command}: {exc.code} ({exc.status}) {exc.message}{details}{retry}"
    return f"{command}: {exc}"


def fail(command: str, exc: BaseException | str, code: int = EXIT_ERROR) -> int:
    """Print ``exc`` for ``command`` on stderr and return the exit code."""
    print(error_line(command, exc) if isinstance(exc, BaseException) else f"{command}: {exc}", file=sys.stderr)
    return code
