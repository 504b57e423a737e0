"""TrainConfig: every option of a training run, defined once, validated when built, written next to the outputs.

Each field carries its command-line form (`Option`): `python -m training` builds its parser from
these fields, and a resumed run is checked against the options marked `defines_run` (RUN_DEFINING).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from handlers.spec import FITS
from training.data import BUILTIN
from training.errors import UserError
from training.models import ARCHITECTURES
from training.normalization import FORMS, parse

AUGMENTATIONS = ("none", "flip", "crop", "crop+flip")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a TorchServe model name

# The default batch (batch_for): the largest for large training splits, smaller where it would take few steps.
LARGEST_BATCH, SMALLEST_BATCH, MIN_STEPS = 256, 32, 100
BATCH_RULE = f"{LARGEST_BATCH}, halved while an epoch would take fewer than {MIN_STEPS} steps, down to {SMALLEST_BATCH}"

# The sections of `python -m training --help`, in order.
WHAT, HOW, DATA, OUTPUTS = "what to train", "how to train", "data", "hardware and outputs"


@dataclass(frozen=True)
class Option:
    """A TrainConfig field's command-line form: --NAME (underscores as dashes), typed by the field."""

    group: str  # its --help section
    help: str  # argparse help text: %(default)s shows the default
    defines_run: bool = False  # what is trained: a --resume must use the saved value
    choices: tuple | None = None  # the allowed values (checked when a config is built)
    metavar: str | None = None
    read: Callable[[str], object] | None = None  # command-line text -> value, for fields that are not str/number/Path


def option(default, group: str, help: str, *, defines_run: bool = False, choices: tuple | None = None,
           metavar: str | None = None, read: Callable[[str], object] | None = None):
    """A TrainConfig field and its command-line form."""
    metadata = {"option": Option(group, help, defines_run, choices, metavar, read)}
    if isinstance(default, dict):  # mutable: every config gets its own
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """A field's command-line flag: model_args -> --model-args."""
    return "--" + name.replace("_", "-")


