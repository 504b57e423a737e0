"""The Open Inference Protocol in `make bench-serve` (bench/serve_load.py): request bodies, and the
KServe ModelServer started on free loopback ports with the kit's own archives.

Each body is one inference request that wrk repeats: the same test image (or N copies of it) as the
`image` input, in the binary tensor extension (what tritonclient sends by default: JSON, then each
image as a 4-byte little-endian length and its bytes, the JSON's length in a header) or in plain JSON
(base64 text).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import harness


def oip_body(image: bytes, count: int, binary: bool, folder: Path) -> tuple[Path, dict, str]:
    """An inference request carrying `count` copies of `image` as `image` BYTES [count]:
    (the body's file, its extra headers, its content type)."""
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


def start_kserve(name: str, archives: list[Path], scratch: Path, workers: int):
    """KServe's ModelServer with `workers` REST processes serving copies of `archives` (the kit's own,
    as make serve-kserve serves them): (its /v2/models/NAME/infer URL, stop)."""
    folder = scratch / f"kserve-{workers}"
    (folder / "store").mkdir(parents=True)
    for archive in archives:
        shutil.copy(archive, folder / "store")
    server = harness.start_kserve(folder / "store", folder, [name], extra_args=("--workers", str(workers)))
    return f"{server.http}/v2/models/{name}/infer", server.stop
