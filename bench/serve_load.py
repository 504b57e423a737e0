"""HTTP load benchmark against a native TorchServe (issues: serving, serving at the engine's limit).

One TorchServe serves, side by side:
  NAME-noop                              TorchServe's own ceiling: a handler that does no work
                                         (bench/baseline/noop_handler.py), archived with exactly
                                         the kit archive's model-config.yaml,
  NAME                                   the kit's ONNX Runtime archive (the default),
  NAME-int8                              the kit's INT8 ONNX Runtime archive, where export wrote one,
  NAME-torchscript                       the kit's TorchScript archive,
  NAME-baseline                          the same model behind a handler written the way
                                         TorchServe's MNIST example is (bench/baseline/),
  /ping                                  the frontend alone,
  /v2/models/NAME/infer                  the Open Inference Protocol (binary tensor extension) on the
                                         same TorchServe (key oip),
and, beside it, KServe's ModelServer (make serve-kserve, bench/oip_engines.py) with 2 REST processes
(key kserve: binary, JSON, and binary with 16 images per request) and with 1 (key kserve1: binary);
wrk loads each at 1, 8 and 32 concurrent clients in alternating rounds (every round runs every
target, the order reversed each round; figures are medians over rounds). It prints requests/s,
p50/p99 latency and errors, each archive's ratio to the no-op ceiling and to the example-style
baseline, the kit/no-op ratio at 1, 8 and 32 clients with the median latency the kit adds at 1
client (targets: >= 0.85x at 32 clients, <= 0.5 ms at 1 client), and served images/s as a fraction
of in-process ONNX Runtime throughput at the served batch size.

Needs `make train export` first (artifacts/NAME, model_store/NAME*.mar) and wrk (Debian package).
Run: make bench-serve   (about 12 minutes with the defaults; every wrk run is bounded by --seconds)
"""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
import oip_engines  # noqa: E402

from export.archive import ARCHIVER  # noqa: E402
from export.data import load_run_data  # noqa: E402
from export.parity import onnxruntime_runner  # noqa: E402
from handlers.archive import MODEL_CONFIG, read_archive  # noqa: E402
from handlers.spec import Spec  # noqa: E402
from handlers.store import served as live_archives  # noqa: E402
from training.checkpoint import CHECKPOINT_FORMAT, load_torch_file  # noqa: E402
from training.loop import normalize, per_channel  # noqa: E402
from training.models import architecture, conv_bn, conv_pool_bn  # noqa: E402
from training.samples import save_png  # noqa: E402

CONCURRENCY = (1, 8, 32)
TARGET_RATIO_AT_32 = 0.85  # kit / no-op requests/s at 32 clients
TARGET_ADDED_MS_AT_1 = 0.5  # kit - no-op median latency at 1 client
LUA = """
local f = io.open(os.getenv("WRK_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local n = os.getenv("WRK_JSON_LENGTH"); if n ~= "" then wrk.headers["Inference-Header-Content-Length"] = n end
"""


@dataclass(frozen=True)
class Target:
    key: str  # what --targets names
    label: str
    url: str  # full URL
    body: Path | None = None  # None: GET
    content_type: str = "image/png"
    headers: dict = field(default_factory=dict)  # the binary tensor extension's Inference-Header-Content-Length
    images: int = 1  # per request


def archive(name: str, handler: Path, config: Path, store: Path, scratch: Path, *extra: str) -> None:
    (scratch / "tmp").mkdir(exist_ok=True)
    subprocess.run([ARCHIVER, "--model-name", name, "--version", "1.0", "--handler", str(handler),
                    "--config-file", str(config), "--export-path", str(store), "--force", *extra],
                   check=True, env={"TMPDIR": str(scratch / "tmp"), "PATH": "/usr/bin:/bin"})


