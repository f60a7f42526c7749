"""Fault injection for the crash tests: the real API and workers, with a pause the test brings along.

    python -m tests.e2e.faults serve  [--pause-upload R:S] [--pause-process-round R:S] <fedloom serve flags>
    python -m tests.e2e.faults api    [--pause-upload R:S] --host H --port P
    python -m tests.e2e.faults worker [--pause-process-round R:S] [--queues Q]

``--pause-upload R:S`` holds the first upload of round R for S seconds after its first chunk has
arrived (once per data dir: a marker file remembers it), through a dependency override of the
request body, so a test can kill the API mid-upload. ``--pause-process-round R:S`` holds round R's
``process_round`` activity for S seconds before it runs (first attempt only, heartbeating), through
an activity interceptor, so a test can kill the worker while that activity is in flight. ``serve``
runs fedloom's supervisor with ``api`` and ``worker`` children from this module, given the same
pauses. Run it from the repository root (``-m tests...``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

# At module level: FastAPI resolves the override's annotations (postponed by the __future__ import) here.
from fastapi import Request

log = logging.getLogger("fedloom.faults")
MODULE = "tests.e2e.faults"
UPLOAD_MARKER = "fault-upload-paused"
Pause = tuple[int, float]


def serve_command(*, pause_upload: Pause | None = None, pause_process_round: Pause | None = None) -> list[str]:
    """The argv of a ``fedloom serve`` with these pauses, for ``fedloom_tools.launch.start_serve(command=...)``."""
    return [sys.executable, "-m", MODULE, "serve", *_pause_flags(pause_upload, pause_process_round)]


def _pause_flags(pause_upload: Pause | None, pause_process_round: Pause | None) -> list[str]:
    flags = []
    if pause_upload:
        flags += ["--pause-upload", f"{pause_upload[0]}:{pause_upload[1]}"]
    if pause_process_round:
        flags += ["--pause-process-round", f"{pause_process_round[0]}:{pause_process_round[1]}"]
    return flags


# --- the API: an upload held mid-body ---------------------------------------------------------------------


def held_body(round: int, seconds: float) -> Callable[..., Any]:
    """An override of ``api.deps.request_body_stream`` that holds round ``round``'s first upload."""
    from fastapi.concurrency import run_in_threadpool

    async def body(request: Request) -> AsyncIterator[bytes]:
        state = request.app.state
        marker = state.settings.data_dir / UPLOAD_MARKER
        hold = not marker.exists() and await run_in_threadpool(_current_round, state.engine) == round
        return _held(request.stream(), seconds if hold else 0.0, marker)

    return body


async def _held(chunks: AsyncIterator[bytes], pause: float, marker: Path) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk
        if pause:
            marker.touch()
            log.warning("fault injection: pausing an upload %.1f s after its first %d bytes", pause, len(chunk))
            await asyncio.sleep(pause)
            pause = 0.0


def _current_round(engine) -> int | None:  # type: ignore[no-untyped-def]
    from fedloom_core.storage.repo import latest_experiment, session_scope

    with session_scope(engine) as s:
        exp = latest_experiment(s)
        return exp.current_round if exp else None


def run_api(host: str, port: int, pause_upload: Pause | None) -> int:
    """The real API app, with the upload pause as a dependency override."""
    import uvicorn

    from api.app import create_app
    from api.deps import request_body_stream

    app = create_app()
    if pause_upload:
        app.dependency_overrides[request_body_stream] = held_body(*pause_upload)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


# --- the worker: process_round held before it runs ------------------------------------------------------------


def round_pause_interceptor(round: int, seconds: float):  # type: ignore[no-untyped-def]
    """A Temporal worker interceptor that holds round ``round``'s ``process_round`` (first attempt)."""
    from temporalio import activity
    from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

    class HoldRound(ActivityInboundInterceptor):
        async def execute_activity(self, input: ExecuteActivityInput) -> Any:
            info = activity.info()
            arg = input.args[0] if input.args else None
            at = getattr(getattr(arg, "validation", None), "round", None)
            if info.activity_type == "process_round" and info.attempt == 1 and at == round:
                log.warning("fault injection: holding round %d's process_round %.1f s before it runs", round, seconds)
                loop = asyncio.get_running_loop()
                until = loop.time() + seconds
                while (left := until - loop.time()) > 0:
                    activity.heartbeat()  # alive until the test kills this process
                    await asyncio.sleep(min(1.0, left))
            return await super().execute_activity(input)

    class HoldRoundInterceptor(Interceptor):
        def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
            return HoldRound(next)

    return HoldRoundInterceptor()


def run_worker(queues: Sequence[str], pause_process_round: Pause | None) -> int:
    """The real workers, with the process_round pause as an activity interceptor."""
    from fedloom_core.settings import Settings
    from fedloom_core.temporal import connect_with_retry
    from workers.main import run_workers

    settings = Settings()
    interceptors = [round_pause_interceptor(*pause_process_round)] if pause_process_round else []

    async def main() -> None:
        client = await connect_with_retry(settings.temporal_address or "127.0.0.1:7233", settings.temporal_namespace)
        await run_workers(client, settings, queues, interceptors=interceptors)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


# --- the supervisor ------------------------------------------------------------------------------------------


def run_serve(rest: list[str], pause_upload: Pause | None, pause_process_round: Pause | None) -> int:
    """fedloom's serve supervisor, with ``api`` and ``worker`` children from this module."""
    from fedloom.cli import build_parser, serve_options
    from fedloom_tools.serve import serve

    args = build_parser().parse_args(["serve", *rest])
    flags = _pause_flags(pause_upload, pause_process_round)
    child = [sys.executable, "-m", MODULE]
    return serve(**serve_options(args), api_command=[*child, "api", *flags], worker_command=[*child, "worker", *flags])


def _pause(text: str) -> Pause:
    round, _, seconds = text.partition(":")
    return int(round), float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("role", choices=("serve", "api", "worker"))
    parser.add_argument("--pause-upload", type=_pause, metavar="ROUND:SECONDS")
    parser.add_argument("--pause-process-round", type=_pause, metavar="ROUND:SECONDS")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role == "serve":
        return run_serve(rest, args.pause_upload, args.pause_process_round)
    if args.role == "api":
        api = argparse.ArgumentParser(prog=f"python -m {MODULE} api")
        api.add_argument("--host", default="127.0.0.1")
        api.add_argument("--port", type=int, default=8080)
        opts = api.parse_args(rest)
        return run_api(opts.host, opts.port, args.pause_upload)
    worker = argparse.ArgumentParser(prog=f"python -m {MODULE} worker")
    worker.add_argument("--queues", default="experiments,aggregation")
    return run_worker(worker.parse_args(rest).queues.split(","), args.pause_process_round)


if __name__ == "__main__":
    sys.exit(main())
