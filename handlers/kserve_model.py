"""The kit's archives on KServe's ModelServer: the complete Open Inference Protocol, REST and gRPC.

  make serve-kserve        HTTP on 127.0.0.1:8085, gRPC on 127.0.0.1:8086, 2 REST processes; Ctrl-C stops it
  python -m handlers.kserve_model --model_store model_store --http_port 8085 --grpc_port 8086
      [--workers N] [--host 0.0.0.0] [--log_requests true]     (and every option of KServe's: --help)

Every archive (.mar) of the model store is served under its own name, read exactly as TorchServe
reads it (MAR-INF/MANIFEST.json, model-config.yaml's `handler:` section, spec.json, the model file)
and run through the same pipeline (handlers/pipeline.py) with the same contract (handlers/oip.py).
`ArchivedClassifier` is the thin adapter, the counterpart of torchserve_handler.py. The rest is
KServe's own server, changed where running it showed why (each change says so where it is made):
one listening address instead of all interfaces, the platform in the model metadata, REST requests
with binary BYTES data decoded by the kit's codec, the protocol's 400 for a body FastAPI cannot
parse, gRPC outputs handed over as bytes, and --workers processes that load the archives themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import sys
import tempfile
import uuid
import zipfile
from concurrent import futures
from pathlib import Path

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio

from handlers import oip
from handlers.archive import read_archive
from handlers.errors import UserError
from handlers.image import BadImage
from handlers.pipeline import (
    Classifier,
    load_classifier,
    probabilities_of_images,
    probabilities_of_inputs,
)

# `import kserve` parses sys.argv with the ModelServer's own parser (kserve/model_server.py builds it at
# import time): hide this process's arguments from it, so importing this module never depends on them.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve import model_server
    from kserve.errors import InvalidInput
    from kserve.logging import logger as log
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput
    from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess
    from kserve.protocol.rest.server import RESTServer
finally:
    sys.argv = _argv


class ArchivedClassifier(kserve.Model):
    """One archive's classifier behind the Open Inference Protocol."""

    def __init__(self, name: str, version: str, archive: Path, workers: int = 1, threads: int = 0,
                 backend: str = "", classifier: Classifier | None = None):
        super().__init__(name)
        self.version, self.archive, self.workers, self.threads = version, archive, workers, threads
        self.backend, self.classifier = backend, classifier
        self.ready = classifier is not None

    def load(self) -> bool:
        if self.classifier is None:
            loaded = load_archive(self.archive, self.workers, self.threads)
            self.backend, self.classifier = loaded.backend, loaded.classifier
        self.ready = True
        return self.ready

    def __reduce__(self):
        # KServe's --workers pickles the models into its REST processes, and an ONNX Runtime session does
        # not pickle: each process gets the archive's name and loads it (KitRESTServer.run) once it
        # answers KServe's liveness pings, which a load inside unpickling would hold up past their 5 s.
        return ArchivedClassifier, (self.name, self.version, self.archive, self.workers, self.threads)

    def get_input_types(self) -> list[dict]:
        return oip.inputs_metadata(self.classifier.spec)

    def get_output_types(self) -> list[dict]:
        return oip.outputs_metadata(self.classifier.spec)

    def metadata(self) -> dict:
        return oip.model_metadata(self.name, self.version, self.classifier.spec, self.backend)

    def predict(self, request: InferRequest, headers: dict | None = None) -> InferResponse:
        if not isinstance(request, InferRequest):  # KServe's v1 route: /v1/models/<name>:predict
            raise InvalidInput(f"this server speaks the Open Inference Protocol: POST /v2/models/{self.name}/infer")
        try:
            inputs = oip.model_input([tensor_of(item) for item in request.inputs], self.classifier.spec)
            probabilities = (probabilities_of_images(inputs, self.classifier) if isinstance(inputs, list)
                             else probabilities_of_inputs(inputs, self.classifier))
            requested = [output.name for output in request.request_outputs] if request.request_outputs else None
            outputs = oip.model_outputs(probabilities, self.classifier.spec.class_names, requested)
        except (BadImage, oip.BadRequest) as error:  # KServe answers 400 / INVALID_ARGUMENT with the message
            raise InvalidInput(str(error)) from None
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),  # KServe's REST schema requires an id
            model_name=self.name, model_version=self.version,
            infer_outputs=[infer_output(tensor, raw=request.from_grpc) for tensor in outputs],
            use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs)


