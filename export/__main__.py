"""Export a trained model: `python -m export --name NAME` (or `make export`).

Loads artifacts/NAME/checkpoint.pt (checked against spec.json), writes model.torchscript.pt and
model.onnx, proves they match the eager model on the real test images (parity.json), and only
then packs model_store/NAME.mar (ONNX Runtime) and model_store/NAME-torchscript.mar. It also
writes a statically quantized INT8 ONNX model, calibrated on training images, and packs
model_store/NAME-int8.mar only when that passes its own gate (accuracy within 0.5 points of
FP32, >= 1.5x FP32's throughput; export/quantize.py); if not, it says why in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.archive import ServingConfig
from training.errors import UserError

D = ServingConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist", help="the trained model's name (%(default)s)")
    p.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"), help="(%(default)s)")
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="(%(default)s)")
    serving = p.add_argument_group("serving settings written into each archive's model-config.yaml")
    serving.add_argument("--workers", type=int, default=D.workers, help="TorchServe workers per model (%(default)s)")
    serving.add_argument("--batch-size", type=int, default=D.batch_size,
                         help="dynamic batching: requests per forward pass at most (%(default)s)")
    serving.add_argument("--max-batch-delay", type=int, default=D.max_batch_delay_ms,
                         help="ms a batch waits to fill (%(default)s)")
    serving.add_argument("--response-timeout", type=int, default=D.response_timeout_s, help="s (%(default)s)")
    serving.add_argument("--max-pixels", type=int, default=D.max_pixels,
                         help="larger images are refused with 413 before decoding (%(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from export.run import ExportConfig, export  # heavy imports after --help

        serving = ServingConfig(args.workers, args.batch_size, args.max_batch_delay, args.response_timeout,
                                args.max_pixels)
        export(ExportConfig(args.name, args.artifacts_dir, args.model_store, serving))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was archived; earlier archives are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
