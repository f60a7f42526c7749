"""An experiment's round-0 global model, given by the user (custom models) or taken from another experiment.

The server never builds or imports a custom model: it keeps the weights it was given, and every
update is later checked against their tensors (names, shapes, dtypes).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fedloom_core.errors import InvalidRequest, ModelValidationFailed, NotFound
from fedloom_core.learning import weights
from fedloom_core.learning.catalog import builtin_architecture
from fedloom_core.policy.validation import check_update_file
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import Experiment, GlobalModel
from fedloom_core.storage.keys import model_id_for, model_key
from fedloom_core.storage.repo import session_scope

Structure = dict[str, tuple[str, tuple[int, ...]]]


def builtin_structure(spec: dict) -> Structure | None:
    """The tensors of a built-in architecture's model (from an experiment's model_config), or None for a custom one."""
    arch = builtin_architecture(spec.get("architecture", ""))
    if arch is None:
        return None
    from fedloom_core.learning.zoo import build_model

    state = build_model(arch, spec.get("input_shape") or [], spec.get("num_classes") or 2).state_dict()
    return {name: (weights.dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()}


def parameters_of(found: Structure) -> int:
    """Floating-point parameters in a model's structure."""
    return sum(math.prod(shape) for dtype, shape in found.values() if dtype in ("F16", "BF16", "F32", "F64"))


def store(engine: Engine, blobs: BlobStore, experiment_id: str, upload: Path) -> dict[str, Any]:
    """Check an uploaded initial model and store it as the experiment's round-0 global model."""
    with session_scope(engine) as s:
        exp = s.get(Experiment, experiment_id)
        if exp is None:
            raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
        spec = dict(exp.model_config_ or {})
    expected = builtin_structure(spec)
    with tempfile.TemporaryDirectory(prefix="fedloom-initial-", dir=upload.parent) as tmp:
        out = Path(tmp) / "initial.safetensors"
        report = check_update_file(upload, out, expected, stop_at_failure=True, structure_required=False)
        if report.problem is not None:
            raise ModelValidationFailed("Initial model failed validation", report.problem)
        found = weights.structure(out)
        info = blobs.put_file(model_key(experiment_id, 0), out)
    with session_scope(engine) as s:
        row = _record(s, experiment_id, info, parameters_of(found))
    return {
        "experiment_id": experiment_id,
        "model_id": row.model_id,
        "round": 0,
        "format": report.format,
        "size_bytes": row.size_bytes,
        "sha256": row.sha256,
        "parameters_count": row.parameters_count,
        "tensors": len(found),
    }


def adopt(session: Session, blobs: BlobStore, experiment_id: str, source_model_id: str, spec: dict) -> GlobalModel:
    """Copy another experiment's global model (warm start) as this experiment's round-0 model."""
    source = session.get(GlobalModel, source_model_id)
    if source is None:
        raise InvalidRequest(
            "Invalid experiment_config", f"experiment_config.initial_model_id: model '{source_model_id}' does not exist"
        )
    expected = builtin_structure(spec)
    with blobs.open_local(source.blob_key) as path:
        found = weights.structure(path)
        if expected is not None:
            problems = weights.compare_structure(found, expected)
            if problems:
                raise InvalidRequest(
                    "Invalid experiment_config",
                    f"experiment_config.initial_model_id: model '{source_model_id}' does not fit the experiment's "
                    f"{spec.get('architecture')}: {'; '.join(problems[:5])}",
                )
        info = blobs.put_file(model_key(experiment_id, 0), Path(path))
    return _record(session, experiment_id, info, source.parameters_count or parameters_of(found))


def initial_model(session: Session, experiment_id: str) -> GlobalModel | None:
    """The experiment's round-0 model, if one was given or adopted."""
    return session.get(GlobalModel, model_id_for(experiment_id, 0))


def _record(session: Session, experiment_id: str, info: Any, parameters: int) -> GlobalModel:
    session.exec(delete(GlobalModel).where(GlobalModel.model_id == model_id_for(experiment_id, 0)))  # type: ignore[call-overload]
    row = GlobalModel(
        model_id=model_id_for(experiment_id, 0),
        experiment_id=experiment_id,
        round=0,
        blob_key=info.key,
        sha256=info.sha256,
        size_bytes=info.size,
        parameters_count=parameters,
    )
    session.add(row)
    session.flush()
    return row
