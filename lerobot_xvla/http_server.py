"""HTTP server that speaks the original X-VLA protocol, so the original benchmark and robot clients work.
It runs on the original's stack: FastAPI under uvicorn, the payload validated by pydantic models.

    pip install 'lerobot_policy_xvla[serve]'    # FastAPI and uvicorn
    lerobot-xvla serve <checkpoint> [--host 127.0.0.1] [--port 8010] [--device cpu] [--max-request-mb 32]

POST /act with a JSON object (the original's `models/modeling_xvla.py` /act):

    image0               required; a json_numpy array (the string json_numpy.dumps makes, or its object) of
                         an HxWx3 uint8 RGB image, or of the 1-D uint8 bytes of a JPEG or PNG file (decoded to
                         RGB). Each side 1..MAX_IMAGE_SIDE. image0 is the primary camera.
    image1, image2       optional, the same; absent (or null) ones are masked views
    language_instruction str of at most MAX_INSTRUCTION_CHARS characters
    proprio              json_numpy array (or a plain list) of exactly the checkpoint's state width of
                         finite numbers within +-MAX_PROPRIO_ABS; required when the checkpoint uses proprio
    domain_id            int in [0, num_domains)
    steps                optional int in [1, MAX_STEPS]; default num_denoising_steps

-> 200 {"action": [[...], ...]} (chunk_size actions, through the checkpoint's postprocessor)
-> 4xx {"error": "..."} for every invalid request: 400 (naming the field), 404, 405, 408 (body slower than
   body_timeout_s), 411 (no Content-Length), 413 (body over --max-request-mb, refused before it is read).
   Error answers close the connection. Malformed HTTP (request line, headers) gets uvicorn's plain-text
   400, and a connection beyond max_connections its plain-text 503. A connection is closed the way nginx
   closes one ("lingering close"): after the answer the server ends its side and discards what the client
   still sends, for at most linger_s, so an answer to a request refused unread is not lost to a reset.
GET /health -> 200 {"status": "ok", "cameras": [...], "state_width": ..., "num_domains": ...}

Resources are bounded: a connection that sends no complete request line and headers within keep_alive_s
is closed (uvicorn alone waits forever for a first request, and any byte cancels its keep-alive timer);
a body must arrive within body_timeout_s; at most max_connections connections; DECODE_SLOTS requests are
parsed and their images decoded at a time (memory: a few times the body, plus at most
MAX_IMAGE_SIDE^2 x 3 bytes per decoded image); the model serves one request at a time. Encoded images
must carry JPEG or PNG magic bytes and the width and height their header declares (PNG IHDR, JPEG SOFn)
must be within MAX_IMAGE_SIDE before anything is decoded.

Differences from the original on purpose: file paths are refused (the original opened any path on the
server), only JPEG and PNG are decoded, encoded images are decoded to RGB (the original kept OpenCV's
BGR), domain_id and steps must be JSON integers (the original called int() on anything), the server
binds to localhost unless told otherwise, and every resource above is limited.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import re
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch

try:  # the `serve` extra
    import h11
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request, Response
    from pydantic import (
        AfterValidator,
        BaseModel,
        BeforeValidator,
        ConfigDict,
        Discriminator,
        Field,
        PrivateAttr,
        Tag,
        ValidationError,
        ValidationInfo,
        model_validator,
    )
    from pydantic_core import PydanticCustomError, from_json
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"the X-VLA /act server needs {missing.name}: pip install 'lerobot_policy_xvla[serve]'", name=missing.name
    ) from missing

logger = logging.getLogger(__name__)

CAMERA_FIELDS = ("image0", "image1", "image2")
MAX_STEPS = 100
MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000
# Robot states (metres, radians, degrees, encoder ticks) are far smaller; values near 1e19 overflow the
# model's float32 arithmetic (a LayerNorm squares them) and give NaN actions.
MAX_PROPRIO_ABS = 1e6
ARRAY_DTYPES = {"|u1": np.uint8, "<f4": np.float32, "<f8": np.float64, "<i4": np.int32, "<i8": np.int64}
MAX_ARRAY_ELEMENTS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 3
KEEP_ALIVE_S = 5
BODY_TIMEOUT_S = 30
LINGER_S = 2
MAX_CONNECTIONS = 32
DECODE_SLOTS = 2
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF0..SOF15: the frame headers that hold the image size (C4 DHT, C8 JPG and CC DAC are other segments).
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0..7, SOI: no length field


@dataclass(frozen=True)
class CheckpointShape:
    """What a request must fit; the validation context of ActRequest."""

    cameras: int
    state_width: int | None  # None: the checkpoint takes no proprio
    num_domains: int


def _error(kind: str, message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, context)


def encoded_image_size(data: bytes) -> tuple[int, int]:
    """(height, width) that the header of JPEG or PNG `data` declares, read without decoding anything."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise _error("image_header", "is a PNG without its IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data.startswith(b"\xff\xd8"):
        return _jpeg_frame_size(data)
    raise _error("image_format", "holds bytes that are not a JPEG or PNG file (the only encodings accepted)")


