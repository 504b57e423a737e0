"""KServe's ModelServer with the kit's changes, and the command line that serves a model store with it.

  python -m handlers.kserve_model --model_store model_store --http_port 8085 --grpc_port 8086
      [--workers N] [--host 0.0.0.0] [--log_requests true]     (and every option of KServe's: --help)

`python -m handlers.kserve_model` (make serve-kserve, the serving image's serve-kserve) runs `main`
here; the models it serves are handlers/kserve_model.py's `ArchivedClassifier`. The rest is KServe's
own server, changed where running it showed why (each change says so where it is made): one
listening address instead of all interfaces, the platform in the model metadata, every version of
each model at /v2/models/<name>/versions/<version>/... and gRPC's model_version, the REST inference
route answered by the kit's codec ahead of FastAPI (DirectInfer), REST requests with binary BYTES
data decoded by the kit's codec on KServe's own path too, the protocol's 400 for a body FastAPI
cannot parse, gRPC outputs handed over as bytes, and --workers processes that load the archives
themselves.

Some of these changes re-implement KServe's own methods (ModelServer.start, GRPCServer.start) or
override its private hooks (RESTServer._add_middlewares, _add_exception_handlers), and reach into its
private members, which another release may rename or drop. So this module is written
against one kserve release, KSERVE_VERSION (requirements.txt pins the same): every method that
touches KServe's private API is marked @kserve_private_api and checks the installed version first,
and `main` checks it before anything else, so another release is one clear line at start.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import logging
import re
import socket
import sys
from concurrent import futures
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio

from handlers import oip
from handlers.errors import ClientError, UserError
from handlers.kserve_model import ArchivedClassifier, load_store

# isort: split
# After handlers.kserve_model, which imports kserve with this process's arguments hidden from KServe's parser.
import kserve
from kserve import model_server
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.logging import logger as log
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest, ModelMetadataResponse, ModelReadyResponse
from kserve.protocol.rest.v2_endpoints import V2Endpoints

KSERVE_VERSION = "0.21.0"  # the release whose private API this module uses


# ---------------------------------------------------------------------------- the kserve version

def installed_kserve_version() -> str:
    return importlib.metadata.version("kserve")


def check_kserve_version() -> None:
    """A UserError unless the installed kserve is KSERVE_VERSION, whose private API this module uses."""
    installed = installed_kserve_version()
    if installed != KSERVE_VERSION:
        raise UserError(f"kserve {installed} is installed, but the kit's KServe server (handlers/kserve_server.py) "
                        f"uses the private API of kserve {KSERVE_VERSION}: pip install kserve=={KSERVE_VERSION} "
                        f"(what requirements.txt pins), or update handlers/kserve_server.py for kserve {installed}")


def kserve_private_api(method):
    """Marks a method that touches KServe's private API: it checks the installed version before it runs."""

    @functools.wraps(method)
    def checked(*args, **kwargs):
        check_kserve_version()
        return method(*args, **kwargs)  # an async method's coroutine, which then runs as KServe awaits it

    return checked


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
            request = oip.decode_rest_request(body, headers.get(oip.JSON_LENGTH_HEADER))
        except ClientError as error:
            raise InvalidInput(str(error)) from None
        return InferRequest(
            model_name=model_name, request_id=request.id,
            infer_inputs=[InferInput(t.name, list(t.data.shape), t.datatype, data=t.data) for t in request.inputs],
            parameters={"binary_data_output": request.binary_outputs},
            request_outputs=None if request.outputs is None else
            [RequestedOutput(name, {"binary_data": binary}) for name, binary in request.outputs])


# ---------------------------------------------------------------------------- versions

class VersionNotFound(ModelNotFound):
    """A 404 (gRPC NOT_FOUND) naming the versions there are."""

    def __init__(self, name: str, version: str, served: list[str]):
        super().__init__(name)
        if served:
            self.reason = f"model {name} has no version {version} here (its versions: {', '.join(served)})"


