"""The default policy's bounds against poisoned updates, applied when an experiment's policy does not set them.

Each is a ``policy_config`` field whose default is below; ``null`` turns it off. The values were measured
with honest clients (digits, CNN and MLP, 3 to 20 clients, IID, Dirichlet 0.1-1.0 and label shards,
1-2 local epochs, 10 rounds of FedAvg): ``docs/policies.md`` gives the numbers.
"""

from __future__ import annotations

# Reject an update whose delta norm exceeds this many times the round's median delta norm. Honest
# non-IID clients reached 3.4x at most; global + N(0, 10) noise is 750x (MLP) to 6,700x (CNN).
DEFAULT_MAX_NORM_RATIO = 5.0

# Leave a client out of selection while its trust in the experiment is below this. A client whose
# updates are rejected every round falls below it after its third round (0.7 ** 3 = 0.343).
DEFAULT_TRUST_THRESHOLD = 0.4

# Count no accepted update's data_samples above this many times the median of the round's accepted
# updates. Honest partitions spread to 2.9x the median at most.
DEFAULT_MAX_WEIGHT_RATIO = 3.0

# The policy_config fields that turn all three off, e.g. to compare a run with and without them.
DEFAULT_BOUNDS_OFF: dict[str, None] = {"max_norm_ratio": None, "trust_threshold": None, "max_weight_ratio": None}