def _jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the first frame header (SOFn) of a JPEG, walking the marker segments before it."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF or marker in JPEG_STANDALONE_MARKERS:  # a fill byte, or a marker without a length
            position += 1 if marker == 0xFF else 2
            continue
        if marker in JPEG_FRAME_MARKERS and position + 9 <= len(data):
            return struct.unpack(">HH", data[position + 5 : position + 9])
        if marker in (0xD9, 0xDA):  # end of image or start of scan: no frame header came first
            break
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    raise _error("image_header", "is a JPEG without a readable frame header (SOFn) before its image data")


def _json_numpy_object(value: Any) -> Any:
    """A json_numpy string (what json_numpy.dumps makes, the original clients' form) -> its JSON object;
    anything else is left to the model."""
    if not isinstance(value, str):
        return value
    if not value.lstrip().startswith("{"):
        raise _error("json_numpy", "must be a json_numpy array; file paths and other strings are refused")
    try:
        return from_json(value, allow_inf_nan=False)
    except ValueError as error:
        raise _error("json_numpy", "is not valid json_numpy: {reason}", reason=str(error)) from None


class NumpyArray(BaseModel):
    """json_numpy's form of an array: {"__numpy__": base64 of its bytes, "dtype": "<f4", "shape": [...]}.

    Only plain numeric dtypes and at most 3 dimensions, and the data must be exactly the bytes the shape
    needs (checked on the base64 length before decoding, and after), so a request cannot make the server
    allocate more than it carries.
    """

    data: str = Field(alias="__numpy__")
    dtype: Literal["|u1", "<f4", "<f8", "<i4", "<i8"]
    shape: Annotated[list[Annotated[int, Field(strict=True, ge=0, le=MAX_ARRAY_ELEMENTS)]], Field(max_length=3)]
    _array: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _decode(self) -> NumpyArray:
        count = math.prod(self.shape)
        if count > MAX_ARRAY_ELEMENTS:
            message = "has {count} elements; at most {limit} are accepted"
            raise _error("array_size", message, count=count, limit=MAX_ARRAY_ELEMENTS)
        dtype = np.dtype(ARRAY_DTYPES[self.dtype])
        needed = count * dtype.itemsize
        size_error = _error(
            "array_size", "carries {chars} base64 characters; shape {shape} of {dtype} needs {needed} bytes",
            chars=len(self.data), shape=self.shape, dtype=self.dtype, needed=needed,
        )
        if len(self.data) != 4 * math.ceil(needed / 3):
            raise size_error
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error:
            raise _error("array_data", "has invalid base64 data") from None
        if len(raw) != needed:  # padding inside the data
            raise size_error
        self._array = np.frombuffer(raw, dtype=dtype).reshape(self.shape)
        return self

    @property
    def array(self) -> np.ndarray:
        return self._array


