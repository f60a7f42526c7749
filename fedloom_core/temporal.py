"""Connecting to Temporal with the data converter every fedloom process must share, and the
custom search attributes that let operators find experiments in the Web UI."""

from __future__ import annotations

import asyncio
import logging

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from fedloom_core.schemas import StartRequest

log = logging.getLogger(__name__)

# The custom search attributes every experiment workflow carries and keeps up to date.
EXPERIMENT_ID = SearchAttributeKey.for_keyword("ExperimentId")
EXPERIMENT_STATUS = SearchAttributeKey.for_keyword("ExperimentStatus")
CURRENT_ROUND = SearchAttributeKey.for_int("CurrentRound")
STRATEGY = SearchAttributeKey.for_keyword("Strategy")
SEARCH_ATTRIBUTES = (EXPERIMENT_ID, EXPERIMENT_STATUS, CURRENT_ROUND, STRATEGY)

_INDEXED = {
    "KEYWORD": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "INT": IndexedValueType.INDEXED_VALUE_TYPE_INT,
}


def dev_server_flags() -> list[str]:
    """``temporal server start-dev`` flags that register the search attributes at start-up."""
    names = {"KEYWORD": "Keyword", "INT": "Int"}
    flags: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{key.name}={names[key.indexed_value_type.name]}"]
    return flags


async def ensure_search_attributes(client: Client, namespace: str = "default") -> list[str]:
    """Register any of fedloom's search attributes the namespace lacks; return the names added.

    A workflow that upserts an unregistered attribute stalls, so every worker calls this before it
    polls. Registering an attribute that exists is skipped, so concurrent workers are harmless.
    """
    wanted = {k.name: _INDEXED[k.indexed_value_type.name] for k in SEARCH_ATTRIBUTES}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        known = set(existing.custom_attributes) | set(existing.system_attributes)
    except RPCError as exc:  # the time-skipping test server cannot list; adding is still fine
        if exc.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        known = set()
    missing = {name: kind for name, kind in wanted.items() if name not in known}
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(search_attributes=missing, namespace=namespace)
            )
        except RPCError as exc:  # another worker won the race, or the cluster forbids it
            if exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise RuntimeError(
                    f"cannot register Temporal search attributes {sorted(missing)}: {exc}; "
                    "register them with 'temporal operator search-attribute create' (see README)"
                ) from exc
        log.info("registered Temporal search attributes %s", sorted(missing))
    return sorted(missing)


async def connect(address: str, namespace: str = "default") -> Client:
    """A Temporal client that (de)serialises pydantic models."""
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter)


async def connect_with_retry(address: str, namespace: str = "default", attempts: int = 60) -> Client:
    """Connect, waiting up to ``attempts`` seconds for a server that is still starting."""
    for attempt in range(attempts):
        try:
            return await connect(address, namespace)
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)
    raise RuntimeError("unreachable")


def start_search_attributes(experiment_id: str, strategy: str) -> TypedSearchAttributes:
    """The search attributes an experiment's workflow starts with (it updates them as it runs)."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(EXPERIMENT_ID, experiment_id),
            SearchAttributePair(EXPERIMENT_STATUS, "running"),
            SearchAttributePair(CURRENT_ROUND, 0),
            SearchAttributePair(STRATEGY, strategy),
        ]
    )


def experiment_memo(experiment_id: str, req: StartRequest) -> dict[str, object]:
    """What the Web UI shows in an experiment's memo: its name and a one-line config summary."""
    ec, tc, ac = req.experiment_config, req.training_config, req.aggregation_config
    summary = (
        f"{ec.dataset} / {ec.model_architecture}, {ac.strategy}, {ec.rounds} rounds, "
        f"min_clients {ec.min_clients}, fraction {ec.client_fraction}, "
        f"{tc.local_epochs} local epoch(s), lr {tc.learning_rate}, batch {tc.batch_size}, seed {ec.seed}"
    )
    return {
        "name": experiment_id,
        "summary": summary,
        "dataset": ec.dataset,
        "model_architecture": ec.model_architecture,
        "strategy": ac.strategy,
        "rounds": ec.rounds,
    }
