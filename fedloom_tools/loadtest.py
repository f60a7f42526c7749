"""A bounded, open-loop load generator for one GET endpoint (``fedloom loadtest``).

    fedloom loadtest --server http://127.0.0.1:8080 --api-key KEY [--path /api/v1/training/status]
                     [--rate 200] [--duration 60] [--concurrency 64]

Request ``i`` is due at ``start + i / rate`` whether or not earlier ones have answered (open loop),
so a slow server shows up as latency instead of silently lowering the rate. Latency is measured
from the due time, not the send time, so queueing inside this client counts against the server
too. At most ``concurrency`` requests are in flight; the run never lasts longer than
``duration + grace`` seconds. Point it only at servers you run: it is a load test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class LoadReport:
    rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    def line(self) -> str:
        return (
            f"{self.sent} requests at {self.rate:g}/s for {self.duration_s:g} s: {self.ok} ok, {self.errors} errors; "
            f"achieved {self.achieved_rps:.1f}/s; latency p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"max {self.max_ms:.1f} ms"
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


async def run_load(
    url: str,
    api_key: str,
    *,
    rate: float = 200,
    duration: float = 60,
    concurrency: int = 64,
    grace: float = 15,
) -> LoadReport:
    """GET ``url`` ``rate`` times a second for ``duration`` seconds; a report of what came back."""
    total = int(rate * duration)
    report = LoadReport(rate=rate, duration_s=duration)
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=grace) as http:

        async def one(due: float) -> None:
            try:
                response = await http.get(url)
                if response.status_code == 200:
                    report.ok += 1
                else:
                    kinds[f"HTTP {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                kinds[type(exc).__name__] += 1
            except asyncio.CancelledError:
                pass  # past the bound: counted as unfinished
            finally:
                latencies.append(time.perf_counter() - due)
                gate.release()

        start = time.perf_counter()
        stop_at = start + duration + grace
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:  # all slots busy: the server is behind; wait, but never past the bound
                await asyncio.wait_for(gate.acquire(), timeout=max(0.0, stop_at - time.perf_counter()))
            except TimeoutError:
                kinds["not sent: server too slow"] += total - i
                break
            tasks.append(asyncio.create_task(one(due)))
            report.sent += 1
        pending = [t for t in tasks if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=max(0.1, stop_at - time.perf_counter()))
            for task in still:
                task.cancel()
            kinds["unfinished"] += len(still)
        report.elapsed_s = time.perf_counter() - start

    done = sorted(latencies)
    report.errors = sum(kinds.values())
    report.error_kinds = dict(kinds)
    report.achieved_rps = report.ok / report.elapsed_s if report.elapsed_s else 0.0
    report.p50_ms = _percentile(done, 50) * 1e3
    report.p99_ms = _percentile(done, 99) * 1e3
    report.max_ms = (done[-1] if done else 0.0) * 1e3
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedloom loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=os.environ.get("FEDLOOM_API_KEY"))
    parser.add_argument("--path", default="/api/v1/training/status")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is needed: --api-key or FEDLOOM_API_KEY")
    report = asyncio.run(
        run_load(
            args.server.rstrip("/") + args.path,
            args.api_key,
            rate=args.rate,
            duration=args.duration,
            concurrency=args.concurrency,
        )
    )
    print(json.dumps(asdict(report)) if args.json else report.line(), flush=True)
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
