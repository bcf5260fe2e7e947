"""Processor steps that put SO101 arms in X-VLA's end-effector space (`action_mode=so101_ee6d`).

Datasets and robots speak joints: per arm five joints and the gripper, in LeRobot's degrees (width 6, or 12 for
`bi_so_follower`, left arm then right). The model speaks `ee6d`: per arm [xyz in metres in that arm's base
frame, the 6D rotation in the "interleaved" layout of the pretraining data, gripper closure (1 = closed)],
20 values for two arms, zeros for a missing second arm.

* `JointsToEndEffectorStep` (preprocessor, before normalisation): forward kinematics of the state and of every
  action target of a chunk, batched torch. It keeps the last measured joints for the IK step.
* `EndEffectorToJointsStep` (postprocessor, before the action guard): inverse kinematics of each predicted
  pose. The first pose of a call is seeded from the measured joints, each later pose of a chunk from the
  previous solution; the target position is clipped into the workspace box, the solution into the joint
  limits and within `max_joint_step_deg` of its seed. An unreachable pose gives the closest reachable one and
  a counted warning, never an exception.

The gripper joint reads 0 (closed) to 100 (open) in LeRobot; X-VLA's closure is c = 1 - g / 100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from lerobot.processor import EnvTransition, ProcessorStep, TransitionKey
from lerobot.utils.constants import ACTION, OBS_STATE

from ..rotations import matrix_to_rot6d, rot6d_to_matrix
from .so101_kinematics import (
    ARM_JOINTS,
    JointCalibration,
    SO101ForwardKinematics,
    SO101InverseKinematics,
    mesh_free_urdf,
    packaged_urdf,
)

logger = logging.getLogger(__name__)

JOINTS_PER_ARM = len(ARM_JOINTS) + 1  # five arm joints and the gripper
EE_PER_ARM = 10  # xyz, 6D rotation, gripper
ROT6D_LAYOUT = "interleaved"
GRIPPER_OPEN = 100.0  # LeRobot's gripper reading when fully open (0: closed)
# An IK answer this far from its target counts as unreachable (logged and counted).
UNREACHED_POSITION_M = 0.002


@dataclass
class SO101Arms:
    """The kinematic settings both steps share: how many arms, the arm model, each arm's joint calibration."""

    arms: int = 1
    urdf_path: str | None = None
    joint_offsets_deg: list[float] = field(default_factory=list)
    joint_signs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arms not in (1, 2):
            raise ValueError(f"SO101 end-effector steps take 1 or 2 arms, got {self.arms}")
        self.calibrations  # noqa: B018  (checks the offsets and signs now, not at the first batch)

    @cached_property
    def calibrations(self) -> list[JointCalibration]:
        n = len(ARM_JOINTS)

        def per_arm(name: str, values: list[float], default: float) -> list[tuple[float, ...]]:
            values = list(values) or [default] * n
            if len(values) == n:
                return [tuple(values)] * self.arms
            if len(values) == n * self.arms:
                return [tuple(values[a * n : (a + 1) * n]) for a in range(self.arms)]
            raise ValueError(f"{name} needs {n} values (every arm) or {n * self.arms} (one per joint of each arm), got {len(values)}")

        offsets = per_arm("joint_offsets_deg", self.joint_offsets_deg, 0.0)
        signs = per_arm("joint_signs", self.joint_signs, 1.0)
        return [JointCalibration(o, s) for o, s in zip(offsets, signs, strict=True)]

    @cached_property
    def urdf(self):
        return packaged_urdf() if self.urdf_path is None else self.urdf_path

    @cached_property
    def forward_kinematics(self) -> SO101ForwardKinematics:
        return SO101ForwardKinematics(mesh_free_urdf(self.urdf))

    @property
    def joint_width(self) -> int:
        return JOINTS_PER_ARM * self.arms

    def check_joints(self, joints: torch.Tensor, what: str) -> None:
        if joints.shape[-1] != self.joint_width:
            raise ValueError(
                f"'{what}' has {joints.shape[-1]} values; action_mode so101_ee6d with {self.arms} arm(s) expects "
                f"{self.joint_width} (per arm: {', '.join(ARM_JOINTS)}, gripper in LeRobot degrees)"
            )

    def to_end_effector(self, joints: torch.Tensor) -> torch.Tensor:
        """Joints [..., 6 * arms] (LeRobot degrees, gripper 0-100) -> ee6d vectors [..., 20]."""
        parts = []
        for arm, calibration in enumerate(self.calibrations):
            arm_joints = joints[..., arm * JOINTS_PER_ARM : (arm + 1) * JOINTS_PER_ARM]
            pose = self.forward_kinematics(calibration.to_urdf(arm_joints[..., : len(ARM_JOINTS)]))
            closure = (1 - arm_joints[..., -1:] / GRIPPER_OPEN).clamp(0, 1)
            parts += [pose[..., :3, 3], matrix_to_rot6d(pose[..., :3, :3], ROT6D_LAYOUT), closure]
        vector = torch.cat(parts, dim=-1)
        return torch.nn.functional.pad(vector, (0, 2 * EE_PER_ARM - vector.shape[-1]))


