"""Eager model -> TorchScript and ONNX files (written to a given path; the caller renames them
into place only after the parity gate passed)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import onnx
import torch

from training.checkpoint import write_bytes_atomic

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def example_input(spec: dict, batch: int = 2) -> torch.Tensor:
    shape = spec["input"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, shape["channels"], shape["height"], shape["width"], generator=generator)


def to_torchscript(model: torch.nn.Module, spec: dict, path: Path) -> None:
    """Traced (the registry's models have no data-dependent control flow) and frozen for inference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still supported
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), example_input(spec))
        frozen = torch.jit.freeze(traced)
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer, _extra_files={"spec.json": json.dumps(spec)})
    write_bytes_atomic(path, buffer.getvalue())


def to_onnx(model: torch.nn.Module, spec: dict, path: Path) -> None:
    """One self-contained file: dynamic batch, input `input`, output `logits`, the spec in metadata."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example_input(spec),), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                    opset_version=ONNX_OPSET, external_data=False, verbose=False)
    proto = program.model_proto
    metadata = {
        "spec": json.dumps(spec),
        "class_names": json.dumps(spec["class_names"]),
        "mean": json.dumps(spec["mean"]),
        "std": json.dumps(spec["std"]),
        "input_size": json.dumps([spec["input"]["channels"], spec["input"]["height"], spec["input"]["width"]]),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "image-classifier-serving-kit"
    onnx.checker.check_model(proto, full_check=True)
    write_bytes_atomic(path, proto.SerializeToString())
