"""LeRobot's async inference with X-VLA over loopback: `lerobot-xvla-policy-server` (LeRobot's policy server,
accepting `xvla`) in its own process, LeRobot's RobotClient driving the simulated bimanual SO101."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

from lerobot.robots.bi_so_follower import BiSOFollowerConfig
from lerobot.robots.so_follower import SOFollowerConfig

from lerobot_xvla.demo import lerobot_command
from sim_so101 import SimCameraConfig, all_goal_writes
from so101_deploy import (  # noqa: F401  (fixtures)
    CAMERAS,
    HEIGHT,
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


def test_policy_server_drives_the_robot_client(checkpoint, robot, tmp_path, monkeypatch):
    # RobotClient opens logs/robot_client_<time>.log in the working directory when its module is imported
    # (a class attribute), so it is imported here, from the test's own directory, not the checkout's.
    monkeypatch.chdir(tmp_path)
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [lerobot_command("lerobot-xvla-policy-server"), "--host=127.0.0.1", f"--port={port}", "--fps=10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,  # it writes logs/ there
    )  # fmt: skip
    try:
        wait_for_port(port, server)
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
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "lerobot_xvla" in log or "Time taken to put policy" in log, log[-3000:]