def json_object(text: str) -> dict:
    """--model-args: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--model-args is not valid JSON ({error.msg} at character {error.pos}): "
                        """write a JSON object, e.g. '{"base_width": 32}'""") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-args must be a JSON object of keyword arguments, not {type(value).__name__}")
    return value


def prefixes(text: str) -> tuple:
    """--freeze: parameter-name prefixes separated by commas."""
    return tuple(prefix for prefix in text.split(",") if prefix)


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    name: str = option(  # artifacts/<name>/, model_store/<name>.mar
        "fashion-mnist", WHAT, "model name: artifacts/NAME/, model_store/NAME.mar (%(default)s)")
    dataset: str = option(
        "fashion-mnist", WHAT, f"{', '.join(BUILTIN)} or folder:PATH (one subfolder per class) (%(default)s)",
        defines_run=True)
    model: str | None = option(  # None: the --init-from checkpoint's model, else fast-cnn
        None, WHAT, f"{', '.join(ARCHITECTURES)}, or your own: path/to/file.py:ClassName or "
                    "package.module:ClassName (a class or a function returning an nn.Module). Default: "
                    "the --init-from checkpoint's model, else fast-cnn", defines_run=True)
    model_args: dict = option(
        {}, WHAT, "keyword arguments for the model, a JSON object; in_channels, num_classes, height "
                  "and width come from the data set where the model takes them",
        defines_run=True, metavar="JSON", read=json_object)
    init_from: Path | None = option(
        None, WHAT, "start from these weights: a kit checkpoint.pt or a plain state_dict (.pt/.pth); "
                    "tensors are matched by name and shape, the rest stays freshly initialized",
        defines_run=True, metavar="PATH")
    freeze: tuple = option(
        (), WHAT, "do not train parameters whose names start with a prefix (their batch-norm "
                  "statistics stay fixed too); --summary lists the names",
        defines_run=True, metavar="PREFIX[,PREFIX...]", read=prefixes)
    image_size: int | None = option(  # None: the images' own size, or 64
        None, WHAT, "folder: only: train at SIZExSIZE (default: the images' own size when all "
                    "share one, else 64)", defines_run=True)
    resize: str = option(
        "stretch", WHAT, "folder: only: stretch (every image resized to the model's size, aspect ratio not "
                         "kept) or crop (the shorter side resized to SIZE / --crop-fraction, then the centre "
                         "SIZExSIZE: torchvision's Resize(256) + CenterCrop(224), for photos) (%(default)s)",
        defines_run=True, choices=FITS)
    crop_fraction: float | None = option(  # None: 0.875 (training.data.DEFAULT_CROP_FRACTION)
        None, WHAT, "--resize crop only: the share of the resized shorter side the centre crop keeps, in "
                    "(0, 1] (default 0.875: 224 of 256)", defines_run=True)
    # how to train
    epochs: int = option(  # seed 0, weight decay 5e-4: 9: 93.34 % test; 8: 93.08 %; 10: 93.22 %
        9, HOW, "(%(default)s); 0 packages the --init-from weights unchanged: no step, evaluated on the "
                "validation and test splits, written as a run (needs --normalize)", defines_run=True)
    batch_size: int | None = option(  # None: batch_for(the training split's size)
        None, HOW, f"the global batch: under torchrun each of N processes takes batch/N of it, so the "
                   f"learning rate and schedule keep their meaning (default: {BATCH_RULE})", defines_run=True)
    optimizer: str = option("sgd", HOW, "(%(default)s)", defines_run=True, choices=("sgd", "adamw"))
    lr: float = option(0.1, HOW, "peak learning rate (%(default)s; try 3e-3 for adamw)", defines_run=True)
    momentum: float = option(0.9, HOW, "SGD momentum (%(default)s)", defines_run=True)
    nesterov: bool = option(True, HOW, "Nesterov momentum for SGD (on)", defines_run=True)
    weight_decay: float = option(  # test, seeds 0-2 (AMD): 4e-3 93.41/93.38/93.28 %; 1e-3 93.30/93.22/93.10 %
        4e-3, HOW, "on weights, not on biases or batch norm (%(default)s)", defines_run=True)
    schedule: str = option(
        "linear", HOW, "one-cycle, or linear warmup then linear or cosine decay to zero (%(default)s)",
        defines_run=True, choices=("onecycle", "linear", "cosine"))
    warmup_epochs: float = option(  # one-cycle warms up for 25 % of the run
        0.5, HOW, "linear and cosine schedules (%(default)s)", defines_run=True)
    label_smoothing: float = option(0.1, HOW, "(%(default)s)", defines_run=True)
    ema_decay: float = option(
        0.99, HOW, "evaluate, keep and export a moving average of the weights, updated every step "
                   "with this decay; 0 = off (%(default)s)", defines_run=True)
    augment: str = option(
        "flip", HOW, "random horizontal flip (only where the data allows it: not for digits) and/or "
                     "random crop with 2-pixel padding (%(default)s)", defines_run=True, choices=AUGMENTATIONS)
    patience: int = option(
        0, HOW, "early stop after N epochs without a better validation accuracy; 0 = never (%(default)s)")
    seed: int = option(0, HOW, "seeds splits, initialization, shuffling (%(default)s)", defines_run=True)
    resume: Path | None = option(None, HOW, "continue from a last.pt written by an earlier run")
    # data
    val_fraction: float = option(0.1, DATA, "validation share carved from the training split (%(default)s)",
                                 defines_run=True)
    test_fraction: float = option(  # data sets without an official test split (mnist-5k, folder:)
        0.1, DATA, "test share for data sets without an official test split (%(default)s)", defines_run=True)
    train_limit: int | None = option(None, DATA, "use only N training images (quick runs)", defines_run=True)
    normalize: str | None = option(  # None: data when training; --epochs 0 requires it
        None, DATA, f"how inputs are normalized: {FORMS}; imagenet for torchvision/timm weights "
                    "(default: data, the training split's mean/std; required with --epochs 0)",
        defines_run=True, metavar="HOW")
    data_dir: Path = option(Path("data"), DATA, "downloaded data sets (%(default)s)")
    download: bool = option(  # mnist / cifar10 / fashion-mnist through torchvision
        True, DATA, "let torchvision download missing data where the internet is reachable (on)")
    workers: int = option(2, DATA, "image decoding processes (%(default)s)")  # for folder: data
    max_memory_mb: int = option(4096, DATA, "folder: data larger than this streams from disk (%(default)s)")
    # hardware and outputs
    device: str = option("auto", OUTPUTS, "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps (%(default)s)")
    precision: str = option("auto", OUTPUTS, "auto: bf16 autocast where the device runs bf16 fast (%(default)s)",
                            choices=("auto", "bf16", "fp32"))
    compile: bool = option(False, OUTPUTS, "torch.compile the model (off)")
    artifacts_dir: Path = option(Path("artifacts"), OUTPUTS, "(%(default)s)")
    tensorboard: bool = option(False, OUTPUTS, "also log to ARTIFACTS_DIR/NAME/tensorboard/ for TensorBoard (off; "
                                               "report.html is always written)")

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
        for f in dataclasses.fields(self):
            allowed, value = f.metadata["option"].choices, getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise UserError(f"{flag(f.name)} {value!r}: choose one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"--device {self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        self.check_packaging()
        positive = ("batch_size", "lr", "max_memory_mb")
        for option in positive:
            if getattr(self, option) is not None and getattr(self, option) <= 0:
                raise UserError(f"{flag(option)} must be positive")
        for option in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, option) < 0.5:
                raise UserError(f"{flag(option)} must be between 0 and 0.5")
        if not 0 <= self.label_smoothing < 1:
            raise UserError("--label-smoothing must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise UserError("--ema-decay must be in [0, 1): 0 turns the moving average off, 0.99 is typical")
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            raise UserError("--image-size must be between 8 and 512")
        if self.crop_fraction is not None and not 0 < self.crop_fraction <= 1:
            raise UserError(f"--crop-fraction {self.crop_fraction}: give a share in (0, 1], e.g. 0.875 (224 of 256)")
        if self.crop_fraction is not None and self.resize != "crop":
            raise UserError("--crop-fraction applies to --resize crop only: add --resize crop, or drop it")
        if self.train_limit is not None and self.train_limit < 2:
            raise UserError("--train-limit must be at least 2")
        if min(self.patience, self.workers, self.weight_decay, self.momentum, self.warmup_epochs) < 0:
            raise UserError("--patience, --workers, --weight-decay, --momentum and --warmup-epochs "
                            "must not be negative")

    def check_packaging(self) -> None:
        """--epochs 0 packages finished weights: they and their normalization must be given."""
        if self.epochs < 0:
            raise UserError("--epochs must be positive, or 0 to package finished weights (with --init-from and "
                            "--normalize)")
        if self.normalize is not None:
            parse(self.normalize)
        if self.epochs > 0:
            if self.normalize is None:  # frozen: set once here, so train_config.json records the choice
                object.__setattr__(self, "normalize", "data")
            return
        if self.init_from is None:
            raise UserError("--epochs must be positive to train; --epochs 0 packages finished weights: give them "
                            "with --init-from FILE (and --normalize)")
        if self.normalize is None:
            raise UserError(f"--epochs 0 needs --normalize: say how the weights' inputs were normalized ({FORMS}); "
                            "the kit cannot tell from the weights")
        if self.resume is not None or self.freeze:
            raise UserError("--epochs 0 trains nothing: --resume and --freeze apply only to training")

    @property
    def out_dir(self) -> Path:
        return self.artifacts_dir / self.name

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_options(cls, options: dict) -> TrainConfig:
        """Builds a config from a dict (e.g. parsed CLI options); unknown keys are an error. Text for an
        option that is neither a string, a number nor a path (--model-args, --freeze) is read as the
        command line writes it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(unknown)}")
        read = {name: fields[name].metadata["option"].read for name in options}
        return cls(**{name: read[name](value) if read[name] and isinstance(value, str) else value
                      for name, value in options.items()})


# Options that define what is trained: a resumed run must use the same ones as the saved state.
RUN_DEFINING = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["option"].defines_run)


def batch_for(images: int) -> int:
    """The default --batch-size for a training split of `images`: LARGEST_BATCH, halved while an epoch
    would take fewer than MIN_STEPS steps, down to SMALLEST_BATCH. A large split keeps the batch that
    makes its steps fast; a small one keeps enough steps to learn in a few epochs."""
    batch = LARGEST_BATCH
    while batch > SMALLEST_BATCH and images / batch < MIN_STEPS:
        batch //= 2
    return batch


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
