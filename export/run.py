"""Export one trained model: checkpoint -> TorchScript + ONNX -> parity gate -> TorchServe archives.

Exported files are first written under temporary names and only renamed to model.torchscript.pt
and model.onnx, and packed into model_store/, when the parity gate passes. parity.json is
written either way: it says what failed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export import convert, parity, quantize
from export.archive import ServingConfig, build_archive, ensure_writable
from export.checkpoint import load_trained
from export.data import RunData, load_run_data
from export.report import update_report
from export.versions import next_version, release_record, sample_pngs
from handlers.spec import Spec
from handlers.store import versions
from training.checkpoint import write_json_atomic
from training.config import check_name
from training.errors import UserError
from training.loop import batches, normalize, per_channel

FORMATS = {  # format name -> (file name, runner loading it from disk, TorchServe backend, archive suffix)
    "torchscript": ("model.torchscript.pt", parity.torchscript_runner, "torchscript", "-torchscript"),
    "onnxruntime": ("model.onnx", parity.onnxruntime_runner, "onnxruntime", ""),
}


@dataclass(frozen=True)
class ExportConfig:
    name: str = "fashion-mnist"
    artifacts_dir: Path = Path("artifacts")
    model_store: Path = Path("model_store")
    serving: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self):
        check_name(self.name)
        s = self.serving
        if min(s.workers, s.batch_size, s.response_timeout_s, s.max_pixels) < 1 or s.max_batch_delay_ms < 0:
            raise UserError("--workers, --batch-size, --response-timeout and --max-pixels must be positive, "
                            "--max-batch-delay not negative")


def test_images(run_data: RunData, spec: Spec, sample_size: int = max(parity.BATCH_SIZES)):
    """(the first `sample_size` normalized test images, edge images, a function yielding the whole
    test split in batches)."""
    data, run = run_data
    mean, std = per_channel(spec.mean), per_channel(spec.std)
    shape = tuple(data.shape)

    def test_batches():
        for images, labels in batches(data.test, 256, torch.device("cpu"), None, shape, run["workers"]):
            yield normalize(images.cpu(), mean, std).numpy(), labels.cpu().numpy()

    sample = np.concatenate([images for images, _ in itertools.islice(test_batches(), -(-sample_size // 256))])
    if len(sample) < max(parity.BATCH_SIZES):
        raise UserError(f"the test split has {len(sample)} images; the parity gate needs at least 64")
    # What a client may send beyond the data set: all black, all white, and noise.
    noise = torch.Generator().manual_seed(0)
    edge = torch.stack([torch.zeros(shape, dtype=torch.uint8), torch.full(shape, 255, dtype=torch.uint8),
                        torch.randint(0, 256, shape, dtype=torch.uint8, generator=noise)])
    return sample[:sample_size], normalize(edge, mean, std).numpy(), test_batches


def export(config: ExportConfig) -> dict:
    """Runs the whole export; returns the parity report. A failed gate is a UserError."""
    started = time.perf_counter()
    out_dir = config.artifacts_dir / config.name
    model, spec = load_trained(out_dir)
    ensure_writable(config.model_store)
    batch_sizes = tuple(sorted({*parity.BATCH_SIZES, config.serving.batch_size}))
    run_data = load_run_data(out_dir)  # once: the parity gate's test split, INT8's calibration images
    sample, edge, test_batches = test_images(run_data, spec, max(batch_sizes))
    batch_sizes = tuple(size for size in batch_sizes if size <= len(sample))

    pending = {name: out_dir / f".pending-{file_name}" for name, (file_name, *_) in FORMATS.items()}
    try:
        examples = [torch.from_numpy(sample[:size]) for size in (2, 1, 7)]  # traced on 2, checked on 1 and 7
        convert.to_torchscript(model, spec, pending["torchscript"], examples)
        convert.to_onnx(model, spec, pending["onnxruntime"], examples[0])
        runners = {"eager": parity.eager_runner(model)}
        runners.update({name: runner(pending[name]) for name, (_, runner, *_) in FORMATS.items()})
        report = parity.run_gate(runners, sample, edge, test_batches, batch_sizes)
        report["checkpoint_sha256"] = spec.checkpoint_sha256
        write_json_atomic(out_dir / "parity.json", report)
        print(parity.format_table(report))
        if not report["passed"]:
            raise UserError(f"the parity gate failed (details in {out_dir / 'parity.json'}): exports differ from "
                            "the trained model; nothing was archived")
        for name, (file_name, *_) in FORMATS.items():
            pending[name].replace(out_dir / file_name)
    finally:
        for path in pending.values():
            path.unlink(missing_ok=True)

    spec_file = out_dir / "spec.json"
    version = next_version(config.model_store, config.name, spec, config.serving)
    if version in versions(config.model_store).get(config.name, {}):
        print(f"version {version} of {config.name} again: the same checkpoint and serving settings as its archives")
    pngs = sample_pngs(run_data[0].test.images)  # recorded with each archive's answers: make rollout checks them
    for name, (file_name, _, backend, suffix) in FORMATS.items():
        release = release_record(out_dir, file_name, backend, pngs, report["passed"],
                                 report["formats"][name]["test_accuracy"])
        archive = build_archive(config.name + suffix, out_dir / file_name, spec_file, backend,
                                config.model_store, config.serving, version, release)
        print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB, {backend}, version {version})")
    # INT8 (its own gate; a failure leaves the two archives above in place)
    quantize.export_int8(config.name, out_dir, spec, run_data, test_batches, report, config.model_store,
                         config.serving, version=version, pngs=pngs)
    update_report(out_dir, config.model_store)
    print(f"export took {time.perf_counter() - started:.1f}s")
    return report