class VersionedRepository(ModelRepository):
    """KServe's registry of the live model of each name, which /v2/models/<name>/... answers, and of every
    version of each name, which /v2/models/<name>/versions/<version>/... answers. KServe's data plane finds
    a model by one name: version V of M goes by the name "M/versions/V", which no name in a URL can be."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, dict[str, kserve.Model]] = {}

    def add_version(self, model: ArchivedClassifier) -> None:
        self.versions.setdefault(model.name, {})[model.version] = model

    def version_name(self, name: str, version: str) -> str:
        """The registry's name of a version of `name`; VersionNotFound where it is not served."""
        if version not in self.versions.get(name, {}):
            raise VersionNotFound(name, version, list(self.versions.get(name, {})))
        return f"{name}/versions/{version}"

    def get_model(self, name: str):
        model = super().get_model(name)
        if model is None and "/versions/" in name:
            base, _, version = name.partition("/versions/")
            model = self.versions.get(base, {}).get(version)
        return model

    def every_model(self) -> list[kserve.Model]:
        """The live models and every version, each once."""
        unique = {id(model): model for model in self.get_models().values()}
        unique.update((id(model), model) for by_version in self.versions.values() for model in by_version.values())
        return list(unique.values())


def register_version_endpoints(app: FastAPI, dataplane: DataPlane) -> None:
    """/v2/models/<name>/versions/<version>[/ready|/infer], ahead of KServe's own routes for these paths
    (which answer "Model versioning not supported yet"): KServe's endpoints, given the version's name."""
    registry: VersionedRepository = dataplane.model_registry
    endpoints = V2Endpoints(dataplane)
    router = APIRouter(prefix="/v2/models/{model_name}/versions/{model_version}", tags=["V2"])

    async def metadata(model_name: str, model_version: str) -> ModelMetadataResponse:
        return await endpoints.model_metadata(registry.version_name(model_name, model_version))

    async def ready(model_name: str, model_version: str) -> ModelReadyResponse:
        await endpoints.model_ready(registry.version_name(model_name, model_version))  # else ModelNotReady
        return ModelReadyResponse(name=model_name, ready=True)

    async def infer(raw_request: Request, raw_response: Response, model_name: str, model_version: str,
                    request_body: InferenceRequest | bytes):
        return await endpoints.infer(raw_request, raw_response, registry.version_name(model_name, model_version),
                                     request_body)

    router.add_api_route("", metadata, response_model=ModelMetadataResponse, methods=["GET"])
    router.add_api_route("/ready", ready, response_model=ModelReadyResponse, methods=["GET"])
    router.add_api_route("/infer", infer, response_model=None, methods=["POST"])
    app.router.routes[:0] = router.routes  # the first route that matches a path answers it


