"""Experiment tracking: each experiment's rounds exported to MLflow and TensorBoard, off the rounds' path.

A background exporter tails the database's round records (``exporter.py``) and writes them to the
configured sinks (``sinks.py``); see docs/operations.md.
"""

from __future__ import annotations

from fedloom_core.tracking.exporter import Exporter, start_exporter

__all__ = ["Exporter", "start_exporter"]
