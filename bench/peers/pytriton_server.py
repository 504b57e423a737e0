"""Triton Inference Server through PyTriton with Triton's dynamic batching (`max_batch_size`,
`max_queue_delay_microseconds`): `workers` model instances (PyTriton binds one inference callable per
instance; they run in this one Python process), HTTP, gRPC and metrics on 127.0.0.1.

POST /v2/models/classifier/infer (the Open Inference Protocol): input `image` BYTES [1, 1], the image's
bytes in the binary tensor extension; the answer: output `answer` BYTES [1, 1], the kit's JSON text
(Triton has no per-request HTTP status inside a batch: a bad image's answer is its error JSON).
Run: python bench/peers/pytriton_server.py PORT (settings from the environment: classifier.Settings).
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig

# Triton's Python backend stub links libpython3.11: this interpreter's own, first.
os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
    filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")]))

import classifier  # noqa: E402
import numpy as np  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inference_callable(classify):
    @batch
    def infer(image: np.ndarray) -> dict:  # object array of bytes, (N, 1)
        answers = classify([bytes(row[0]) for row in image])
        return {"answer": np.array([[text.encode()] for _, text in answers], dtype=object)}
    return infer


def main(port: int) -> None:
    settings = classifier.Settings.from_environment()
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=free_port(),
                          metrics_address="127.0.0.1", metrics_port=free_port(), log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name="classifier",
                    infer_func=[inference_callable(classifier.load(settings)) for _ in range(settings.workers)],
                    inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="answer", dtype=bytes, shape=(1,))],
                    config=ModelConfig(max_batch_size=settings.max_batch, batcher=DynamicBatcher(
                        max_queue_delay_microseconds=round(settings.max_delay_ms * 1000))), strict=True)
        triton.serve()


if __name__ == "__main__":
    main(int(sys.argv[1]))