def infer_output(tensor: oip.Tensor, raw: bool) -> InferOutput:
    output = InferOutput(tensor.name, list(tensor.data.shape), tensor.datatype, data=tensor.data,
                         parameters=tensor.parameters or None)
    if raw:  # KServe 0.21's gRPC encoder fails on NumPy data when the request was raw: give it bytes
        output.set_data_from_numpy(tensor.data, binary_data=True)
    return output


def tensor_of(item: InferInput) -> oip.Tensor:
    """A KServe input -> the kit's Tensor; data that does not fit its shape or datatype is a client error."""
    if item.datatype != "BYTES" and item.datatype not in oip.NUMPY_TYPES:
        raise oip.BadRequest(f"input {item.name!r}: unknown datatype {item.datatype!r}")
    try:
        data = item.as_numpy()
    except Exception as error:  # numpy's reshape/frombuffer and KServe's own decoding raise several types
        raise oip.BadRequest(f"input {item.name!r}: its data does not fit shape {list(item.shape)} and "
                             f"datatype {item.datatype} ({error})") from None
    return oip.Tensor(item.name, item.datatype, data)


# ---------------------------------------------------------------------------- the server

class KitDataPlane(DataPlane):
    async def model_metadata(self, model_name: str) -> dict:
        model = self.get_model_from_registry(model_name)
        if isinstance(model, ArchivedClassifier):  # KServe's own leaves "platform" empty
            return model.metadata()
        return await super().model_metadata(model_name)

    def decode_inference_request(self, body, headers: dict, model_name: str) -> InferRequest:
        # KServe 0.21's own decoder turns binary BYTES data into UTF-8 text, which encoded images are
        # not ("Failed to encode ... using UTF-8"): the kit's codec keeps them as bytes.
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        try:
            request = oip.decode_request(body, headers.get(oip.JSON_LENGTH_HEADER))
        except oip.BadRequest as error:
            raise InvalidInput(str(error)) from None
        return InferRequest(
            model_name=model_name, request_id=request.id,
            infer_inputs=[InferInput(t.name, list(t.data.shape), t.datatype, data=t.data) for t in request.inputs],
            parameters={"binary_data_output": request.binary_outputs},
            request_outputs=None if request.outputs is None else
            [RequestedOutput(name, {"binary_data": binary}) for name, binary in request.outputs])


class LoopbackGRPCServer(GRPCServer):
    """KServe's gRPC server on one address (its own listens on [::])."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host

    async def start(self, max_workers: int):
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=((LoggingInterceptor(),) if self._kwargs.get("log_requests") else ())
            + (ExceptionToStatusInterceptor(),),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                     ("grpc.so_reuseport", 0)])  # else a second server on the same port shares its traffic
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        address = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
        if self._server.add_insecure_port(address) == 0:
            raise OSError(f"gRPC cannot listen on {address}")
        log.info("gRPC listening on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()


class KitRESTServer(RESTServer):
    """KServe's REST server (also what each --workers process runs) with the kit's changes."""

    def __init__(self, *args, log_requests: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_requests = log_requests

    def run(self, sockets=None):  # the entry point of each --workers process
        for model in self.dataplane.model_registry.get_models().values():
            if not model.ready:
                model.load()
        super().run(sockets)

    def _add_middlewares(self, app):
        # KServe's only middleware times each request (getrusage twice) to log it: skipped when not logging.
        if self.log_requests:
            super()._add_middlewares(app)

    def _add_exception_handlers(self, app):
        super()._add_exception_handlers(app)
        app.add_exception_handler(RequestValidationError, invalid_body)


async def invalid_body(_, error: RequestValidationError) -> JSONResponse:
    """FastAPI's answer to a body that is not an inference request (422 {"detail": ...}) in the protocol's
    form: 400 {"error": ...}, as every other refusal."""
    details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
    return JSONResponse(status_code=400, content={"error": f"not an inference request ({details})"})


class KitModelServer(model_server.ModelServer):
    """KServe's ModelServer listening on `host` only, with the kit's data plane and REST server."""

    def __init__(self, host: str, log_requests: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.host, self.log_requests = host, log_requests
        self.dataplane = KitDataPlane(model_registry=self.registered_models)

    def start(self, models: list[kserve.Model]) -> None:
        # KServe's start() with the address set: its RESTServer hard-codes host 0.0.0.0 in uvicorn's config.
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = KitRESTServer(
            model_server.FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
            self.http_port, access_log_format=self.access_log_format, workers=self.workers,
            grace_period=self.grace_period, event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile, log_requests=self.log_requests)
        rest.config.host = self.host
        if self.workers > 1:  # KServe's multi-process server: it binds the socket, its processes run `rest`
            self._rest_multiprocess_server = RESTServerMultiProcess(
                model_server.FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                self.http_port, workers=self.workers, grace_period=self.grace_period,
                log_config_file=model_server.args.log_config_file)
            self._rest_multiprocess_server._rest_server = rest
            self.servers.append(self._rest_multiprocess_server.start())
        else:
            self._rest_server = rest
            self.servers.append(rest.start())
        if self.enable_grpc:
            self._grpc_server = LoopbackGRPCServer(self.host, self.grpc_port, self.dataplane,
                                                   self.model_repository_extension, kwargs=vars(model_server.args),
                                                   grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


# ---------------------------------------------------------------------------- archives

def load_archive(path: Path, workers: int = 1, threads: int = 0) -> ArchivedClassifier:
    """A .mar -> its classifier, read as TorchServe reads it; `workers` processes share the CPU cores,
    unless `threads` (> 0) overrides the archive's threads per process."""
    archive = read_archive(path)
    settings = dataclasses.replace(archive.settings, threads=threads) if threads > 0 else archive.settings
    try:
        with tempfile.TemporaryDirectory(prefix="kit-kserve-") as scratch:  # the model is in memory after
            classifier = load_classifier(archive.unpack(Path(scratch)), settings, workers=workers, gpu_id=0)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not an archive of the kit ({type(error).__name__}: {error}): "
                        "make export writes them") from None
    log.info("loaded %s (%s, %s) from %s", archive.name, settings.backend, classifier.device, path)
    return ArchivedClassifier(archive.name, archive.version, path.resolve(), workers, threads, settings.backend,
                              classifier)


