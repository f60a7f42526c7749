"""The operator commands of ``fedloom``: experiments, clients and models, on the SDK's ``FLClient``.

Each prints tables, or the API's JSON with ``--json``. The server and key come from ``--server`` and
``--api-key``, else ``FEDLOOM_SERVER`` and ``FEDLOOM_API_KEY``, else ``http://127.0.0.1:8080`` and the
admin key that ``fedloom serve`` wrote into its data directory. API errors print the spec's code and
message and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from fedloom._client import FLAPIError, FLClient
from fedloom._extras import require_extra
from fedloom.cli_output import EXIT_USAGE, fail, print_json, print_rounds, print_table, show

DEFAULT_SERVER = "http://127.0.0.1:8080"
# The server's own identifier rule: ids are checked here too, before they become part of a URL path.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Request bodies read from --file: far above any experiment body, far below a mistaken model file.
MAX_BODY_FILE_BYTES = 1 << 20
MAX_KEY_FILE_BYTES = 4096
HASH_CHUNK = 1 << 20
EXPERIMENT_STATUSES = ("created", "running", "completed", "failed", "stopped")
CLIENT_STATUSES = ("registered", "active", "inactive")
MODEL_SUFFIX = {"safetensors": "safetensors", "pytorch": "pt", "onnx": "onnx"}


class UsageError(Exception):
    """A bad argument or input file: exit 2 with the message."""


def require_cli(what: str = "this command") -> None:
    """Raise ``MissingExtraError`` unless the ``cli`` extra (rich) is installed."""
    require_extra("cli", ("rich",), what)


def require_watch(what: str = "fedloom experiments watch") -> None:
    """Raise ``MissingExtraError`` unless rich and a WebSocket client (the ``cli`` extra) are installed."""
    require_extra("cli", ("rich", "websockets"), what)


# -- connection -------------------------------------------------------------------------------
def server_url(args: argparse.Namespace) -> str:
    """``--server``, else ``FEDLOOM_SERVER``, else the local default."""
    return (args.server or os.environ.get("FEDLOOM_SERVER") or DEFAULT_SERVER).rstrip("/")


def api_key(args: argparse.Namespace) -> str:
    """``--api-key``, else ``FEDLOOM_API_KEY``, else the admin key file of ``FEDLOOM_DATA_DIR`` (or ``./.fedloom``)."""
    key = args.api_key or os.environ.get("FEDLOOM_API_KEY")
    if key:
        return key
    path = Path(os.environ.get("FEDLOOM_DATA_DIR") or ".fedloom") / "admin_api_key"
    try:
        with open(path, "rb") as fh:
            found = fh.read(MAX_KEY_FILE_BYTES).decode("utf-8", "replace").strip()
    except OSError:
        found = ""
    if not found:
        raise UsageError("an API key is needed: --api-key, FEDLOOM_API_KEY, or run where fedloom serve keeps its data")
    return found


def check_id(value: str, what: str) -> str:
    """``value`` if it is an id the server accepts, else a usage error naming ``what``."""
    if not ID_PATTERN.fullmatch(value):
        raise UsageError(f"{what} {value!r} is invalid: use 1-128 letters, digits, '.', '_' or '-'")
    return value


def read_json_file(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (at most ``MAX_BODY_FILE_BYTES``)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BODY_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BODY_FILE_BYTES:
        raise UsageError(f"{what}: {path} is larger than {MAX_BODY_FILE_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: {path} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{what}: {path} must hold a JSON object")
    return body


def _get(api: FLClient, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A GET that FLClient has no method for (the admin's lists), without the unset ``params``."""
    return api._json("GET", path, params={k: v for k, v in (params or {}).items() if v is not None})


