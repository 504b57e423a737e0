"""Photo-sized serving benchmark: torchvision's ResNet-18 at 224x224 RGB, trained on a `folder:` of JPEG photos with
`--resize crop`, served through TorchServe against the same model in-process, in one run.

Steps (in --work, a temporary folder unless given; a given one keeps its photos, run and archives, so a
second run only measures):
  1. photos: 3 classes x --per-class (100) photo-like JPEGs of mixed sizes around 500x375 (bench/photo_folder.py)
  2. python -m training --model torchvision.models:resnet18 (the ImageNet layout, 1.8 GFLOPs at 224; the
     registry's resnet18 has a stem for small images) --image-size 224 --resize crop --augment crop+flip --epochs 1
  3. python -m export (parity gate on the run's own test split; archives with the kit's defaults)
  4. TorchServe (tests/harness.py) serves the ONNX Runtime archive; one test photo's answer is checked
     against the in-process model on the tensor training evaluated for that photo;
  5. wrk POSTs that JPEG at 1, 8 and 32 clients (bench/serve_load.py's wrk runner); right after each wrk
     run, in this process, ONNX Runtime runs the same model.onnx on all cores at the served batch size;
     then one image's forward pass on a worker's threads, and the served decoding (JPEG -> crop ->
     normalized tensor).
It prints requests/s and p50/p99 per concurrency beside the in-process images/s measured next to it,
and what the serving path costs: served / in-process throughput, and the latency it adds at 1 client
(served p50 minus decoding and forward pass).

Needs wrk (Debian package) and Java 17 (TorchServe). Run: make bench-photo  (SECONDS=5 per wrk run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
import photo_folder  # noqa: E402
import serve_load  # noqa: E402

from export.data import load_run_data  # noqa: E402
from export.parity import onnxruntime_runner  # noqa: E402
from handlers.archive import read_archive  # noqa: E402
from handlers.pipeline import (  # noqa: E402
    Classifier,
    image_pixels,
    normalized_batch,
    onnxruntime_backend,
    softmax,
    threads_per_worker,
)
from handlers.spec import Spec  # noqa: E402
from handlers.store import served as live_archives  # noqa: E402
from training.loop import normalize, per_channel  # noqa: E402

NAME = "photo-resnet18"
CLASSES = len(photo_folder.CLASSES)


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode:
        raise SystemExit(f"error: {' '.join(command[1:4])} ... failed (its message is above)")


def prepare(work: Path, per_class: int, train_args: list[str]) -> None:
    """Photos, a trained run and its archives in `work`, each made only where it is missing."""
    photos, artifacts, store = work / "photos", work / "artifacts", work / "store"
    if not photos.is_dir():
        photo_folder.write_folder(photos, per_class)
        print(f"wrote {per_class * len(photo_folder.CLASSES)} JPEG photos to {photos}/")
    python = str(ROOT / ".venv" / "bin" / "python")
    if not (artifacts / NAME / "checkpoint.pt").is_file():
        run([python, "-m", "training", "--dataset", f"folder:{photos}", "--name", NAME,
             "--model", "torchvision.models:resnet18", "--model-args", json.dumps({"num_classes": CLASSES}),
             "--image-size", "224", "--resize", "crop", "--augment", "crop+flip", "--epochs", "1",
             "--test-fraction", "0.25",  # at least 64 test photos: the parity gate's minimum
             "--batch-size", "32", "--lr", "0.02", "--artifacts-dir", str(artifacts), *train_args])
    if NAME not in live_archives(store):
        run([python, "-m", "export", "--name", NAME, "--artifacts-dir", str(artifacts), "--model-store", str(store)])


def in_process_rate(model_file: Path, image: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images/s of ONNX Runtime on all cores at `batch_size` (bench/serve_load.py's ceiling)."""
    return serve_load.in_process_onnxruntime(model_file, image, batch_size, seconds)


def in_process_latency_ms(model_file: Path, image: np.ndarray, threads: int, seconds: float) -> float:
    """Median ms of one image's forward pass, on a session set up as a served worker's (its threads)."""
    infer, _ = onnxruntime_backend(model_file, threads, None)
    for _ in range(5):
        infer(image[None])
    timings, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        infer(image[None])
        timings.append(time.perf_counter() - started)
    return 1e3 * statistics.median(timings)


