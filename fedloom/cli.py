"""The ``fedloom`` command: serve, worker, api, client, demo, loadtest, and the operator commands
experiments, clients and models (:mod:`fedloom.cli_ops`).

Each subcommand imports what it runs only when it runs, so the SDK stays light; one whose extra is
not installed (``server`` for serve, api, worker and demo, ``torch`` for client, ``cli`` for the
operator commands) exits naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedloom._extras import MissingExtraError, require_server, require_torch
from fedloom.cli_ops import add_operator_commands

# Packages of this project: a missing one is a broken install, not a missing extra.
_OWN_PACKAGES = {"fedloom", "fedloom_tools", "fedloom_core", "api", "workers", "workflows", "activities"}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from fedloom_core.redact import install

    # uvicorn logs through its own handlers, so its loggers get the filter too.
    install("uvicorn", "uvicorn.error", "uvicorn.access", "temporalio")


def serve_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``fedloom_tools.serve.serve`` that ``fedloom serve``'s flags give."""
    return {
        "data_dir": args.data_dir,
        "host": args.host,
        "port": args.port,
        "temporal_address": args.temporal_address,
        "temporal_port": args.temporal_port,
        "temporal_ui_port": args.temporal_ui_port,
        "headless": args.temporal_headless,
        "one_process": not args.separate_worker,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedloom_tools.serve import serve

    # Once its plan is made, this process becomes the small stdlib-only supervisor.
    return serve(**serve_options(args), exec_supervisor=True)


def _cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from fedloom_core.settings import Settings
    from fedloom_core.temporal import connect_with_retry
    from workers.main import run_workers

    settings = Settings()

    async def main() -> None:
        client = await connect_with_retry(settings.temporal_address or "127.0.0.1:7233", settings.temporal_namespace)
        await run_workers(client, settings, args.queues.split(","))

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from fedloom_core.settings import Settings
    from fedloom_tools.serve import uvicorn_options

    settings = Settings()
    app = create_app(settings)
    if not args.with_worker:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **uvicorn_options(settings))
        return 0
    from workers.main import run_beside_api

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", **uvicorn_options(settings))
    return run_beside_api(uvicorn.Server(config), settings)