def _rgb_image(value: NumpyArray) -> np.ndarray:
    """An HxWx3 uint8 RGB array, or the bytes of a JPEG or PNG whose declared size is checked before it is
    decoded -> HxWx3 uint8 RGB array."""
    array = value.array
    if array.dtype != np.uint8 or array.ndim not in (1, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise _error(
            "image", "must be an HxWx3 uint8 RGB image or the 1-D uint8 bytes of a JPEG/PNG, got {dtype} {shape}",
            dtype=str(array.dtype), shape=list(array.shape),
        )
    if array.ndim == 1:
        height, width = encoded_image_size(array.tobytes())
        _check_sides(height, width, "declares")
        import cv2

        decoded = cv2.imdecode(array, cv2.IMREAD_COLOR)  # always 8-bit, 3 channels
        if decoded is None:
            raise _error("image_data", "holds a JPEG/PNG that does not decode")
        array = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    _check_sides(*array.shape[:2], "is")
    return array


def _check_sides(height: int, width: int, verb: str) -> None:
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise _error(
            "image_size", "{verb} {height}x{width} pixels; each side must be 1..{limit}",
            verb=verb, height=height, width=width, limit=MAX_IMAGE_SIDE,
        )


def _proprio_values(value: NumpyArray | list[float], info: ValidationInfo) -> np.ndarray:
    values = value.array if isinstance(value, NumpyArray) else np.asarray(value, dtype=np.float64)
    width = info.context.state_width
    if width is not None and (values.ndim != 1 or values.size != width):
        raise _error(
            "proprio_width", "must be {width} values (the checkpoint's state width), got shape {shape}",
            width=width, shape=list(values.shape),
        )
    if not (np.isfinite(values) & (np.abs(values) <= MAX_PROPRIO_ABS)).all():
        raise _error("proprio_range", f"must hold finite values within +-{MAX_PROPRIO_ABS:g}")
    return values.astype(np.float32)


def _known_domain(value: int, info: ValidationInfo) -> int:
    if value >= info.context.num_domains:
        message = "must be < {count} (the checkpoint's num_domains), got {value}"
        raise _error("domain_id", message, count=info.context.num_domains, value=value)
    return value


# Validated into an HxWx3 uint8 RGB ndarray.
Image = Annotated[NumpyArray, BeforeValidator(_json_numpy_object), AfterValidator(_rgb_image)]
# Validated into a float32 ndarray; a plain JSON list of numbers is accepted as well as json_numpy.
Proprio = Annotated[
    Annotated[NumpyArray, Tag("json_numpy")] | Annotated[list[Annotated[float, Field(strict=True)]], Tag("list")],
    Discriminator(lambda value: "list" if isinstance(value, list) else "json_numpy"),
    BeforeValidator(_json_numpy_object),
    AfterValidator(_proprio_values),
]


class ActRequest(BaseModel):
    """The /act payload, validated with `context=CheckpointShape(...)` of the serving checkpoint."""

    model_config = ConfigDict(allow_inf_nan=False)

    image0: Image
    image1: Image | None = None
    image2: Image | None = None
    language_instruction: Annotated[str, Field(max_length=MAX_INSTRUCTION_CHARS)]
    proprio: Proprio | None = None
    domain_id: Annotated[int, Field(strict=True, ge=0), AfterValidator(_known_domain)]
    steps: Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)] | None = None

    @model_validator(mode="after")
    def _fits_checkpoint(self, info: ValidationInfo) -> ActRequest:
        shape: CheckpointShape = info.context
        extra = [field for field in CAMERA_FIELDS[shape.cameras :] if getattr(self, field) is not None]
        if extra:
            message = "this checkpoint has {count} camera(s); {extra} cannot be used"
            raise _error("camera", message, count=shape.cameras, extra=extra)
        if shape.state_width is not None and self.proprio is None:
            message = "'proprio' is required: this checkpoint takes {width} state values"
            raise _error("missing", message, width=shape.state_width)
        return self


