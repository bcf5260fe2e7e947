"""The SO101 in MuJoCo (the MJCF that ships beside the URDF), driven through the end-effector IK path.

`track_end_effector` plays a commanded end-effector trajectory as a deployed policy would: each control tick the
measured joints go through the preprocessor's forward-kinematics step, the commanded pose through the
postprocessor's inverse-kinematics step, and the joint targets into MuJoCo's position actuators (the STS3215
model of the MJCF, under gravity). It returns what the arm's end effector actually did.

MuJoCo's `gripperframe` site is the URDF's `gripper_frame_link` point; its axes are the URDF frame's turned by
-90 degrees about y (`SITE_TO_URDF`). Both models share the joint zero, so LeRobot degrees equal MuJoCo's
angles here (no calibration offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lerobot.processor import TransitionKey
from lerobot.utils.constants import OBS_STATE

from ..rotations import rot6d_to_matrix
from .so101_kinematics import ARM_JOINTS, packaged_urdf, rotation_angle_deg
from .so101_steps import EndEffectorToJointsStep, JointsToEndEffectorStep

SITE = "gripperframe"
# URDF frame axes = site axes @ SITE_TO_URDF
SITE_TO_URDF = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


@dataclass
class Tracking:
    position_error_mm: np.ndarray  # [T] distance of the reached end effector from each commanded position
    orientation_error_deg: np.ndarray  # [T] angle between reached and commanded orientation
    commanded_joints: np.ndarray  # [T, 6] what the IK step sent (LeRobot degrees, gripper 0-100)


def load_model():
    import mujoco

    return mujoco.MjModel.from_xml_path(str(packaged_urdf().with_name("so101_new_calib.xml")))


def track_end_effector(targets: torch.Tensor, start_joints: torch.Tensor, fps: float = 30.0, settle_s: float = 1.0, **ik_settings) -> Tracking:
    """Command ee6d poses `targets` [T, 20] (one arm) at `fps` from the joints `start_joints` [6] (degrees,
    gripper 0-100), after holding the start for `settle_s`; errors are measured at the end of each tick."""
    import mujoco

    model = load_model()
    data = mujoco.MjData(model)
    arm = [model.joint(name).qposadr[0] for name in (*ARM_JOINTS, "gripper")]
    gripper_range = model.actuator("gripper").ctrlrange
    forward = JointsToEndEffectorStep(arms=1)
    inverse = EndEffectorToJointsStep(arms=1, **ik_settings)
    inverse.joints_source = forward
    data.qpos[arm] = np.deg2rad(start_joints[:5].tolist() + [0.0])
    substeps = max(1, round(1 / fps / model.opt.timestep))

    def command(joints: np.ndarray) -> None:
        data.ctrl[:5] = np.deg2rad(joints[:5])
        # LeRobot's gripper 0-100 over the MJCF gripper's range
        data.ctrl[5] = gripper_range[0] + (gripper_range[1] - gripper_range[0]) * joints[5] / 100
        mujoco.mj_step(model, data, substeps)

    start = start_joints.double().numpy()
    for _ in range(round(settle_s * fps)):
        command(start)
    errors_mm, errors_deg, sent = [], [], []
    site = model.site(SITE).id
    for target in targets.double():
        measured = np.rad2deg(data.qpos[arm[:5]])
        state = torch.tensor([*measured, start[5]])[None]
        forward({TransitionKey.OBSERVATION: {OBS_STATE: state}})
        joints = inverse({TransitionKey.ACTION: target[None]})[TransitionKey.ACTION][0].numpy()
        command(joints)
        sent.append(joints)
        reached = data.site_xmat[site].reshape(3, 3) @ SITE_TO_URDF
        wanted = rot6d_to_matrix(target[3:9], "interleaved").numpy()
        errors_mm.append(1e3 * np.linalg.norm(data.site_xpos[site] - target[:3].numpy()))
        errors_deg.append(rotation_angle_deg(reached, wanted))
    return Tracking(np.array(errors_mm), np.array(errors_deg), np.stack(sent))
