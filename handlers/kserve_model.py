"""The kit's archives as KServe Models: the adapter between KServe's ModelServer and the inference contract.

  make serve-kserve        HTTP on 127.0.0.1:8085, gRPC on 127.0.0.1:8086, 2 REST processes; Ctrl-C stops it
  python -m handlers.kserve_model --model_store model_store --http_port 8085 --grpc_port 8086
      [--workers N] [--host 0.0.0.0] [--log_requests true]     (and every option of KServe's: --help)

Every archive (.mar) of the model store is served: the live version of each name at
/v2/models/<name>/..., every version at /v2/models/<name>/versions/<version>/... (the store's
layout and what is live: handlers/store.py). Each is read exactly as TorchServe reads it
(handlers/archive.py) and answered by the same contract (handlers/contract.py) as TorchServe's
handler: `ArchivedClassifier` is the counterpart of torchserve_handler.py, and only translates
KServe's InferRequest into the contract's tensors and its outputs into an InferResponse. The server
around it (KServe's ModelServer with the kit's changes, the command line that
`python -m handlers.kserve_model` runs) is handlers/kserve_server.py.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

from handlers import contract, oip
from handlers.archive import BrokenArchive, read_archive
from handlers.batching import AdaptiveBatcher
from handlers.errors import ClientError, UserError
from handlers.pipeline import Classifier, load_classifier
from handlers.store import served, versions

# `import kserve` parses sys.argv with the ModelServer's own parser (kserve/model_server.py builds it at
# import time): hide this process's arguments from it, so importing this module never depends on them.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.logging import logger as log
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv


class ArchivedClassifier(kserve.Model):
    """One archive's classifier behind the Open Inference Protocol."""

    def __init__(self, name: str, version: str, archive: Path, workers: int = 1, threads: int = 0,
                 batch_images: int = 1, backend: str = "", classifier: Classifier | None = None):
        super().__init__(name)
        self.version, self.archive, self.workers, self.threads = version, archive, workers, threads
        self.batch_images = batch_images  # images per forward pass at most; 1: no batching
        self.backend, self.classifier = backend, classifier
        self.batcher: AdaptiveBatcher | None = None  # made in the process that serves, on its first request
        self.ready = classifier is not None

    def load(self) -> bool:
        if self.classifier is None:
            loaded = load_archive(self.archive, self.workers, self.threads, self.batch_images)
            self.backend, self.classifier = loaded.backend, loaded.classifier
        self.ready = True
        return self.ready

    def __reduce__(self):
        # KServe's --workers pickles the models into its REST processes, and an ONNX Runtime session does
        # not pickle: each process gets the archive's name and loads it (kserve_server.KitRESTServer.run) once it
        # answers KServe's liveness pings, which a load inside unpickling would hold up past their 5 s.
        return ArchivedClassifier, (self.name, self.version, self.archive, self.workers, self.threads,
                                    self.batch_images)

    def get_input_types(self) -> list[dict]:
        return oip.inputs_metadata(self.classifier.spec)

    def get_output_types(self) -> list[dict]:
        return oip.outputs_metadata(self.classifier.spec)

    def metadata(self) -> dict:
        return oip.model_metadata(self.name, self.version, self.classifier.spec, self.backend)

    async def predict(self, request: InferRequest, headers: dict | None = None) -> InferResponse:
        if not isinstance(request, InferRequest):  # KServe's v1 route: /v1/models/<name>:predict
            raise InvalidInput(f"this server speaks the Open Inference Protocol: POST /v2/models/{self.name}/infer")
        try:
            requested = [output.name for output in request.request_outputs] if request.request_outputs else None
            outputs = await self.outputs([tensor_of(item) for item in request.inputs], requested)
        except ClientError as error:  # KServe answers 400 / INVALID_ARGUMENT with the message
            raise InvalidInput(str(error)) from None
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),  # KServe's REST schema requires an id
            model_name=self.name, model_version=self.version,
            infer_outputs=[infer_output(tensor, raw=request.from_grpc) for tensor in outputs],
            use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs)

    async def answer_rest(self, body: bytes, json_length: str | None) -> tuple[bytes, int | None]:
        """A REST inference request's body (and its Inference-Header-Content-Length) -> the answer's body (and
        its JSON length): the same answer as `predict` through KServe's REST path, by the kit's codec
        (handlers/oip.py). A bad request raises ClientError."""
        request = oip.decode_rest_request(body, json_length)
        requested = [name for name, _ in request.outputs] if request.outputs is not None else None
        outputs = await self.outputs(request.inputs, requested)
        request = dataclasses.replace(request, id=request.id or str(uuid.uuid4()))
        return oip.encode_rest_response(self.name, self.version, request, outputs)

    async def outputs(self, inputs: list[oip.Tensor], requested: list[str] | None) -> list[oip.Tensor]:
        """The contract's step, with concurrent requests sharing a forward pass (handlers/batching.py)."""
        batch = contract.model_batch(inputs, self.classifier)
        if self.batch_images > 1:
            self.batcher = self.batcher or AdaptiveBatcher(self.classifier.infer, self.batch_images)
            logits = await self.batcher.run(batch)
        else:
            logits = self.classifier.infer(batch)
        return contract.output_tensors(logits, requested, self.classifier)


