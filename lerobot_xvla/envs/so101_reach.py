"""Simulated SO101 arms reaching for a ball: a gymnasium env that `lerobot-eval --env.type=so101_reach` makes.

One SO101 (`SO101Reach-v0`) or two side by side (`BiSO101Reach-v0`, as LeRobot's `bi_so_follower`: left arm,
then right), the MJCF of the `kinematics` extra in MuJoCo, rendered headless (`MUJOCO_GL=egl`) without shadows
or MSAA so that a CPU renders a frame in about 20 ms.

* Observation: `pixels`, a dict of HxWx3 uint8 images (`front`, and a wrist camera per arm: `wrist`, or
  `left_wrist` and `right_wrist`), and `agent_pos` [6a], the measured joints in LeRobot's units (degrees, the
  gripper 0-100), as a real arm reports them.
* Action: joint position targets [6a] in the same units, what a deployed policy's postprocessor sends a real
  arm (for `action_mode=so101_ee6d` its inverse-kinematics step makes them from poses). MuJoCo clamps targets
  into the actuators' ranges; a non-finite action is refused with an error, never simulated.
* Task: touch the ball (red for the left or only arm, blue for the right) with the fingertip frame
  (`gripper_frame_link`). An episode succeeds, with reward 1, on the step every arm is within
  `success_distance_m` of its ball, and ends there. Each ball is drawn at reset, from the env's seed, at the
  forward kinematics of random joints in front of its arm, so it is always reachable; its place is seen only
  by the cameras (`info["ball_positions"]` holds it in each arm's base frame, for scripted experts).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ..robots.so101_kinematics import KinematicsUnavailableError, SO101ForwardKinematics, SO101InverseKinematics, packaged_urdf

try:
    import mujoco
except ImportError as error:
    raise KinematicsUnavailableError(f"the simulated SO101 arms need MuJoCo: pip install 'lerobot_policy_xvla[so101_sim]' ({error})") from None
from ..robots.so101_mujoco import ROBOT_JOINTS, SimulatedArm, mjcf_path
from .so101_reach_config import camera_names

ARM_PREFIXES = {1: ("",), 2: ("left_", "right_")}
ARM_BASE_Y = {1: (0.0,), 2: (0.2, -0.2)}  # metres; the robot faces +x, so its left is +y
BALL_COLOURS = ((0.9, 0.1, 0.1, 1.0), (0.1, 0.3, 0.9, 1.0))
BALL_RADIUS = 0.015
START_JOINTS = np.array([0.0, -40.0, 50.0, 50.0, 0.0, 50.0])  # LeRobot units; the fingertip 0.22 m ahead, 6 cm up
START_NOISE_DEG = 5.0
# Balls are placed at the fingertip of joints drawn from these ranges (degrees), kept if the point lies in
# BALL_BOX (the arm's base frame, metres) and at least BALL_MIN_TRAVEL_M from the start.
BALL_JOINT_LOW = np.array([-35.0, -30.0, -10.0, 20.0, 0.0])
BALL_JOINT_HIGH = np.array([35.0, 25.0, 60.0, 80.0, 0.0])
BALL_BOX = (np.array([0.12, -0.3, 0.03]), np.array([0.45, 0.3, 0.22]))
BALL_MIN_TRAVEL_M = 0.06
TASKS = {1: "touch the red ball with the gripper", 2: "touch the red ball with the left gripper and the blue ball with the right gripper"}


def build_scene(arms: int):
    """The MuJoCo model: a floor, a shadowless light, `arms` SO101s, a ball per arm (a mocap body that does not
    collide) and a front camera over the workspace."""
    scene = mujoco.MjSpec()
    scene.visual.quality.offsamples = 0  # no MSAA: software rendering pays for every sample
    scene.visual.headlight.ambient = [0.4, 0.4, 0.4]
    scene.visual.headlight.diffuse = [0.5, 0.5, 0.5]
    scene.worldbody.add_geom(type=mujoco.mjtGeom.mjGEOM_PLANE, size=[2.0, 2.0, 0.05], rgba=[0.55, 0.55, 0.5, 1.0])
    scene.worldbody.add_light(pos=[0.2, 0.0, 1.5], dir=[0.0, 0.0, -1.0], castshadow=False)
    for prefix, y, colour in zip(ARM_PREFIXES[arms], ARM_BASE_Y[arms], BALL_COLOURS, strict=False):
        arm = mujoco.MjSpec.from_file(str(mjcf_path()))
        scene.worldbody.add_frame(pos=[0.0, y, 0.0]).attach_body(arm.body("base"), prefix, "")
        ball = scene.worldbody.add_body(name=f"{prefix}ball", mocap=True, pos=[0.25, y, 0.1])
        ball.add_geom(type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[BALL_RADIUS, 0, 0], rgba=list(colour), contype=0, conaffinity=0)
    scene.worldbody.add_camera(name="front", pos=[0.8, 0.0, 0.55], xyaxes=_look_at([0.8, 0.0, 0.55], [0.22, 0.0, 0.04]), fovy=50.0 if arms == 1 else 65.0)
    return scene.compile()


def _look_at(eye, target) -> list[float]:
    """MuJoCo camera `xyaxes` for a camera at `eye` looking at `target`, the image's up towards +z."""
    forward = np.subtract(target, eye) / np.linalg.norm(np.subtract(target, eye))
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return [*right, *np.cross(right, forward)]


