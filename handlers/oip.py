"""The Open Inference Protocol (KServe v2, what Triton and KServe speak) for the kit's classifiers.

The model's contract, the same on every server of the kit (TorchServe's /v2/models/<name>/infer and
KServe's ModelServer, REST and gRPC):

  inputs   image          BYTES [N]             N encoded images in any format /predictions takes: raw
                                                bytes (gRPC, the binary tensor extension), base64 text in
                                                JSON (where BYTES can only be text)
           input          FP32  [N, C, H, W]    tensors already normalized as the spec says
  outputs  probabilities  FP32  [N, classes]    softmax, classes in the spec's order; their names travel
                                                as JSON text in the output's parameter `class_names`
           label          BYTES [N]             the most probable class's name

One input per request (either one); the requested outputs, else both. `model_input` and
`model_outputs` are this contract on decoded tensors; handlers/contract.py runs the model between
them, for both engines. `decode_rest_request` and `encode_rest_response` are the protocol's REST codec
— a JSON body, or JSON followed by binary tensor data (the binary tensor extension, tritonclient's
default, with the JSON's length in the Inference-Header-Content-Length header) — for TorchServe, which
hands the handler the raw body, and for KServe's REST requests with binary data. A request the
protocol or the contract refuses raises handlers.errors.ClientError with its HTTP status.

Plain NumPy and the standard library: this module is copied into every .mar.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from handlers.errors import ClientError
from handlers.spec import Spec

IMAGE, INPUT, PROBABILITIES, LABEL = "image", "input", "probabilities", "label"
OUTPUTS = (PROBABILITIES, LABEL)
PLATFORMS = {"onnxruntime": "onnx_onnxv1", "torchscript": "pytorch_torchscript"}  # the protocol's names
MAX_IMAGES = 256  # per request: a bound on the memory one request can take
JSON_LENGTH_HEADER = "inference-header-content-length"  # HTTP header names are case-insensitive
NUMPY_TYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
               "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass(frozen=True)
class Tensor:
    """One named tensor. `data` has the tensor's shape; BYTES: an object array of bytes (or of str,
    as JSON carries BYTES)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    id: str | None
    inputs: list[Tensor]
    outputs: list[tuple[str, bool]] | None  # requested (name, binary), or None: every output
    binary_outputs: bool  # the request-wide default, parameter binary_data_output


# ---------------------------------------------------------------------------- the model's contract

def inputs_metadata(spec: Spec) -> list[dict]:
    return [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": INPUT, "datatype": "FP32", "shape": [-1, *spec.input.size]}]


def outputs_metadata(spec: Spec) -> list[dict]:
    return [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, spec.num_classes]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]}]


def model_metadata(name: str, version: str, spec: Spec, backend: str) -> dict:
    """The protocol's model metadata (its metadata has no field for class names: see `model_outputs`)."""
    return {"name": name, "versions": [version], "platform": PLATFORMS[backend],
            "inputs": inputs_metadata(spec), "outputs": outputs_metadata(spec)}


