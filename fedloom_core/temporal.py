"""Connecting to Temporal with the data converter every fedloom process must share."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter


async def connect(address: str, namespace: str = "default") -> Client:
    """A Temporal client that (de)serialises pydantic models."""
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter)