def in_process_decoding(body: bytes, classifier: Classifier, seconds: float) -> float:
    """ms per image of the served pipeline's decoding (JPEG -> crop -> normalized tensor), on one core."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        normalized_batch([image_pixels(body, classifier)], classifier)
        count += 1
    return 1e3 * (time.perf_counter() - started) / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="keep photos, run and archives here (default: a temporary folder)")
    p.add_argument("--per-class", type=int, default=100, help="photos per class (%(default)s)")
    p.add_argument("--seconds", type=int, default=5, help="duration of each wrk run, whole seconds (%(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of 1/8/32 clients; figures are medians (%(default)s)")
    p.add_argument("--train-args", default="", help="more options for python -m training, e.g. '--workers 1'")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed: apt-get install wrk (make bench-photo does this)")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        prepare(work, args.per_class, args.train_args.split())
        measure(work, args, Path(scratch))
    return 0


def measure(work: Path, args, scratch: Path) -> None:
    out_dir, store = work / "artifacts" / NAME, work / "store"
    spec = Spec.read(out_dir / "spec.json")
    archive = live_archives(store)[NAME]
    served_config = read_archive(archive).model_config
    test = load_run_data(out_dir).data.test  # the run's own test split, decoded as training evaluated it
    photo, body = test.files[0], test.files[0].read_bytes()
    evaluated = normalize(test.images[:1], per_channel(spec.mean), per_channel(spec.std))[0].numpy()
    classifier = Classifier(spec, 24_000_000, onnxruntime_runner(out_dir / "model.onnx"), "cpu")
    assert np.array_equal(normalized_batch([image_pixels(body, classifier)], classifier)[0], evaluated), \
        "the served pipeline's tensor differs from the one training evaluated"
    expected = softmax(classifier.infer(evaluated[None]))[0]

    serving = scratch / "serving"
    (serving / "store").mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, serving / "store")
    script = serving / "post.lua"
    script.write_text(serve_load.LUA)
    (serving / "photo.jpg").write_bytes(body)
    server = harness.start(serving / "store", serving / "ts", [NAME])
    try:
        status, answer, _ = server.predict(NAME, body, "image/jpeg")
        assert status == 200, answer
        served = np.array([answer["probabilities"][name] for name in spec.class_names])
        difference = float(np.abs(served - expected).max())
        assert difference <= 1e-5, f"served probabilities differ from in-process by {difference}"
        target = serve_load.Target("kit", f"{NAME} (onnxruntime)", f"{server.inference}/predictions/{NAME}",
                                   serving / "photo.jpg", "image/jpeg")
        serve_load.wrk(target, 8, 1, script)  # warm-up
        runs: dict[int, list[dict]] = {}
        model_rates: dict[int, list[float]] = {}  # in-process, measured right after each wrk run
        for _ in range(args.rounds):
            for concurrency in serve_load.CONCURRENCY:
                runs.setdefault(concurrency, []).append(serve_load.wrk(target, concurrency, args.seconds, script))
                model_rates.setdefault(concurrency, []).append(in_process_rate(
                    out_dir / "model.onnx", evaluated, served_config["batchSize"], args.seconds / 2))
    finally:
        server.stop()
    threads = threads_per_worker(served_config["minWorkers"], 0)
    single_ms = in_process_latency_ms(out_dir / "model.onnx", evaluated, threads, args.seconds / 2)
    decode_ms = in_process_decoding(body, classifier, args.seconds / 2)
    results = {c: serve_load.median_rows(rows) for c, rows in runs.items()}
    rates = {c: statistics.median(values) for c, values in model_rates.items()}
    report(spec, served_config, args, photo, results, runs, rates, (threads, single_ms), decode_ms, difference)


def report(spec, served_config, args, photo, results, runs, rates, single, decode_ms, difference) -> None:
    import torch
    from PIL import Image

    size = "x".join(map(str, spec.input.size))
    width, height = Image.open(photo).size
    batch = served_config["batchSize"]
    print(f"machine: {torch.get_num_threads()} cores; {spec.arch} {size}, input fit {spec.input.fit} "
          f"{spec.input.crop_fraction}; served workers {served_config['minWorkers']}, batchSize {batch}, "
          f"maxBatchDelay {served_config['maxBatchDelay']} ms; body: a {width}x{height} JPEG of "
          f"{photo.stat().st_size:,} bytes; wrk {args.seconds} s per run, median of {args.rounds} round(s)")
    print(f"served answer = in-process model on the tensor training evaluated (max |dprob| {difference:.1e})")
    print(f"{'clients':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'in-process img/s':>18}{'served/in-process':>19}")
    for concurrency, row in results.items():
        errors = sum(r["errors"] for r in runs[concurrency])
        print(f"{concurrency:>7}{row['requests_per_second']:>9.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
              f"{errors:>8}{rates[concurrency]:>18.1f}{row['requests_per_second'] / rates[concurrency]:>18.2f}x")
    threads, single_ms = single
    print(f"in-process: ONNX Runtime on all cores at batch {batch}, measured right after each wrk run; one image's "
          f"forward pass on {threads} thread(s) (a worker's) {single_ms:.1f} ms; the served decoding "
          f"(JPEG -> crop -> tensor) {decode_ms:.1f} ms per image")
    top = max(results)
    share = results[top]["requests_per_second"] / rates[top]
    added = results[1]["p50_ms"] - single_ms - decode_ms
    print(json.dumps({f"served_over_in_process_at_{top}": round(share, 3), "added_ms_at_1": round(added, 2)}))
    print(f"the serving path: {share:.2f}x in-process throughput at {top} clients; at 1 client it adds "
          f"{added:.1f} ms to one image's {single_ms + decode_ms:.1f} ms (decoding + forward pass)")


if __name__ == "__main__":
    sys.exit(main())