def _cmd_client(args: argparse.Namespace) -> int:
    from fedloom.app import ModelMismatchError, RegistrationError
    from fedloom.runtime import run_client

    api_key = args.api_key or os.environ.get("FEDLOOM_API_KEY")
    if not api_key:
        print("fedloom client: --api-key (or FEDLOOM_API_KEY) is required", file=sys.stderr)
        return 2
    try:
        if args.app:
            load_app(args.app).run(args.server, api_key, args.client_id)
            return 0
        if not args.client_id:
            print("fedloom client: --client-id is required", file=sys.stderr)
            return 2
        run_client(
            server=args.server,
            api_key=api_key,
            client_id=args.client_id,
            dataset=args.dataset,
            partition=args.partition,
            seed=args.seed,
            partition_strategy=args.partition_strategy,
            alpha=args.alpha,
            shards_per_client=args.shards_per_client,
            attack=args.attack,
        )
    except KeyboardInterrupt:
        return 130
    except (RegistrationError, ModelMismatchError) as exc:
        print(f"fedloom client: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --partition, --attack, dataset or --app, or a task for other data
        print(f"fedloom client: {exc}", file=sys.stderr)
        return 2
    return 0


def load_app(spec: str):  # type: ignore[no-untyped-def]
    """The ``ClientApp`` that ``package.module:attr`` names (or that calling it, with no arguments, returns).

    The working directory is importable, so a project's own module runs as ``--app client_app:app``.
    """
    from fedloom.app import ClientApp

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app must look like package.module:attr, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    import importlib

    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"--app {spec}: {module_name} has no attribute {attr!r}")
    app = target if isinstance(target, ClientApp) else target() if callable(target) else None
    if not isinstance(app, ClientApp):
        raise ValueError(f"--app {spec} is not a fedloom.ClientApp nor a function returning one")
    return app


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedloom_tools.demo import run_demo

    return run_demo(clients=args.clients, rounds=args.rounds, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedloom`` command."""
    parser = argparse.ArgumentParser(prog="fedloom", description="Federated-learning orchestration server.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run Temporal's dev server and the API with the workers on this machine")
    serve.add_argument("--data-dir", default=None, help="data directory (default: FEDLOOM_DATA_DIR or ./.fedloom)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="API port")
    serve.add_argument("--temporal-address", default=None, help="use this Temporal server instead of starting one")
    serve.add_argument("--temporal-port", type=int, default=7233, help="gRPC port of the embedded Temporal server")
    serve.add_argument("--temporal-ui-port", type=int, default=8233, help="Web UI port of the embedded Temporal server")
    serve.add_argument("--temporal-headless", action="store_true", help="do not start the Temporal Web UI")
    layout = serve.add_mutually_exclusive_group()
    layout.add_argument(
        "--separate-worker",
        action="store_true",
        help="run the worker as its own process, apart from the API: for heavy aggregation (docs/running.md)",
    )
    layout.add_argument(
        "--one-process",
        action="store_true",
        help="run the worker inside the API process (the default; the least memory)",
    )
    serve.set_defaults(func=_cmd_serve, require=require_server)

    worker = sub.add_parser("worker", help="run the workflow and activity workers")
    worker.add_argument(
        "--queues",
        default="experiments,aggregation",
        help="comma-separated: experiments (workflow + light activities), aggregation",
    )
    worker.set_defaults(func=_cmd_worker, require=require_server)

    api = sub.add_parser("api", help="run the REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.add_argument("--with-worker", action="store_true", help="also run the workers (all queues) in this process")
    api.set_defaults(func=_cmd_api, require=require_server)

    client = sub.add_parser("client", help="join experiments as a training client")
    client.add_argument("--server", default=os.environ.get("FEDLOOM_SERVER", "http://127.0.0.1:8080"))
    client.add_argument("--api-key", default=None, help="the client's own key, the admin key or an enrollment token")
    client.add_argument("--client-id", default=None, help="required unless the --app sets it")
    client.add_argument(
        "--app", default=None, help="run your own fedloom.ClientApp, package.module:attr (the flags below are unused)"
    )
    client.add_argument("--dataset", default="digits")
    client.add_argument("--partition", default="1/1", help="I/N: this client's shard (1-based)")
    client.add_argument("--seed", type=int, default=0, help="partition and training seed")
    client.add_argument(
        "--partition-strategy",
        choices=("iid", "dirichlet", "shards"),
        default="iid",
        help="how the N clients split the training set: iid, dirichlet (label skew) or shards (k classes each)",
    )
    client.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    client.add_argument(
        "--attack",
        default=None,
        help="behave maliciously, for testing defences: sign_flip[:s], scale:<f>, gaussian:<sigma>, label_flip",
    )
    client.add_argument("--shards-per-client", type=int, default=2, help="label-sorted shards per client (shards)")
    client.set_defaults(func=_cmd_client, require=require_torch)

    demo = sub.add_parser("demo", help="run a complete federated experiment on this machine")
    demo.add_argument("--clients", type=int, default=5)
    demo.add_argument("--rounds", type=int, default=10)
    demo.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    demo.set_defaults(func=_cmd_demo, require=require_server)

    add_operator_commands(sub)

    # Its options are fedloom_tools.loadtest's own; main() hands them over unparsed.
    sub.add_parser("loadtest", help="hold a request rate on one endpoint and report latency (fedloom loadtest -h)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedloom`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        from fedloom_tools.loadtest import main as loadtest

        return loadtest(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.require(f"fedloom {args.command}")
        _setup_logging(args.verbose)
        return int(args.func(args) or 0)
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        # A dependency of the extra beyond those require() looks for (boto3, rich, ...).
        if not exc.name or exc.name.partition(".")[0] in _OWN_PACKAGES:
            raise
        extra = getattr(args, "extra", None) or ("torch" if args.require is require_torch else "server")
        print(MissingExtraError(extra, exc.name, f"fedloom {args.command}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
