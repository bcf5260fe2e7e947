"""HTTP server that speaks the original X-VLA protocol, so the original benchmark and robot clients work.
It runs on the original's stack: FastAPI under uvicorn, the payload validated by pydantic models.

    pip install 'lerobot_policy_xvla[serve]'    # FastAPI and uvicorn
    lerobot-xvla serve <checkpoint> [--host 127.0.0.1] [--port 8010] [--device cpu] [--max-request-mb 32]

POST /act with a JSON object (the original's `models/modeling_xvla.py` /act):

    image0               required; a json_numpy array (the string json_numpy.dumps makes, or its object) of
                         an HxWx3 uint8 RGB image, or of the 1-D uint8 bytes of a JPEG or PNG file (decoded to
                         RGB). Each side 1..MAX_IMAGE_SIDE. image0 is the primary camera. Images are resized
                         to the network's size as uint8 while they are validated (see "Resources").
    image1, image2       optional, the same; absent (or null) ones are masked views
    language_instruction str of at most MAX_INSTRUCTION_CHARS characters
    proprio              json_numpy array (or a plain list) of exactly the checkpoint's state width of
                         finite numbers within +-MAX_STATE_ABS (processor_xvla.py); required when the checkpoint uses proprio
    domain_id            int in [0, num_domains)
    steps                optional int in [1, MAX_STEPS]; default num_denoising_steps

-> 200 {"action": [[...], ...]} (chunk_size actions, through the checkpoint's postprocessor)
-> 4xx {"error": "..."} for every invalid request: 400 (naming the field), 404, 405, 408 (body slower than
   body_timeout_s, or than min_body_rate while the server is full), 411 (no Content-Length), 413 (body over
   --max-request-mb, refused before it is read).
   Error answers close the connection. Malformed HTTP (request line, headers) gets uvicorn's plain-text
   400, and a request that finds max_connections others in progress 503 {"error": "..."} (see below).
   A client that ends its side (shutdown(SHUT_WR)) still gets the answer to each request it sent, then the
   close; a body shorter than its Content-Length gets 400, a request line or headers cut off a plain-text
   400. A connection is closed the way nginx closes one ("lingering close"): after the answer the server
   ends its side and discards what the client still sends, for at most linger_s (at once if the client has
   ended its side), so an answer to a request refused unread is not lost to a reset.
GET /health -> 200 {"status": "ok", "cameras": [...], "state_width": ..., "num_domains": ...}

Resources are bounded: a connection that sends no complete request line and headers within keep_alive_s
is closed (uvicorn alone waits forever for a first request, and any byte cancels its keep-alive timer);
a body must arrive within body_timeout_s (and the unread rest of one the app answered without reading it
within keep_alive_s). At most max_connections requests are in progress at a time, and idle or slow
connections cannot hold one out (`GuardedH11Protocol`): a request head that finds max_connections others
in progress refuses (408) those whose body has come slower than min_body_rate (64 KiB/s) since GRACE_S
(1 s) after their head, slowest first. Heads take turns: one that finds earlier heads waiting, or no room
while bodies within their grace may still fall behind, waits (at most keep_alive_s); a request meets 503
only when max_connections others are in progress with bodies that keep up min_body_rate. Holding the
server so costs a client max_connections x min_body_rate (2 MiB/s), not a few bytes, while honest clients,
which send the body with the head at the speed of their link, are not touched. Idle connections are not
counted; with more than max_connections open, those without a request (idle, trickling headers, kept
alive after an answer) are closed, longest waiting first, once they have had an answer or GRACE_S to send
a head, so a new client's connection is not closed before its request comes. min_body_rate is an
XVLAServer argument (0 turns the rule off).
DECODE_SLOTS requests are parsed and their images decoded at a time, one image after another, and each
image leaves validation as uint8 at the network's size (`CheckpointShape.view_size`), so the model lock
never sees more: a JPEG is decoded at the smallest DCT scale (1/8..1) that covers that size, a PNG once at
full size and resized as uint8 at once (PIL bicubic, as the original's processor; bilinear to fit the
letterbox of resize_imgs_with_padding). Memory per decoding request: a few times the body, plus the one
image being decoded, at most MAX_IMAGE_SIDE^2 x 4 bytes (PIL's pixels; 64 MB), twice that for palette,
alpha and CMYK images, which are converted to RGB before the resize; no float copy is made before the
resize. The model serves one request at a time. Encoded images must carry JPEG or PNG magic bytes and the
width and height their header declares (PNG IHDR, JPEG SOFn) must be within MAX_IMAGE_SIDE before
anything is decoded.

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
import io
import json
import logging
import math
import re
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image as PILImage

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
    from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's default, imported as uvicorn does
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"the X-VLA /act server needs {missing.name}: pip install 'lerobot_policy_xvla[serve]'", name=missing.name
    ) from missing

from .processor_xvla import MAX_STATE_ABS

logger = logging.getLogger(__name__)

CAMERA_FIELDS = ("image0", "image1", "image2")
MAX_STEPS = 100
MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000
ARRAY_DTYPES = {"|u1": np.uint8, "<f4": np.float32, "<f8": np.float64, "<i4": np.int32, "<i8": np.int64}
MAX_ARRAY_ELEMENTS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 3
KEEP_ALIVE_S = 5
BODY_TIMEOUT_S = 30
LINGER_S = 2
MAX_CONNECTIONS = 32
MIN_BODY_RATE = 64 * 1024  # bytes/s a body must keep up, once GRACE_S have passed, while the server is full
GRACE_S = 1  # how long a connection may wait for its head, or come slower than MIN_BODY_RATE, before it is judged
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
    image_size: tuple[int, int] = (224, 224)  # (H, W) the network takes (config.model_image_size)
    letterbox: bool = False  # resize_imgs_with_padding: scaled to fit and padded, not stretched
    served_domain: int | None = None  # served as this domain (`--domain-id`): requests must name it; None: any

    def view_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) a height x width camera image is resized to before it reaches the policy: the network's size,
        or with the letterbox the size that fits inside it (the policy pads it; smaller images are left to it)."""
        if not self.letterbox:
            return self.image_size
        ratio = max(width / self.image_size[1], height / self.image_size[0])
        if ratio <= 1:
            return height, width
        return max(1, round(height / ratio)), max(1, round(width / ratio))


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


