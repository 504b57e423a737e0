"""Where a model comes from: the kit's registry, the user's own file, or an importable module.

`--model` takes a registry name (`cnn`), `path/to/file.py:Name` or `package.module:Name`, where
Name is an nn.Module class or a function returning one. `resolve()` turns that into an `Origin`
(the constructor plus the record the spec keeps); `rebuild()` makes the same constructor again
from that record at export time, so a checkpoint always means the same network:

- a file's text is kept in the checkpoint (and, to read, as artifacts/<name>/model_source.py).
  Training and export both execute that text, never the file again: moving or editing the file
  after training changes nothing.
- a module of an installed package is imported as usual (its relative imports and the package's
  own registries need the real package). Its defining file is recorded (text and sha256) and
  export refuses to rebuild when that file has changed since training.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import linecache
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.spec import Spec
from training.errors import UserError
from training.models import ARCHITECTURES, architecture, check_input_size

# Constructor parameters the kit fills from the data set where the constructor takes them. Channels and
# classes always; the image size only by names that cannot mean anything else: `height` and `width`
# together, or one of IMAGE_SIZE_NAMES. A lone `width` or `height` is the model's own (a channel width).
CHANNEL_NAMES = ("in_channels", "in_chans")  # in_chans: timm's spelling
IMAGE_SIZE_NAMES = ("image_size", "img_size", "input_size")
DATA_ARGUMENTS = (*CHANNEL_NAMES, "num_classes", "height", "width", *IMAGE_SIZE_NAMES)
SOURCE_FILE = "model_source.py"  # the readable copy of a user model's source in artifacts/<name>/


@dataclass(frozen=True)
class Origin:
    kind: str  # "registry", "file" or "module"
    reference: str  # as the user gave it: cnn, examples/my_net.py:MyNet, mypackage.nets:MyNet
    name: str  # the class or function
    constructor: Callable[..., nn.Module]
    source: str | None = None  # text of the file that defines it (file and module origins)
    module: str | None = None  # the defining module (module origins)
    directory: str | None = None  # where a file model's own local imports are found (file origins)
    local_imports: tuple[str, ...] = ()  # modules next to the user's file that it imports (not copied)

    @property
    def source_sha256(self) -> str | None:
        return None if self.source is None else sha256_text(self.source)

    def record(self) -> dict:
        """What the spec keeps: enough to rebuild this constructor and to check it is the same."""
        record = {"origin": self.kind, "reference": self.reference, "name": self.name}
        if self.kind != "registry":
            record.update(source_sha256=self.source_sha256, source_file=SOURCE_FILE)
        if self.kind == "module":
            record["module"] = self.module
        if self.local_imports:
            record.update(directory=self.directory, local_imports=list(self.local_imports))
        return record


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- resolving --model

def resolve(reference: str) -> Origin:
    """A `--model` value -> Origin; every user mistake is one UserError."""
    if ":" not in reference:
        if reference not in ARCHITECTURES:
            raise UserError(f"unknown model {reference!r}: choose one of {', '.join(ARCHITECTURES)}, "
                            "or your own as path/to/file.py:ClassName or package.module:ClassName")
        constructor = architecture(reference)
        return Origin("registry", reference, getattr(constructor, "__name__", reference), constructor)
    location, _, name = reference.rpartition(":")
    if not location or not name.isidentifier():
        raise UserError(f"--model {reference!r}: write path/to/file.py:ClassName or package.module:ClassName")
    if location.endswith(".py") or "/" in location or "\\" in location:
        return from_file(reference, Path(location), name)
    return from_module(reference, location, name)


def from_file(reference: str, path: Path, name: str) -> Origin:
    if not path.is_file():
        raise UserError(f"model file {path} not found (from --model {reference}): check the path")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read model file {path} ({error}): it must be a Python source file") from None
    directory = str(path.resolve().parent)
    before = set(sys.modules)
    module = execute(source, str(path), directory)
    local = tuple(sorted(m for m in set(sys.modules) - before - {module.__name__}
                         if is_inside(sys.modules[m], directory)))
    constructor = find_constructor(module, name, str(path))
    return Origin("file", reference, name, constructor, source, directory=directory, local_imports=local)


def from_module(reference: str, module_name: str, name: str) -> Origin:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserError(f"cannot import {module_name} ({error}): check --model {reference} and that the package "
                        "is importable (installed, or on PYTHONPATH)") from None
    except Exception as error:  # whatever the user's package raises while importing
        raise UserError(f"importing {module_name} failed ({one_line(error)}): fix the module") from None
    constructor = find_constructor(module, name, module_name)
    defining = sys.modules.get(getattr(constructor, "__module__", ""), module)
    source_path = getattr(defining, "__file__", None)
    if not source_path or not source_path.endswith(".py"):
        raise UserError(f"{reference} has no Python source file to record: use path/to/file.py:{name}")
    return Origin("module", reference, name, constructor, Path(source_path).read_text(), module=defining.__name__)


def execute(source: str, filename: str, directory: str | None) -> types.ModuleType:
    """Runs a model file's text as a fresh module (named after its sha256, so the same text is
    loaded once per process). `directory` goes on sys.path while it runs, as for `python file.py`."""
    module_name = f"kit_model_{sha256_text(source)[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module = types.ModuleType(module_name)
    module.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks, inspect
    sys.modules[module_name] = module  # dataclasses, pickling and torch look modules up by name
    added = directory is not None and directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except SyntaxError as error:
        del sys.modules[module_name]
        raise UserError(f"{filename}:{error.lineno}: syntax error ({error.msg}): fix the model file") from None
    except Exception as error:  # an import or anything else failing at the file's top level
        del sys.modules[module_name]
        raise UserError(f"{filename} failed to load ({one_line(error)}): fix the model file") from None
    finally:
        if added:
            sys.path.remove(directory)
    return module


def is_inside(module: types.ModuleType | None, directory: str) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and Path(path).resolve().is_relative_to(directory)


def find_constructor(module: types.ModuleType, name: str, where: str) -> Callable[..., nn.Module]:
    constructor = getattr(module, name, None)
    if constructor is None:
        defined = sorted(n for n, v in vars(module).items() if is_model_class(v) and v.__module__ == module.__name__)
        hint = f"it defines {', '.join(defined)}" if defined else "it defines no nn.Module class"
        raise UserError(f"{where} has no {name!r} ({hint}): check the name after ':' in --model")
    if inspect.isclass(constructor) and not issubclass(constructor, nn.Module):
        raise UserError(f"{where}:{name} is a class but not an nn.Module: subclass torch.nn.Module")
    if not callable(constructor):
        raise UserError(f"{where}:{name} is a {type(constructor).__name__}, not an nn.Module class or a function")
    return constructor


def is_model_class(value) -> bool:
    return inspect.isclass(value) and issubclass(value, nn.Module)


# ---------------------------------------------------------------------------- rebuilding from a spec

def rebuild(spec: Spec, source: str | None) -> Origin:
    """The Origin a spec names (`arch`, and the `model` record of user models), checked against
    the source text the checkpoint carries. Specs from before user models have no record."""
    record, reference = spec.model or {"origin": "registry"}, spec.arch
    if record["origin"] == "registry":
        return resolve(reference)
    name = record["name"]
    if source is None or sha256_text(source) != record["source_sha256"]:
        raise UserError(f"the checkpoint's copy of {reference}'s source is missing or does not match its spec: "
                        "train again")
    if record["origin"] == "file":
        module = execute(source, record.get("source_file", SOURCE_FILE), record.get("directory"))
        return Origin("file", reference, name, find_constructor(module, name, reference), source,
                      directory=record.get("directory"), local_imports=tuple(record.get("local_imports", ())))
    current = from_module(reference, reference.rpartition(":")[0], name)
    if current.source_sha256 != record["source_sha256"]:
        raise UserError(f"{current.module}'s source changed since training (sha256 {current.source_sha256[:12]}... "
                        f"vs {record['source_sha256'][:12]}...): install the version the model was trained with, "
                        f"or retrain")
    return current


# ---------------------------------------------------------------------------- arguments and construction

def signature_of(origin: Origin) -> inspect.Signature:
    try:
        return inspect.signature(origin.constructor)
    except (TypeError, ValueError):
        raise UserError(f"cannot read {origin.reference}'s parameters: give a Python class or function") from None


def filled_from_data(parameters, channels: int, num_classes: int, height: int, width: int) -> dict:
    """The arguments the data set gives a constructor with these parameter names (see DATA_ARGUMENTS)."""
    size = height if height == width else [height, width]
    filled = {name: channels for name in CHANNEL_NAMES if name in parameters}
    filled |= {name: value for name, value in (("num_classes", num_classes),) if name in parameters}
    if "height" in parameters and "width" in parameters:
        filled |= {"height": height, "width": width}
    return filled | {name: size for name in IMAGE_SIZE_NAMES if name in parameters}


def data_argument_names(origin: Origin) -> set[str]:
    """Which of the constructor's arguments come from the data set (not inherited when fine-tuning)."""
    return set(filled_from_data(signature_of(origin).parameters, 1, 1, 1, 1))


