"""The Strategy interface: configure a round, aggregate its updates, carry server state across rounds.

Strategies are pure computations over files: updates and models are safetensors files on local
disk (materialised one at a time through ``AggregationContext.opener``), and per-strategy server
state (e.g. an optimizer's moments) is a safetensors file too, which the caller keeps in the blob
store between rounds and across continue-as-new. Nothing here touches Temporal or the database.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom_core.learning.kernels import Opener, UpdateFile, open_path


@dataclass
class AggregationContext:
    """Everything one aggregation needs."""

    round: int
    # The global model the clients started from.
    global_path: Path
    # The accepted updates (full client weights, not deltas), in any order.
    updates: Sequence[UpdateFile]
    # Where to write the new global model (safetensors).
    out_path: Path
    # Server state written by this strategy in the previous round, if any.
    state_path: Path | None = None
    # Where to write the new server state, if the strategy keeps one.
    state_out_path: Path | None = None
    # Seed for any randomness (e.g. DP noise): derived from the experiment seed and the round.
    seed: int = 0
    opener: Opener = open_path


@dataclass
class AggregateResult:
    """What an aggregation produced besides the model file."""

    # True when the strategy wrote ``state_out_path``.
    wrote_state: bool = False
    # Facts worth recording with the round (e.g. {"noise_multiplier": 1.1, "krum_selected": [...]}).
    info: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """One aggregation algorithm and its settings."""

    #: Name as written in ``aggregation_config.strategy``.
    name: str = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def configure_round(self, round: int, client_ids: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
        """Extra training parameters for each selected client this round (sent with its task)."""
        return {}

    @abstractmethod
    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Write the new global model to ``ctx.out_path`` (deterministic for the same inputs)."""