class SO101ReachEnv(gym.Env):
    """See the module docstring. `arms`: 1 or 2; images `observation_height` x `observation_width`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, arms: int = 1, observation_height: int = 128, observation_width: int = 128, fps: int = 30,
                 success_distance_m: float = 0.02, render_mode: str = "rgb_array") -> None:
        if arms not in ARM_PREFIXES:
            raise ValueError(f"SO101ReachEnv arms must be 1 or 2, got {arms}")
        if render_mode != "rgb_array":
            raise ValueError(f"SO101ReachEnv renders only render_mode='rgb_array', got {render_mode!r}")
        self.arms, self.render_mode, self.success_distance_m = arms, render_mode, success_distance_m
        self.metadata = {**self.metadata, "render_fps": fps}
        self.model = build_scene(arms)
        self.data = mujoco.MjData(self.model)
        self.robot = [SimulatedArm(self.model, self.data, prefix) for prefix in ARM_PREFIXES[arms]]
        self.balls = [self.model.body(f"{prefix}ball").mocapid[0] for prefix in ARM_PREFIXES[arms]]
        self.substeps = max(1, round(1 / fps / self.model.opt.timestep))
        self.cameras = camera_names(arms)
        self.renderer = mujoco.Renderer(self.model, observation_height, observation_width)
        self.forward_kinematics = SO101ForwardKinematics(packaged_urdf())
        self.task = self.task_description = TASKS[arms]
        self.ball_positions = np.zeros((arms, 3))

        low, high = [], []
        for arm in self.robot:
            ranges = self.model.actuator_ctrlrange[arm.actuators]
            low += [*np.rad2deg(ranges[:5, 0]), 0.0]
            high += [*np.rad2deg(ranges[:5, 1]), 100.0]
        self.action_space = spaces.Box(np.array(low, np.float32), np.array(high, np.float32), dtype=np.float32)
        image = spaces.Box(0, 255, (observation_height, observation_width, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({name: image for name in self.cameras}),
            "agent_pos": spaces.Box(-np.inf, np.inf, (len(ROBOT_JOINTS) * arms,), dtype=np.float32),
        })

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        starts = [START_JOINTS + np.r_[self.np_random.uniform(-START_NOISE_DEG, START_NOISE_DEG, 5), 0.0] for _ in self.robot]
        for arm, start in zip(self.robot, starts, strict=True):
            arm.place(start)
        mujoco.mj_kinematics(self.model, self.data)  # the bases' world poses, to place the balls
        for index, (arm, start) in enumerate(zip(self.robot, starts, strict=True)):
            self.ball_positions[index] = self._draw_ball(start)
            base_rotation = self.data.xmat[arm.base].reshape(3, 3)
            self.data.mocap_pos[self.balls[index]] = self.data.xpos[arm.base] + base_rotation @ self.ball_positions[index]
        mujoco.mj_forward(self.model, self.data)
        return self._observation(), self._info()

    def _draw_ball(self, start: np.ndarray) -> np.ndarray:
        start_tip = self.forward_kinematics(torch.from_numpy(start[:5]))[:3, 3].numpy()
        while True:
            joints = self.np_random.uniform(BALL_JOINT_LOW, BALL_JOINT_HIGH, (64, 5))
            tips = self.forward_kinematics(torch.from_numpy(joints))[:, :3, 3].numpy()
            good = np.all((tips >= BALL_BOX[0]) & (tips <= BALL_BOX[1]), axis=1)
            good &= np.linalg.norm(tips - start_tip, axis=1) >= BALL_MIN_TRAVEL_M
            if good.any():
                return tips[np.argmax(good)]

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"SO101ReachEnv expects joint targets of shape {self.action_space.shape}, got {action.shape}")
        if not np.isfinite(action).all():
            raise ValueError(f"SO101ReachEnv refuses a non-finite action: {action.tolist()}")
        for arm, joints in zip(self.robot, action.reshape(self.arms, len(ROBOT_JOINTS)), strict=True):
            arm.command(joints)
        mujoco.mj_step(self.model, self.data, self.substeps)
        info = self._info()
        success = bool(info["is_success"])
        return self._observation(), float(success), success, False, info

    def distances(self) -> np.ndarray:
        """Distance (m) of each arm's fingertip from its ball [arms]."""
        return np.array([np.linalg.norm(arm.end_effector()[0] - ball) for arm, ball in zip(self.robot, self.ball_positions, strict=True)])

    def _info(self) -> dict:
        distances = self.distances()
        return {"is_success": bool((distances <= self.success_distance_m).all()), "distance_m": distances,
                "ball_positions": self.ball_positions.copy()}

    def _observation(self) -> dict:
        pixels = {name: self._render(name if name == "front" else f"{name}_cam") for name in self.cameras}  # MJCF: <prefix>wrist_cam
        joints = np.concatenate([arm.joints() for arm in self.robot]).astype(np.float32)
        return {"pixels": pixels, "agent_pos": joints}

    def _render(self, camera: str) -> np.ndarray:
        self.renderer.update_scene(self.data, camera=camera)
        return self.renderer.render().copy()

    def render(self) -> np.ndarray:
        return self._render("front")

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()  # now, not at interpreter exit, where EGL's teardown prints tracebacks
            self.renderer = None