def arguments(origin: Origin, shape: tuple[int, int, int], num_classes: int, given: dict) -> dict:
    """Every argument of the constructor, JSON-ready, as the spec records them: what the data set fills
    in (filled_from_data: channels, classes, the image size by unambiguous names), --model-args, defaults.

    A default that JSON cannot hold (say, an activation class) is left to the constructor: the
    recorded source fixes it anyway."""
    signature = signature_of(origin)
    parameters = signature.parameters
    arguments = filled_from_data(parameters, *shape[:1], num_classes, *shape[1:])
    for key, value in given.items():
        if key in arguments and json_ready(value) != arguments[key]:
            raise UserError(
                f"--model-args {key}={value!r} conflicts with the data set ({key} is {arguments[key]}): the kit "
                f"fills {', '.join(sorted(arguments))} from the data; a parameter meaning something else needs "
                "another name")
        arguments[key] = value
    try:
        bound = signature.bind(**arguments)
    except TypeError as error:
        raise UserError(f"{origin.reference} does not take these arguments ({error}): check --model-args "
                        f"(it takes: {', '.join(parameters) or 'nothing'})") from None
    bound.apply_defaults()
    complete = {}
    for key, value in bound.arguments.items():
        kind = parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            complete.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            complete[key] = value
    recorded = {key: json_ready(value) for key, value in complete.items()}
    return {key: value for key, value in recorded.items() if is_json(value)}


