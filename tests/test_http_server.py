"""The /act server (FastAPI + uvicorn) over loopback: the original X-VLA clients' payloads, 16 concurrent
clients, idle and slow clients, limits, image bombs, and an HTTP answer below 500 to thousands of malformed
requests."""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import importlib.util
import json
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import cv2
import json_numpy
import numpy as np
import psutil
import pytest
import requests
import torch

from lerobot_xvla import XVLAPolicy, http_server
from lerobot_xvla_cli import build_parser
from lerobot_xvla_cli import main as cli_main
from lerobot_xvla.http_server import LINGER_S, XVLAServer, XVLAService
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

from conftest import PUSHT_DOMAIN, SO101_DOMAIN, tiny_config
from so101_deploy import training_stats

CAMERAS = ("observation.images.image0", "observation.images.image1", "observation.images.image2")
BOUNDS = {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20) * 5, "max": torch.ones(20) * 5}
STATS = {"observation.state": BOUNDS, "action": BOUNDS}
KEEP_ALIVE_S = 1
BODY_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def service(tmp_path_factory, tokenizer_dir):
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    config = tiny_config(3, tokenizer_name=tokenizer_dir)
    config.input_features = {CAMERAS[i]: config.input_features[f"observation.images.cam{i}"] for i in range(3)} | {
        "observation.state": config.input_features["observation.state"]
    }
    XVLAPolicy(config).save_pretrained(checkpoint)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(checkpoint)
    return XVLAService(checkpoint)


@contextlib.contextmanager
def serving(service: XVLAService, **limits):
    """An XVLAServer on a free port in a thread; yields the port."""
    httpd = XVLAServer(service, port=0, max_request_mb=2, **limits)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.port
    finally:
        httpd.shutdown()
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(service):
    with serving(service, keep_alive_s=KEEP_ALIVE_S, body_timeout_s=BODY_TIMEOUT_S, max_connections=64) as port:
        yield port


