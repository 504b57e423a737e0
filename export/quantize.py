"""INT8: a statically quantized copy of the exported ONNX model, gated like the other formats.

ONNX Runtime's quantization tools (QDQ format: uint8 activations, int8 weights per output channel,
MinMax ranges) calibrate on a seeded sample of the run's TRAINING images, never its test images.
The gate, on this machine: test accuracy on the whole test split within `accuracy_points` of the
FP32 ONNX model's, and in-process throughput at the served batch size, with the threads each
serving worker gets, at least `min_speedup` times the FP32 model's (medians of interleaved rounds).
Only when it passes are artifacts/<name>/model.int8.onnx and model_store/<name>-int8.mar written;
otherwise the export still succeeds for the other formats and says why in one line.

Called by export/run.py after the FP32 archives are packed; `python -m export` runs it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.archive import ServingConfig, build_archive
from export.data import RunData
from export.versions import release_record
from handlers.pipeline import onnxruntime_backend, threads_per_worker
from handlers.spec import Spec
from handlers.store import archive_path
from training.checkpoint import write_json_atomic
from training.loop import batches, normalize, per_channel

INT8_FILE = "model.int8.onnx"
ARCHIVE_SUFFIX = "-int8"


@dataclass(frozen=True)
class Int8Gate:
    accuracy_points: float = 0.5  # |INT8 - FP32| test accuracy, percentage points
    min_speedup: float = 1.5  # INT8 / FP32 images/s at the served batch size
    calibration_images: int = 1024  # a seeded sample of the training split
    rounds: int = 7  # interleaved timing rounds (medians)
    round_seconds: float = 0.3


def calibration_batches(run_data: RunData, spec: Spec, count: int, seed: int = 0) -> list[np.ndarray]:
    """Normalized float32 batches of `count` training images (a seeded sample), as served models see them."""
    data, run = run_data
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:count]
    mean, std = per_channel(spec.mean), per_channel(spec.std)
    return [normalize(images.cpu(), mean, std).numpy()
            for images, _ in batches(data.train.subset(order), 64, torch.device("cpu"), None, data.shape,
                                     run["workers"])]


def quantize(fp32_model: Path, int8_model: Path, calibration: list[np.ndarray]) -> None:
    """Writes the statically quantized model (pre-processed by ORT's shape inference and fusions)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(fp32_model), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(calibration)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(dir=int8_model.parent, prefix=".quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared))
        # A batch norm that a max-pool keeps apart from its conv (fast-cnn) stays in the graph: its
        # scale is one value per channel (axis 0), not a conv weight's axis 1 that ORT assumes.
        quantize_static(prepared, int8_model, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})