# -- experiments ---------------------------------------------------------------------------------
def experiments_list(api: FLClient, args: argparse.Namespace) -> int:
    body = _get(api, "/experiments", {"status": args.status, "limit": args.limit, "offset": args.offset})
    if args.json:
        print_json(body)
        return 0
    rows = [
        (e["experiment_id"], e["name"], e["status"], f"{e['progress']:.0%}", e["created_at"])
        for e in body["experiments"]
    ]
    more = " (more: --offset)" if body.get("has_more") else ""
    footer = f"{len(rows)} of {body['total_count']} experiments{more}"
    print_table(None, ("experiment", "name", "status", "progress", "created"), rows, footer)
    return 0


def experiments_show(api: FLClient, args: argparse.Namespace) -> int:
    exp_id = check_id(args.experiment_id, "experiment id")
    body = api.get_experiment(exp_id)
    if args.json:
        print_json(body)
        return 0
    names = ["experiment_id", "name", "status", "dataset", "model_architecture", "rounds_completed", "total_rounds"]
    names += ["created_at", "started_at", "finished_at", "final_model_id", "stop_reason", "error", "temporal_ui_url"]
    show(body, False, f"experiment {exp_id}", names)
    if body["status"] != "created":
        metrics = api.get_training_metrics(exp_id)
        print_rounds(metrics["rounds"])
    return 0


def experiments_create(api: FLClient, args: argparse.Namespace) -> int:
    body = read_json_file(args.file, "--file")
    if args.initial_model and not os.path.isfile(args.initial_model):
        raise UsageError(f"--initial-model: {args.initial_model} is not a file")
    created = api.create_experiment(body)
    if args.initial_model:
        try:
            api.upload_initial_model(created["experiment_id"], args.initial_model)
        except FLAPIError as exc:
            note = f"experiment {created['experiment_id']} was created, but its initial model was refused"
            return fail(f"fedloom experiments create: {note}", exc)
    fields = ["experiment_id", "name", "status", "created_at", "estimated_duration", "resource_requirements"]
    show(created, args.json, "created", fields)
    return 0


def start_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /training/start`` body: ``--file``'s, for the given experiment, with ``--rounds``."""
    body = read_json_file(args.file, "--file") if args.file else {}
    config = body.setdefault("experiment_config", {})
    if not isinstance(config, dict):
        raise UsageError("--file: experiment_config must be a JSON object")
    config["experiment_id"] = check_id(args.experiment_id, "experiment id")
    if args.rounds is not None:
        config["rounds"] = args.rounds
    return body


def experiments_start(api: FLClient, args: argparse.Namespace) -> int:
    body = start_body(args)
    fields = ["experiment_id", "status", "total_rounds", "current_round", "selected_clients", "estimated_duration"]
    if not args.watch:
        show(api.start_training(body), args.json, "started", fields)
        return 0

    def start() -> str:
        started = api.start_training(body)
        return f"started: {started['total_rounds']} rounds, estimated {started.get('estimated_duration')}"

    from fedloom._watch import watch

    # The start happens once the event stream is open, so the watch sees the run from its first event.
    return watch(api, body["experiment_config"]["experiment_id"], as_json=args.json, timeout=args.timeout, first=start)


def experiments_stop(api: FLClient, args: argparse.Namespace) -> int:
    exp_id = check_id(args.experiment_id, "experiment id")
    stopped = api.stop_training(reason=args.reason, experiment_id=exp_id)
    show(stopped, args.json, "stop")
    return 0


def experiments_watch(api: FLClient, args: argparse.Namespace) -> int:
    from fedloom._watch import watch

    exp_id = check_id(args.experiment_id, "experiment id")
    return watch(api, exp_id, as_json=args.json, timeout=args.timeout)


# -- clients ---------------------------------------------------------------------------------------
def clients_list(api: FLClient, args: argparse.Namespace) -> int:
    exp_id = check_id(args.experiment, "--experiment") if args.experiment else None
    body = _get(api, "/clients", {"status": args.status, "round": args.round, "experiment_id": exp_id})
    if args.json:
        print_json(body)
        return 0
    rows = [(c["client_id"], c["status"], c["current_round"], c["trust_score"]) for c in body["clients"]]
    footer = f"{body['total_count']} clients, {body['active_count']} active"
    print_table(None, ("client", "status", "round", "trust"), rows, footer)
    return 0