def image(seed: int = 0, size=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def payload(seed: int = 0, size=(48, 64), steps: int = 4) -> dict:
    """A request as the original clients build it: every array a json_numpy string."""
    return {
        "image0": json_numpy.dumps(image(seed, size)),
        "image1": json_numpy.dumps(image(seed + 1, (32, 32))),
        "image2": json_numpy.dumps(image(seed + 2, size)),
        "language_instruction": "put the red cube in the bowl",
        "proprio": json_numpy.dumps(np.zeros(20, dtype=np.float32)),
        "domain_id": 3,
        "steps": steps,
    }


def encoded(data: bytes) -> str:
    """Bytes of an encoded image as the original clients send them: json_numpy of a 1-D uint8 array."""
    return json_numpy.dumps(np.frombuffer(data, np.uint8))


def post(port: int, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, json.loads(data)


def exchange(port: int, raw: bytes, method: str = "POST", timeout: float = 30) -> tuple[int | None, bytes]:
    """Send raw bytes on a fresh connection; (status, body) of the answer, status None if none came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # the server may answer and close before taking all of a refused body
            pass
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return None, b""


def http_request(body: bytes, method: str = "POST", path: str = "/act", headers: dict | None = None) -> bytes:
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))} | (headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_original_client_payload_gives_an_action_chunk(server):
    reply = requests.post(f"http://127.0.0.1:{server}/act", json=payload(), timeout=120)  # as the original clients
    assert reply.status_code == 200, reply.text
    action = np.asarray(reply.json()["action"])
    assert action.shape == (30, 20) and np.isfinite(action).all()


def test_encoded_views_objects_and_absent_views(server):
    request = payload()
    request["image1"] = encoded(cv2.imencode(".jpg", image(5))[1].tobytes())  # as the original accepts
    request["image0"] = json.loads(json_numpy.dumps(image(6)))  # the object form (clients using json_numpy.patch())
    del request["image2"]  # a masked view, as in the original processor
    request["proprio"] = [0.1] * 20  # a plain list is accepted too
    status, reply = post(server, json.dumps(request).encode())
    assert status == 200, reply
    request["image2"] = encoded(cv2.imencode(".png", image(7))[1].tobytes())
    status, reply = post(server, json.dumps(request).encode())
    assert status == 200, reply


def test_health_names_what_requests_must_fit(server):
    status, reply = exchange(server, http_request(b"", "GET", "/health"), "GET")
    assert status == 200
    assert json.loads(reply) == {"status": "ok", "cameras": list(CAMERAS), "state_width": 20, "num_domains": 8}


@pytest.mark.parametrize("values", [[0.5], [0.0] * 14, [0.0] * 21, [[0.0] * 20]])
def test_proprio_must_have_the_checkpoints_state_width(server, values):
    array = np.asarray(values, np.float32)
    status, reply = post(server, json.dumps({**payload(), "proprio": json_numpy.dumps(array)}).encode())
    expected = f"'proprio': must be 20 values (the checkpoint's state width), got shape {list(array.shape)}"
    assert (status, reply) == (400, {"error": expected})


@pytest.mark.parametrize("proprio", [[1e30] * 20, json_numpy.dumps(np.full(20, np.nan, np.float32)), [1e40] * 20])
def test_proprio_out_of_range_is_named(server, proprio):
    status, reply = post(server, json.dumps({**payload(), "proprio": proprio}).encode())
    assert (status, reply) == (400, {"error": "'proprio': must hold finite values within +-1e+06"})


def test_sixteen_concurrent_clients(server, capsys):
    def client(seed: int) -> tuple[int, np.ndarray, float]:
        start = time.perf_counter()
        status, reply = post(server, json.dumps(payload(seed, steps=2)).encode())
        return status, np.asarray(reply.get("action")), time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(client, range(16)))
    with capsys.disabled():
        print(f"\n16 concurrent /act latencies (s): {sorted(round(seconds, 3) for _, _, seconds in results)}")
    for status, action, _ in results:
        assert status == 200 and action.shape == (30, 20) and np.isfinite(action).all()


def test_idle_and_partial_requests_are_closed(server):
    with socket.create_connection(("127.0.0.1", server), timeout=KEEP_ALIVE_S + 20) as sock:
        assert sock.recv(1024) == b""  # closed by the server, not timed out here
    with socket.create_connection(("127.0.0.1", server), timeout=KEEP_ALIVE_S + 20) as sock:
        sock.sendall(b"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", server), timeout=KEEP_ALIVE_S + 20) as sock:
        sock.sendall(http_request(b"", "GET", "/health"))
        answer = sock.makefile("rb").read()  # the answer, then the close of the idle keep-alive connection
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_slow_body_gets_408(server):
    body = json.dumps(payload()).encode()
    status, reply = exchange(server, http_request(body)[: -len(body) // 2])  # half the body, then silence
    assert status == 408
    assert json.loads(reply) == {"error": f"POST /act: the body did not arrive within {BODY_TIMEOUT_S} s"}


def test_size_limit_and_content_length(server):
    status, reply = exchange(server, http_request(b"", headers={"Content-Length": str(3 * 1024 * 1024)}))
    assert status == 413  # refused before reading: no body was sent
    assert json.loads(reply) == {"error": "POST /act: the body exceeds 2097152 bytes"}
    status, reply = exchange(server, b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert status == 411



def refuse_then_keep_sending(port: int, raw: bytes, seconds: float) -> tuple[int, bytes, float | None]:
    """Send `raw` and read the answer, then go on sending for up to `seconds` the way a client still uploading
    a refused body does: (status, body, seconds after the answer until the server closed, None if it did not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        status, body = response.status, response.read()
        answered = time.monotonic()
        try:
            while time.monotonic() - answered < seconds:
                sock.sendall(b"x" * 2**20)
                time.sleep(0.05)
        except OSError:  # reset: the server closed while data still came
            return status, body, time.monotonic() - answered
        return status, body, None


@pytest.mark.parametrize(
    "raw",
    [
        http_request(b"x" * 1000, headers={"Content-Length": str(4 * 2**20)}),  # a body over the limit, half sent
        b"POST /act HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000,  # a header over h11's limit, still coming
    ],
    ids=["body_over_limit", "header_over_limit"],
)
def test_a_refused_client_still_sending_is_drained_then_closed(server, raw):
    # Closing at once would reset the connection under a client still sending, and a reset can discard the
    # answer before the client reads it (seen in CI). The server drains for LINGER_S, and no longer.
    status, _, closed_after = refuse_then_keep_sending(server, raw, seconds=LINGER_S + 8)
    assert status in (400, 413)
    assert closed_after is not None and 0.5 <= closed_after <= LINGER_S + 5, closed_after

def half_closed(port: int, raw: bytes, timeout: float = 30) -> bytes:
    """Send `raw`, end our side (shutdown(SHUT_WR)) and read until the server closes: all it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def status_lines(answer: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def test_a_half_closed_client_gets_every_answer(server):
    valid = json.dumps(payload(steps=1)).encode()
    cut = http_request(valid, headers={"Content-Length": str(len(valid) + 100)})  # 100 bytes short of its length
    cases = {
        "GET /health": (http_request(b"", "GET", "/health"), [200]),
        "valid POST /act": (http_request(valid), [200]),
        "invalid POST /act": (http_request(b"{}"), [400]),
        "body shorter than its Content-Length": (cut, [400]),
        "headers cut off": (b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Le", [400]),
        "two pipelined requests": (http_request(b"", "GET", "/health") + http_request(valid), [200, 200]),
    }
    answers = {name: half_closed(server, raw) for name, (raw, _) in cases.items()}
    seen = {name: status_lines(answer) for name, answer in answers.items()}
    assert seen == {name: statuses for name, (_, statuses) in cases.items()}, answers
    assert answers["body shorter than its Content-Length"].endswith(
        f"the client ended its side after {len(valid)} of the {len(valid) + 100} body bytes its Content-Length "
        'declares"}'.encode()
    )
    assert answers["valid POST /act"].count(b'"action"') == 1


def honest_requests(port: int, seconds: float, act_body: bytes) -> Counter:
    """GET /health and POST /act alternately, each on a new connection, for `seconds`: the answers by status
    ("dropped" for a connection closed without an answer)."""
    seen: Counter = Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for raw, method in ((http_request(b"", "GET", "/health"), "GET"), (http_request(act_body), "POST")):
            status, _ = exchange(port, raw, method)
            seen[status or "dropped"] += 1
    return seen


def honest_clients(port: int, clients: int = 3, seconds: float = 3.0) -> Counter:
    """What `clients` honest clients see in `seconds` of `honest_requests` beside the hoarders."""
    time.sleep(0.5)  # every hoarder connected and waiting
    act_body = json.dumps(payload(steps=1)).encode()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(honest_requests, [port] * clients, [seconds] * clients, [act_body] * clients))
    return sum(results, Counter())


class Hoarders:
    """TCP connections held the way a client hoarding them does, each opened again as soon as the server closes
    it (checked every `every` s): `idle` ones that send nothing, `header_tricklers` that send a request header a
    byte at a time, and `body_tricklers` that send a complete POST /act head declaring a 1 MB body, then one
    body byte at a time. `answers` counts the status lines the server sent the body tricklers before closing."""

    HEADER = b"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 10_000
    BODY_HEAD = http_request(b"", headers={"Content-Length": str(10**6)})

    def __init__(self, port: int, idle: int = 0, header_tricklers: int = 0, body_tricklers: int = 0,
                 every: float = 0.25) -> None:
        self.port, self.every, self.stop = port, every, threading.Event()
        kinds = ["idle"] * idle + ["header"] * header_tricklers + ["body"] * body_tricklers
        self.connections = [self._connect(kind) for kind in kinds]
        self.reopened, self.answers = 0, Counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self, kind: str) -> dict:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if kind == "body":
            sock.sendall(self.BODY_HEAD)
        sock.setblocking(False)
        return {"kind": kind, "sock": sock, "sent": 0, "received": b""}

    @staticmethod
    def _closed(connection: dict) -> bool:
        try:
            while chunk := connection["sock"].recv(65536):
                connection["received"] += chunk
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            for index, connection in enumerate(self.connections):
                kind, sock = connection["kind"], connection["sock"]
                try:
                    if not self._closed(connection):
                        if kind == "header":
                            sent = connection["sent"] % len(self.HEADER)
                            sock.send(self.HEADER[sent : sent + 1])
                        elif kind == "body":
                            sock.send(b"x")
                        connection["sent"] += 1
                        continue
                except OSError:
                    pass
                sock.close()
                if kind == "body":
                    self.answers.update(status_lines(connection["received"]) or ["none"])
                self.connections[index] = self._connect(kind)
                self.reopened += 1

    def __enter__(self) -> Hoarders:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for connection in self.connections:
            connection["sock"].close()


@pytest.mark.parametrize("idle", [31, 64])
def test_idle_and_trickling_connections_do_not_lock_out_clients(service, idle, capsys):
    # The limits of `lerobot-xvla serve`: 32 connections, 5 s for a request's headers.
    with serving(service) as port, Hoarders(port, idle=idle, header_tricklers=1) as hoarders:
        seen = honest_clients(port)
    with capsys.disabled():
        print(f"\n{idle} idle sockets and a trickling client (reopened {hoarders.reopened} times): honest clients "
              f"got {dict(seen)}")
    assert set(seen) == {200} and seen[200] >= 6, seen


@pytest.mark.parametrize("tricklers", [32, 64])
def test_bodies_trickled_while_the_server_is_full_do_not_lock_out_clients(service, tricklers, capsys):
    # Complete heads, then a byte of body every 0.25 s: a body has 30 s to arrive, so each trickler could hold
    # its connection that long. While the server is full, a body slower than min_body_rate after GRACE_S is
    # refused (408) to make room; honest bodies arrive at once, and their requests wait their turn.
    with serving(service) as port, Hoarders(port, body_tricklers=tricklers) as hoarders:
        seen = honest_clients(port)
    with capsys.disabled():
        print(f"\n{tricklers} clients trickling bodies (reopened {hoarders.reopened} times, answered "
              f"{dict(hoarders.answers)}): honest clients got {dict(seen)}")
    assert set(seen) == {200} and seen[200] >= 6, seen
    # 408 when refused to make room (503 if a trickler's own head waited keep_alive_s for its turn); never served
    assert set(hoarders.answers) <= {408, 503} and hoarders.answers[408] > 0, hoarders.answers


def test_clients_above_the_connection_limit_get_503(service, monkeypatch):
    body = json.dumps(payload(steps=1)).encode()
    release, act = threading.Event(), service.act
    monkeypatch.setattr(service, "act", lambda request: release.wait(60) and act(request))
    with serving(service, max_connections=4) as port:
        holders = []  # four connections with a request in progress: sent whole, held in the model call
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(http_request(body))
            holders.append(sock)
        time.sleep(0.5)  # the server has taken the four requests
        above = Counter(exchange(port, http_request(b"", "GET", "/health"), "GET")[0] for _ in range(6))
        release.set()
        answers = []
        for sock in holders:  # the four requests were served, not refused
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            answers.append(response.status)
            response.read()
            sock.close()
        after = exchange(port, http_request(b"", "GET", "/health"), "GET")[0]
    assert (above, answers, after) == (Counter({503: 6}), [200] * 4, 200)


def send_paced(sock: socket.socket, data: bytes, rate: float, piece: int = 8192) -> None:
    """Send `data` at about `rate` bytes/s, `piece` bytes at a time."""
    start = time.monotonic()
    for offset in range(0, len(data), piece):
        time.sleep(max(0.0, start + offset / rate - time.monotonic()))
        sock.sendall(data[offset : offset + piece])


def test_a_full_server_refuses_the_slow_body_and_keeps_the_upload_at_rate(service):
    """Two connections, both full: one trickles its body, one uploads at twice min_body_rate. A third request
    refuses the trickler (408, named) and is served; the upload is served too."""
    upload = http_request(json.dumps(payload(size=(200, 300), steps=1)).encode())
    with serving(service, max_connections=2) as port, ThreadPoolExecutor(max_workers=1) as pool:
        trickler = socket.create_connection(("127.0.0.1", port), timeout=30)
        trickler.sendall(http_request(b"", headers={"Content-Length": "1000"}) + b"{")
        uploader = socket.create_connection(("127.0.0.1", port), timeout=60)
        sending = pool.submit(send_paced, uploader, upload, 2 * http_server.MIN_BODY_RATE)
        time.sleep(http_server.GRACE_S + 0.5)
        assert not sending.done()  # still uploading: the server is full of bodies in progress
        third = exchange(port, http_request(b"", "GET", "/health"), "GET")
        refused = trickler.makefile("rb").read()
        sending.result()
        response = http.client.HTTPResponse(uploader, method="POST")
        response.begin()
        uploaded = response.status, json.loads(response.read())
    assert third[0] == 200 and uploaded[0] == 200 and len(uploaded[1]["action"]) == 30, (third, uploaded)
    assert refused.startswith(b"HTTP/1.1 408 "), refused
    message = json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]
    assert re.fullmatch(
        r"POST /act: the body came at \d bytes/s \(1 bytes in \d+\.\d s\); while the server is full, bodies slower "
        r"than 65536 bytes/s are refused", message), message


def timed_exchange(port: int, raw: bytes, method: str) -> tuple[int | None, float]:
    start = time.monotonic()
    return exchange(port, raw, method)[0], time.monotonic() - start


@pytest.mark.parametrize("on_its_way", ["head", "body"])
def test_a_client_whose_request_is_on_its_way_is_waited_for_not_closed(service, on_its_way):
    """One request at a time. The first client connects (and, for "body", sends its head); a second request
    comes 0.2 s later, the first's request (the rest of it) 0.3 s after that. Closing the first would drop an
    honest client: it is kept, and the second is served beside its connection ("head") or waits for its
    request to end ("body": at most GRACE_S, then the body would be judged)."""
    body = json.dumps(payload(steps=1)).encode()
    raw = http_request(body)
    sent_first = len(raw) - len(body) if on_its_way == "body" else 0
    with serving(service, max_connections=1) as port, ThreadPoolExecutor(max_workers=1) as pool:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
            first.sendall(raw[:sent_first])
            time.sleep(0.2)
            second = pool.submit(timed_exchange, port, http_request(b"", "GET", "/health"), "GET")
            time.sleep(0.3)
            first.sendall(raw[sent_first:])
            response = http.client.HTTPResponse(first, method="POST")
            response.begin()
            answered = response.status, json.loads(response.read())
        status, waited = second.result()
    assert answered[0] == 200 and len(answered[1]["action"]) == 30, answered
    assert status == 200 and (on_its_way == "head" or waited > 0.25), (status, waited)


def test_idle_connections_are_closed_only_beyond_the_limit_longest_waiting_first(service):
    """Four allowed. Two idle connections and a request: nothing is closed. Three more idle ones (six with the
    request): the two that have waited longest are closed, once every one has had GRACE_S to send a head."""

    def still_open(sock: socket.socket) -> bool:
        try:
            return sock.recv(1) != b""
        except BlockingIOError:
            return True

    with serving(service, max_connections=4) as port:
        idle = []
        for count in (2, 3):
            for _ in range(count):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                idle[-1].setblocking(False)
                time.sleep(0.05)  # a distinct waiting order
            time.sleep(http_server.GRACE_S + 0.2)
            assert exchange(port, http_request(b"", "GET", "/health"), "GET")[0] == 200
            time.sleep(0.2)
            if count == 2:
                assert [still_open(sock) for sock in idle] == [True] * 2
        states = [still_open(sock) for sock in idle]
        for sock in idle:
            sock.close()
    assert states == [False, False, True, True, True], states


def test_min_body_rate_is_the_servers_setting(service):
    """min_body_rate=0 turns the rule off: the trickled body keeps its connection and a request beside it gets
    503, named, at once (there is nothing to wait for)."""
    with serving(service, max_connections=1, min_body_rate=0) as port, socket.create_connection(
        ("127.0.0.1", port), timeout=30
    ) as trickler:
        trickler.sendall(http_request(b"", headers={"Content-Length": "1000"}) + b"{")
        time.sleep(http_server.GRACE_S + 0.5)
        status, waited = timed_exchange(port, http_request(b"", "GET", "/health"), "GET")
        answer = exchange(port, http_request(b"", "GET", "/health"), "GET")
    full = "GET /health: the server is full: max_connections=1 connections have a request in progress"
    assert (status, json.loads(answer[1])) == (503, {"error": full}) and waited < 0.5, (status, answer, waited)


def test_the_unread_body_of_an_answered_request_has_the_header_deadline(server):
    """GET /health answers without reading a body; uvicorn would read the rest for as long as it comes."""
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(http_request(b"", "GET", "/health", headers={"Content-Length": str(10**9)}))
        sock.settimeout(0.1)
        start, answer = time.monotonic(), b""
        while time.monotonic() - start < KEEP_ALIVE_S + 10:  # a byte of the body every 0.1 s
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: closed while bytes still came
                break
            if not chunk:
                break
            answer += chunk
        closed_after = time.monotonic() - start
    assert status_lines(answer) == [200], answer
    assert closed_after < KEEP_ALIVE_S + LINGER_S + 3, closed_after


def test_three_4096_pixel_pngs_are_decoded_within_the_documented_memory(server, capsys):
    # Each 4096x4096 PNG (61 kB) must be decoded once at full size (PNG has no reduced decoding); the server
    # decodes one image at a time and resizes it as uint8 before anything else sees it.
    big = png_bomb(4096, 64)
    body = json.dumps({**payload(), **{field: encoded(big) for field in ("image0", "image1", "image2")}}).encode()
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    post(server, json.dumps(payload()).encode())  # warm
    sampler = threading.Thread(target=sample)
    baseline = process.memory_info().rss
    sampler.start()
    start = time.perf_counter()
    try:
        status, reply = post(server, body)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    with capsys.disabled():
        print(f"\n/act with three 4096x4096 PNGs ({len(body) / 2**20:.2f} MB body): RSS +{growth_mb:.0f} MB, "
              f"{seconds:.2f} s")
    assert status == 200, reply
    # One decoded image at 4 bytes a pixel (64 MB), and the body and its parse: three images at once or any
    # float copy at full size (192 MB an image) would exceed it.
    assert growth_mb < 130, growth_mb


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        *((method, "/act", 405) for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")),
        ("POST", "/health", 405),
        ("GET", "/nope", 404),
        ("POST", "/act/", 404),
    ],
)
def test_wrong_methods_and_paths(server, method, path, status):
    answer, body = exchange(server, http_request(b"{}", method, path), method)
    assert answer == status
    if method != "HEAD":
        assert json.loads(body)["error"].startswith(f"{method} {path}: ")


def png_bomb(side: int = 16000, rows_per_block: int = 100) -> bytes:
    """A valid PNG of side x side black RGB pixels (side * (3 * side + 1) zero bytes deflated, ~750 kB for
    16000). Built from one fully flushed deflate block repeated (after a full flush the same input deflates
    to the same bytes), so making it costs milliseconds."""
    row = 3 * side + 1  # a filter byte, then the pixels
    block = bytes(row * rows_per_block)
    deflate = zlib.compressobj(9)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    final_block = deflate.flush()[:-4]  # without the Adler-32 of the two blocks given
    adler = ((row * side) % 65521) << 16 | 1  # the Adler-32 of that many zero bytes
    stream = first + repeated * (side // rows_per_block - 1) + final_block + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def jpeg_declaring(height: int, width: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to declare height x width."""
    data = bytearray(cv2.imencode(".jpg", image(3, (16, 16)))[1].tobytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_png_bomb_is_refused_before_decoding(server):
    bomb = png_bomb()
    assert zlib.decompressobj().decompress(bomb[41:-16], 1 << 20) == bytes(1 << 20)  # the IDAT inflates
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    baseline = process.memory_info().rss
    sampler.start()
    try:
        status, reply = post(server, json.dumps({**payload(), "image1": encoded(bomb)}).encode())
    finally:
        done.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    print(f"RSS growth while refusing a {len(bomb) // 1024} kB PNG declaring 16000x16000: {growth_mb:.1f} MB")
    assert (status, reply) == (400, {"error": "'image1': declares 16000x16000 pixels; each side must be 1..4096"})
    assert growth_mb < 100
    status, reply = post(server, json.dumps({**payload(), "image2": encoded(jpeg_declaring(16000, 9))}).encode())
    assert (status, reply) == (400, {"error": "'image2': declares 16000x9 pixels; each side must be 1..4096"})


def test_only_jpeg_and_png_are_decoded(server):
    expected = {"error": "'image0': holds bytes that are not a JPEG or PNG file (the only encodings accepted)"}
    for extension in (".bmp", ".tiff", ".ppm", ".webp"):
        data = cv2.imencode(extension, image(4, (16, 16)))[1].tobytes()
        status, reply = post(server, json.dumps({**payload(), "image0": encoded(data)}).encode())
        assert (status, reply) == (400, expected), extension


def test_json_number_and_string_attacks_name_the_field(server):
    good = json.dumps(payload())
    cases = {
        "domain_id": good.replace('"domain_id": 3', '"domain_id": ' + "9" * 5000),
        "steps": good.replace('"steps": 4', '"steps": NaN'),
        "language_instruction": good.replace("put the red cube", "put the \\ud800 cube"),
        "proprio": good.replace('"proprio": "', '"proprio": ' + "[" * 2000 + "]" * 2000 + ', "x": "'),
    }
    for field, body in cases.items():
        status, reply = post(server, body.encode())
        assert status == 400 and f"'{field}'" in reply["error"], (field, reply)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


TINY = image(0, (8, 8))
# json_numpy objects that are broken or hostile as arrays.
BAD_ARRAYS = [
    {"__numpy__": "!!!not base64!!!", "dtype": "|u1", "shape": [2, 2, 3]},
    {"__numpy__": _b64(TINY)[:-4] + "====", "dtype": "|u1", "shape": [8, 8, 3]},  # padding inside
    {"__numpy__": _b64(TINY), "dtype": ["|u1"], "shape": [8, 8, 3]},
    *(
        {"__numpy__": _b64(TINY), "dtype": dtype, "shape": [8, 8, 3]}
        for dtype in ("|O", "<U4", ">f4", "|b1", "|V8", "", 5, None)
    ),
    *(
        {"__numpy__": _b64(TINY), "dtype": "|u1", "shape": shape}
        for shape in ([1] * 70, [2**63, 2**63, 0], [-8, 8, 3], [8.0, 8, 3], "8,8,3", [10**6] * 3, [True, 8, 3], None)
    ),
    {"__numpy__": "", "dtype": "|u1", "shape": [2**63, 2**63, 0]},
    {"dtype": "|u1", "shape": [1]},
]
# Field values of the wrong type, proprio values of the wrong width or range, JSON literals no encoder writes.
WRONG_VALUES = [None, True, 1.5, -1, 10**30, 2**63, "", "x", [], [[1, 2], [3]], {}, {"a": 1}, "/etc/passwd", "{not json"]
BAD_PROPRIOS = [[0.0] * 21, [0.0], [], [[0.0] * 20], [1, "a"], [True] * 20, [1e30] * 20]
LITERALS = ["9" * 5000, "-" + "9" * 100_000, "1e999999", "NaN", "Infinity", "-Infinity", "[" * 2000 + "]" * 2000]
LITERALS += ['"\\ud800"', '"\\udfff x"']  # lone surrogates
# Requests wrong at the HTTP level.
WRONG_ROUTES = [
    *(("GET", "/act"), ("PUT", "/act"), ("DELETE", "/health"), ("FOO", "/act"), ("OPTIONS", "/"), ("POST", "/")),
    *(("POST", "/act/"), ("POST", "/acts"), ("GET", "/%ff"), ("POST", "/act?x=1"), ("GET", "/health?" + "a" * 5000)),
]
RAW_REQUESTS = [
    b"HELLO\r\n\r\n",
    b"POST /act HTTP/2.0\r\nHost: x\r\n\r\n",
    b"POST /act HTTP/1.1\r\n\r\n",  # no Host
    b"POST /act HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n",
    b"POST /\xc3\xa4 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /act HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: [\r\n\r\n",
    b"POST /act HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"POST /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
]
BAD_LENGTHS = ["\u00b2", "-5", "1e3", "", "9" * 5000, "12, 13", "0x10", "+5"]
OVERSIZED = [{"Content-Length": str(3 * 2**20)}, {"Content-Length": "1" + "0" * 30}]
OVERSIZED += [{"Expect": "100-continue", "Content-Length": str(2**40)}]


def bad_images() -> list[np.ndarray]:
    """Encoded bombs, other formats, cut and empty files, and raw arrays of the wrong shape or dtype."""
    jpeg, png = (cv2.imencode(extension, TINY)[1].reshape(-1) for extension in (".jpg", ".png"))
    bombs = (png_bomb(8000, 50), jpeg_declaring(16000, 16000), jpeg_declaring(0, 8))
    return [
        *(np.frombuffer(data, np.uint8) for data in bombs),
        *(cv2.imencode(extension, TINY)[1].reshape(-1) for extension in (".bmp", ".tiff", ".ppm", ".webp")),
        *(cv2.imencode(extension, TINY.astype(np.float32))[1].reshape(-1) for extension in (".pfm", ".hdr")),
        jpeg[:40],  # a readable frame header, then cut off
        png[:30],
        np.frombuffer(b"\x89PNG\r\n\x1a\n", np.uint8),
        np.frombuffer(b"\xff\xd8\xff\xd9", np.uint8),
        np.frombuffer(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(40), np.uint8),  # JPEG 2000 signature
        np.zeros(0, np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8), np.uint8),
        np.zeros((5000, 1, 3), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8, 3, 1), np.uint8),
    ]


def fuzz_cases(count: int, seed: int = 0):
    """`count` (raw HTTP request, method) pairs: mutations of a valid request (wrong types, huge integer
    literals, NaN, lone surrogates, bad base64, dtypes and shapes, deep nesting, image bombs and other
    formats, truncated bodies, wrong Content-Length, bad methods, paths and request lines)."""
    rng = random.Random(seed)
    good = payload(size=(8, 8), steps=1)
    good["image1"] = good["image2"] = good["image0"]
    images = [json.loads(json_numpy.dumps(array)) for array in bad_images()]
    for index in range(count):
        request = copy.deepcopy(good)
        kind = index % 13
        field = rng.choice(list(good))
        if kind == 0:  # a required field missing, or a field of the wrong type
            if rng.random() < 0.3:
                del request[rng.choice(["image0", "language_instruction", "proprio", "domain_id"])]
            else:
                request[field] = rng.choice(WRONG_VALUES)
        elif kind in (1, 2):  # a broken or hostile array in an image field, as a string or an object
            value = rng.choice(BAD_ARRAYS if kind == 1 else images)
            request[rng.choice(["image0", "image1", "image2"])] = rng.choice([value, json.dumps(value)])
        elif kind == 3:
            request["proprio"] = rng.choice(BAD_PROPRIOS)
        elif kind == 4:
            pairs = [(-1, 1), (30, 1), (3.0, 1), ("3", 1), (3, 0), (3, 101), (3, 2.5), (3, False)]
            request["domain_id"], request["steps"] = rng.choice(pairs)
        elif kind == 5:
            request["language_instruction"] = rng.choice([None, 7, ["a"], "w" * 5000, "\ud800", "a\udfffb"])
        elif kind == 6:  # a JSON literal in a field, or in the shape inside a json_numpy string
            literal = rng.choice(LITERALS)
            if rng.random() < 0.3:
                request["image1"] = json.dumps({"__numpy__": "", "dtype": "|u1", "shape": "@LITERAL@"})
                body = json.dumps(request).replace('\\"@LITERAL@\\"', json.dumps(literal)[1:-1])
            else:
                request[field] = "@LITERAL@"
                body = json.dumps(request).replace('"@LITERAL@"', literal)
            yield http_request(body.encode()), "POST"
            continue
        elif kind == 7:  # not an object, not JSON, not UTF-8, absurdly nested, truncated
            body = json.dumps(good).encode()
            bodies = [b"[1, 2]", b'"a"', b"null", b"", b"{", b"\xff\xfe garbage", b"[" * 100_000]
            yield http_request(rng.choice([*bodies, body[: rng.randrange(len(body))]])), "POST"
            continue
        elif kind == 8:  # a body longer than its Content-Length (cut JSON), or a malformed Content-Length
            body = json.dumps(request).encode()
            length = str(rng.randrange(len(body))) if rng.random() < 0.5 else rng.choice(BAD_LENGTHS)
            yield http_request(body, headers={"Content-Length": length}), "POST"
            continue
        elif kind == 9:
            method, path = rng.choice(WRONG_ROUTES)
            yield http_request(json.dumps(request).encode(), method, path), method
            continue
        elif kind == 10:
            yield rng.choice(RAW_REQUESTS), "POST"
            continue
        elif kind == 11:  # over the size limit: refused unread
            yield http_request(b"", headers=rng.choice(OVERSIZED)), "POST"
            continue
        else:  # an image field holding a path or a camera's name
            paths = ["/etc/passwd", "C:\\x.png", "image.jpg", "observation.images.image0"]
            request[rng.choice(["image0", "image1"])] = rng.choice(paths)
        yield http_request(json.dumps(request).encode()), "POST"


def test_thousands_of_malformed_requests_get_an_answer_below_500(server, capsys):
    statuses: Counter = Counter()
    for number, (raw, method) in enumerate(fuzz_cases(2200)):
        status, body = exchange(server, raw, method)
        statuses[status] += 1
        assert status is not None and status < 500, (number, raw[:300], status, body[:300])
        if status == 200 and raw.startswith(b"POST /act"):  # a mutation that left the request valid
            assert np.isfinite(json.loads(body)["action"]).all()
    with capsys.disabled():
        print(f"\n/act fuzz: {sum(statuses.values())} requests, answers by status {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == 2200
    assert post(server, json.dumps(payload()).encode())[0] == 200  # still serving


def test_serve_command_line(capsys):
    args = build_parser().parse_args(["serve", "some/checkpoint"])
    assert (args.host, args.port, args.device, args.max_request_mb) == ("127.0.0.1", 8010, "cpu", 32.0)
    assert (args.domain_id, args.min_body_rate) == (None, None)  # each request's domain; the server's 64 KiB/s
    args = build_parser().parse_args(["serve", "some/checkpoint", "--domain-id", "6", "--min-body-rate", "0"])
    assert (args.domain_id, args.min_body_rate) == (6, 0.0)
    for rate in ("-1", "nan", "inf", "fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "some/checkpoint", "--min-body-rate", rate])
        assert f"--min-body-rate: must be a finite number of bytes/s >= 0, got '{rate}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = {"--host": "127.0.0.1", "--port": "8010", "--device": "cpu", "--max-request-mb": "32.0"}
    for option, default in defaults.items():  # each option's own help says its default
        assert f"(default: {default})" in help_text.split(f"{option} ", 2)[-1].split(" --")[0], (option, help_text)


def test_missing_serve_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what `import fastapi` meets when it is not installed
    spec = importlib.util.spec_from_file_location("lerobot_xvla.http_server_without_fastapi", http_server.__file__)
    message = "the X-VLA /act server needs fastapi: pip install 'lerobot_policy_xvla[serve]'"
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize(("domain", "status"), [(-1, 400), (0, 200), (7, 200), (8, 400)])
def test_domain_id_boundaries_through_act(server, domain, status):
    """-1, 0, N-1 and N (the tiny checkpoint has 8 domains): the last valid id acts, N is refused by name."""
    request = payload(steps=1)
    request["domain_id"] = domain
    answered, content = post(server, json.dumps(request).encode())
    assert answered == status, content
    if status == 400:
        assert "domain_id" in content["error"]


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_red_image_reaches_the_policy_red(service, monkeypatch, image_format):
    """The original clients send RGB images (encoded or as arrays): a pure-red JPEG and PNG reach the policy's
    preprocessor with red in channel 0, not in OpenCV's BGR order."""
    import io

    from PIL import Image

    seen = []
    preprocess = service.preprocessor
    monkeypatch.setattr(service, "preprocessor", lambda observation: seen.append(observation) or preprocess(observation))
    data = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(data, image_format)
    request = payload(steps=1)
    request["image0"] = encoded(data.getvalue())
    request["image1"] = json_numpy.dumps(np.tile(np.array([255, 0, 0], np.uint8), (32, 32, 1)))
    status, content = service.answer(json.dumps(request).encode())
    assert status == 200, content
    for camera in service.cameras[:2]:
        pixels = seen[0][camera].float()  # [3, H, W] uint8
        means = pixels.mean(dim=(1, 2)).tolist()
        assert means[0] > 250 and means[1] < 5 and means[2] < 5, (camera, means)


def so101_request(domain_id: int) -> dict:
    """An /act request from the two-arm SO101 of `mixture_checkpoint`: its two 64x96 cameras and 12 joints."""
    rng = np.random.default_rng(0)
    views = {f"image{i}": json_numpy.dumps(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for i in range(2)}
    proprio = training_stats()["observation.state"]["mean"].numpy()
    return {**views, "language_instruction": "pick", "proprio": json_numpy.dumps(proprio), "domain_id": domain_id, "steps": 2}


def test_a_mixture_checkpoint_is_served_as_one_of_its_robots(mixture_checkpoint, capsys):
    """`lerobot-xvla serve --domain-id 6` on a checkpoint co-trained on the SO101 and PushT: the SO101's requests get
    its 12-D actions inside its dataset's range; a request for another domain is refused by name (a mixture's
    statistics and widths are per domain); without --domain-id the command stops in one line."""
    service = XVLAService(mixture_checkpoint, domain_id=SO101_DOMAIN)
    status, answer = service.answer(json.dumps(so101_request(SO101_DOMAIN)).encode())
    assert status == 200, answer
    action, bounds = np.asarray(answer["action"]), training_stats()["action"]  # the dataset's actions lie inside
    assert action.shape[1] == 12 and np.isfinite(action).all()
    assert (action >= bounds["min"].numpy() - 1e-4).all() and (action <= bounds["max"].numpy() + 1e-4).all()
    status, answer = service.answer(json.dumps(so101_request(PUSHT_DOMAIN)).encode())
    assert status == 400 and answer["error"] == "'domain_id': must be 6 (the domain this server acts as, --domain-id), got 3"
    assert cli_main(["serve", str(mixture_checkpoint)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lerobot-xvla serve: error: this X-VLA was trained on a mixture")
    assert "one of [3, 6]: 6 = local/so101_two_cameras, 3 = local/xvla_demo_pusht; lerobot-xvla serve: --domain-id" in error