def load_store(model_store: Path, workers: int = 1, threads: int = 0) -> list[ArchivedClassifier]:
    archives = sorted(model_store.glob("*.mar"))
    if not archives:
        raise UserError(f"no archives in {model_store}/: run make train export first")
    models = [load_archive(path, workers, threads) for path in archives]
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise UserError(f"two archives in {model_store}/ name the same model: {sorted(names)}")
    return models


def check_free(host: str, port: int) -> None:
    """One clear line for a port in use (uvicorn would print a traceback, gRPC share the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves bind
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}): another server uses it? "
                            "choose other ports (--http_port/--grpc_port; make serve-kserve KSERVE_HTTP_PORT=... "
                            "KSERVE_GRPC_PORT=...)") from None


def parser() -> argparse.ArgumentParser:
    """KServe's own ModelServer options (its parser is the parent) and the kit's."""
    p = argparse.ArgumentParser(prog="python -m handlers.kserve_model", parents=[model_server.parser],
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_store", type=Path, default=Path("model_store"), help="folder of .mar archives")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, REST and gRPC (%(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per process; 0: the archive's setting, else CPU cores / --workers. "
                        "In a container with a CPU limit, set it: os.cpu_count() there is the host's (%(default)s)")
    p.add_argument("--log_requests", type=lambda x: x.lower() in ("1", "true", "yes"), default=False,
                   help="log a line per request (uvicorn's access log, KServe's timings) (%(default)s)")
    p.set_defaults(http_port=8085, grpc_port=8086, enable_latency_logging=False)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    model_server.args = args  # read by KServe when it configures logging and gRPC message sizes
    server = KitModelServer(args.host, args.log_requests, http_port=args.http_port, grpc_port=args.grpc_port,
                            workers=args.workers,
                            max_threads=args.max_threads, max_asyncio_workers=args.max_asyncio_workers,
                            enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
                            enable_latency_logging=args.enable_latency_logging,
                            access_log_format=args.access_log_format, event_loop=args.event_loop,
                            timeout_keep_alive=args.timeout_keep_alive)  # configures KServe's logging
    if not args.log_requests:  # 3-4 lines per request, which cost more time than the model here
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        for port in (args.http_port, args.grpc_port) if args.enable_grpc else (args.http_port,):
            check_free(args.host, port)
        models = load_store(args.model_store, args.workers, args.threads)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    server.start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