def clients_show(api: FLClient, args: argparse.Namespace) -> int:
    client_id = check_id(args.client_id, "client id")
    body = api.get_client(client_id)
    if args.json:
        print_json(body)
        return 0
    perf = body.get("performance_metrics") or {}
    fields = [(k, body.get(k)) for k in ("client_id", "status", "current_round", "last_update")]
    fields += [(k, body.get(k)) for k in ("trust_score", "contribution_score")]
    fields += [(f"last round: {k}", v) for k, v in perf.items()]
    print_table(f"client {client_id}", ("field", "value"), fields)
    return 0


def _confirm(question: str, assume_yes: bool) -> bool:
    """Ask on a terminal; scripts (no terminal on stdin) and ``--yes`` go ahead."""
    if assume_yes or not sys.stdin.isatty():
        return True
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def clients_revoke(api: FLClient, args: argparse.Namespace) -> int:
    client_id = check_id(args.client_id, "client id")
    if not _confirm(f"revoke the key of client {client_id}? It can no longer call the API.", args.yes):
        return fail("fedloom clients revoke", "not confirmed; nothing changed", EXIT_USAGE)
    body = api.revoke_client(client_id)
    show(body, args.json, f"revoked {client_id}")
    return 0


def clients_rotate_key(api: FLClient, args: argparse.Namespace) -> int:
    client_id = check_id(args.client_id, "client id")
    if not _confirm(f"replace the key of client {client_id}? Its current key stops working.", args.yes):
        return fail("fedloom clients rotate-key", "not confirmed; nothing changed", EXIT_USAGE)
    key = api.rotate_client_key(client_id)
    if args.json:
        print_json({"client_id": client_id, "api_key": key})
        return 0
    # The key is shown this once: the server keeps only its hash.
    print(f"new API key of {client_id} (shown once, store it now): {key}")
    return 0


# -- models ------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def models_download(api: FLClient, args: argparse.Namespace) -> int:
    exp_id = check_id(args.experiment_id, "experiment id")
    meta = api.get_global_model(round=args.round, format=args.format, experiment_id=exp_id)
    model_id = check_id(meta["model_id"], "model id")
    dest = Path(args.output or f"{model_id}.{MODEL_SUFFIX.get(args.format, args.format)}")
    partial = dest.with_name(f".{dest.name}.part")
    try:
        sent = api.download_model(model_id, partial, format=args.format)  # streamed to disk in chunks
        size = partial.stat().st_size
        got = _sha256(partial)
        if sent["sha256"] and got != sent["sha256"]:
            return fail("fedloom models download", f"{model_id}: sha256 {got} does not match the server's")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    result = {**meta, "path": str(dest), "bytes": size, "sha256": got}
    fields = ["model_id", "experiment_id", "round", "accuracy", "format", "bytes", "sha256", "path"]
    show(result, args.json, "downloaded", fields)
    return 0