def noop_archive(kit_archive: Path, store: Path, name: str) -> None:
    """The no-op handler with the kit archive's model-config.yaml, byte for byte."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / MODEL_CONFIG).write_bytes(read_archive(kit_archive).read(MODEL_CONFIG))
        archive(name, ROOT / "bench" / "baseline" / "noop_handler.py", scratch / MODEL_CONFIG, store, scratch)


def baseline_archive(out_dir: Path, store: Path, name: str) -> None:
    """Packs the trained model as TorchServe's MNIST example would: model file + state_dict."""
    spec = Spec.read(out_dir / "spec.json")
    model_class = architecture(spec.arch)
    if not inspect.isclass(model_class):
        raise SystemExit(f"the baseline handler serves the registry's class-based models, not {spec.arch}")
    defaults = tuple(tuple(v) if isinstance(v, list) else v
                     for v in (spec.arch_args[p] for p in inspect.signature(model_class).parameters))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = "import torch\nfrom torch import nn\n\n\n" + "\n\n".join(  # the layer helpers the models use
            inspect.getsource(helper) for helper in (conv_bn, conv_pool_bn)) + "\n\n"
        source += inspect.getsource(model_class) + "\n\n# BaseHandler builds the class without arguments.\n"
        source += f"{model_class.__name__}.__init__.__defaults__ = {defaults!r}\n"
        (scratch / "model.py").write_text(source)
        state = load_torch_file(out_dir / "checkpoint.pt", CHECKPOINT_FORMAT, "train again")
        torch.save(state["state_dict"], scratch / "state_dict.pt")
        (scratch / "model-config.yaml").write_text(yaml.safe_dump(
            {"minWorkers": 2, "maxWorkers": 2, "batchSize": 1, "maxBatchDelay": 0, "responseTimeout": 30}))
        archive(name, ROOT / "bench" / "baseline" / "example_style_handler.py", scratch / "model-config.yaml",
                store, scratch, "--model-file", str(scratch / "model.py"),
                "--serialized-file", str(scratch / "state_dict.pt"), "--extra-files", str(out_dir / "spec.json"))


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
    output = subprocess.run(command + [target.url], capture_output=True, text=True, check=True,
                            env={"WRK_BODY": str(target.body or ""), "WRK_CONTENT_TYPE": target.content_type,
                                 "WRK_JSON_LENGTH": target.headers.get("Inference-Header-Content-Length", ""),
                                 "PATH": "/usr/bin:/bin"}).stdout
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


def oip_target(key: str, label: str, url: str, image: bytes, count: int, binary: bool, folder: Path) -> Target:
    body, headers, content_type = oip_engines.oip_body(image, count, binary, folder)
    return Target(key, label, url, body, content_type, headers, count)


def other_engines(name: str, image_path: Path, scratch: Path, archives: list[Path], batch: int) -> list:
    """Serving engines of the kit other than TorchServe, as (key, start) pairs; `start()` returns
    (targets, stop). KServe's ModelServer with 2 REST processes (as make serve-kserve runs it: binary,
    JSON, and `batch` images per request) and with 1 (KServe's default: binary)."""
    image = image_path.read_bytes()

    def kserve(key: str, workers: int):
        def start():
            url, stop = oip_engines.start_kserve(name, archives, scratch, workers)
            label = f"kserve {workers} proc OIP"
            targets = [oip_target(key, f"{label} binary", url, image, 1, True, scratch / f"kserve-{workers}")]
            if workers > 1:
                targets += [oip_target(key, f"{label} JSON", url, image, 1, False, scratch / f"kserve-{workers}"),
                            oip_target(key, f"{label} bin {batch} img/req", url, image, batch, True,
                                       scratch / f"kserve-{workers}")]
            return targets, stop
        return start

    return [("kserve", kserve("kserve", 2)), ("kserve1", kserve("kserve1", 1))]


