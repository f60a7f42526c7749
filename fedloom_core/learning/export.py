"""Exporting a global model to ONNX."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported by the export itself: the API imports this module at start-up without needing it.
if TYPE_CHECKING:
    import torch


def export_onnx(
    state: Mapping[str, torch.Tensor], architecture: str, input_shape: Sequence[int], num_classes: int, out: str | Path
) -> None:
    """Write the architecture with ``state``'s weights as ONNX (input ``input``: N x C x H x W, output ``logits``)."""
    import torch

    from fedloom_core.learning.zoo import build_model

    height, width, channels = (int(v) for v in input_shape)
    model = build_model(architecture, input_shape, num_classes)
    model.load_state_dict(dict(state))
    model.eval()
    example = torch.zeros(1, channels, height, width)
    with warnings.catch_warnings():
        # The TorchScript-based exporter needs no extra packages; torch flags it as legacy.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
