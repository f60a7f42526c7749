"""What every benchmark script shares: medians, machine facts, JSON results and docs sections.

Conventions for ``benchmarks/bench_*.py``:

- ``--quick`` runs a tiny size (the test suite does this once per script, to keep the scripts
  working; it asserts nothing about time) and never touches ``docs/``.
- ``--out DIR`` is where the JSON result and the PNG plot go (default ``benchmarks/results``).
- A full run writes ``<out>/<name>.json``, a plot ``docs/img/bench_<name>.png`` and rewrites its
  own section of ``docs/benchmarks.md`` (between ``<!-- bench:<name> -->`` markers), so several
  scripts can share the page without touching each other's text.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

DOC_HEADER = """# Benchmarks

`make bench` runs every script in `benchmarks/` and rewrites the sections below (each script owns the
text between its markers). Every number is a median over repeated runs in one process run, and every
target is a ratio against a reference measured in that same run, because absolute numbers drift on a
shared 2-core machine. Reproduce one section with `.venv/bin/python benchmarks/<script>.py`.

"""


def base_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no docs update (used by the tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON result and plot")
    return parser


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; ``values`` need not be sorted."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    mem_gib = None
    try:
        found = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem_gib = round(int(found.group(1)) / 2**20, 1) if found else None
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}, "
        f"torch {info.get('torch', '?')}; measured {info['date']}"
    )


def rss_bytes(pid: int | None = None, field: str = "VmRSS") -> int:
    """Resident set size of ``pid`` (default: this process) from /proc; ``field="VmHWM"`` for its peak.

    Kept free of fedloom imports: it also runs in the Flower comparison's own virtualenv.
    """
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", status).group(1)) * 1024


def write_result(out: Path, name: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def plot_path(out: Path, name: str, quick: bool) -> Path:
    """Where a script saves its PNG: into ``docs/img`` for a full run, beside the JSON for ``--quick``."""
    directory = out if quick else IMG
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"bench_{name}.png"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write a finished matplotlib figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def publish(
    args: argparse.Namespace,
    name: str,
    result: dict[str, Any],
    plot: Callable[[dict[str, Any], Path], None],
    section: Callable[[dict[str, Any], str], str],
) -> None:
    """Write the JSON result and the plot; a full run (not ``--quick``) also rewrites its docs section.

    ``section(machine_info, image_path)`` returns the section's Markdown; the image path is relative to
    ``docs/``.
    """
    info = machine()
    write_result(args.out, name, result)
    png = plot_path(args.out, name, args.quick)
    plot(result, png)
    if not args.quick:
        update_doc_section(name, section(info, f"img/{png.name}"))


def update_doc_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace this benchmark's section of ``docs/benchmarks.md``, keeping every other section."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else DOC_HEADER
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


# The page's order: the numbering of the benchmarks.
SECTION_ORDER = (
    "aggregation",
    "memory",
    "transfer",
    "large_model",
    "round_overhead",
    "efficiency",
    "scale",
    "long_run",
    "vs_flower",
    "run",
)


def order_sections(doc: Path = DOC, order: Sequence[str] = SECTION_ORDER) -> None:
    """Put the page's sections in ``order`` (unknown ones keep their place at the end)."""
    if not doc.exists():
        return
    text = doc.read_text()
    pattern = re.compile(r"<!-- bench:([a-z_]+) -->.*?<!-- /bench:\1 -->", re.S)
    blocks = {m.group(1): m.group(0) for m in pattern.finditer(text)}
    first = pattern.search(text)
    if not blocks or first is None:
        return
    head = text[: first.start()].rstrip() + "\n\n"
    ranked = sorted(blocks, key=lambda n: (order.index(n) if n in order else len(order), list(blocks).index(n)))
    doc.write_text(head + "\n\n".join(blocks[n] for n in ranked) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable when printed to a terminal)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(machine_line(machine()))
    sys.exit(0)