class VersionedServicer(InferenceServicer):
    """KServe's gRPC service with the requests' model_version honoured (KServe's own ignores it)."""

    def __init__(self, data_plane: DataPlane, model_repository_extension):
        super().__init__(data_plane, model_repository_extension)
        self.registry: VersionedRepository = data_plane.model_registry

    async def ModelInfer(self, request, context):
        if request.model_version:
            request.model_name = self.registry.version_name(request.model_name, request.model_version)
        return await super().ModelInfer(request, context)

    async def ModelReady(self, request, context):
        if request.version:
            request.name = self.registry.version_name(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        if request.version:
            request.name = self.registry.version_name(request.name, request.version)
        return await super().ModelMetadata(request, context)


# ---------------------------------------------------------------------------- the REST inference route

INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
MAX_BODY_BYTES = 256 * 2**20  # one request's body at most: 413 beyond (uvicorn and FastAPI read any size)


class DirectInfer:
    """POST /v2/models/<name>[/versions/<version>]/infer answered ahead of FastAPI, by the model's own codec
    (ArchivedClassifier.answer_rest): the same answers, but KServe's REST path (FastAPI's validation, the data
    plane, InferRequest and InferResponse and their encoding) costs more per request than the model does
    (docs/benchmarks-peers.md). Everything else, CloudEvents included, goes on to KServe's app."""

    def __init__(self, app, registry: VersionedRepository):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if "ce-specversion" in headers or "cloudevents" in headers.get("content-type", ""):
            return await self.app(scope, receive, send)
        status, extra = 200, []
        try:
            name = match["name"] if match["version"] is None else self.registry.version_name(*match.groups())
            model = self.registry.get_model(name)
            if not isinstance(model, ArchivedClassifier):
                raise ModelNotFound(match["name"])
            if not model.ready:
                raise ModelNotReady(match["name"])
            body = await request_body(receive)
            answer, json_length = await model.answer_rest(body, headers.get(oip.JSON_LENGTH_HEADER))
            if json_length is not None:
                extra = [(oip.JSON_LENGTH_HEADER.encode(), str(json_length).encode())]
        except BodyTooLarge as error:
            status, answer = 413, error_body(error)
        except ClientError as error:  # 400, as KServe's own path answers InvalidInput
            status, answer = 400, error_body(error)
        except (ModelNotFound, ModelNotReady) as error:
            status, answer = (404 if isinstance(error, ModelNotFound) else 503), error_body(error)
        except Exception as error:  # as KServe's generic handler answers it
            log.exception("inference failed")
            status, answer = 500, error_body(error)
        content_type = b"application/octet-stream" if extra else b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(answer)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": answer})


class BodyTooLarge(ClientError):
    pass


async def request_body(receive) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError("the client went away before its request was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MB", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def error_body(error: Exception) -> bytes:
    return json.dumps({"error": str(error)}).encode()


class LoopbackGRPCServer(GRPCServer):
    """KServe's gRPC server on one address (its own listens on [::])."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host

    @kserve_private_api  # GRPCServer.start with the address set; _server, _kwargs, _data_plane, ... are KServe's
    async def start(self, max_workers: int):
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=((LoggingInterceptor(),) if self._kwargs.get("log_requests") else ())
            + (ExceptionToStatusInterceptor(),),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                     ("grpc.so_reuseport", 0)])  # else a second server on the same port shares its traffic
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            VersionedServicer(self._data_plane, self._model_repository_extension), self._server)
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
        quiet_request_logs(self.log_requests)  # KServe configured each process's logging anew
        for model in self.dataplane.model_registry.every_model():
            if not model.ready:
                model.load()
        super().run(sockets)

    @kserve_private_api  # a private hook of RESTServer
    def _register_endpoints(self, app):
        super()._register_endpoints(app)
        register_version_endpoints(app, self.dataplane)

    @kserve_private_api  # a private hook of RESTServer
    def _add_middlewares(self, app):
        # KServe's only middleware times each request (getrusage twice) to log it: skipped when not logging.
        if self.log_requests:
            super()._add_middlewares(app)
        app.add_middleware(DirectInfer, registry=self.dataplane.model_registry)  # the outermost: first to see

    @kserve_private_api  # a private hook of RESTServer
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
        super().__init__(registered_models=VersionedRepository(), **kwargs)
        self.host, self.log_requests = host, log_requests
        self.dataplane = KitDataPlane(model_registry=self.registered_models)

    @kserve_private_api  # ModelServer.start re-implemented, with its private members and methods
    def start(self, models: list[kserve.Model], versions: list[ArchivedClassifier] = ()) -> None:
        # KServe's start() with the address set: its RESTServer hard-codes host 0.0.0.0 in uvicorn's config.
        for model in versions:
            self.registered_models.add_version(model)
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


# ---------------------------------------------------------------------------- the command line

def quiet_request_logs(log_requests: bool) -> None:
    """Without --log_requests, no line per request: 3-4 of them (uvicorn's access log, KServe's timings) cost
    more time than the model here."""
    if not log_requests:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


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
    p.add_argument("--batch_images", type=int, default=0,
                   help="images of concurrent requests per forward pass at most (handlers/batching.py); 0: the "
                        "archive's batchSize, 1: no batching, each request its own pass (%(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per process; 0: the archive's setting, else CPU cores / --workers. "
                        "In a container with a CPU limit, set it: os.cpu_count() there is the host's (%(default)s)")
    p.add_argument("--log_requests", type=lambda x: x.lower() in ("1", "true", "yes"), default=False,
                   help="log a line per request (uvicorn's access log, KServe's timings) (%(default)s)")
    p.set_defaults(http_port=8085, grpc_port=8086, enable_latency_logging=False)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        check_kserve_version()  # before KServe's parser, the first of its parts this module builds on
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    p = parser()
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.batch_images < 0:
        p.error("--batch_images must be 0 (the archive's batchSize) or more")
    model_server.args = args  # read by KServe when it configures logging and gRPC message sizes
    server = KitModelServer(args.host, args.log_requests, http_port=args.http_port, grpc_port=args.grpc_port,
                            workers=args.workers,
                            max_threads=args.max_threads, max_asyncio_workers=args.max_asyncio_workers,
                            enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
                            enable_latency_logging=args.enable_latency_logging,
                            access_log_format=args.access_log_format, event_loop=args.event_loop,
                            timeout_keep_alive=args.timeout_keep_alive)  # configures KServe's logging
    quiet_request_logs(args.log_requests)
    try:
        for port in (args.http_port, args.grpc_port) if args.enable_grpc else (args.http_port,):
            check_free(args.host, port)
        live, versions = load_store(args.model_store, args.workers, args.threads, args.batch_images)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    server.start(live, versions)
    return 0