def infer_output(tensor: oip.Tensor, raw: bool) -> InferOutput:
    output = InferOutput(tensor.name, list(tensor.data.shape), tensor.datatype, data=tensor.data,
                         parameters=tensor.parameters or None)
    if raw:  # KServe 0.21's gRPC encoder fails on NumPy data when the request was raw: give it bytes
        output.set_data_from_numpy(tensor.data, binary_data=True)
    return output


def tensor_of(item: InferInput) -> oip.Tensor:
    """A KServe input -> the kit's Tensor; data that does not fit its shape or datatype is a client error."""
    if item.datatype != "BYTES" and item.datatype not in oip.NUMPY_TYPES:
        raise ClientError(f"input {item.name!r}: unknown datatype {item.datatype!r}")
    try:
        data = item.as_numpy()
    except Exception as error:  # numpy's reshape/frombuffer and KServe's own decoding raise several types
        raise ClientError(f"input {item.name!r}: its data does not fit shape {list(item.shape)} and "
                             f"datatype {item.datatype} ({error})") from None
    return oip.Tensor(item.name, item.datatype, data)


# ---------------------------------------------------------------------------- the model store

def load_archive(path: Path, workers: int = 1, threads: int = 0, batch_images: int = 0) -> ArchivedClassifier:
    """A .mar -> its classifier, read as TorchServe reads it; `workers` processes share the CPU cores,
    unless `threads` (> 0) overrides the archive's threads per process. Up to `batch_images` images of
    concurrent requests share a forward pass; 0: the archive's batchSize (what TorchServe batches), 1: none."""
    archive = read_archive(path)
    settings = dataclasses.replace(archive.settings, threads=threads) if threads > 0 else archive.settings
    try:
        with tempfile.TemporaryDirectory(prefix="kit-kserve-") as scratch:  # the model is in memory after
            classifier = load_classifier(archive.unpack(Path(scratch)), settings, workers=workers, gpu_id=0)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise BrokenArchive(path, f"{type(error).__name__}: {error}") from None
    log.info("loaded %s (%s, %s) from %s", archive.name, settings.backend, classifier.device, path)
    batch_images = batch_images or int(archive.model_config.get("batchSize", 1))
    return ArchivedClassifier(archive.name, archive.version, path.resolve(), workers, threads, batch_images,
                              settings.backend, classifier)


def load_store(model_store: Path, workers: int = 1, threads: int = 0,
               batch_images: int = 0) -> tuple[list[ArchivedClassifier], list[ArchivedClassifier]]:
    """(the live version of each name, every version of each name): what /v2/models/<name>/... and
    /v2/models/<name>/versions/<version>/... answer. Each archive is loaded once: a live version is
    the same model in both lists."""
    chosen = served(model_store)  # the live version of each name (handlers/store.py)
    if not chosen:
        raise UserError(f"no archives in {model_store}/: run make train export first")
    paths = {path for by_version in versions(model_store).values() for path in by_version.values()}
    loaded = {path: load_archive(path, workers, threads, batch_images) for path in sorted(paths | set(chosen.values()))}
    live = [loaded[path] for path in chosen.values()]
    names = [model.name for model in live]
    if len(set(names)) != len(names):
        raise UserError(f"two archives in {model_store}/ name the same model: {sorted(names)}")
    return live, list(loaded.values())


if __name__ == "__main__":  # the entry point of make serve-kserve and the serving image's serve-kserve
    from handlers.kserve_server import main

    sys.exit(main())