def images_per_second(runners: dict[str, Callable], batch: np.ndarray, gate: Int8Gate) -> dict[str, float]:
    """Median images/s of each runner over interleaved rounds (these machines are noisy)."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        for _ in range(10):  # warm-up
            run(batch)
    for _ in range(gate.rounds):
        for name, run in runners.items():
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < gate.round_seconds:
                run(batch)
                count += len(batch)
            rates[name].append(count / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def run_gate(fp32_model: Path, int8_model: Path, test_batches: Callable[[], Iterable], fp32_accuracy: float,
             serving: ServingConfig, gate: Int8Gate) -> dict:
    threads = threads_per_worker(serving.workers, 0)  # what each serving worker gets
    runners = {name: onnxruntime_backend(path, threads, None)[0]
               for name, path in (("fp32", fp32_model), ("int8", int8_model))}
    correct = total = 0
    for images, labels in test_batches():
        correct += int((runners["int8"](images).argmax(1) == labels).sum())
        total += len(labels)
    accuracy = correct / total
    sample = next(iter(test_batches()))[0]
    batch = np.resize(sample, (serving.batch_size, *sample.shape[1:]))  # real test images, repeated if few
    rates = images_per_second(runners, batch, gate)
    speedup = rates["int8"] / rates["fp32"]
    difference = abs(accuracy - fp32_accuracy) * 100
    failures = []
    if difference > gate.accuracy_points:
        failures.append(f"test accuracy {accuracy:.2%} is {difference:.2f} points from FP32's {fp32_accuracy:.2%} "
                        f"(at most {gate.accuracy_points})")
    if speedup < gate.min_speedup:
        failures.append(f"{speedup:.2f}x FP32's throughput at batch {serving.batch_size} on {threads} thread(s) "
                        f"(at least {gate.min_speedup}x)")
    return {"gate": asdict(gate), "test_accuracy": accuracy, "fp32_test_accuracy": fp32_accuracy,
            "accuracy_diff_points": difference, "batch_size": serving.batch_size, "threads": threads,
            "images_per_second": rates, "speedup": speedup, "passed": not failures, "why_not": "; ".join(failures)}


def format_table(result: dict) -> str:
    """The INT8 gate as printed after the parity table."""
    if "speedup" not in result:
        return f"int8 gate: FAILED: {result['why_not']}"
    rates = result["images_per_second"]
    return "\n".join([
        f"{'format':<13}{'test accuracy':>15}{'Δ points':>10}{'images/s':>10}{'FP32 images/s':>15}{'speedup':>9}  pass",
        f"{'int8':<13}{result['test_accuracy']:>15.4%}{result['accuracy_diff_points']:>10.2f}{rates['int8']:>10.0f}"
        f"{rates['fp32']:>15.0f}{result['speedup']:>8.2f}x  {'yes' if result['passed'] else 'NO'}",
        f"int8 gate (≤ {result['gate']['accuracy_points']} points, ≥ {result['gate']['min_speedup']}x at batch "
        f"{result['batch_size']} on {result['threads']} thread(s)): {'passed' if result['passed'] else 'FAILED'}"])


def export_int8(name: str, out_dir: Path, spec: Spec, run_data: RunData, test_batches: Callable[[], Iterable],
                report: dict, model_store: Path, serving: ServingConfig, gate: Int8Gate = Int8Gate(),
                version: int = 1, pngs: list[bytes] = ()) -> Path | None:
    """Quantizes (calibrated on `run_data`'s training split), gates on `test_batches`, records the
    result in report["int8"] (and parity.json), archives on a pass.

    Returns the archive, or None after printing one line that says why there is none. A failed gate
    also removes an INT8 archive of this version left by an earlier export: it would serve an older model.
    """
    fp32_model = out_dir / "model.onnx"
    pending = out_dir / f".pending-{INT8_FILE}"
    archive = archive_path(model_store, f"{name}{ARCHIVE_SUFFIX}", version)
    try:
        try:
            quantize(fp32_model, pending, calibration_batches(run_data, spec, gate.calibration_images))
        except Exception as error:  # e.g. an operator the quantizer does not handle, in a user's model
            result = {"gate": asdict(gate), "passed": False,
                      "why_not": f"quantization failed ({type(error).__name__}: {error})".splitlines()[0]}
        else:
            result = run_gate(fp32_model, pending, test_batches, report["formats"]["onnxruntime"]["test_accuracy"],
                              serving, gate)
        report["int8"] = result
        write_json_atomic(out_dir / "parity.json", report)
        print(format_table(result))
        if result["passed"]:
            pending.replace(out_dir / INT8_FILE)
    finally:
        pending.unlink(missing_ok=True)
    if not result["passed"]:
        (out_dir / INT8_FILE).unlink(missing_ok=True)
        stale = archive.is_file()
        archive.unlink(missing_ok=True)
        print(f"int8: no archive{' (removed the earlier one)' if stale else ''}: {result['why_not']}")
        return None
    release = release_record(out_dir, INT8_FILE, "onnxruntime", list(pngs), result["passed"], result["test_accuracy"])
    built = build_archive(f"{name}{ARCHIVE_SUFFIX}", out_dir / INT8_FILE, out_dir / "spec.json", "onnxruntime",
                          model_store, serving, version, release)
    print(f"wrote {built} ({built.stat().st_size / 1e6:.1f} MB, onnxruntime int8)")
    return built
