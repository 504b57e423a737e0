"""Loading a trained checkpoint for export: verified against its spec, rebuilt from the spec and the
model source the checkpoint carries (never from the user's file, which may have moved or changed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from handlers.spec import Spec
from training.checkpoint import CHECKPOINT_FORMAT, load_torch_file, sha256_of
from training.errors import UserError
from training.model_origin import construct, rebuild


def load_trained(out_dir: Path) -> tuple[torch.nn.Module, Spec]:
    """(eval-mode model, spec) from artifacts/<name>/; any mismatch is a UserError."""
    spec_path, checkpoint_path = out_dir / "spec.json", out_dir / "checkpoint.pt"
    if not spec_path.is_file() or not checkpoint_path.is_file():
        raise UserError(f"no trained model in {out_dir} (checkpoint.pt and spec.json): run `make train` first")
    try:
        json.loads(spec_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{spec_path} is not valid JSON ({error}): train again") from None
    spec = Spec.read(spec_path)
    actual = sha256_of(checkpoint_path)
    if spec.checkpoint_sha256 != actual:
        raise UserError(f"{checkpoint_path} does not match {spec_path} (sha256 {actual[:12]}... vs "
                        f"{str(spec.checkpoint_sha256)[:12]}...): the checkpoint was changed or "
                        "replaced; train again")
    record = load_torch_file(checkpoint_path, CHECKPOINT_FORMAT, "train again")
    origin = rebuild(spec, record.get("model_source"))
    model = construct(origin, spec.arch_args)
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), first)
        raise UserError(f"the weights in {checkpoint_path} do not fit the spec's {spec.arch} ({detail}): "
                        "train again") from None
    return model.eval(), spec