def _rgb_image(value: NumpyArray, info: ValidationInfo) -> np.ndarray:
    """An HxWx3 uint8 RGB array, or the bytes of a JPEG or PNG whose declared size is checked before it is
    decoded -> a uint8 RGB array at the size the network takes (`CheckpointShape.view_size`)."""
    array = value.array
    if array.dtype != np.uint8 or array.ndim not in (1, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise _error(
            "image", "must be an HxWx3 uint8 RGB image or the 1-D uint8 bytes of a JPEG/PNG, got {dtype} {shape}",
            dtype=str(array.dtype), shape=list(array.shape),
        )
    shape: CheckpointShape = info.context
    if array.ndim == 1:
        height, width = encoded_image_size(array.tobytes())
        _check_sides(height, width, "declares")
        return _decode_for_network(array.tobytes(), shape)
    _check_sides(*array.shape[:2], "is")
    size = shape.view_size(*array.shape[:2])
    if size == array.shape[:2]:
        return array
    return np.asarray(_resized(PILImage.fromarray(array), size, shape))


# EXIF orientation -> the transposition that shows the image upright (what OpenCV's decoder applies).
EXIF_ORIENTATION = 0x0112
UPRIGHT = {
    2: PILImage.Transpose.FLIP_LEFT_RIGHT, 3: PILImage.Transpose.ROTATE_180, 4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE, 6: PILImage.Transpose.ROTATE_270, 7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_90,
}
# Modes that are resized as decoded (grey, RGB, 16-bit grey); the others (palette, alpha, CMYK, 1-bit) are
# converted to RGB first.
RESIZED_AS_DECODED = frozenset({"L", "RGB", "I", "I;16", "I;16B", "I;16L"})


def _decode_for_network(data: bytes, shape: CheckpointShape) -> np.ndarray:
    """A JPEG or PNG -> uint8 RGB at the network's view size. A JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that still covers that size; a PNG cannot be decoded smaller, so it is decoded once at full
    size (at most MAX_IMAGE_SIDE^2 x 4 bytes, PIL's pixel layout) and resized as uint8 at once."""
    try:
        image = PILImage.open(io.BytesIO(data), formats=("JPEG", "PNG"))
        if image.format == "JPEG":
            side = max(shape.view_size(image.height, image.width))  # covers the view whichever way it is turned
            image.draft("RGB", (side, side))
        image.load()
        turn = UPRIGHT.get(image.getexif().get(EXIF_ORIENTATION, 1))
        if image.mode not in RESIZED_AS_DECODED:
            image = image.convert("RGB")
        height, width = (image.width, image.height) if turn in _SIDEWAYS else (image.height, image.width)
        size = shape.view_size(height, width)
        image = _resized(image, size[::-1] if turn in _SIDEWAYS else size, shape)
        if turn is not None:
            image = image.transpose(turn)
        if image.mode.startswith("I"):  # 16-bit grey: its high byte, as OpenCV's 8-bit decoding keeps
            image = PILImage.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        return np.asarray(image.convert("RGB"))
    except PydanticCustomError:
        raise
    except Exception as error:  # any fault of a decoder fed hostile bytes
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise _error("image_data", "holds a JPEG/PNG that does not decode ({reason})", reason=reason) from None


_SIDEWAYS = frozenset({PILImage.Transpose.TRANSPOSE, PILImage.Transpose.ROTATE_270,
                       PILImage.Transpose.TRANSVERSE, PILImage.Transpose.ROTATE_90})


def _resized(image: PILImage.Image, size: tuple[int, int], shape: CheckpointShape) -> PILImage.Image:
    """`image` at (height, width) `size`: bicubic as the original's processor (`Resize(BICUBIC)` of the uint8
    PIL image), bilinear for the letterbox of resize_imgs_with_padding."""
    if (image.height, image.width) == tuple(size):
        return image
    method = PILImage.Resampling.BILINEAR if shape.letterbox else PILImage.Resampling.BICUBIC
    return image.resize((size[1], size[0]), method)


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
    if not (np.isfinite(values) & (np.abs(values) <= MAX_STATE_ABS)).all():
        raise _error("proprio_range", f"must hold finite values within +-{MAX_STATE_ABS:g}")
    return values.astype(np.float32)


def _known_domain(value: int, info: ValidationInfo) -> int:
    shape: CheckpointShape = info.context
    if value >= shape.num_domains:
        message = "must be < {count} (the checkpoint's num_domains), got {value}"
        raise _error("domain_id", message, count=shape.num_domains, value=value)
    if shape.served_domain is not None and value != shape.served_domain:
        # A mixture's statistics, widths and action mode are per domain: another id would mix two robots.
        message = "must be {served} (the domain this server acts as, --domain-id), got {value}"
        raise _error("domain_id", message, served=shape.served_domain, value=value)
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

    def __init__(self, checkpoint: str | Path, device: str = "cpu", domain_id: int | None = None) -> None:
        """domain_id: serve as that domain only (required for a checkpoint trained on a mixture of robots, which
        acts as one of them); None: each request names its domain."""
        from .modeling_xvla import load_for_inference

        overrides = {} if domain_id is None else {"domain_id": domain_id}
        self.policy, self.preprocessor, self.postprocessor = load_for_inference(checkpoint, device, **overrides)
        config = self.policy.config
        self.cameras = config.camera_order[: len(CAMERA_FIELDS)]
        state = config.robot_state_feature.shape[-1] if config.use_proprio else None
        letterbox = config.resize_imgs_with_padding is not None
        self.shape = CheckpointShape(
            len(self.cameras), state, config.num_domains, tuple(config.model_image_size), letterbox, domain_id
        )
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
        body = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {timeout_s} s") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client closed the connection before sending its body") from None
    if len(body) != int(declared):  # the client ended its side early (GuardedH11Protocol.eof_received)
        message = f"the client ended its side after {len(body)} of the {declared} body bytes"
        message += " its Content-Length declares"
        raise HTTPException(400, message)
    return body


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


