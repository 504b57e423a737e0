"""TrainConfig: every option of a training run, validated when built, written next to the outputs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.data import BUILTIN
from training.errors import UserError
from training.models import ARCHITECTURES

AUGMENTATIONS = ("none", "flip", "crop", "crop+flip")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a TorchServe model name


@dataclass(frozen=True)
class TrainConfig:
    name: str = "fashion-mnist"  # the model's name: artifacts/<name>/, model_store/<name>.mar
    dataset: str = "fashion-mnist"
    model: str | None = None  # registry name, path/file.py:Name or package.module:Name; None: fast-cnn or --init-from's
    model_args: dict = field(default_factory=dict)  # keyword arguments for the model's constructor
    init_from: Path | None = None  # start from these weights (a kit checkpoint or a plain state_dict)
    freeze: tuple = ()  # parameter-name prefixes that are not trained
    epochs: int = 9  # 93.34 % test; 8: 93.08 %; 10: 93.22 % (README: "Time to accuracy")
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd (momentum, Nesterov) or adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "linear"  # onecycle; linear or cosine: linear warmup, then linear or cosine decay to 0
    warmup_epochs: float = 0.5  # linear and cosine; one-cycle warms up for 25 % of the run
    label_smoothing: float = 0.1
    ema_decay: float = 0.99  # evaluate and keep a moving average of the weights (per step); 0 = off
    augment: str = "flip"  # none, flip, crop, crop+flip (flip only where the data allows it)
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # data sets without an official test split (mnist-5k, folder:)
    image_size: int | None = None  # folder: only; default: the images' own size, or 64
    train_limit: int | None = None  # train on the first N training images only (quick runs)
    seed: int = 0
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (bf16 where the device has fast bf16), bf16, fp32
    compile: bool = False  # torch.compile the model for training
    workers: int = 2  # decoding processes for folder: data
    max_memory_mb: int = 4096  # folder: data larger than this streams from disk
    data_dir: Path = Path("data")
    artifacts_dir: Path = Path("artifacts")
    resume: Path | None = None  # a last.pt to continue from
    download: bool = True  # let torchvision download mnist / cifar10 / fashion-mnist where reachable
    tensorboard: bool = False  # also log to artifacts/<name>/tensorboard/ (the HTML report is always written)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), f.type)
        check_name(self.name)
        if self.dataset not in BUILTIN and not self.dataset.startswith("folder:"):
            raise UserError(f"unknown data set {self.dataset!r}: choose one of {', '.join(BUILTIN)} "
                            "or folder:PATH")
        if self.model is not None and ":" not in self.model:
            if self.model not in ARCHITECTURES:  # files and modules are checked when they are loaded
                raise UserError(f"unknown model {self.model!r}: choose one of {', '.join(ARCHITECTURES)}, "
                                "or your own as path/to/file.py:ClassName or package.module:ClassName")
        if not all(isinstance(key, str) for key in self.model_args):
            raise UserError("--model-args must be a JSON object of keyword arguments")
        if not all(isinstance(prefix, str) and prefix for prefix in self.freeze):
            raise UserError("--freeze takes parameter-name prefixes separated by commas, e.g. features.0,features.1")
        choices = {"optimizer": ("sgd", "adamw"), "schedule": ("onecycle", "linear", "cosine"),
                   "precision": ("auto", "bf16", "fp32"), "augment": AUGMENTATIONS}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise UserError(f"--{option} {getattr(self, option)!r}: choose one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"--device {self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        positive = ("epochs", "batch_size", "lr", "max_memory_mb")
        for option in positive:
            if getattr(self, option) <= 0:
                raise UserError(f"--{option.replace('_', '-')} must be positive")
        for option in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, option) < 0.5:
                raise UserError(f"--{option.replace('_', '-')} must be between 0 and 0.5")
        if not 0 <= self.label_smoothing < 1:
            raise UserError("--label-smoothing must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise UserError("--ema-decay must be in [0, 1): 0 turns the moving average off, 0.99 is typical")
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            raise UserError("--image-size must be between 8 and 512")
        if self.train_limit is not None and self.train_limit < 2:
            raise UserError("--train-limit must be at least 2")
        if min(self.patience, self.workers, self.weight_decay, self.momentum, self.warmup_epochs) < 0:
            raise UserError("--patience, --workers, --weight-decay, --momentum and --warmup-epochs "
                            "must not be negative")

    @property
    def out_dir(self) -> Path:
        return self.artifacts_dir / self.name

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_options(cls, options: dict) -> TrainConfig:
        """Builds a config from a dict (e.g. parsed CLI options); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**options)


def check_name(name: str) -> None:
    """A model name is a folder name, an archive name and a TorchServe model name at once."""
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")


TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "Path": (Path,), "dict": (dict,),
         "tuple": (tuple, list)}


def check_type(name: str, value, annotation: str) -> None:
    """`annotation` is the field's type as written, e.g. "int | None" (bool is not an int here)."""
    parts = [part.strip() for part in annotation.split("|")]
    if value is None:
        ok = "None" in parts
    else:
        ok = any(isinstance(value, TYPES[p]) and (p == "bool") == isinstance(value, bool)
                 for p in parts if p != "None")
    if not ok:
        raise UserError(f"option {name}={value!r} should be {annotation}")
