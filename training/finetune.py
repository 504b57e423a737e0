"""Starting from existing weights (--init-from) and training only part of a model (--freeze).

A parent is a kit checkpoint (its spec can also name the architecture) or a plain state_dict as
torchvision and timm publish them. Tensors are matched by name and shape: what does not fit
(typically the classifier head when the class count changes) keeps its fresh initialization.
A run that trains nothing (--epochs 0) packages the parent as it is: `check_complete_fit` first
requires every tensor of the model, and only those, with its shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.spec import Spec
from training.checkpoint import CHECKPOINT_FORMAT, read_torch_file, sha256_of
from training.errors import UserError

NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest the weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
SHOWN = 6  # names listed in the one-line report before "and N more"


@dataclass(frozen=True)
class Parent:
    path: Path
    sha256: str
    kind: str  # "kit checkpoint" or "state_dict"
    state_dict: dict[str, torch.Tensor]
    spec: Spec | None = None  # kit checkpoints only
    model_source: str | None = None  # kit checkpoints of a user model

    def record(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "kind": self.kind}


def read_parent(path: Path) -> Parent:
    what_to_do = "give --init-from a kit checkpoint.pt or a state_dict file (.pt/.pth)"
    record = read_torch_file(path, what_to_do)
    sha256 = sha256_of(path)
    if isinstance(record, dict) and record.get("format") == CHECKPOINT_FORMAT:
        return Parent(path, sha256, "kit checkpoint", record["state_dict"],
                      Spec.from_dict(record["spec"], str(path)), record.get("model_source"))
    if isinstance(record, dict):
        nested = next((record[k] for k in NESTED_KEYS if isinstance(record.get(k), dict)), record)
        tensors = {k: v for k, v in nested.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return Parent(path, sha256, "state_dict", strip_wrappers(tensors))
    raise UserError(f"{path} holds no tensors by name (found {type(record).__name__}): {what_to_do}")


def strip_wrappers(state_dict: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_matching(model: nn.Module, parent: Parent) -> dict:
    """Copies every tensor whose name and shape fit; returns what was loaded, skipped and left fresh."""
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, tensor in parent.state_dict.items():
        if key not in own:
            skipped.append(f"{key} (not in the model)")
        elif tensor.shape != own[key].shape:
            skipped.append(f"{key} (shape {list(tensor.shape)}, the model's {list(own[key].shape)})")
        else:
            loaded[key] = tensor
    if not loaded:
        example = ", ".join(list(parent.state_dict)[:3])
        raise UserError(f"no tensor of {parent.path} fits the model by name and shape (the file has e.g. {example}; "
                        f"the model {', '.join(list(own)[:3])}): it was saved from another architecture")
    model.load_state_dict(loaded, strict=False)
    parameters = dict(model.named_parameters())
    return {
        "loaded": len(loaded), "tensors": len(own),
        "loaded_parameters": sum(parameters[k].numel() for k in loaded if k in parameters),
        "parameters": sum(p.numel() for p in parameters.values()),
        "skipped": skipped, "fresh": [k for k in own if k not in loaded],
    }


def check_complete_fit(model: nn.Module, parent: Parent, reference: str) -> None:
    """--epochs 0: the weights must be the whole model. Missing, mis-shaped and unknown tensors are one
    UserError. A missing batch-norm `num_batches_tracked` is let through: only training with
    momentum=None reads that counter, never an eval-mode forward pass."""
    own = model.state_dict()
    missing = [key for key in own if key not in parent.state_dict and not key.endswith(".num_batches_tracked")]
    misshaped = [f"{key} (file {list(tensor.shape)}, model {list(own[key].shape)})"
                 for key, tensor in parent.state_dict.items() if key in own and tensor.shape != own[key].shape]
    unknown = [key for key in parent.state_dict if key not in own]
    problems = [f"{what} {len(names)}: {listing(names)}" for what, names in
                (("missing", missing), ("mis-shaped", misshaped), ("not in the model", unknown)) if names]
    if problems:
        raise UserError(f"{parent.path} does not fit {reference} completely ({'; '.join(problems)}): --epochs 0 "
                        "packages weights unchanged, so give the class and --model-args they were saved from "
                        "(or train with --epochs N to fine-tune what fits)")


def describe(report: dict, path: Path) -> str:
    """The one line a run prints about --init-from."""
    line = (f"init from {path}: loaded {report['loaded']}/{report['tensors']} tensors "
            f"({report['loaded_parameters']:,} of {report['parameters']:,} parameters)")
    if report["skipped"]:
        line += f"; skipped {len(report['skipped'])}: {listing(report['skipped'])}"
    if report["fresh"]:
        line += f"; freshly initialized: {listing(report['fresh'])}"
    return line


def listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def under(name: str, prefix: str) -> bool:
    """Whether `name` starts with `prefix` at a dot: features.1 covers features.1.weight, not
    features.10.weight (a prefix ending in a dot, or a whole name, is taken as it is)."""
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Turns off gradients for parameters whose names start with a prefix; returns their names."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(under(name, prefix) for name in names):
            top = sorted({name.split(".")[0] for name in names})
            raise UserError(f"--freeze {prefix!r} matches no parameter (names start with {', '.join(top)})")
    frozen = [name for name in names if any(under(name, prefix) for prefix in prefixes)]
    if prefixes and len(frozen) == len(names):
        raise UserError(f"--freeze {','.join(prefixes)} freezes every parameter: nothing is left to train")
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def hold_frozen_batch_norm(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Batch-norm layers inside a frozen prefix keep their running statistics: eval mode while the
    rest trains. Call after every model.train()."""
    if not prefixes:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                under(f"{name}.running_mean", prefix) for prefix in prefixes):
            module.eval()
