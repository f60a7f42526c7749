"""Connecting to Temporal with the data converter every fedloom process must share, and the
custom search attributes that let operators find experiments in the Web UI."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from fedloom_core.errors import ServiceUnavailable
from fedloom_core.schemas import StartRequest
from fedloom_core.search_attributes import dev_server_flags  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

# The custom search attributes every experiment workflow carries and keeps up to date.
EXPERIMENT_ID = SearchAttributeKey.for_keyword("ExperimentId")
EXPERIMENT_STATUS = SearchAttributeKey.for_keyword("ExperimentStatus")
CURRENT_ROUND = SearchAttributeKey.for_int("CurrentRound")
STRATEGY = SearchAttributeKey.for_keyword("Strategy")
# The best central (else federated) accuracy the experiment's rounds have reached.
BEST_ACCURACY = SearchAttributeKey.for_float("BestAccuracy")
SEARCH_ATTRIBUTES = (EXPERIMENT_ID, EXPERIMENT_STATUS, CURRENT_ROUND, STRATEGY, BEST_ACCURACY)

_INDEXED = {
    "KEYWORD": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "INT": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "DOUBLE": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
}


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


# The API's RPCs give up on an unreachable server after about 2 s (the SDK's default is 10 s), so a
# request fails fast with 503 and the link starts reconnecting; workers keep the patient default.
API_RPC_RETRY = RetryConfig(max_interval_millis=1000, max_elapsed_time_millis=2000, max_retries=6)


async def connect(address: str, namespace: str = "default", retry: RetryConfig | None = None) -> Client:
    """A Temporal client that (de)serialises pydantic models."""
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter, retry_config=retry
    )


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


# Errors that mean the Temporal server cannot be reached (as opposed to a refused request).
UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Temporal server is down or unreachable."""
    return isinstance(exc, RPCError) and exc.status in UNREACHABLE


class TemporalUnavailable(ServiceUnavailable):
    """A request needs Temporal while the process is not connected to it (the API adds Retry-After)."""


class TemporalLink:
    """A process's Temporal client, (re)connected in the background with capped exponential backoff.

    ``client`` is None while Temporal is unreachable, so callers can answer "unavailable" at once
    instead of waiting; ``mark_down`` (an RPC failed as unreachable) and a periodic health check
    both send the link back to reconnecting. ``connector`` makes one attempt (None or raises on failure).
    """

    def __init__(
        self,
        connector: Callable[[], Awaitable[Client | None]],
        *,
        first_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
        check_every_s: float = 5.0,
    ) -> None:
        self._connector = connector
        self._first, self._max, self._check_every = first_delay_s, max_delay_s, check_every_s
        self._client: Client | None = None
        self._delay = first_delay_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_error = "not connected yet"

    @property
    def client(self) -> Client | None:
        return self._client

    @property
    def retry_after_s(self) -> int:
        """When a caller refused for lack of Temporal should try again (whole seconds, at least 1)."""
        return max(1, round(self._delay))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="temporal-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def require(self) -> Client:
        """The client, or TemporalUnavailable while Temporal is unreachable."""
        if self._client is None:
            raise TemporalUnavailable(
                "Service temporarily unavailable", "the Temporal server is not reachable; reconnecting"
            )
        return self._client

    def mark_down(self, reason: str) -> None:
        """An RPC found Temporal unreachable: refuse until the background task has it back."""
        if self._client is not None:
            log.warning("Temporal unreachable (%s); reconnecting in the background", reason)
        self._client, self.last_error = None, reason
        self._wake.set()

    async def check(self, timeout_s: float = 3.0) -> bool:
        """Ask the server for its health now; a failure marks the link down."""
        client = self._client
        if client is None:
            return False
        try:
            await client.service_client.check_health(timeout=timedelta(seconds=timeout_s))
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means it is not serving us
            self.mark_down(f"health check failed: {type(exc).__name__}")
            return False

    async def _run(self) -> None:
        while True:
            if self._client is None:
                await self._reconnect()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._check_every)
            except TimeoutError:
                await self.check()

    async def _reconnect(self) -> None:
        self._delay = self._first
        while True:
            try:
                client = await self._connector()
                if client is not None:
                    await client.service_client.check_health(timeout=timedelta(seconds=3))
                    self._client, self.last_error = client, ""
                    log.info("connected to Temporal")
                    return
            except Exception as exc:  # noqa: BLE001 - keep trying whatever the failure
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self._max)


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


def experiment_memo(experiment_id: str, req: StartRequest, name: str | None = None) -> dict[str, object]:
    """What the Web UI shows in an experiment's memo: its given name (else its id) and a one-line summary."""
    ec, tc, ac = req.experiment_config, req.training_config, req.aggregation_config
    summary = (
        f"{ec.dataset} / {ec.model_architecture}, {ac.strategy}, {ec.rounds} rounds, "
        f"min_clients {ec.min_clients}, fraction {ec.client_fraction}, "
        f"{tc.local_epochs} local epoch(s), lr {tc.learning_rate}, batch {tc.batch_size}, seed {ec.seed}"
    )
    return {
        "name": name or experiment_id,
        "experiment_id": experiment_id,
        "summary": summary,
        "dataset": ec.dataset,
        "model_architecture": ec.model_architecture,
        "strategy": ac.strategy,
        "rounds": ec.rounds,
    }
