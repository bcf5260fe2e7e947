"""LeRobot's async inference with X-VLA over loopback: `lerobot-xvla-policy-server` (LeRobot's policy server,
accepting `xvla`) in its own process, LeRobot's RobotClient driving the simulated bimanual SO101, and the
server's domain-id boundaries through LeRobot's own gRPC messages."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation, map_robot_keys_to_lerobot_features
from lerobot.robots.bi_so_follower import BiSOFollowerConfig
from lerobot.robots.so_follower import SOFollowerConfig

from lerobot.transport import services_pb2, services_pb2_grpc
from lerobot.transport.utils import send_bytes_in_chunks

from lerobot_xvla.demo import lerobot_command
from lerobot_xvla.modeling_xvla import load_config
from sim_so101 import SimCameraConfig, all_goal_writes
from so101_deploy import (  # noqa: F401  (fixtures)
    CAMERAS,
    HEIGHT,
    JOINTS,
    PORTS,
    ROBOT_ID,
    TASK,
    WIDTH,
    assert_goals_inside_calibration,
    checkpoint,
    robot,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the policy server exited: {process.stdout.read()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no policy server on port {port}")


@contextlib.contextmanager
def policy_server(directory: Path) -> Iterator[SimpleNamespace]:
    """`lerobot-xvla-policy-server` on a free port, run from `directory` (it writes logs/ there); yields its
    port, and its output (`log`) once it has stopped."""
    served = SimpleNamespace(port=free_port(), log="")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [lerobot_command("lerobot-xvla-policy-server"), "--host=127.0.0.1", f"--port={served.port}", "--fps=10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=directory,
    )  # fmt: skip
    try:
        wait_for_port(served.port, server)
        yield served
    finally:
        server.terminate()
        served.log = server.communicate(timeout=30)[0]


def test_policy_server_drives_the_robot_client(checkpoint, robot, tmp_path, monkeypatch):
    # RobotClient opens logs/robot_client_<time>.log in the working directory when its module is imported
    # (a class attribute), so it is imported here, from the test's own directory, not the checkout's.
    monkeypatch.chdir(tmp_path)
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient

    with policy_server(tmp_path) as server:
        port = server.port
        arms = {
            arm: SOFollowerConfig(port=PORTS[arm], cameras={CAMERAS[arm]: SimCameraConfig(width=WIDTH, height=HEIGHT, fps=30, seed=i)})
            for i, arm in enumerate(("left", "right"))
        }
        config = RobotClientConfig(
            policy_type="xvla",
            pretrained_name_or_path=str(checkpoint),
            robot=BiSOFollowerConfig(id=ROBOT_ID, calibration_dir=tmp_path / "calibration", left_arm_config=arms["left"], right_arm_config=arms["right"]),
            actions_per_chunk=10,
            task=TASK,
            server_address=f"127.0.0.1:{port}",
            fps=10,
        )
        client = RobotClient(config)
        assert client.start(), "the client could not register the xvla policy with the server"
        receiver = threading.Thread(target=client.receive_actions, daemon=True)
        control = threading.Thread(target=client.control_loop, kwargs={"task": TASK}, daemon=True)
        receiver.start()
        control.start()
        deadline = time.monotonic() + 90
        while len(all_goal_writes(robot)) < 12 * 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        client.stop()
        control.join(timeout=30)
        receiver.join(timeout=30)
        writes = assert_goals_inside_calibration(robot)
        assert len(writes) >= 12 * 8, f"only {len(writes)} goal writes reached the servos"
    assert "lerobot_xvla" in server.log or "Time taken to put policy" in server.log, server.log[-3000:]


def with_domain_id(source: Path, directory: Path, domain_id: int, where: str) -> Path:
    """A copy of checkpoint `source` with `domain_id` in its config.json ("config"), or in its preprocessor's
    domain step with the config's left unset, as LeRobot's built-in X-VLA saves it ("preprocessor")."""
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config["domain_id"] = domain_id if where == "config" else None
    (directory / "config.json").write_text(json.dumps(config))
    if where == "preprocessor":
        path = directory / "policy_preprocessor.json"
        pipeline = json.loads(path.read_text())
        (step,) = [step for step in pipeline["steps"] if step.get("registry_name") == "xvla_add_domain_id"]
        step["config"]["domain_id"] = domain_id
        path.write_text(json.dumps(pipeline))
    return directory


class AsyncClient:
    """LeRobot's async-inference client messages (those RobotClient sends) for the simulated bimanual SO101."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = services_pb2_grpc.AsyncInferenceStub(self.channel)
        motors = {f"{arm}_{motor}.pos": float for arm, motor in JOINTS}
        cameras = {f"{arm}_{name}": (HEIGHT, WIDTH, 3) for arm, name in CAMERAS.items()}
        self.features = map_robot_keys_to_lerobot_features(SimpleNamespace(observation_features=motors | cameras))
        self.observation = {key: 0.0 for key in motors} | {
            key: np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) for key, shape in cameras.items()
        } | {"task": TASK}
        self.timestep = 0

    def act(self, path: Path) -> list:
        """Register the checkpoint at `path` as the policy (Ready, SendPolicyInstructions), send one observation
        and ask for its actions: the actions ([] for an empty answer)."""
        self.stub.Ready(services_pb2.Empty())
        spec = RemotePolicyConfig("xvla", str(path), self.features, actions_per_chunk=5)
        self.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(spec)))
        self.timestep += 1
        observation = TimedObservation(time.time(), self.timestep, self.observation, must_go=True)
        self.stub.SendObservations(send_bytes_in_chunks(pickle.dumps(observation), services_pb2.Observation))
        answer = self.stub.GetActions(services_pb2.Empty())
        return [action.get_action() for action in pickle.loads(answer.data)] if answer.data else []


def test_the_policy_server_serves_valid_domain_ids_and_refuses_the_others_by_name(checkpoint, tmp_path):
    """Domain ids -1, 0, N-1 and N on the async server's two input paths: the checkpoint's config.json, and
    the preprocessor's domain step of a config without one (LeRobot's built-in X-VLA layout). 0 and N-1
    are served; -1 and N never reach the model: both paths are refused at setup, by name (the client's
    RpcError), since an id read from the preprocessor is checked like one from config.json. The server goes
    on serving the next client."""
    num_domains = load_config(checkpoint).num_domains
    refused_at_setup, no_actions = {}, {}
    with policy_server(tmp_path) as server:
        client = AsyncClient(server.port)
        for where in ("config", "preprocessor"):
            for domain_id in (-1, 0, num_domains, num_domains - 1):  # each refusal followed by a valid id
                path = with_domain_id(checkpoint, tmp_path / f"{where}{domain_id}", domain_id, where)
                try:
                    actions = client.act(path)
                except grpc.RpcError as error:
                    refused_at_setup[where, domain_id] = error.details()
                    continue
                if actions:
                    assert len(actions) == 5 and all(a.shape == (12,) and a.isfinite().all() for a in actions)
                else:
                    no_actions[where, domain_id] = True
        client.channel.close()
    outside = {-1, num_domains}
    assert {key: message.split(": ", 1)[-1] for key, message in refused_at_setup.items()} == {
        (where, d): f"domain_id must be in [0, num_domains={num_domains}), got {d}" for where in ("config", "preprocessor") for d in outside
    }
    assert not no_actions
