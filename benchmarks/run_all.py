"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``); each rewrites its own docs section.

.venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts whose results others read as targets run first: bench_large_model compares its 1 GB rates
# with this run's 44 MB transfer figures, not with a previous run's (possibly another machine's).
FIRST = ("bench_transfer",)


def scripts(only: list[str] | None = None) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"), key=lambda p: (p.stem not in FIRST, p.name))
    if only:
        found = [p for p in found if any(name in p.stem for name in only)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    failed = []
    took: dict[str, float] = {}
    started = time.perf_counter()
    for script in scripts(args.only):
        print(f"\n=== {script.name} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script), *(["--quick"] if args.quick else [])]).returncode
        took[script.name] = time.perf_counter() - t0
        print(f"=== {script.name}: exit {rc} in {took[script.name]:.0f} s ===", flush=True)
        if rc:
            failed.append(script.name)
    total = time.perf_counter() - started
    if not args.quick and not args.only:
        sys.path.insert(0, str(HERE))
        from _common import machine, machine_line, order_sections, update_doc_section

        update_doc_section("run", whole_run(took, total, failed, machine_line(machine())))
        order_sections()
    print(f"\nall benchmarks: {total:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def whole_run(took: dict[str, float], total: float, failed: list[str], machine: str) -> str:
    """The docs section on the whole run: how long it took, the longest scripts, what failed."""
    longest = sorted(took.items(), key=lambda kv: -kv[1])[:3]
    named = ", ".join(f"`{name}` {seconds:.0f} s" for name, seconds in longest)
    return (
        f"## The whole run\n\n`make bench` ran the {len(took)} scripts above in {total:.0f} s; the longest: "
        f"{named}. Failed: {', '.join(failed) or 'none'}. {machine}."
    )


if __name__ == "__main__":
    sys.exit(main())
