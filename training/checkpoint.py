"""Atomic writes, checkpoints that describe themselves, and the spec that travels to serving.

checkpoint.pt = {"format", "state_dict" (the bare model's), "spec", "model_source" (the text of a
user model's file, or None)}: plain tensors and data, loadable with torch.load(weights_only=True).
spec.json = the same spec plus the checkpoint's sha256, which export checks before it trusts the
weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from handlers.spec import Spec
from training.errors import UserError

CHECKPOINT_FORMAT = "image-classifier-checkpoint/1"
TRAINING_STATE_FORMAT = "training-state/1"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder + fsync + rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, record) -> None:
    write_bytes_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bare_state_dict(model: torch.nn.Module) -> dict:
    """The state_dict of the model itself, not of a torch.compile or DDP wrapper around it."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def save_checkpoint(out_dir: Path, state_dict: dict, spec: Spec, model_source: str | None = None) -> Spec:
    """Writes checkpoint.pt then spec.json (with the checkpoint's sha256); returns that spec.

    A user model's source text travels inside the checkpoint, so the file alone rebuilds the network."""
    path = out_dir / "checkpoint.pt"
    write_bytes_atomic(path, torch_bytes({"format": CHECKPOINT_FORMAT, "state_dict": state_dict,
                                          "spec": spec.to_dict(), "model_source": model_source}))
    full_spec = spec.with_checkpoint(sha256_of(path))
    write_json_atomic(out_dir / "spec.json", full_spec.to_dict())
    return full_spec


def read_torch_file(path: Path, what_to_do: str):
    """torch.load(weights_only=True) with one clear error for a missing, corrupt or foreign file."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: {what_to_do}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors all mean "not a readable checkpoint"
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is corrupt or not a checkpoint ({reason}): {what_to_do}") from None


def load_torch_file(path: Path, expected_format: str, what_to_do: str) -> dict:
    """A kit file of `expected_format` (a checkpoint or a training state)."""
    record = read_torch_file(path, what_to_do)
    if not isinstance(record, dict) or record.get("format") != expected_format:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path} is not a {expected_format} file (found {found!r}): {what_to_do}")
    return record
