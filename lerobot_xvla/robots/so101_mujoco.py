"""The SO101 in MuJoCo (the MJCF that ships beside the URDF), in LeRobot's units, and driven through the IK path.

`SimulatedArm` is one arm of a MuJoCo model (a scene may hold several, their names prefixed) as LeRobot's robot
classes see a real one: joints in degrees, the gripper 0 (closed) to 100 (open), commands to the STS3215
position actuators of the MJCF. The simulated env (`lerobot_xvla/envs/so101_reach.py`) and `track_end_effector`
both drive arms through it.

`track_end_effector` plays a commanded end-effector trajectory as a deployed policy would: each control tick the
measured joints go through the preprocessor's forward-kinematics step, the commanded pose through the
postprocessor's inverse-kinematics step, and the joint targets into MuJoCo's actuators (under gravity). It
returns what the arm's end effector actually did.

MuJoCo's `gripperframe` site is the URDF's `gripper_frame_link` point; its axes are the URDF frame's turned by
-90 degrees about y (`SITE_TO_URDF`). Both models share the joint zero, so LeRobot degrees equal MuJoCo's
angles here (no calibration offsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lerobot.processor import TransitionKey
from lerobot.utils.constants import OBS_STATE

from ..rotations import rot6d_to_matrix
from .so101_kinematics import ARM_JOINTS, GRIPPER_JOINT, packaged_urdf, rotation_angle_deg
from .so101_steps import GRIPPER_OPEN, EndEffectorToJointsStep, JointsToEndEffectorStep

SITE = "gripperframe"
# URDF frame axes = site axes @ SITE_TO_URDF
SITE_TO_URDF = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
ROBOT_JOINTS = (*ARM_JOINTS, GRIPPER_JOINT)  # LeRobot's order of an SO101's six motors


def mjcf_path() -> Path:
    """The SO101's MJCF, beside the URDF in the `kinematics` extra's model package."""
    return packaged_urdf().with_name("so101_new_calib.xml")


def load_model():
    import mujoco

    return mujoco.MjModel.from_xml_path(str(mjcf_path()))


class SimulatedArm:
    """One SO101 of a MuJoCo model whose joint, actuator, site and body names carry `prefix`."""

    def __init__(self, model, data, prefix: str = "") -> None:
        self.model, self.data = model, data
        joints = [model.joint(prefix + name).id for name in ROBOT_JOINTS]
        self.qpos, self.dofs = model.jnt_qposadr[joints], model.jnt_dofadr[joints]
        self.actuators = np.array([model.actuator(prefix + name).id for name in ROBOT_JOINTS])
        self.gripper_range = model.actuator(prefix + GRIPPER_JOINT).ctrlrange.copy()
        self.site = model.site(prefix + SITE).id
        self.base = model.body(prefix + "base").id

    def to_mujoco(self, joints: np.ndarray) -> np.ndarray:
        """LeRobot units [6] -> MuJoCo joint angles [6] (radians; the gripper 0-100 over its actuator range)."""
        low, high = self.gripper_range
        return np.array([*np.deg2rad(joints[:5]), low + (high - low) * joints[5] / GRIPPER_OPEN])

    def command(self, joints: np.ndarray) -> None:
        """Send position targets [6] in LeRobot units; MuJoCo clamps them into the actuators' ranges."""
        self.data.ctrl[self.actuators] = self.to_mujoco(joints)

    def place(self, joints: np.ndarray) -> None:
        """Put the arm at `joints` [6] at rest, its actuators holding it there (for a reset)."""
        self.data.qpos[self.qpos] = self.to_mujoco(joints)
        self.data.qvel[self.dofs] = 0.0
        self.command(joints)

    def joints(self) -> np.ndarray:
        """The measured joints [6] in LeRobot units (float64)."""
        low, high = self.gripper_range
        angles = self.data.qpos[self.qpos]
        return np.array([*np.rad2deg(angles[:5]), GRIPPER_OPEN * (angles[5] - low) / (high - low)])

    def end_effector(self) -> tuple[np.ndarray, np.ndarray]:
        """Position [3] (m) and URDF-frame axes [3, 3] of the end effector in this arm's base frame."""
        base_rotation = self.data.xmat[self.base].reshape(3, 3)
        position = base_rotation.T @ (self.data.site_xpos[self.site] - self.data.xpos[self.base])
        rotation = base_rotation.T @ self.data.site_xmat[self.site].reshape(3, 3) @ SITE_TO_URDF
        return position, rotation


@dataclass
class Tracking:
    position_error_mm: np.ndarray  # [T] distance of the reached end effector from each commanded position
    orientation_error_deg: np.ndarray  # [T] angle between reached and commanded orientation
    commanded_joints: np.ndarray  # [T, 6] what the IK step sent (LeRobot degrees, gripper 0-100)


def track_end_effector(targets: torch.Tensor, start_joints: torch.Tensor, fps: float = 30.0, settle_s: float = 1.0, **ik_settings) -> Tracking:
    """Command ee6d poses `targets` [T, 20] (one arm) at `fps` from the joints `start_joints` [6] (degrees,
    gripper 0-100), after holding the start for `settle_s`; errors are measured at the end of each tick."""
    import mujoco

    model = load_model()
    data = mujoco.MjData(model)
    arm = SimulatedArm(model, data)
    forward = JointsToEndEffectorStep(arms=1)
    inverse = EndEffectorToJointsStep(arms=1, **ik_settings)
    inverse.joints_source = forward
    start = start_joints.double().numpy()
    arm.place(start)
    substeps = max(1, round(1 / fps / model.opt.timestep))

    def command(joints: np.ndarray) -> None:
        arm.command(joints)
        mujoco.mj_step(model, data, substeps)

    for _ in range(round(settle_s * fps)):
        command(start)
    errors_mm, errors_deg, sent = [], [], []
    for target in targets.double():
        state = torch.tensor([*arm.joints()[:5], start[5]])[None]
        forward({TransitionKey.OBSERVATION: {OBS_STATE: state}})
        joints = inverse({TransitionKey.ACTION: target[None]})[TransitionKey.ACTION][0].numpy()
        command(joints)
        sent.append(joints)
        position, rotation = arm.end_effector()
        wanted = rot6d_to_matrix(target[3:9], "interleaved").numpy()
        errors_mm.append(1e3 * np.linalg.norm(position - target[:3].numpy()))
        errors_deg.append(rotation_angle_deg(rotation, wanted))
    return Tracking(np.array(errors_mm), np.array(errors_deg), np.stack(sent))
