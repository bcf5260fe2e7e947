"""The /act HTTP server of the original X-VLA protocol: real json_numpy clients, concurrency, and 4xx (never
5xx) answers to over a thousand malformed requests, all over loopback."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import json_numpy
import numpy as np
import pytest
import torch

from lerobot_xvla import XVLAPolicy
from lerobot_xvla.http_server import XVLAService, make_server
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

from conftest import tiny_config

CAMERAS = ("observation.images.image0", "observation.images.image1", "observation.images.image2")
STATS = {key: {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20) * 5, "max": torch.ones(20) * 5} for key in ("observation.state", "action")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    config = tiny_config(3, tokenizer_name=tokenizer_dir)
    config.input_features = {CAMERAS[i]: config.input_features[f"observation.images.cam{i}"] for i in range(3)} | {
        "observation.state": config.input_features["observation.state"]
    }
    XVLAPolicy(config).save_pretrained(checkpoint)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(checkpoint)
    httpd = make_server(XVLAService(checkpoint), port=0, max_request_mb=2)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def image(seed: int = 0, size=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def payload(seed: int = 0) -> dict:
    """A request as the original clients build it: every array a json_numpy string."""
    return {
        "image0": json_numpy.dumps(image(seed)),
        "image1": json_numpy.dumps(image(seed + 1, (32, 32))),
        "image2": json_numpy.dumps(image(seed + 2)),
        "language_instruction": "put the red cube in the bowl",
        "proprio": json_numpy.dumps(np.zeros(20, dtype=np.float32)),
        "domain_id": 3,
        "steps": 4,
    }


def post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/act", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, json.loads(data)


def test_original_client_payload_gives_an_action_chunk(server):
    status, reply = post(server, json.dumps(payload()).encode())
    assert status == 200, reply
    action = np.asarray(reply["action"])
    assert action.shape == (30, 20) and np.isfinite(action).all()


def test_encoded_jpeg_views_and_absent_views(server):
    request = payload()
    ok, jpeg = cv2.imencode(".jpg", image(5))
    request["image1"] = json_numpy.dumps(jpeg.reshape(-1))
    del request["image2"]  # a masked view, as in the original processor
    request["proprio"] = [0.1] * 14  # a plain list is accepted too
    status, reply = post(server, json.dumps(request).encode())
    assert status == 200, reply


@pytest.mark.parametrize("proprio", [[1e40] * 3, json_numpy.dumps(np.full(20, np.nan, np.float32))])
def test_proprio_outside_float32_is_named(server, proprio):
    status, reply = post(server, json.dumps({**payload(), "proprio": proprio}).encode())
    assert (status, reply) == (400, {"error": "'proprio' must hold finite float32 values"})


def test_eight_concurrent_clients(server):
    def client(seed: int) -> list[int]:
        return [post(server, json.dumps(payload(seed * 10 + i)).encode())[0] for i in range(3)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [s for result in pool.map(client, range(8)) for s in result]
    assert statuses == [200] * 24


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def malformed_payloads(count: int, seed: int = 0):
    """`count` invalid requests: every field missing, of the wrong type, or with a broken or hostile value."""
    rng = random.Random(seed)
    good = payload()
    wrong_values = [None, True, 1.5, -1, 10**30, "", "x" * 10, [], [[1, 2], [3]], {}, {"a": 1}, "/etc/passwd", "{not json"]
    arrays = [
        {"__numpy__": "!!!not base64!!!", "dtype": "|u1", "shape": [2, 2, 3]},
        {"__numpy__": _b64(image()), "dtype": "|O", "shape": [48, 64, 3]},
        {"__numpy__": _b64(image()), "dtype": "|u1", "shape": [10**6, 10**6, 3]},
        {"__numpy__": _b64(image()), "dtype": "|u1", "shape": [48, 64]},
        {"__numpy__": _b64(image()), "dtype": "|u1", "shape": [-48, 64, 3]},
        {"__numpy__": _b64(image()), "dtype": "|u1", "shape": "48,64,3"},
        {"__numpy__": _b64(np.zeros((4, 4, 4), np.uint8)), "dtype": "|u1", "shape": [4, 4, 4]},
        {"__numpy__": _b64(np.zeros((4, 4, 3), np.float32)), "dtype": "<f4", "shape": [4, 4, 3]},
        {"__numpy__": _b64(np.zeros((5000, 1, 3), np.uint8)), "dtype": "|u1", "shape": [5000, 1, 3]},
        {"__numpy__": _b64(np.frombuffer(b"garbage bytes, not a jpeg", np.uint8)), "dtype": "|u1", "shape": [25]},
        {"__numpy__": _b64(np.zeros(3, np.int64)), "dtype": "<i8", "shape": [3]},
        {"dtype": "|u1", "shape": [1]},
        {"__numpy__": _b64(image()), "dtype": "|u1", "shape": [48, 64, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]},
    ]
    proprios = [
        json_numpy.dumps(np.full(20, np.nan, np.float32)),
        json_numpy.dumps(np.zeros(21, np.float32)),
        json_numpy.dumps(np.zeros((4, 5), np.float32)),
        json_numpy.dumps(np.zeros(0, np.float32)),
        [1, "a", 3],
        [float("inf")] * 3,
        json_numpy.dumps(np.array([1e40], np.float64)),
    ]
    for index in range(count):
        request = copy.deepcopy(good)
        kind = index % 8
        if kind == 0:  # a required field missing
            del request[rng.choice(["image0", "language_instruction", "proprio", "domain_id"])]
        elif kind == 1:  # a field of the wrong type (any string is a valid instruction: see kind 5)
            request[rng.choice([k for k in good if k != "language_instruction"])] = rng.choice(wrong_values)
        elif kind == 2:  # a broken or hostile image
            array = rng.choice(arrays)
            request[rng.choice(["image0", "image1", "image2"])] = rng.choice([array, json.dumps(array)])
        elif kind == 3:
            request["proprio"] = rng.choice(proprios)
        elif kind == 4:
            request["domain_id"] = rng.choice([-1, 8, 2**63, 3.0, "3"])
            if rng.random() < 0.5:
                request["domain_id"], request["steps"] = 3, rng.choice([0, 101, -5, 2.5, "10", False])
        elif kind == 5:
            request["language_instruction"] = rng.choice([None, 7, ["a"], "w" * 5000])
        elif kind == 6:  # not an object / not JSON / not UTF-8 / absurdly nested
            yield rng.choice([b"[1, 2, 3]", b'"a string"', b"null", b"{", b"\xff\xfe\x00 garbage", b"[" * 100_000 + b"]" * 100_000])
            continue
        else:  # a field that is a path or an extra camera
            request[rng.choice(["image0", "image1"])] = rng.choice(["/etc/passwd", "C:\\x.png", "image.jpg"])
        yield json.dumps(request).encode()


def test_a_thousand_malformed_requests_get_4xx(server):
    statuses = {}
    for number, body in enumerate(malformed_payloads(1200)):
        status, reply = post(server, body)
        assert 400 <= status < 500, (number, body[:200], reply)
        assert isinstance(reply["error"], str) and reply["error"]
        statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == 1200
    assert post(server, json.dumps(payload()).encode())[0] == 200  # still serving


def headers_only(port: int, length: str | None) -> int:
    """Status of a POST /act that announces a body of `length` bytes (or none) and sends only headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("POST", "/act", skip_accept_encoding=True)
    if length is not None:
        connection.putheader("Content-Length", length)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_size_limit_length_and_routes(server):
    assert headers_only(server, str(3 * 1024 * 1024)) == 413  # refused before reading the body
    assert headers_only(server, None) == 411
    assert headers_only(server, "-5") == 411
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    connection.request("GET", "/act")
    assert connection.getresponse().status == 405
    connection.close()


def test_binds_to_localhost_by_default(server):
    from lerobot_xvla.cli import build_parser

    args = build_parser().parse_args(["serve", "some/checkpoint"])
    assert args.host == "127.0.0.1"