def median_rows(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--seconds", type=int, default=5, help="duration of each wrk run, whole seconds (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians (%(default)s)")
    p.add_argument("--targets", default="all",
                   help="comma-separated subset of noop,kit,int8,torchscript,baseline,ping,oip,kserve,kserve1 "
                        "(noop and kit always run) (%(default)s)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed: apt-get install wrk (make bench-serve does this)")
    wanted = None if args.targets == "all" else set(args.targets.split(",")) | {"noop", "kit"}
    out_dir, store_dir = ROOT / "artifacts" / args.name, ROOT / "model_store"
    live = live_archives(store_dir)  # the live version of each name, as make serve serves it
    kit_archive = live.get(args.name, store_dir / f"{args.name}.mar")
    if not kit_archive.is_file() or not (out_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")
    spec = Spec.read(out_dir / "spec.json")
    test = load_run_data(out_dir)[0].test  # the run's own test split
    normalized = normalize(test.images[:1], per_channel(spec.mean), per_channel(spec.std))[0].numpy()
    served_config = read_archive(kit_archive).model_config

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        image_path = scratch / "test-image.png"
        save_png(test.images[0], image_path)
        store = scratch / "store"
        store.mkdir()
        names = {"noop": f"{args.name}-noop", "kit": args.name, "int8": f"{args.name}-int8",
                 "torchscript": f"{args.name}-torchscript", "baseline": f"{args.name}-baseline"}
        labels = {"noop": f"{names['noop']} (no work)", "kit": f"{args.name} (onnxruntime)",
                  "baseline": f"{names['baseline']} (example style)"}
        served = [key for key in names if wanted is None or key in wanted]
        for key in served:
            if key == "noop":
                noop_archive(kit_archive, store, names[key])
            elif key == "baseline":
                baseline_archive(out_dir, store, names[key])
            elif names[key] in live:
                shutil.copy(live[names[key]], store)
            else:
                print(f"note: no {store_dir / names[key]}.mar, so no {key} row (make export writes it)")
        served = [key for key in served if names[key] in live_archives(store)]
        script = scratch / "post.lua"
        script.write_text(LUA)
        server = harness.start(store, scratch / "ts", [names[key] for key in served])
        targets = [Target(key, labels.get(key, names[key]), f"{server.inference}/predictions/{names[key]}", image_path)
                   for key in served]
        if wanted is None or "ping" in wanted:
            targets.append(Target("ping", "/ping", server.inference + "/ping"))
        if wanted is None or "oip" in wanted:
            targets.append(oip_target("oip", "torchserve OIP binary", f"{server.inference}/v2/models/{args.name}/infer",
                                      image_path.read_bytes(), 1, True, scratch))
        stops = []
        try:
            for key, start in other_engines(args.name, image_path, scratch, [kit_archive], served_config["batchSize"]):
                if wanted is None or key in wanted:
                    engine_targets, stop = start()
                    stops.append(stop)
                    targets += engine_targets
            for target in targets:
                wrk(target, 8, 1, script)  # warm-up
            runs: dict[tuple[str, int], list[dict]] = {}
            for round_index in range(args.rounds):
                order = targets if round_index % 2 == 0 else targets[::-1]
                for concurrency in CONCURRENCY:
                    for target in order:
                        runs.setdefault((target.label, concurrency), []).append(
                            wrk(target, concurrency, args.seconds, script))
        finally:
            server.stop()
            for stop in stops:
                stop()
    ceiling = in_process_onnxruntime(out_dir / "model.onnx", normalized, served_config["batchSize"])
    results = {key: median_rows(rows) for key, rows in runs.items()}
    print_report(results, runs, targets, spec, served_config, args, ceiling)
    return 0


def print_report(results, runs, targets, spec, served_config, args, ceiling) -> None:
    noop, kit = targets[0].label, targets[1].label
    baseline = next((t.label for t in targets if "example style" in t.label), None)
    size = "x".join(map(str, spec.input.size))
    print(f"machine: {torch.get_num_threads()} cores, model {spec.arch} {size}, served workers "
          f"{served_config['minWorkers']}, batchSize {served_config['batchSize']}, maxBatchDelay "
          f"{served_config['maxBatchDelay']} ms; wrk {args.seconds} s per run, median of {args.rounds} rounds")
    images = {target.label: target.images for target in targets}  # per request
    print(f"{'target':<34}{'conc':>5}{'req/s':>10}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'x no-op':>9}{'x baseline':>12}{'of ceiling':>12}")
    for (label, concurrency), row in results.items():
        is_model = label != "/ping"
        rate = row["requests_per_second"] * images[label]  # images/s
        versus_noop = f"{rate / results[noop, concurrency]['requests_per_second']:.2f}x" if is_model else ""
        versus_base = (f"{rate / results[baseline, concurrency]['requests_per_second']:.1f}x"
                       if is_model and baseline and (baseline, concurrency) in results else "")
        share = f"{rate / ceiling:.0%}" if is_model and label != noop else ""
        errors = sum(r["errors"] for r in runs[label, concurrency])
        print(f"{label:<34}{concurrency:>5}{row['requests_per_second']:>10.0f}{rate:>8.0f}{row['p50_ms']:>9.2f}"
              f"{row['p99_ms']:>9.2f}{errors:>8}{versus_noop:>9}{versus_base:>12}{share:>12}")
    print(f"in-process ONNX Runtime at batch {served_config['batchSize']} on all cores: {ceiling:.0f} images/s")
    if (kit, 1) in results and (noop, 1) in results:
        ratios = {c: results[kit, c]["requests_per_second"] / results[noop, c]["requests_per_second"]
                  for c in CONCURRENCY}
        rounds_at_32 = [k["requests_per_second"] / n["requests_per_second"]
                        for k, n in zip(runs[kit, 32], runs[noop, 32])]
        added = results[kit, 1]["p50_ms"] - results[noop, 1]["p50_ms"]
        print("kit / no-op requests/s: " + ", ".join(f"{ratios[c]:.2f}x at {c}" for c in CONCURRENCY)
              + f" (rounds at 32: {', '.join(f'{r:.2f}' for r in rounds_at_32)}); "
              f"target >= {TARGET_RATIO_AT_32}x at 32: {'met' if ratios[32] >= TARGET_RATIO_AT_32 else 'NOT met'}")
        print(f"median latency the kit adds at 1 client: {added:+.2f} ms ({results[kit, 1]['p50_ms']:.2f} vs "
              f"{results[noop, 1]['p50_ms']:.2f} ms); target <= {TARGET_ADDED_MS_AT_1} ms: "
              f"{'met' if added <= TARGET_ADDED_MS_AT_1 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
