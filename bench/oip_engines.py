"""The Open Inference Protocol rows of `make bench-serve` (bench/serve_load.py): request bodies and the
KServe ModelServer started on free loopback ports with the kit's own archives.

Each target is one POST that wrk repeats: the same test image (or N of them in one request) as an
OIP request, in the binary tensor extension (what tritonclient sends by default) or in plain JSON
(base64 text), to KServe's /v2/models/NAME/infer, or to TorchServe's (the kit's handler parses it).
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import harness


@dataclass(frozen=True)
class Target:
    label: str
    url: str  # full URL; body None: GET
    body: Path | None = None
    content_type: str = "image/png"
    headers: dict = field(default_factory=dict)
    images: int = 1  # per request


def oip_body(image: bytes, count: int, binary: bool, folder: Path) -> tuple[Path, dict, str]:
    """An inference request carrying `count` copies of `image` as `image` BYTES [count]: (file, headers,
    content type). Binary: JSON, then each image as a 4-byte little-endian length and its bytes."""
    name = f"oip-{count}-{'binary' if binary else 'json'}.body"
    if binary:
        data = (len(image).to_bytes(4, "little") + image) * count
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                                         "parameters": {"binary_data_size": len(data)}}],
                             "parameters": {"binary_data_output": True}}).encode()
        (folder / name).write_bytes(header + data)
        return folder / name, {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"
    text = base64.b64encode(image).decode()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count], "data": [text] * count}]}
    (folder / name).write_text(json.dumps(request))
    return folder / name, {}, "application/json"


def oip_target(label: str, url: str, image: bytes, count: int, binary: bool, folder: Path) -> Target:
    body, headers, content_type = oip_body(image, count, binary, folder)
    return Target(label, url, body, content_type, headers, count)


def start_kserve(name: str, archives: list[Path], image: bytes, scratch: Path, batch: int, workers: int):
    """KServe's ModelServer with `workers` REST processes serving `archives` (the kit's own); returns
    (its targets, stop). With 2 processes: binary, JSON and `batch` images per request; with 1: binary."""
    folder = scratch / f"kserve-{workers}"
    (folder / "store").mkdir(parents=True)
    for archive in archives:
        shutil.copy(archive, folder / "store")
    server = harness.start_kserve(folder / "store", folder, [name], extra_args=("--workers", str(workers)))
    url = f"{server.http}/v2/models/{name}/infer"
    label = f"kserve {workers} proc OIP"
    targets = [oip_target(f"{label} binary", url, image, 1, True, folder)]
    if workers > 1:
        targets += [oip_target(f"{label} JSON", url, image, 1, False, folder),
                    oip_target(f"{label} bin {batch} img/req", url, image, batch, True, folder)]
    return targets, server.stop