def _raw_answer(status: int, body: bytes = b"", media_type: str = "text/plain; charset=utf-8") -> bytes:
    """An answer that closes the connection, written by the protocol itself: for requests the app does not
    answer (cut off, too slow, no room), so neither h11 nor the app has an answer to give."""
    content_type = f"Content-Type: {media_type}\r\n".encode() if body else b""
    head = b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, HTTPStatus(status).phrase.encode(), content_type, len(body)) + body


_REQUEST_TIMEOUT = _raw_answer(408)
_CUT_REQUEST = _raw_answer(400, b"the client ended its side inside a request line or its headers")


class LingeringTransport:
    """An asyncio transport whose close() answers first and closes later. Closing a socket that holds unread
    data (the rest of a body refused unread, an over-long header) makes the kernel reset the connection, and
    on some network stacks the reset discards the answer before the client reads it. So close() ends our side
    (the answer is still flushed), keeps reading and discarding, and closes when the client closes or after
    linger_s. A client that has already ended its side (`client_ended`) sends nothing more: its connection is
    closed at once, once the answer is flushed. Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_s: float) -> None:
        self.transport = transport
        self.loop = loop
        self.linger_s = linger_s
        self.lingering = False
        self.client_ended = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self.transport.is_closing()

    def close(self) -> None:
        if self.lingering or self.client_ended or self.transport.is_closing() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        if not self.transport.is_reading():  # uvicorn pauses reading while a body waits to be consumed
            self.transport.resume_reading()
        self.loop.call_later(self.linger_s, self.transport.close)  # a no-op if the client closed first


class _RequestWatch(h11.Connection):
    """h11's server connection, asking `admit()` about each request head as it is parsed (before uvicorn sees
    it): a head not admitted yet is held back (`held`; uvicorn is told NEED_DATA) and asked about again at the
    next call. Counts the body bytes of the request in progress (`body_bytes`)."""

    def __init__(self, role: type[h11.SERVER], max_incomplete_event_size: int, admit: Any) -> None:
        super().__init__(role, max_incomplete_event_size)
        self.admit = admit
        self.held: h11.Request | None = None
        self.body_bytes = 0

    def next_event(self) -> Any:
        event = self.held if self.held is not None else super().next_event()
        self.held = None
        if isinstance(event, h11.Request):
            if not self.admit(event):
                self.held = event
                return h11.NEED_DATA
            self.body_bytes = 0
        elif isinstance(event, h11.Data):
            self.body_bytes += len(event.data)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline, answers to half-closed connections, room for requests and a
    lingering close.

    - Each request line and its headers must arrive within keep_alive_s of the connection (or of the last
      answer): uvicorn arms its keep-alive timer only after an answer and any byte cancels it, so a client
      that connects and sends nothing, or trickles a header, would hold its connection forever.
    - A client that ends its side (shutdown(SHUT_WR)) after a request still gets the answer, then the
      connection closes; a body shorter than its Content-Length gets 400, a request line or headers cut off
      a plain-text 400. (uvicorn closes on the end of the stream and drops the answer.)
    - Room for requests (`_admit`, `_make_room`): at most max_connections requests in progress. A head that
      finds max_connections others in progress makes room by refusing (408) those whose body has come
      slower than min_body_rate once GRACE_S have passed since their head, slowest first. Heads take turns,
      first come first served: one that finds earlier ones waiting, or no room while bodies within their
      grace may still be judged, is held back (reading paused) until a request ends or is admitted or a
      body is judged, for at most keep_alive_s; no room otherwise is 503. Connections without a request are
      not counted, but beyond max_connections open, those that have had an answer or GRACE_S since they
      opened are closed, longest waiting first. Only a request head closes others, never a new connection.
      (The limit is kept here, not by uvicorn's limit_concurrency, which also counts the tasks of requests
      refused a moment ago.)
    - After an answer, the rest of a body the app did not read (GET /health with a body) must arrive within
      keep_alive_s, as a next request's head must: uvicorn would read it for as long as it comes.
    - Closing goes through `LingeringTransport`."""

    def __init__(
        self,
        *args: Any,
        linger_s: float = LINGER_S,
        max_connections: int = MAX_CONNECTIONS,
        min_body_rate: float = MIN_BODY_RATE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.h11_max_incomplete_event_size
        self.conn = _RequestWatch(h11.SERVER, limit or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, self._admit)
        self.linger_s = linger_s
        self.max_connections = max_connections
        self.min_body_rate = min_body_rate
        self.request_since = 0.0  # when the last request was admitted (its head passed to uvicorn)
        self.held_since: float | None = None  # when the head now held back arrived
        self.hold: asyncio.TimerHandle | None = None
        self.header_deadline: asyncio.TimerHandle | None = None
        self.waiting_since = 0.0  # when the connection, or its last answer, began to wait for a request
        self.answered = False  # whether a request has been answered here (a kept-alive connection)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop, self.linger_s))  # type: ignore[arg-type]
        self.waiting_since = self.loop.time()
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # after the answer, what still comes is discarded
            super().data_received(data)

    def eof_received(self) -> bool:
        """The client has ended its side: answer what it sent, then close. True keeps our side open."""
        self.transport.client_ended = True
        if self.transport.is_closing():  # answered (lingering) or closed: nothing more to say
            return False
        self._answer_the_ended_client()
        return True

    def on_response_complete(self) -> None:
        self.waiting_since, self.answered = self.loop.time(), True
        self._wake_held()
        super().on_response_complete()  # starts a pipelined request, if a complete one is waiting
        if self.transport.client_ended:
            self._answer_the_ended_client()
        elif not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.header_deadline, self.hold):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
        self._wake_held()

    def _answer_the_ended_client(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # the body is cut short: the app finds it shorter than
            self.cycle.more_body = False  # its Content-Length and answers 400 (`_read_body`)
            self.cycle.message_event.set()
        elif self.cycle is None or self.cycle.response_complete:  # no request in progress
            if self.conn.trailing_data[0]:
                self.transport.write(_CUT_REQUEST)
            self.transport.close()
        # else a complete request is being answered; this runs again when its answer is complete

    def answering(self) -> bool:
        """Whether a request has reached the app and is not answered yet."""
        return self.cycle is not None and not self.cycle.response_complete and not self.transport.is_closing()

    def waiting_for_room(self) -> bool:
        """Whether a request head is held back here until there is room for it (`_admit`)."""
        return self.conn.held is not None and not self.transport.is_closing()

    def request_in_progress(self) -> bool:
        """Whether a request is being received, held back or answered here: closing would lose it."""
        return self.answering() or self.waiting_for_room()

    def slow_body_rate(self, now: float) -> float | None:
        """The rate (bytes/s) at which this request's body has come since it was admitted, when GRACE_S have
        passed and it is below min_body_rate; None otherwise."""
        elapsed = now - self.request_since
        if not self.answering() or self.conn.their_state is not h11.SEND_BODY or elapsed < GRACE_S:
            return None
        rate = self.conn.body_bytes / elapsed
        return rate if rate < self.min_body_rate else None

    def idle_for_room(self, now: float) -> bool:
        """Whether this connection may be closed as idle: it has no request in progress, and it has had an
        answer or GRACE_S to send its first head (a new client's head may be on its way)."""
        if self.transport.is_closing() or self.request_in_progress():
            return False
        return self.answered or now - self.waiting_since >= GRACE_S

    def judged_at(self, now: float) -> float | None:
        """When this request's body, behind min_body_rate but still within GRACE_S, will be judged."""
        judged = self.request_since + GRACE_S
        if not self.answering() or self.conn.their_state is not h11.SEND_BODY or judged <= now:
            return None
        return judged if self.conn.body_bytes < self.min_body_rate * GRACE_S else None

    def _admit(self, head: h11.Request) -> bool:
        """A request head has arrived: make room for it (`_make_room`). When heads that came earlier are waiting,
        or there is no room but bodies within their grace will be judged (`judged_at`), it waits in turn (held
        back, reading paused; woken when a request ends or is admitted, or a body is judged), for at most
        keep_alive_s. Otherwise, and after that, no room is 503."""
        now = self.loop.time()
        if self.held_since is None:
            self.held_since = now
        if self.hold is not None:
            self.hold.cancel()
        others = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)]
        first = all(c.held_since >= self.held_since for c in others if c.waiting_for_room())
        if first and self._make_room(others, now):
            self.held_since, self.hold, self.request_since = None, None, now
            self._wake_held()  # there may be room for the next one too
            return True
        give_up = self.held_since + self.timeout_keep_alive
        judged = min(filter(None, (c.judged_at(now) for c in others)), default=None)
        if now < give_up and (not first or judged is not None):  # else only requests in progress: 503 now
            self.flow.pause_reading()
            self.hold = self.loop.call_at(min(judged or give_up, give_up), self._release)
        else:
            request = f"{head.method.decode()} {head.target.decode('ascii', 'replace')[:200]}"
            full = f"the server is full: max_connections={self.max_connections} connections have a request in progress"
            self._answer_and_close(503, {"error": f"{request}: {full}"})
        return False

    def _release(self) -> None:
        if not self.transport.is_closing():
            self.handle_events()  # the held head is asked about again

    def _wake_held(self) -> None:
        """A request has ended or been admitted: the head that has waited longest asks again."""
        held = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.waiting_for_room()]
        if held:
            self.loop.call_soon(min(held, key=lambda c: c.held_since)._release)

    def shutdown(self) -> None:
        if self.conn.held is None:
            super().shutdown()
        else:  # the server is going away; uvicorn's shutdown expects a request to have its cycle
            self.transport.close()

    def _make_room(self, others: list[GuardedH11Protocol], now: float) -> bool:
        """Room for this request: at most max_connections requests in progress with it, bodies slower than
        min_body_rate refused (408, slowest first) to make it; False, refusing none, when that is not enough.
        Then idle connections (`idle_for_room`), longest waiting first, are closed until at most
        max_connections are open, as far as there are such."""
        for closing in (c for c in others if c.transport.is_closing()):
            closing.connections.discard(closing)  # answered: its slot is free, and its lingering close goes on
        busy = [c for c in others if c.answering()]
        rates = {c: rate for c in busy if (rate := c.slow_body_rate(now)) is not None}
        excess = len(busy) + 1 - self.max_connections
        if len(rates) < excess:
            return False
        for victim in sorted(rates, key=rates.get)[: max(excess, 0)]:
            victim.connections.discard(victim)  # its slot is free now, before the transport reports the close
            victim._refuse_slow_body(rates[victim], now)
        idle = sorted((c for c in others if c.idle_for_room(now)), key=lambda c: c.waiting_since)
        for victim in idle[: max(len(self.connections) - self.max_connections, 0)]:
            victim.connections.discard(victim)
            victim.transport.transport.close()
        return True

    def _refuse_slow_body(self, rate: float, now: float) -> None:
        """Answer 408 in place of the app, which is waiting for the body: it is told the client left, so its
        own answer is not sent. The rest of the body is drained by the lingering close."""
        message = (
            f"{self.scope['method']} {self.scope['path']}: the body came at {rate:.0f} bytes/s "
            f"({self.conn.body_bytes} bytes in {now - self.request_since:.1f} s); while the server is full, "
            f"bodies slower than {self.min_body_rate:.0f} bytes/s are refused"
        )
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        self._answer_and_close(408, {"error": message})

    def _answer_and_close(self, status: int, content: dict) -> None:
        """A JSON answer written here, for a request the app does not answer; then the lingering close."""
        self.transport.write(_raw_answer(status, json.dumps(content).encode(), "application/json"))
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.timeout_keep_alive, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        if self.request_in_progress() or self.transport.is_closing():
            return  # a request arrived (its body has its own deadline) or the connection is gone
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head: say why it is cut off
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
        min_body_rate: float = MIN_BODY_RATE,
    ) -> None:
        app = make_app(service, int(max_request_mb * 1024 * 1024), body_timeout_s)
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=functools.partial(
                GuardedH11Protocol, linger_s=linger_s, max_connections=max_connections, min_body_rate=min_body_rate
            ),
            lifespan="off",
            log_config=None,  # leave the application's logging configuration alone
            timeout_keep_alive=keep_alive_s,
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.server.should_exit = True


def serve(
    checkpoint: str,
    host: str,
    port: int,
    device: str,
    max_request_mb: float,
    domain_id: int | None = None,
    min_body_rate: float | None = None,
) -> None:
    service = XVLAService(checkpoint, device, domain_id)
    server = XVLAServer(service, host, port, max_request_mb, min_body_rate=MIN_BODY_RATE if min_body_rate is None else min_body_rate)
    if host not in LOCAL_HOSTS:
        logger.warning("serving X-VLA on %s: reachable from other machines", host)
    print(f"X-VLA /act server on http://{host}:{server.port} (checkpoint {checkpoint})", flush=True)
    server.serve_forever()
