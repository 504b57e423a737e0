"""The archive layout (.mar): what the kit puts in one, and the one reader of it.

A kit archive is a zip that torch-model-archiver writes (export/archive.py):
  MAR-INF/MANIFEST.json   TorchServe's manifest: model name, version, the serialized model's file name
  model-config.yaml       TorchServe's worker and batching settings, and the kit's `handler:` section
  spec.json               the model's spec (handlers/spec.py), carrying the archive's version
  release.json            what export found: its gates' outcome, the test accuracy and a few test
                          images with this archive's answers (export/versions.py; make rollout checks them)
  <serialized file>       model.onnx or model.torchscript.pt
  handlers/...            this package, which TorchServe's workers import

Every place that opens an archive (the KServe adapter, the report, make kserve-store, the container's
memory check and health check, the benchmarks) reads it through `read_archive`; TorchServe unpacks an
archive itself and the handler reads the same files through `HandlerSettings` and `Spec`.
Plain standard library and PyYAML (a TorchServe dependency): this module is copied into every .mar.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from handlers.errors import UserError
from handlers.spec import Spec

MANIFEST = "MAR-INF/MANIFEST.json"
MODEL_CONFIG = "model-config.yaml"
SPEC = "spec.json"
RELEASE = "release.json"
BACKENDS = ("onnxruntime", "torchscript")
DEFAULT_MAX_PIXELS = 24_000_000  # a 24-megapixel photo decodes to 72 MB of RGB: refuse beyond that


class BrokenArchive(UserError):
    """A file in the model store that is not a readable kit archive; `reason` says what is wrong."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not an archive of the kit ({reason}): make export writes them")
        self.reason = reason


@dataclass(frozen=True)
class HandlerSettings:
    """The `handler:` section of an archive's model-config.yaml, validated."""

    backend: str
    model_file: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0  # intra-op threads per worker; 0 = CPU count / workers

    @classmethod
    def from_model_config(cls, model_config: dict, model_file: str) -> HandlerSettings:
        section = model_config.get("handler") or {}
        unknown = set(section) - {"backend", "max_pixels", "threads"}
        if unknown:
            raise ValueError(f"unknown handler setting(s) in model-config.yaml: {sorted(unknown)}")
        backend = section.get("backend")
        if backend not in BACKENDS:
            raise ValueError(f"model-config.yaml handler.backend must be one of {BACKENDS}, not {backend!r}")
        return cls(backend, model_file, int(section.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   int(section.get("threads", 0)))


@dataclass(frozen=True)
class Archive:
    path: Path
    name: str
    version: str
    model_config: dict  # model-config.yaml as TorchServe reads it
    settings: HandlerSettings
    spec: Spec
    model_bytes: int  # the serialized model's size in the archive
    release: dict | None = None  # release.json (archives of older kits have none)

    @property
    def workers(self) -> int:
        return int(self.model_config.get("minWorkers", self.model_config.get("maxWorkers", 1)))

    def read(self, member: str) -> bytes:
        with zipfile.ZipFile(self.path) as mar:
            return mar.read(member)

    def unpack(self, directory: Path) -> Path:
        """spec.json and the serialized model into `directory`, as TorchServe unpacks them; returns it."""
        with zipfile.ZipFile(self.path) as mar:
            mar.extract(SPEC, directory)
            mar.extract(self.settings.model_file, directory)
        return directory


def read_archive(path: Path) -> Archive:
    """One kit archive's manifest, settings and spec; anything else is one UserError naming the file."""
    try:
        with zipfile.ZipFile(path) as mar:
            manifest = json.loads(mar.read(MANIFEST))["model"]
            model_config = yaml.safe_load(mar.read(manifest.get("configFile", MODEL_CONFIG))) or {}
            if not isinstance(model_config, dict):
                raise ValueError(f"{MODEL_CONFIG} is not a mapping")
            settings = HandlerSettings.from_model_config(model_config, manifest["serializedFile"])
            spec = Spec.from_json(mar.read(SPEC), f"{path}:{SPEC}")
            model_bytes = mar.getinfo(settings.model_file).file_size
            release = json.loads(mar.read(RELEASE)) if RELEASE in mar.namelist() else None
            if release is not None and not isinstance(release, dict):
                raise ValueError(f"{RELEASE} is not a JSON object")
            return Archive(path, manifest["modelName"], str(manifest.get("modelVersion", "1.0")), model_config,
                           settings, spec, model_bytes, release)
    except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile, yaml.YAMLError,
            UserError) as error:
        raise BrokenArchive(path, str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
                            ) from None
