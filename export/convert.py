"""Eager model -> TorchScript and ONNX files (written to a given path; the caller renames them
into place only after the parity gate passed).

Any model works that TorchScript tracing and the ONNX exporter can represent faithfully. What
they cannot is refused with one line naming the model and the reason, before anything is kept:
tracing records one path through the forward pass, so a Python decision on the input's values
or on the batch size would be frozen for every input (the tracer warns about it, and traces
made on different batches disagree); the ONNX exporter refuses such decisions itself, and
operators without an ONNX mapping.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from handlers.spec import Spec
from training.checkpoint import write_bytes_atomic
from training.errors import UserError
from training.model_origin import one_line

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def to_torchscript(model: torch.nn.Module, spec: Spec, path: Path, examples: list[torch.Tensor]) -> None:
    """Traced on the first of `examples` (real images), checked on the others, and frozen."""
    name = spec.arch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model.eval(), examples[0], check_inputs=[(x,) for x in examples[1:]])
        except torch.jit.TracingCheckError:
            raise UserError(f"{name} cannot be exported: its traced graph differs between batches of "
                            f"{', '.join(str(len(x)) for x in examples)} images (the forward pass decides something "
                            "from the batch size or the input in Python): use tensor operations instead") from None
        except Exception as error:  # whatever the user's forward raises under the tracer
            raise UserError(f"{name} cannot be traced for TorchScript ({one_line(error)})") from None
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer_warnings:
        warning = tracer_warnings[0]
        code = linecache.getline(warning.filename, warning.lineno).strip()
        reason = str(warning.message).split(". ")[0]
        raise UserError(f"{name} cannot be exported faithfully: at {Path(warning.filename).name}:{warning.lineno} "
                        f"`{code}`: {reason}; tracing would freeze that decision for every input: compute it with "
                        "tensor operations (e.g. torch.where) instead of Python control flow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still supported
        frozen = torch.jit.freeze(traced)
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer, _extra_files={"spec.json": spec.to_json()})
    write_bytes_atomic(path, buffer.getvalue())


def to_onnx(model: torch.nn.Module, spec: Spec, path: Path, example: torch.Tensor) -> None:
    """One self-contained file: dynamic batch, input `input`, output `logits`, the spec in metadata."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings(), silenced_output():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model.eval(), (example,), input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                        opset_version=ONNX_OPSET, external_data=False, verbose=False)
    except Exception as error:  # the exporter's own error types change between torch releases
        raise UserError(f"{spec.arch} cannot be exported to ONNX: {onnx_failure(error)}") from None
    proto = program.model_proto
    metadata = {
        "spec": spec.to_json(),
        "class_names": json.dumps(list(spec.class_names)),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "input_size": json.dumps(list(spec.input.size)),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "image-classifier-serving-kit"
    onnx.checker.check_model(proto, full_check=True)
    write_bytes_atomic(path, proto.SerializeToString())


def onnx_failure(error: Exception) -> str:
    """The exporter's long report -> its exception summary and the user's line that caused it."""
    text = ANSI.sub("", str(error))
    summary = [line.strip() for line in text.split("## Exception summary", 1)[-1].splitlines() if line.strip()]
    first = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>: ", r"\1: ", summary[0] if summary else type(error).__name__)
    first = re.sub(r"\s*\(unhinted:.*", "", first)[:300]
    call = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    where = f" at {Path(call[1]).name}:{call[2]} `{call[3].strip()}`" if call else ""
    if "data-dependent" in text:
        hint = ": the forward pass branches on the input's values; compute it with tensor operations (torch.where)"
    elif "No ONNX function found" in text:
        hint = ": an operator has no ONNX mapping; replace it with supported operations"
    else:
        hint = ""
    return f"{first}{where}{hint}"


@contextlib.contextmanager
def silenced_output():
    """The exporter prints graphs and logs straight to the process's stdout/stderr on failure: the
    user gets one line instead (file descriptors, so C++ and logging output are caught too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
