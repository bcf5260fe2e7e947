"""HTTP server that speaks the original X-VLA protocol, so the original benchmark and robot clients work.

    lerobot-xvla serve <checkpoint> [--host 127.0.0.1] [--port 8010] [--max-request-mb 32]

POST /act with a JSON body (the original's `models/modeling_xvla.py` /act):

    image0               required; a json_numpy string (or object) of an HxWx3 uint8 RGB array, or of a
                         1-D uint8 array of JPEG/PNG bytes. image0 is the primary camera.
    image1, image2       optional, the same; absent ones are masked views
    language_instruction str
    proprio              json_numpy string (or object, or a plain list) of at most max_state_dim floats
    domain_id            int in [0, num_domains)
    steps                optional int in [1, 100]; default num_denoising_steps

-> 200 {"action": [[...], ...]} (chunk_size actions, through the checkpoint's postprocessor)
-> 4xx {"error": "..."} for every invalid request (400 bad field, 404, 405, 411, 413).

Differences from the original on purpose: file paths are refused (the original opened any path on the
server), encoded images are decoded to RGB (the original kept OpenCV's BGR), the server binds to
localhost unless told otherwise, and request bodies are size-limited.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CAMERA_FIELDS = ("image0", "image1", "image2")
MAX_STEPS = 100
MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000
ARRAY_DTYPES = {"|u1": np.uint8, "<f4": np.float32, "<f8": np.float64, "<i4": np.int32, "<i8": np.int64}


class BadRequest(ValueError):
    """An invalid request; answered with 400 and the message."""


def decode_array(value: Any, field: str) -> np.ndarray:
    """A json_numpy-encoded array (a string of its JSON, the decoded object, or a plain list) -> ndarray.

    Only plain numeric dtypes are accepted and the byte count must match the shape, so nothing in a
    request can make the server allocate more than the request carries or run anything.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise BadRequest(f"'{field}' is not valid json_numpy: {error.msg}") from None
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise BadRequest(f"'{field}' must be a list of numbers") from None
    if not isinstance(value, dict) or not {"__numpy__", "dtype", "shape"} <= value.keys():
        raise BadRequest(f"'{field}' must be a json_numpy array ({{'__numpy__', 'dtype', 'shape'}})")
    dtype, shape, data = value["dtype"], value["shape"], value["__numpy__"]
    if dtype not in ARRAY_DTYPES:
        raise BadRequest(f"'{field}' has dtype {dtype!r}; expected one of {sorted(ARRAY_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise BadRequest(f"'{field}' has an invalid shape {shape!r}")
    if not isinstance(data, str):
        raise BadRequest(f"'{field}' has no base64 data")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{field}' has invalid base64 data") from None
    itemsize = np.dtype(ARRAY_DTYPES[dtype]).itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise BadRequest(f"'{field}' carries {len(raw)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=ARRAY_DTYPES[dtype]).reshape(shape)


def decode_image(value: Any, field: str) -> torch.Tensor:
    """An HxWx3 uint8 array or encoded JPEG/PNG bytes -> [3, H, W] uint8 RGB tensor."""
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        raise BadRequest(f"'{field}' must be an image array, not a path or a string")
    array = decode_array(value, field)
    if array.ndim == 1:
        import cv2

        if array.dtype != np.uint8:
            raise BadRequest(f"'{field}' holds encoded image bytes; expected dtype uint8")
        decoded = cv2.imdecode(array, cv2.IMREAD_COLOR)
        if decoded is None:
            raise BadRequest(f"'{field}' holds bytes that are not a JPEG or PNG image")
        array = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise BadRequest(f"'{field}' must be an HxWx3 uint8 RGB image, got {array.dtype} {array.shape}")
    if not (1 <= array.shape[0] <= MAX_IMAGE_SIDE and 1 <= array.shape[1] <= MAX_IMAGE_SIDE):
        raise BadRequest(f"'{field}' is {array.shape[0]}x{array.shape[1]}; each side must be 1..{MAX_IMAGE_SIDE}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # frombuffer arrays are read-only


def _integer(payload: dict, field: str, low: int, high: int, default: int | None = None) -> int:
    value = payload.get(field, default)
    if value is None:
        raise BadRequest(f"'{field}' is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{field}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(f"'{field}' must be in [{low}, {high}], got {value}")
    return value


class XVLAService:
    """The policy with its processors; turns a validated /act payload into an action chunk."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        from .modeling_xvla import load_for_inference

        self.policy, self.preprocessor, self.postprocessor = load_for_inference(checkpoint, device)
        self.cameras = self.policy.config.camera_order[: len(CAMERA_FIELDS)]
        self.lock = threading.Lock()

    def observation(self, payload: Any) -> tuple[dict[str, Any], set[str], int]:
        """Validate a payload; returns the LeRobot observation, the absent cameras and the step count."""
        if not isinstance(payload, dict):
            raise BadRequest("the body must be a JSON object")
        config = self.policy.config
        if "image0" not in payload:
            raise BadRequest("'image0' (the primary camera) is required")
        observation: dict[str, Any] = {}
        absent = set()
        for field, camera in zip(CAMERA_FIELDS, self.cameras, strict=False):
            if field in payload:
                observation[camera] = decode_image(payload[field], field)
            else:
                absent.add(camera)
        extra = [f for f in CAMERA_FIELDS[len(self.cameras) :] if f in payload]
        if extra:
            raise BadRequest(f"this checkpoint has {len(self.cameras)} camera(s); {extra} cannot be used")
        instruction = payload.get("language_instruction")
        if not isinstance(instruction, str) or len(instruction) > MAX_INSTRUCTION_CHARS:
            raise BadRequest(f"'language_instruction' must be a string of at most {MAX_INSTRUCTION_CHARS} characters")
        observation["task"] = instruction
        if config.use_proprio:
            if "proprio" not in payload:
                raise BadRequest("'proprio' is required")
            proprio = decode_array(payload["proprio"], "proprio")
            if proprio.ndim != 1 or not 1 <= proprio.size <= config.max_state_dim:
                raise BadRequest(f"'proprio' must be 1-D with 1..{config.max_state_dim} values, got shape {proprio.shape}")
            if not (np.isfinite(proprio) & (np.abs(proprio) <= np.finfo(np.float32).max)).all():
                raise BadRequest("'proprio' must hold finite float32 values")
            observation["observation.state"] = torch.from_numpy(proprio.astype(np.float32))
        observation["domain_id"] = _integer(payload, "domain_id", 0, config.num_domains - 1)
        steps = _integer(payload, "steps", 1, MAX_STEPS, default=config.num_denoising_steps)
        return observation, absent, steps

    def act(self, payload: Any) -> list[list[float]]:
        observation, absent, steps = self.observation(payload)
        domain_id = observation.pop("domain_id")
        with self.lock:  # one request at a time through the processors and the model
            batch = self.preprocessor(observation)
            batch["domain_id"] = torch.tensor([domain_id], device=batch["observation.language.tokens"].device)
            chunk = self.policy.predict_action_chunk(batch, absent_cameras=absent, steps=steps)
            return self.postprocessor(chunk[0]).tolist()


def make_handler(service: XVLAService, max_request_bytes: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: HTTPStatus, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug(format, *args)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._reply(HTTPStatus.OK, {"status": "ok", "cameras": service.cameras})
            elif self.path == "/act":
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /act"})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/act":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
                return
            if int(length) > max_request_bytes:
                self.close_connection = True
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body exceeds {max_request_bytes} bytes"})
                return
            body = self.rfile.read(int(length))
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                self._reply(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid JSON"})
                return
            try:
                action = service.act(payload)
            except BadRequest as error:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            except Exception:  # a fault of the server or the model, not of the request
                logger.exception("X-VLA /act failed")
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "inference failed"})
            else:
                self._reply(HTTPStatus.OK, {"action": action})

    return Handler


class XVLAHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: tuple) -> None:
        """A client that hangs up is routine (logged at debug); anything else is logged with its traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("client %s disconnected", client_address)
        else:
            logger.exception("X-VLA server: request from %s failed", client_address)


def make_server(service: XVLAService, host: str = "127.0.0.1", port: int = 8010, max_request_mb: float = 32) -> ThreadingHTTPServer:
    return XVLAHTTPServer((host, port), make_handler(service, int(max_request_mb * 1024 * 1024)))


def serve(checkpoint: str, host: str, port: int, device: str, max_request_mb: float) -> None:
    server = make_server(XVLAService(checkpoint, device), host, port, max_request_mb)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving X-VLA on %s: reachable from other machines", host)
    print(f"X-VLA /act server on http://{host}:{server.server_address[1]} (checkpoint {checkpoint})", flush=True)
    server.serve_forever()
