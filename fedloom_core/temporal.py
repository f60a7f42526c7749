"""Connecting to Temporal with the data converter every fedloom process must share."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter


async def connect(address: str, namespace: str = "default") -> Client:
    """A Temporal client that (de)serialises pydantic models."""
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter)


async def connect_with_retry(address: str, namespace: str = "default", attempts: int = 60) -> Client:
    """Connect, waiting up to ``attempts`` seconds for a server that is still starting."""
    import asyncio

    for attempt in range(attempts):
        try:
            return await connect(address, namespace)
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)
    raise RuntimeError("unreachable")