def model_input(inputs: list[Tensor], spec: Spec) -> list[bytes] | np.ndarray:
    """The request's one input -> encoded images (list of bytes) or a normalized float32 (N, C, H, W) batch."""
    expected = "`image` (BYTES [N]: encoded images) or `input` (FP32 [N, C, H, W]: normalized tensors)"
    if len(inputs) != 1:
        raise ClientError(f"send exactly one input, {expected}; got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name == IMAGE:
        return images_of(tensor)
    if tensor.name == INPUT:
        return batch_of(tensor, spec)
    raise ClientError(f"unknown input {tensor.name!r}: send {expected}")


def check_batch(tensor: Tensor, datatype: str, shape: str) -> int:
    """The datatype, the rank of `shape` (as written in messages: "[N, C, H, W]") and the batch size."""
    if tensor.datatype != datatype:
        raise ClientError(f"input {tensor.name!r} must be {datatype}, not {tensor.datatype}")
    dims = tensor.data.shape
    if len(dims) != len(shape.split(",")):
        raise ClientError(f"input {tensor.name!r} must have shape {shape}, not {list(dims)}")
    if dims[0] == 0:
        raise ClientError(f"input {tensor.name!r} holds no image: send at least one")
    if dims[0] > MAX_IMAGES:
        raise ClientError(f"input {tensor.name!r} holds {dims[0]} images; at most {MAX_IMAGES} per request", 413)
    return dims[0]


def images_of(tensor: Tensor) -> list[bytes]:
    check_batch(tensor, "BYTES", "[N]")
    images = []
    for position, element in enumerate(tensor.data):
        if isinstance(element, str):  # JSON carries BYTES as text: images come base64-encoded
            try:
                element = base64.b64decode(element, validate=True)
            except (binascii.Error, ValueError):
                raise ClientError(f"image {position} is text but not base64: over JSON, send each image "
                                 "base64-encoded") from None
        if not isinstance(element, (bytes, bytearray)):
            raise ClientError(f"image {position} is {type(element).__name__}, not bytes")
        images.append(bytes(element))
    return images


def batch_of(tensor: Tensor, spec: Spec) -> np.ndarray:
    expected = spec.input.size
    check_batch(tensor, "FP32", "[N, C, H, W]")
    if tensor.data.shape[1:] != expected:
        raise ClientError(f"input {tensor.name!r} must have shape [N, {', '.join(map(str, expected))}], "
                         f"not {list(tensor.data.shape)}")
    batch = np.ascontiguousarray(tensor.data, dtype=np.float32)
    if not np.isfinite(batch).all():
        raise ClientError(f"input {tensor.name!r} holds NaN or infinite values")
    return batch


def model_outputs(probabilities: np.ndarray, class_names: list[str], requested: list[str] | None) -> list[Tensor]:
    """Probabilities (N, classes) -> the requested outputs (all when None), in the order requested."""
    names = list(OUTPUTS) if requested is None else requested
    for name in names:
        if name not in OUTPUTS:
            raise ClientError(f"unknown output {name!r}: this model has {' and '.join(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise ClientError(f"output requested twice: {names}")
    tensors = {
        # The protocol's metadata has no place for class names; an output's parameters do.
        PROBABILITIES: lambda: Tensor(PROBABILITIES, "FP32", probabilities.astype(np.float32),
                                      {"class_names": json.dumps(class_names)}),
        LABEL: lambda: Tensor(LABEL, "BYTES", np.array([class_names[i] for i in probabilities.argmax(axis=1)],
                                                       dtype=object)),
    }
    return [tensors[name]() for name in names]


# ---------------------------------------------------------------------------- the REST codec

def decode_rest_request(body: bytes | dict, json_length: str | None) -> Request:
    """An inference request's HTTP body (already parsed JSON, or bytes) and its
    Inference-Header-Content-Length header -> Request. Any malformed part raises ClientError."""
    if isinstance(body, dict):
        header, binary = body, b""
    else:
        if json_length is None:
            header_bytes, binary = body, b""
        else:
            try:
                length = int(json_length)
            except ValueError:
                raise ClientError(f"Inference-Header-Content-Length is not a number: {json_length!r}") from None
            if not 0 < length <= len(body):
                raise ClientError(f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes")
            header_bytes, binary = body[:length], body[length:]
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, ValueError):
            raise ClientError("the body is not an inference request: JSON (followed by binary tensor data when "
                             "Inference-Header-Content-Length is set)") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ClientError('an inference request is a JSON object with "inputs": [...]')
    parameters = mapping(header.get("parameters"), "request parameters")
    offset, inputs = 0, []
    for entry in header["inputs"]:
        tensor, offset = decode_input(entry, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise ClientError(f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size")
    default = bool(parameters.get("binary_data_output", False))
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise ClientError('"outputs" must be a list of {"name": ...}')
        outputs = []
        for entry in header["outputs"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ClientError('each requested output must be {"name": ..., "parameters": {...}}')
            binary = mapping(entry.get("parameters"), f"output {entry['name']!r} parameters").get("binary_data")
            outputs.append((entry["name"], default if binary is None else bool(binary)))
    request_id = header.get("id")
    return Request(None if request_id is None else str(request_id), inputs, outputs, default)


def mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(f"{what} must be a JSON object")
    return value


def decode_input(entry, binary: bytes, offset: int) -> tuple[Tensor, int]:
    """One entry of "inputs" -> (Tensor, offset of the next input's binary data)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ClientError('each input must be {"name", "datatype", "shape", "data"}')
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise ClientError(f"input {name!r}: unknown datatype {datatype!r}")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)):
        raise ClientError(f"input {name!r}: shape must be a list of non-negative integers, not {shape!r}")
    count = math.prod(shape)
    parameters = mapping(entry.get("parameters"), f"input {name!r} parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
            raise ClientError(f"input {name!r}: binary_data_size {size!r} exceeds the binary data sent")
        chunk, offset = binary[offset:offset + size], offset + size
        elements = bytes_elements(chunk, name) if datatype == "BYTES" else numbers_from_binary(chunk, datatype, name)
    elif "data" in entry:
        elements = json_elements(entry["data"], datatype, name)
    else:
        raise ClientError(f'input {name!r} has neither "data" nor a binary_data_size parameter')
    if len(elements) != count:
        raise ClientError(f"input {name!r}: shape {shape} holds {count} elements, the data {len(elements)}")
    return Tensor(name, datatype, elements.reshape(shape)), offset


def numbers_from_binary(chunk: bytes, datatype: str, name: str) -> np.ndarray:
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(chunk) % dtype.itemsize:
        raise ClientError(f"input {name!r}: {len(chunk)} bytes are not a whole number of {datatype} elements")
    return np.frombuffer(chunk, dtype=dtype)


def bytes_elements(chunk: bytes, name: str) -> np.ndarray:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements, position = [], 0
    while position < len(chunk):
        if position + 4 > len(chunk):
            raise ClientError(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", chunk, position)
        position += 4
        if position + length > len(chunk):
            raise ClientError(f"input {name!r}: a BYTES element of {length} bytes runs past the data sent")
        elements.append(chunk[position:position + length])
        position += length
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def json_elements(data, datatype: str, name: str) -> np.ndarray:
    """ "data" in JSON, flat or nested in row-major order -> a flat array."""
    if datatype == "BYTES":
        flat = list(flatten(data))
        if not all(isinstance(element, str) for element in flat):
            raise ClientError(f"input {name!r}: BYTES data in JSON must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array
    try:
        flat = list(flatten(data))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ValueError
        return np.asarray(flat, dtype=NUMPY_TYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise ClientError(f"input {name!r}: data must be {datatype} numbers") from None


def flatten(data):
    if isinstance(data, list):
        for item in data:
            yield from flatten(item)
    else:
        yield data


def encode_rest_response(model_name: str, model_version: str, request: Request,
                    outputs: list[Tensor]) -> tuple[bytes, int | None]:
    """Outputs -> (HTTP body, JSON length for Inference-Header-Content-Length, or None for plain JSON).
    Each output goes as binary data when the request asked for it so."""
    binary_wanted = dict(request.outputs) if request.outputs is not None else {}
    entries, chunks = [], []
    for tensor in outputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.data.shape)}
        parameters = dict(tensor.parameters)
        if binary_wanted.get(tensor.name, request.binary_outputs):
            chunk = encode_bytes(tensor.data) if tensor.datatype == "BYTES" else \
                np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
            parameters["binary_data_size"] = len(chunk)
            chunks.append(chunk)
        else:
            flat = tensor.data.reshape(-1)
            entry["data"] = [str(e) if not isinstance(e, bytes) else e.decode() for e in flat] \
                if tensor.datatype == "BYTES" else flat.tolist()
        if parameters:
            entry["parameters"] = parameters
        entries.append(entry)
    response = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    text = json.dumps(response).encode()
    return (text + b"".join(chunks), len(text)) if chunks else (text, None)


def encode_bytes(data: np.ndarray) -> bytes:
    parts = []
    for element in data.reshape(-1):
        raw = element if isinstance(element, bytes) else str(element).encode()
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)
