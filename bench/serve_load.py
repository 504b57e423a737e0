"""HTTP load benchmark against a native TorchServe (issue: serving). Prints, from one run,

requests/s, p50/p99 latency and errors at concurrency 1, 8 and 32 for
  /ping                                  the server's own ceiling,
  /predictions/NAME                      the kit's ONNX Runtime archive,
  /predictions/NAME-torchscript          the kit's TorchScript archive,
  /predictions/NAME-baseline             the same model behind a handler written the way
                                         TorchServe's MNIST example is (bench/baseline/),
  /v2/models/NAME/infer                  the Open Inference Protocol (binary tensor extension) on
                                         TorchServe, and on KServe's ModelServer (make serve-kserve)
                                         with 2 REST processes (binary, JSON, and binary with 16 images
                                         per request) and with 1 (binary) (bench/oip_engines.py),
each backend's ratio to the baseline, and served images/s as a fraction of in-process ONNX
Runtime throughput at the served batch size (the limit for this model on this machine).

Needs `make train export` first (artifacts/NAME, model_store/NAME*.mar) and wrk (Debian package).
Run: make bench-serve   (about 5 minutes; every wrk run is bounded by --seconds)
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
from oip_engines import Target, oip_target, start_kserve  # noqa: E402

from export.archive import ARCHIVER  # noqa: E402
from export.parity import onnxruntime_runner  # noqa: E402
from export.run import load_run_data  # noqa: E402
from training.checkpoint import CHECKPOINT_FORMAT, load_torch_file  # noqa: E402
from training.loop import normalize, per_channel  # noqa: E402
from training.models import architecture, conv_bn  # noqa: E402

CONCURRENCY = (1, 8, 32)
LUA = """
local f = io.open(os.getenv("WRK_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local n = os.getenv("WRK_JSON_LENGTH"); if n ~= "" then wrk.headers["Inference-Header-Content-Length"] = n end
"""


def baseline_archive(out_dir: Path, store: Path, name: str) -> None:
    """Packs the trained model as TorchServe's MNIST example would: model file + state_dict."""
    spec = json.loads((out_dir / "spec.json").read_text())
    model_class = architecture(spec["arch"])
    if not inspect.isclass(model_class):
        raise SystemExit(f"the baseline handler serves class-based models (mlp, simple-cnn, cnn), not {spec['arch']}")
    defaults = tuple(tuple(v) if isinstance(v, list) else v
                     for v in (spec["arch_args"][p] for p in inspect.signature(model_class).parameters))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(conv_bn) + "\n\n"
        source += inspect.getsource(model_class) + "\n\n# BaseHandler builds the class without arguments.\n"
        source += f"{model_class.__name__}.__init__.__defaults__ = {defaults!r}\n"
        (scratch / "model.py").write_text(source)
        state = load_torch_file(out_dir / "checkpoint.pt", CHECKPOINT_FORMAT, "train again")
        torch.save(state["state_dict"], scratch / "state_dict.pt")
        (scratch / "model-config.yaml").write_text(yaml.safe_dump(
            {"minWorkers": 2, "maxWorkers": 2, "batchSize": 1, "maxBatchDelay": 0, "responseTimeout": 30}))
        (scratch / "tmp").mkdir()
        subprocess.run([ARCHIVER, "--model-name", name, "--version", "1.0", "--model-file", str(scratch / "model.py"),
                        "--serialized-file", str(scratch / "state_dict.pt"),
                        "--handler", str(ROOT / "bench" / "baseline" / "example_style_handler.py"),
                        "--extra-files", str(out_dir / "spec.json"),
                        "--config-file", str(scratch / "model-config.yaml"),
                        "--export-path", str(store), "--force"],
                       check=True, env={"TMPDIR": str(scratch / "tmp"), "PATH": "/usr/bin:/bin"})


def parse_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:  # wrk prints e.g. "-nan" when no request finished
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(target: Target, concurrency: int, seconds: int, script: Path) -> dict:
    command = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if target.body is not None:
        command += ["-s", str(script)]
    env = {"WRK_BODY": str(target.body or ""), "WRK_CONTENT_TYPE": target.content_type, "PATH": "/usr/bin:/bin",
           "WRK_JSON_LENGTH": target.headers.get("Inference-Header-Content-Length", "")}
    output = subprocess.run(command + [target.url], capture_output=True, text=True, check=True, env=env).stdout
    if "Latency Distribution" not in output:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        # anchored at line starts: "+/- Stdev" columns also end in "%"
        "p50_ms": parse_duration_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1)),
        "p99_ms": parse_duration_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1)),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
                  + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


