"""The spec: the one record that travels with a model from training to serving.

Training writes it as artifacts/<name>/spec.json (and inside checkpoint.pt); export embeds the same
record in the TorchScript and ONNX files (so each file describes itself wherever it goes) and packs
spec.json into every archive; the handlers read it there. Every stage reads it through `Spec`, never
by string keys: class names, input size and normalization are written nowhere else.

`format` names the layout. A record of another format (a newer kit's, or no spec at all) is one clear
error naming the file. New fields join with a default, so older records of the same format still read.
Plain standard library: this module is copied into every .mar.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlers.errors import UserError

FORMAT = "image-classifier-spec/1"
FORMAT_FAMILY = FORMAT.rsplit("/", 1)[0]
FITS = ("stretch", "crop")  # how an image's size becomes the model's (InputShape.fit)


@dataclass(frozen=True)
class InputShape:
    """What the model takes: channels x height x width, the resampling filter (`resize`), the colour a
    transparent image is flattened onto (one value per channel, 0-255), and how the image's size
    becomes the model's: `fit` "stretch" resizes to height x width, aspect ratio not kept; "crop"
    resizes the shorter side to floor(side / crop_fraction) and takes the centre height x width
    (torchvision's Resize + CenterCrop, timm's crop_pct)."""

    channels: int
    height: int
    width: int
    resize: str = "bilinear"
    background: tuple[int, ...] = (0,)
    fit: str = "stretch"
    crop_fraction: float | None = None  # with fit "crop": in (0, 1]

    @property
    def size(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


@dataclass(frozen=True)
class Spec:
    name: str
    arch: str  # the model's reference: a registry name, file.py:Class or module:Class
    arch_args: dict  # the constructor's arguments, data-derived ones included
    model: dict  # where the class comes from (training.model_origin's record)
    class_names: tuple[str, ...]
    input: InputShape
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    dataset: str
    normalization: str = "data"  # how mean/std were chosen (--normalize): data, none, imagenet or explicit
    init_from: dict | None = None  # the weights training started from
    frozen: tuple[str, ...] = ()
    torch_version: str = ""
    torchvision_version: str = ""
    python_version: str = ""
    created: str = ""
    checkpoint_sha256: str | None = None  # set once the checkpoint is written
    version: int | None = None  # the archive's version of this name (make export mints it; docs/versions.md)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        """The JSON form, key order as written since format 1."""
        record = dataclasses.asdict(self)
        record["input"]["background"] = list(self.input.background)
        if self.input.fit == "stretch":  # the default: a stretched model's record reads as before the crop existed
            del record["input"]["fit"], record["input"]["crop_fraction"]
        fields = {**record, "class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std),
                  "frozen": list(self.frozen)}
        ordered = {"format": FORMAT, "name": self.name, "arch": self.arch, "arch_args": self.arch_args,
                   "model": self.model, "num_classes": self.num_classes}
        ordered.update((key, value) for key, value in fields.items() if key not in ordered)
        for optional in ("checkpoint_sha256", "version"):
            if ordered[optional] is None:
                del ordered[optional]
        return ordered

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def with_checkpoint(self, sha256: str) -> Spec:
        return dataclasses.replace(self, checkpoint_sha256=sha256)

    def with_version(self, version: int) -> Spec:
        return dataclasses.replace(self, version=version)

    @classmethod
    def from_dict(cls, record: Any, source: str = "spec") -> Spec:
        """A spec from its JSON form; any other record is a UserError naming `source`."""
        if not isinstance(record, dict):
            raise UserError(f"{source}: not a model spec (a JSON object with format {FORMAT!r}): export it again")
        found = record.get("format")
        if found != FORMAT:
            if isinstance(found, str) and found.startswith(FORMAT_FAMILY + "/"):
                raise UserError(f"{source}: spec format {found!r}, but this kit reads {FORMAT!r}: "
                                "use the kit that wrote it, or train and export again with this one")
            raise UserError(f"{source}: not a model spec (format {found!r}, expected {FORMAT!r}): export it again")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - fields - {"format", "num_classes"}
        if unknown:
            raise UserError(f"{source}: unknown spec field(s) {sorted(unknown)} for format {FORMAT!r}: "
                            "use the kit that wrote it")
        try:
            values = {key: value for key, value in record.items() if key in fields}
            shape = values["input"]
            values["input"] = InputShape(int(shape["channels"]), int(shape["height"]), int(shape["width"]),
                                         str(shape.get("resize", "bilinear")),
                                         tuple(int(v) for v in shape.get("background", (0,))),
                                         str(shape.get("fit", "stretch")),
                                         None if shape.get("crop_fraction") is None
                                         else float(shape["crop_fraction"]))
            values["class_names"] = tuple(str(name) for name in values["class_names"])
            values["mean"] = tuple(float(v) for v in values["mean"])
            values["std"] = tuple(float(v) for v in values["std"])
            values["frozen"] = tuple(values.get("frozen") or ())
            spec = cls(**values)
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise UserError(f"{source}: a broken model spec ({detail}): export it again") from None
        if record.get("num_classes", spec.num_classes) != spec.num_classes:
            raise UserError(f"{source}: num_classes {record['num_classes']} but {spec.num_classes} class names")
        fit, fraction = spec.input.fit, spec.input.crop_fraction
        fits = fraction is None if fit != "crop" else fraction is not None and 0 < fraction <= 1
        if fit not in FITS or not fits:
            raise UserError(f"{source}: input fit {fit!r} with crop_fraction {fraction!r}: expected "
                            "fit 'stretch' (no crop_fraction) or 'crop' with a crop_fraction in (0, 1]")
        if not len(spec.mean) == len(spec.std) == spec.input.channels:
            raise UserError(f"{source}: mean and std need one value per input channel ({spec.input.channels})")
        return spec

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "spec") -> Spec:
        try:
            record = json.loads(text)
        except ValueError as error:
            raise UserError(f"{source}: not valid JSON ({error}): export it again") from None
        return cls.from_dict(record, source)

    @classmethod
    def read(cls, path: Path) -> Spec:
        try:
            text = path.read_text()
        except OSError as error:
            raise UserError(f"cannot read the model spec {path} ({error.strerror or error})") from None
        return cls.from_json(text, str(path))
