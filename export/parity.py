"""The parity gate: eager vs TorchScript vs ONNX Runtime on real held-out test images.

Each exported file is loaded back from disk (what will be served, not the in-memory object)
and compared with the eager model at several batch sizes, then scored on the whole test split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from handlers.pipeline import softmax  # the probabilities the served model answers with

BATCH_SIZES = (1, 2, 7, 64)
Runner = Callable[[np.ndarray], np.ndarray]  # float32 (N, C, H, W) -> logits (N, classes)


@dataclass(frozen=True)
class Tolerances:
    logit_abs: float = 1e-4  # |Δ logit| <= logit_abs + logit_rel * |eager logit|
    logit_rel: float = 1e-3
    probability: float = 1e-5  # max |Δ softmax probability|
    accuracy_points: float = 0.01  # test accuracy within this many percentage points of eager's


def eager_runner(model: torch.nn.Module) -> Runner:
    """Any torch module on the CPU (the eager model, or a loaded TorchScript module)."""
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()
    return run


def torchscript_runner(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still supported
        return eager_runner(torch.jit.load(str(path), map_location="cpu").eval())


def onnxruntime_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {session.get_inputs()[0].name: batch})[0]


def compare(reference: np.ndarray, candidate: np.ndarray, tolerances: Tolerances) -> dict:
    difference = np.abs(candidate.astype(np.float64) - reference)
    allowed = tolerances.logit_abs + tolerances.logit_rel * np.abs(reference)
    probability_difference = float(np.abs(softmax(candidate) - softmax(reference)).max())
    agreement = float((candidate.argmax(1) == reference.argmax(1)).mean())
    return {
        "max_abs_diff": float(difference.max()),
        "max_probability_diff": probability_difference,
        "top1_agreement": agreement,
        "passed": bool((difference <= allowed).all() and probability_difference <= tolerances.probability
                       and agreement == 1.0),
    }


def accuracy(runner: Runner, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    correct = total = 0
    for images, labels in batches:
        correct += int((runner(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def run_gate(runners: dict[str, Runner], sample: np.ndarray, test_batches: Callable[[], Iterable],
             tolerances: Tolerances = Tolerances()) -> dict:
    """`runners` holds "eager" and the formats; `sample` >= 64 real normalized test images."""
    eager = runners["eager"]
    eager_accuracy = accuracy(eager, test_batches())
    report = {"tolerances": asdict(tolerances), "batch_sizes": list(BATCH_SIZES),
              "eager_test_accuracy": eager_accuracy, "formats": {}}
    for name, runner in runners.items():
        if name == "eager":
            continue
        batches = {str(size): compare(eager(sample[:size]), runner(sample[:size]), tolerances)
                   for size in BATCH_SIZES}
        format_accuracy = accuracy(runner, test_batches())
        accuracy_difference = abs(format_accuracy - eager_accuracy) * 100
        report["formats"][name] = {
            "batches": batches,
            "test_accuracy": format_accuracy,
            "accuracy_diff_points": accuracy_difference,
            "passed": all(b["passed"] for b in batches.values())
                      and accuracy_difference <= tolerances.accuracy_points,
        }
    report["passed"] = all(f["passed"] for f in report["formats"].values())
    return report


def format_table(report: dict) -> str:
    lines = [f"{'format':<13}{'batch':>6}{'max|Δlogit|':>13}{'max|Δprob|':>12}{'top-1 agree':>13}  pass"]
    for name, result in report["formats"].items():
        for size, row in result["batches"].items():
            lines.append(f"{name:<13}{size:>6}{row['max_abs_diff']:>13.2e}{row['max_probability_diff']:>12.2e}"
                         f"{row['top1_agreement']:>12.2%}  {'yes' if row['passed'] else 'NO'}")
    accuracies = [f"eager {report['eager_test_accuracy']:.4%}"] + [
        f"{name} {result['test_accuracy']:.4%}" for name, result in report["formats"].items()]
    lines.append("test accuracy: " + ", ".join(accuracies))
    lines.append("parity gate: " + ("passed" if report["passed"] else "FAILED"))
    return "\n".join(lines)