def model_config_batch(archive: Path) -> int:
    return int(yaml.safe_load(subprocess.run(["unzip", "-p", str(archive), "model-config.yaml"], capture_output=True,
                                             text=True, check=True).stdout)["batchSize"])


def in_process_onnxruntime(model_file: Path, image: np.ndarray, batch_size: int, seconds: float = 5) -> float:
    """Images/s of ONNX Runtime on all cores at the served batch size: the ceiling for serving."""
    run = onnxruntime_runner(model_file)
    batch = np.repeat(image[None], batch_size, axis=0)
    for _ in range(20):
        run(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(batch)
        count += batch_size
    return count / (time.perf_counter() - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--seconds", type=int, default=6, help="duration of each wrk run, whole seconds (%(default)s)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed: apt-get install wrk (make bench-serve does this)")
    out_dir, store_dir = ROOT / "artifacts" / args.name, ROOT / "model_store"
    archives = [store_dir / f"{args.name}.mar", store_dir / f"{args.name}-torchscript.mar"]
    if not all(a.is_file() for a in archives) or not (out_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")

    spec = json.loads((out_dir / "spec.json").read_text())
    image_path = Path(tempfile.mkdtemp()) / "test-image.png"
    test = load_run_data(out_dir)[0].test  # the run's own test split
    Image.fromarray(test.images[0].permute(1, 2, 0).squeeze(-1).numpy()).save(image_path)
    normalized = normalize(test.images[:1], per_channel(spec["mean"]), per_channel(spec["std"]))[0].numpy()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        for archive in archives:
            shutil.copy(archive, store)
        baseline = f"{args.name}-baseline"
        baseline_archive(out_dir, store, baseline)
        script = scratch / "post.lua"
        script.write_text(LUA)
        server = harness.start(store, scratch / "ts", [args.name, f"{args.name}-torchscript", baseline])
        predictions = f"{server.inference}/predictions/"
        targets = [Target("/ping", f"{server.inference}/ping"),
                   Target(f"{args.name} (onnxruntime)", predictions + args.name, image_path),
                   Target(f"{args.name}-torchscript", f"{predictions}{args.name}-torchscript", image_path),
                   Target(f"{baseline} (example style)", predictions + baseline, image_path),
                   oip_target("torchserve OIP binary", f"{server.inference}/v2/models/{args.name}/infer",
                              image_path.read_bytes(), 1, True, scratch)]
        stops = []
        try:
            for workers in (2, 1):  # as make serve-kserve runs it; as KServe does by default (one pod, 1 CPU)
                kserve_targets, stop = start_kserve(args.name, archives, image_path.read_bytes(), scratch,
                                                    model_config_batch(archives[0]), workers)
                stops.append(stop)
                targets += kserve_targets
            results = {}
            for target in targets:
                wrk(target, 8, 1, script)  # warm-up
                for concurrency in CONCURRENCY:
                    results[target.label, concurrency] = wrk(target, concurrency, args.seconds, script)
        finally:
            server.stop()
            for stop in stops:
                stop()
        served_config = yaml.safe_load(subprocess.run(["unzip", "-p", str(archives[0]), "model-config.yaml"],
                                                      capture_output=True, text=True, check=True).stdout)
        images = {target.label: target.images for target in targets}
        ceiling = in_process_onnxruntime(out_dir / "model.onnx", normalized, served_config["batchSize"])

    print(f"machine: {torch.get_num_threads()} cores, model {spec['arch']} {spec['input']}, "
          f"served batchSize {served_config['batchSize']}, maxBatchDelay {served_config['maxBatchDelay']} ms, "
          f"wrk {args.seconds:g} s per row")
    print(f"{'target':<34}{'conc':>5}{'req/s':>10}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'x baseline':>12}{'of ceiling':>12}")
    for (label, concurrency), row in results.items():
        base = results[(targets[3].label, concurrency)]["requests_per_second"]
        rate = row["requests_per_second"] * images[label]  # images/s
        ratio = f"{rate / base:.1f}x" if label != targets[0].label else ""
        share = f"{rate / ceiling:.0%}" if label != targets[0].label else ""
        print(f"{label:<34}{concurrency:>5}{row['requests_per_second']:>10.0f}{rate:>8.0f}{row['p50_ms']:>9.2f}"
              f"{row['p99_ms']:>9.2f}{row['errors']:>8}{ratio:>12}{share:>12}")
    print(f"in-process ONNX Runtime at batch {served_config['batchSize']} (the ceiling): {ceiling:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