class ReachExpert:
    """A scripted demonstrator: each fingertip heads straight for its ball, at most `step_m` per tick, keeping its
    orientation where the five joints allow (position-only inverse kinematics from the measured joints)."""

    def __init__(self, arms: int = 1, step_m: float = 0.01) -> None:
        self.arms, self.step_m = arms, step_m
        self.forward_kinematics = SO101ForwardKinematics(packaged_urdf())
        self.solver = SO101InverseKinematics(packaged_urdf(), orientation_weight=0.0)

    def __call__(self, observation: dict, info: dict) -> np.ndarray:
        """Joint targets [6a] for the env's `observation` and `info` (which holds the balls' positions)."""
        targets = []
        for joints, ball in zip(observation["agent_pos"].reshape(self.arms, len(ROBOT_JOINTS)), info["ball_positions"], strict=True):
            pose = self.forward_kinematics(torch.from_numpy(joints[:5].astype(np.float64))).numpy()
            gap = ball - pose[:3, 3]
            pose[:3, 3] += gap * min(1.0, self.step_m / max(float(np.linalg.norm(gap)), 1e-9))
            targets.append([*self.solver.solve(pose, joints[:5]).joints_deg, joints[5]])
        return np.asarray(targets, dtype=np.float32).reshape(-1)