class _KinematicStep(ProcessorStep):
    """Features stay those of the joints: datasets and robots keep speaking joints; only the tensors in between change."""

    def transform_features(self, features):
        return features


@dataclass
class JointsToEndEffectorStep(_KinematicStep):
    """Forward kinematics of `observation.state` [B, 6a] and, when present, the action targets [B, (T,) 6a]
    -> [B, (T,) 20]. Registered as `xvla_so101_joints_to_ee`."""

    arms: int = 1
    urdf_path: str | None = None
    joint_offsets_deg: list[float] = field(default_factory=list)
    joint_signs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kinematics = SO101Arms(self.arms, self.urdf_path, self.joint_offsets_deg, self.joint_signs)
        self.measured_joints: torch.Tensor | None = None  # [B, 6a] of the last observation, for the IK seeds

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        transition = transition.copy()
        observation = transition.get(TransitionKey.OBSERVATION)
        if observation and isinstance(observation.get(OBS_STATE), torch.Tensor):
            state = observation[OBS_STATE]
            self.kinematics.check_joints(state, OBS_STATE)
            self.measured_joints = state.detach().reshape(-1, state.shape[-1]).to("cpu", torch.float64)
            transition[TransitionKey.OBSERVATION] = {**observation, OBS_STATE: self.kinematics.to_end_effector(state)}
        action = transition.get(TransitionKey.ACTION)
        if isinstance(action, torch.Tensor):
            self.kinematics.check_joints(action, ACTION)
            transition[TransitionKey.ACTION] = self.kinematics.to_end_effector(action)
        return transition

    def get_config(self) -> dict[str, Any]:
        return {"arms": self.arms, "urdf_path": self.urdf_path, "joint_offsets_deg": self.joint_offsets_deg, "joint_signs": self.joint_signs}