def json_ready(value):
    return [json_ready(v) for v in value] if isinstance(value, tuple | list) else value


def is_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def construct(origin: Origin, args: dict) -> nn.Module:
    """A fresh model; the constructor's own errors become one clear line."""
    if origin.kind == "registry":
        check_input_size(origin.reference, args["height"], args["width"])
    try:
        model = origin.constructor(**args)
    except Exception as error:  # whatever the user's constructor raises
        raise UserError(f"building {origin.reference} with {json.dumps(args)} failed ({one_line(error)}): "
                        "check --model-args") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{origin.reference} returned a {type(model).__name__}, not an nn.Module")
    return model


def check_forward(model: nn.Module, origin: Origin, example: torch.Tensor, num_classes: int) -> None:
    """One eval-mode forward pass on real images of the data set's shape, before any training."""
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as error:  # whatever the user's forward raises
        raise UserError(f"{origin.reference} failed on a batch of shape {tuple(example.shape)} "
                        f"({one_line(error)}): its forward pass must take (N, C, H, W) images") from None
    expected = (len(example), num_classes)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(f"{origin.reference} returned {found} for a batch of {len(example)}: it must return "
                        f"logits of shape (N, {num_classes}) for this data set's {num_classes} classes")
    model.train()


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:240]}" if text else type(error).__name__

