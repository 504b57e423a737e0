"""The storage layout of KServe's TorchServe runtime, written from the kit's archives:

  kserve-store/config/config.properties    TorchServe's settings for that runtime (see `config_properties`)
  kserve-store/model-store/NAME.mar        the archives, as `make export` packed them

Copy the folder to where the cluster reads models (S3, GCS, a PVC) and point storageUri of
deploy/kserve/torchserve.yaml at it. By default only the TorchScript archives go in: the runtime's
stock image (pytorch/torchserve-kfs) has torch but no ONNX Runtime.

Run: make kserve-store [KSERVE_STORE=kserve-store] [KSERVE_BACKENDS=torchscript]
     python -m export.kserve_store --model-store model_store --out kserve-store --backends torchscript
Written in a scratch folder beside --out and renamed into place: an interrupted run leaves the
previous store as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from handlers.archive import read_archive
from handlers.store import served
from training.errors import UserError

BACKENDS = ("onnxruntime", "torchscript")
MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's contents

# The runtime's image runs TorchServe with this file and, in front of it on port 8080, KServe's wrapper
# (a KServe ModelServer) that forwards /v2/models/<name>/infer to port 8085 and reads readiness from
# the management API there, as KServe's own samples set up.
CONFIG = """\
# Written by `make kserve-store` for KServe's TorchServe runtime (deploy/kserve/torchserve.yaml).
inference_address=http://0.0.0.0:8085
management_address=http://0.0.0.0:8085
metrics_address=http://0.0.0.0:8082
grpc_inference_port=7070
grpc_management_port=7071
enable_metrics_api=true
metrics_mode=prometheus
# The runtime sets TS_SERVICE_ENVELOPE=kservev2 for protocol v2, which TorchServe applies only with
# enable_envvars_config=true: that envelope hands a handler pre-parsed inputs of one request per batch.
# Off, the kit's handler reads the Open Inference Protocol itself, as on `make serve`.
enable_envvars_config=false
# KServe's wrapper calls TorchServe without a token; TorchServe listens inside the pod only.
disable_token_authorization=true
enable_model_api=false
install_py_dep_per_model=false
number_of_netty_threads=4
job_queue_size=256
max_request_size=10485760
max_response_size=1048576
default_response_timeout=30
model_store={model_store}
model_snapshot={snapshot}
"""


def config_properties(archives: list[Path], model_store: str = f"{MOUNT}/model-store") -> str:
    """TorchServe's config for the runtime: the archives' own worker and batching settings in the
    model_snapshot, which both TorchServe (what to load) and KServe's wrapper (what to serve) read."""
    models = {}
    for path in archives:
        archive = read_archive(path)
        name, version, config = archive.name, archive.version, archive.model_config
        defaults = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120}
        models[name] = {version: {"defaultVersion": True, "marName": path.name,
                                  **{key: config.get(key, value) for key, value in defaults.items()}}}
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    return CONFIG.format(model_store=model_store, snapshot=json.dumps(snapshot, separators=(",", ":")))


def select(model_store: Path, backends: tuple[str, ...]) -> list[Path]:
    chosen = [path for path in served(model_store).values()  # the live version of each name
              if read_archive(path).settings.backend in backends]
    if not chosen:
        raise UserError(f"no archive in {model_store}/ uses {' or '.join(backends)}: run make train export first")
    return chosen


def write_store(model_store: Path, out: Path, backends: tuple[str, ...]) -> list[Path]:
    """Writes `out` (config/config.properties, model-store/*.mar) atomically; returns the archives."""
    archives = select(model_store, backends)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        (scratch / "config").mkdir()
        (scratch / "model-store").mkdir()
        (scratch / "config" / "config.properties").write_text(config_properties(archives))
        for path in archives:
            shutil.copy2(path, scratch / "model-store" / path.name)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}-old-{os.getpid()}"
            os.replace(out, old)
        os.replace(scratch, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return archives


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.kserve_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="the kit's archives (%(default)s)")
    p.add_argument("--out", type=Path, default=Path("kserve-store"), help="the folder to write (%(default)s)")
    p.add_argument("--backends", default="torchscript",
                   help=f"comma-separated, of {', '.join(BACKENDS)}: the archives to include (%(default)s)")
    args = p.parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    try:
        unknown = set(backends) - set(BACKENDS)
        if unknown or not backends:
            raise UserError(f"--backends takes {' and/or '.join(BACKENDS)}, not {args.backends!r}")
        archives = write_store(args.model_store, args.out, backends)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/: config/config.properties, model-store/ with {', '.join(a.name for a in archives)}")
    print(f"upload it, then set storageUri in deploy/kserve/torchserve.yaml to where it lies (mounted at {MOUNT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