_JSON_POSITION = re.compile(r" at line (\d+) column (\d+)$")
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)|[][{}:,]', re.DOTALL)  # strings (a cut one too) and punctuation


def _field_at(body: bytes, reason: str) -> str | None:
    """The top-level field of `body` whose value holds the JSON error `reason` ("... at line L column C")."""
    position = _JSON_POSITION.search(reason)
    if position is None:
        return None
    line, column = map(int, position.groups())
    offset = sum(len(text) + 1 for text in body.split(b"\n", line - 1)[: line - 1]) + column - 1
    depth, key, field = 0, None, None
    for token in _JSON_TOKEN.finditer(body, 0, offset):
        text = token.group()
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
        elif depth == 1:  # in the top-level object
            if text == b":":
                field = key  # the value of `key` starts
            elif text == b",":
                field = None  # ... and has ended
            else:
                key = text[1:-1].decode("ascii", "replace")
    return field if field in ActRequest.model_fields else None


def describe(error: ValidationError, body: bytes) -> str:
    """One line naming each invalid field (at most five)."""
    parts = []
    for item in error.errors(include_url=False)[:5]:
        if item["type"] == "json_invalid":
            reason = item["ctx"]["error"]
            field = _field_at(body, reason)
            parts.append(f"the body is not valid JSON{f' in {field!r}' if field else ''}: {reason}")
        elif item["loc"]:
            parts.append(f"'{'.'.join(map(str, item['loc']))}': {item['msg']}")
        else:
            parts.append("the body must be a JSON object" if item["type"] == "model_type" else item["msg"])
    return "; ".join(parts)