# -- parsers -------------------------------------------------------------------------------------------
def _options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=None, help=f"API server (default: FEDLOOM_SERVER or {DEFAULT_SERVER})")
    common.add_argument(
        "--api-key", default=None, help="admin key (default: FEDLOOM_API_KEY, else fedloom serve's admin_api_key file)"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    return common


def _leaf(
    group: Any,
    name: str,
    run: Callable[[FLClient, argparse.Namespace], int],
    help: str,
    require: Callable[[str], None] = require_cli,
) -> Any:
    parser = group.add_parser(name, help=help, description=help, parents=[_options()])
    parser.set_defaults(func=run_operator(run), require=require, extra="cli")
    return parser


def add_operator_commands(sub: Any) -> None:
    """Add ``experiments``, ``clients`` and ``models`` to the ``fedloom`` subcommands ``sub``."""
    exp = sub.add_parser("experiments", help="list, create, start, stop and watch experiments").add_subparsers(
        dest="action", required=True
    )
    p = _leaf(exp, "list", experiments_list, "experiments, newest first")
    p.add_argument("--status", choices=EXPERIMENT_STATUSES)
    p.add_argument("--limit", type=int, default=50, help="at most this many (the server allows 500)")
    p.add_argument("--offset", type=int, default=0)
    _leaf(exp, "show", experiments_show, "one experiment and its rounds").add_argument("experiment_id")
    p = _leaf(exp, "create", experiments_create, "create an experiment from the spec's POST /experiments body")
    p.add_argument("--file", required=True, help="JSON file holding the body")
    p.add_argument("--initial-model", default=None, help="round-0 weights: a safetensors or torch.save state_dict")
    p = _leaf(exp, "start", experiments_start, "start a created experiment (POST /training/start)")
    p.add_argument("experiment_id")
    p.add_argument("--file", default=None, help="JSON file with a POST /training/start body that overrides the stored")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--watch", action="store_true", help="then follow it as experiments watch does")
    p.add_argument("--timeout", type=float, default=None, help="with --watch: give up (exit 1) after this many seconds")
    p = _leaf(exp, "stop", experiments_stop, "stop a running experiment; it keeps its last global model")
    p.add_argument("experiment_id")
    p.add_argument("--reason", default="manual_stop")
    p = _leaf(exp, "watch", experiments_watch, "follow an experiment live until it ends", require=require_watch)
    p.add_argument("experiment_id")
    p.add_argument("--timeout", type=float, default=None, help="give up (exit 1) after this many seconds")

    cli = sub.add_parser("clients", help="list and show clients, revoke or rotate their keys").add_subparsers(
        dest="action", required=True
    )
    p = _leaf(cli, "list", clients_list, "registered clients")
    p.add_argument("--status", choices=CLIENT_STATUSES)
    p.add_argument("--round", type=int, default=None, help="those whose update in this round was not rejected")
    p.add_argument("--experiment", default=None, help="the experiment of --round (default: the latest)")
    _leaf(cli, "show", clients_show, "one client's status and scores").add_argument("client_id")
    for name, run, what in (
        ("revoke", clients_revoke, "revoke a client's key: it can no longer call the API"),
        ("rotate-key", clients_rotate_key, "give a client a new key (printed once); the old one stops working"),
    ):
        p = _leaf(cli, name, run, what)
        p.add_argument("client_id")
        p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    models = sub.add_parser("models", help="download global models").add_subparsers(dest="action", required=True)
    p = _leaf(models, "download", models_download, "stream an experiment's global model to a file")
    p.add_argument("experiment_id")
    p.add_argument("--round", type=int, default=None, help="default: the latest")
    p.add_argument("--format", choices=tuple(MODEL_SUFFIX), default="safetensors")
    p.add_argument("-o", "--output", default=None, help="file to write (default: <model_id>.<format suffix>)")


def run_operator(run: Callable[[FLClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command ``run`` with a client of the chosen server, and its errors printed as exit codes."""

    def command(args: argparse.Namespace) -> int:
        name = f"fedloom {args.command} {args.action}"
        try:
            api = FLClient(server_url(args), api_key(args))
        except UsageError as exc:
            return fail(name, exc, EXIT_USAGE)
        try:
            with api:
                return run(api, args)
        except UsageError as exc:
            return fail(name, exc, EXIT_USAGE)
        except FLAPIError as exc:
            return fail(name, exc)
        except httpx.TransportError as exc:
            return fail(name, f"cannot reach {api.server_url}: {exc or type(exc).__name__}")
        except OSError as exc:  # e.g. models download into a directory that does not exist
            return fail(name, exc)
        except KeyboardInterrupt:
            return 130

    return command