@dataclass
class EndEffectorToJointsStep(_KinematicStep):
    """Inverse kinematics of ee6d actions [B, 20] (one control step) or [B, T, 20] (a chunk) -> joint targets
    [B, (T,) 6a] in LeRobot degrees. Registered as `xvla_so101_ee_to_joints`.

    `joints_source` is the preprocessor's `JointsToEndEffectorStep`, whose last measured joints seed the IK
    (the policy factory links the two). `unreachable` counts the poses the arm could not reach.
    """

    arms: int = 1
    urdf_path: str | None = None
    joint_offsets_deg: list[float] = field(default_factory=list)
    joint_signs: list[float] = field(default_factory=list)
    orientation_weight: float = 0.01
    workspace_low: list[float] = field(default_factory=lambda: [-0.5, -0.5, -0.05])
    workspace_high: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.6])
    max_joint_step_deg: float = 10.0

    def __post_init__(self) -> None:
        self.kinematics = SO101Arms(self.arms, self.urdf_path, self.joint_offsets_deg, self.joint_signs)
        if len(self.workspace_low) != 3 or len(self.workspace_high) != 3 or not all(
            lo < hi for lo, hi in zip(self.workspace_low, self.workspace_high, strict=True)
        ):
            raise ValueError(f"the workspace box needs low < high in x, y, z, got {self.workspace_low} and {self.workspace_high}")
        if not self.max_joint_step_deg > 0:
            raise ValueError(f"max_joint_step_deg must be > 0, got {self.max_joint_step_deg}")
        self.joints_source: JointsToEndEffectorStep | None = None
        self.unreachable = 0

    @cached_property
    def solver(self) -> SO101InverseKinematics:
        return SO101InverseKinematics(self.kinematics.urdf, self.orientation_weight)

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        action = transition.get(TransitionKey.ACTION)
        if not isinstance(action, torch.Tensor):
            return transition
        if action.ndim not in (2, 3) or action.shape[-1] < EE_PER_ARM * self.arms:
            raise ValueError(f"xvla_so101_ee_to_joints expects ee6d actions [B, 20] or [B, T, 20], got shape {tuple(action.shape)}")
        if not bool(torch.isfinite(action).all()):
            raise ValueError("X-VLA predicted non-finite end-effector actions (NaN or inf); refusing to pass them to the robot")
        measured = self.joints_source.measured_joints if self.joints_source is not None else None
        if measured is None or measured.shape[0] != action.shape[0]:
            raise ValueError(
                "xvla_so101_ee_to_joints needs the measured joints of the same batch: run the preprocessor (with "
                f"its xvla_so101_joints_to_ee step) on the observation first; got actions of batch {action.shape[0]}"
                + ("" if measured is None else f" after an observation of batch {measured.shape[0]}")
            )
        chunk = action.to(torch.float64).cpu().reshape(action.shape[0], -1, action.shape[-1])
        joints = torch.stack([self._solve_chunk(chunk[b], measured[b]) for b in range(chunk.shape[0])])
        transition = transition.copy()
        transition[TransitionKey.ACTION] = joints.reshape(*action.shape[:-1], -1).to(action.dtype)
        return transition

    def _solve_chunk(self, poses: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """poses [T, 20], measured [6a] -> joints [T, 6a]; each arm seeded from its measured joints, then from the
        previous solution."""
        arm_joints = len(ARM_JOINTS)
        out = torch.empty(poses.shape[0], self.kinematics.joint_width, dtype=torch.float64)
        low, high = np.array(self.workspace_low), np.array(self.workspace_high)
        limits = self.kinematics.forward_kinematics.limits
        for arm, calibration in enumerate(self.kinematics.calibrations):
            columns = slice(arm * JOINTS_PER_ARM, arm * JOINTS_PER_ARM + arm_joints)
            seed = calibration.to_urdf(measured[columns]).numpy()
            for t, vector in enumerate(poses[:, arm * EE_PER_ARM : (arm + 1) * EE_PER_ARM]):
                target = np.eye(4)
                target[:3, :3] = rot6d_to_matrix(vector[3:9], ROT6D_LAYOUT).numpy()
                target[:3, 3] = np.clip(vector[:3].numpy(), low, high)
                result = self.solver.solve(target, seed)
                solution = np.clip(result.joints_deg, limits.lower_deg, limits.upper_deg)
                solution = np.clip(solution, seed - self.max_joint_step_deg, seed + self.max_joint_step_deg)
                if result.position_error_m > UNREACHED_POSITION_M:
                    self._count_unreachable(arm, vector[:3].numpy(), result.position_error_m)
                out[t, columns] = calibration.to_lerobot(torch.from_numpy(solution))
                out[t, arm * JOINTS_PER_ARM + arm_joints] = GRIPPER_OPEN * (1 - vector[9].clamp(0, 1))
                seed = solution
        return out

    def _count_unreachable(self, arm: int, position: np.ndarray, error_m: float) -> None:
        self.unreachable += 1
        if self.unreachable == 1 or self.unreachable % 100 == 0:
            logger.warning(
                "SO101 arm %d cannot reach the predicted position %s m (closest reachable is %.1f mm away); sending "
                "the closest reachable joints (%d unreachable poses so far)",
                arm, np.round(position, 4).tolist(), error_m * 1e3, self.unreachable,
            )

    def reset(self) -> None:
        self.unreachable = 0

    def get_config(self) -> dict[str, Any]:
        return {
            "arms": self.arms, "urdf_path": self.urdf_path, "joint_offsets_deg": self.joint_offsets_deg,
            "joint_signs": self.joint_signs, "orientation_weight": self.orientation_weight,
            "workspace_low": self.workspace_low, "workspace_high": self.workspace_high,
            "max_joint_step_deg": self.max_joint_step_deg,
        }  # fmt: skip