class XVLAService:
    """The policy with its processors; turns a /act body into (HTTP status, JSON answer)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        from .modeling_xvla import load_for_inference

        self.policy, self.preprocessor, self.postprocessor = load_for_inference(checkpoint, device)
        config = self.policy.config
        self.cameras = config.camera_order[: len(CAMERA_FIELDS)]
        state = config.robot_state_feature.shape[-1] if config.use_proprio else None
        self.shape = CheckpointShape(len(self.cameras), state, config.num_domains)
        self.model_lock = threading.Lock()
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)

    def answer(self, body: bytes) -> tuple[int, dict]:
        try:
            with self.decode_slots:  # bounds the memory of parsed bodies and decoded images at any one time
                request = ActRequest.model_validate_json(body, context=self.shape)
        except ValidationError as error:
            return 400, {"error": describe(error, body)}
        try:
            return 200, {"action": self.act(request)}
        except Exception:  # a fault of the server or the model: the request was valid
            logger.exception("X-VLA /act failed")
            return 500, {"error": "inference failed"}

    def act(self, request: ActRequest) -> list[list[float]]:
        images = (request.image0, request.image1, request.image2)
        observation: dict[str, Any] = {
            camera: torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: base64 arrays are read-only
            for camera, image in zip(self.cameras, images, strict=False)
            if image is not None
        }
        absent = {camera for camera, image in zip(self.cameras, images, strict=False) if image is None}
        observation["task"] = request.language_instruction
        if self.shape.state_width is not None:
            observation["observation.state"] = torch.from_numpy(request.proprio)
        steps = request.steps or self.policy.config.num_denoising_steps
        with self.model_lock:  # one request at a time through the processors and the model
            batch = self.preprocessor(observation)
            batch["domain_id"] = torch.tensor([request.domain_id], device=batch["observation.language.tokens"].device)
            chunk = self.policy.predict_action_chunk(batch, absent_cameras=absent, steps=steps)
            return self.postprocessor(chunk[0]).tolist()


def _reply(status: int, content: dict, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer. Error answers close the connection: a body the server did not read must not be taken
    for the next request."""
    headers = {**(headers or {}), **({"Connection": "close"} if status >= 400 else {})}
    return Response(json.dumps(content).encode(), status, headers, media_type="application/json")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused before it is read when its length is unknown or over `limit`, and when it does not
    arrive within timeout_s."""
    declared = request.headers.get("content-length")  # h11 has checked that it is digits
    if declared is None:
        raise HTTPException(411, "a Content-Length header is required")
    if len(declared) > len(str(limit)) or int(declared) > limit:
        raise HTTPException(413, f"the body exceeds {limit} bytes")

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {timeout_s} s") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client closed the connection before sending its body") from None


def make_app(service: XVLAService, max_request_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The /act and /health routes; every other path answers 404, every other method 405."""
    app = FastAPI(title="X-VLA /act", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # scope["path"], not request.url: that parses the Host header, which a client may send malformed
        message = f"{request.method} {request.scope['path']}: {error.detail}"
        return _reply(error.status_code, {"error": message}, error.headers)

    @app.get("/health")
    def health() -> Response:
        return _reply(
            200,
            {
                "status": "ok",
                "cameras": service.cameras,
                "state_width": service.shape.state_width,
                "num_domains": service.shape.num_domains,
            },
        )

    @app.post("/act")
    async def act(request: Request) -> Response:
        body = await _read_body(request, max_request_bytes, body_timeout_s)
        return _reply(*await run_in_threadpool(service.answer, body))

    return app


_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class LingeringTransport:
    """An asyncio transport whose close() answers first and closes later. Closing a socket that holds unread
    data (the rest of a body refused unread, an over-long header) makes the kernel reset the connection, and
    on some network stacks the reset discards the answer before the client reads it. So close() ends our side
    (the answer is still flushed), keeps reading and discarding, and closes when the client closes or after
    linger_s. Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_s: float) -> None:
        self.transport = transport
        self.loop = loop
        self.linger_s = linger_s
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self.transport.is_closing()

    def close(self) -> None:
        if self.lingering or self.transport.is_closing() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        if not self.transport.is_reading():  # uvicorn pauses reading while a body waits to be consumed
            self.transport.resume_reading()
        self.loop.call_later(self.linger_s, self.transport.close)  # a no-op if the client closed first


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline and a lingering close. Each request line and its headers must
    arrive within keep_alive_s of the connection (or of the last answer): uvicorn arms its keep-alive timer
    only after an answer and any byte cancels it, so a client that connects and sends nothing, or trickles a
    header, would hold its connection forever. Closing goes through `LingeringTransport`."""

    def __init__(self, *args: Any, linger_s: float = LINGER_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.linger_s = linger_s
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop, self.linger_s))  # type: ignore[arg-type]
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # after the answer, what still comes is discarded
            super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.timeout_keep_alive, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return  # a request arrived (its body has its own deadline) or the connection is gone
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class XVLAServer:
    """The /act app under uvicorn. The socket is bound on construction (port 0: a free one, see `port`);
    serve_forever() serves in the calling thread until shutdown() is called from another."""

    def __init__(
        self,
        service: XVLAService,
        host: str = "127.0.0.1",
        port: int = 8010,
        max_request_mb: float = 32,
        *,
        keep_alive_s: float = KEEP_ALIVE_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        linger_s: float = LINGER_S,
    ) -> None:
        app = make_app(service, int(max_request_mb * 1024 * 1024), body_timeout_s)
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=functools.partial(GuardedH11Protocol, linger_s=linger_s),
            lifespan="off",
            log_config=None,  # leave the application's logging configuration alone
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.server.should_exit = True


def serve(checkpoint: str, host: str, port: int, device: str, max_request_mb: float) -> None:
    server = XVLAServer(XVLAService(checkpoint, device), host, port, max_request_mb)
    if host not in LOCAL_HOSTS:
        logger.warning("serving X-VLA on %s: reachable from other machines", host)
    print(f"X-VLA /act server on http://{host}:{server.port} (checkpoint {checkpoint})", flush=True)
    server.serve_forever()
