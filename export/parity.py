"""The parity gate: eager vs TorchScript vs ONNX Runtime on real held-out test images.

Each exported file is loaded back from disk (what will be served, not the in-memory object) and
compared with the eager model logit by logit: on real test images at several batch sizes (1, the
served batch size, odd sizes), on edge images a client can send (black, white, noise), and on
every image of the test split, whose accuracy it also scores. A model whose exported form
diverges only for some inputs or batch sizes shows it there.
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


def compare(reference: np.ndarray, candidate: np.ndarray, tolerances: Tolerances,
            require_agreement: bool = True) -> dict:
    """Logits side by side. Over a whole test split two forms within tolerance may still flip the
    top-1 of a near tie, so there agreement is reported, not required."""
    difference = np.abs(candidate.astype(np.float64) - reference)
    allowed = tolerances.logit_abs + tolerances.logit_rel * np.abs(reference)
    probability_difference = float(np.abs(softmax(candidate) - softmax(reference)).max())
    agreement = float((candidate.argmax(1) == reference.argmax(1)).mean())
    return {
        "images": len(reference),
        "max_abs_diff": float(difference.max()),
        "max_probability_diff": probability_difference,
        "top1_agreement": agreement,
        "passed": bool((difference <= allowed).all() and probability_difference <= tolerances.probability
                       and (agreement == 1.0 or not require_agreement)),
    }


def run_gate(runners: dict[str, Runner], sample: np.ndarray, edge: np.ndarray, test_batches: Callable[[], Iterable],
             batch_sizes: tuple[int, ...] = BATCH_SIZES, tolerances: Tolerances = Tolerances()) -> dict:
    """`runners` holds "eager" and the formats; `sample` real normalized test images (at least the
    largest batch size), `edge` normalized edge images, `test_batches()` the whole test split."""
    eager = runners["eager"]
    labels = np.concatenate([batch_labels for _, batch_labels in test_batches()])
    eager_logits = np.concatenate([eager(images) for images, _ in test_batches()])
    eager_accuracy = float((eager_logits.argmax(1) == labels).mean())
    report = {"tolerances": asdict(tolerances), "batch_sizes": list(batch_sizes), "test_images": len(labels),
              "eager_test_accuracy": eager_accuracy, "formats": {}}
    for name, runner in runners.items():
        if name == "eager":
            continue
        checks = {str(size): compare(eager(sample[:size]), runner(sample[:size]), tolerances) for size in batch_sizes}
        checks["edge"] = compare(eager(edge), runner(edge), tolerances)
        logits = np.concatenate([runner(images) for images, _ in test_batches()])
        checks["test split"] = compare(eager_logits, logits, tolerances, require_agreement=False)
        format_accuracy = float((logits.argmax(1) == labels).mean())
        accuracy_difference = abs(format_accuracy - eager_accuracy) * 100
        report["formats"][name] = {
            "batches": checks,
            "test_accuracy": format_accuracy,
            "accuracy_diff_points": accuracy_difference,
            "passed": all(c["passed"] for c in checks.values()) and accuracy_difference <= tolerances.accuracy_points,
        }
    report["passed"] = all(f["passed"] for f in report["formats"].values())
    return report


def format_table(report: dict) -> str:
    lines = [f"{'format':<13}{'inputs':>11}{'images':>7}{'max|Δlogit|':>13}{'max|Δprob|':>12}{'top-1 agree':>13}  pass"]
    for name, result in report["formats"].items():
        for inputs, row in result["batches"].items():
            label = inputs if not inputs.isdigit() else f"batch {inputs}"
            lines.append(f"{name:<13}{label:>11}{row['images']:>7}{row['max_abs_diff']:>13.2e}"
                         f"{row['max_probability_diff']:>12.2e}{row['top1_agreement']:>12.2%}  "
                         f"{'yes' if row['passed'] else 'NO'}")
    accuracies = [f"eager {report['eager_test_accuracy']:.4%}"] + [
        f"{name} {result['test_accuracy']:.4%}" for name, result in report["formats"].items()]
    lines.append("test accuracy: " + ", ".join(accuracies))
    lines.append("parity gate: " + ("passed" if report["passed"] else "FAILED"))
    return "\n".join(lines)
