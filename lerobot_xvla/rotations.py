"""Batched PyTorch conversions between rotation representations.

Every function works on arbitrary leading batch dims `[..., k]`, keeps the input's device and dtype and never
synchronises with the host, so it can sit inside a compiled or CUDA-graphed policy step.

X-VLA's end-effector actions carry a rotation as "6D": the first two COLUMNS of the rotation matrix. The
checkpoints disagree on how those six numbers are laid out, so every 6D function takes a required `layout`:

* ``"contiguous"``: ``[R00, R10, R20, R01, R11, R21]`` (column 0, then column 1). Identity is
  ``(1, 0, 0, 0, 1, 0)``. Used by the LIBERO checkpoint only.
* ``"interleaved"``: ``[R00, R01, R10, R11, R20, R21]``, i.e. ``R[..., :, :2].reshape(6)`` (row by row).
  Identity is ``(1, 0, 0, 1, 0, 0)``. Used by all X-VLA pretraining data and the Bridge/WidowX, CALVIN, RT-1,
  VLABench and RoboTwin checkpoints.

Decoding the wrong layout still yields a valid rotation, just a wrong one, hence no default.

Other conventions: quaternions take a required `order` ("xyzw" as scipy, or "wxyz"); `matrix_to_quaternion`
returns unit quaternions with a non-negative real part. Axis-angle is the rotation vector ``axis * angle`` with
angle in [0, pi]. Euler angles are scipy's extrinsic "xyz": ``R = Rz(angles[2]) @ Ry(angles[1]) @ Rx(angles[0])``.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("contiguous", "interleaved")
ORDERS = ("xyzw", "wxyz")
EULER_CONVENTIONS = ("xyz",)

# Floor for the Gram-Schmidt norms: a degenerate 6D vector decodes to a finite (if meaningless) matrix, not NaN.
_EPS = 1e-8


def _check_trailing(fn: str, x: torch.Tensor, trailing: tuple[int, ...]) -> None:
    if x.dim() < len(trailing) or tuple(x.shape[-len(trailing) :]) != trailing:
        expected = ", ".join(["...", *map(str, trailing)])
        raise ValueError(f"{fn} expects [{expected}], got {tuple(x.shape)}")


def _check_choice(arg: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(_EPS)


# --- 6D ------------------------------------------------------------------------------------------------------


def matrix_to_rot6d(matrix: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 3, 3] rotation matrices -> [..., 6] first two columns in `layout` ("contiguous" or "interleaved")."""
    _check_trailing("matrix_to_rot6d", matrix, (3, 3))
    _check_choice("layout", layout, LAYOUTS)
    columns = matrix[..., :, :2]
    if layout == "contiguous":
        columns = columns.transpose(-1, -2)
    return columns.reshape(*matrix.shape[:-2], 6)


def rot6d_to_matrix(rot6d: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 6] in `layout` -> [..., 3, 3] proper rotation matrices.

    Gram-Schmidt makes any network output (unnormalised, not orthogonal) a rotation with det +1.
    """
    _check_trailing("rot6d_to_matrix", rot6d, (6,))
    _check_choice("layout", layout, LAYOUTS)
    if layout == "contiguous":
        a1, a2 = rot6d[..., :3], rot6d[..., 3:]
    else:
        a1, a2 = rot6d[..., 0::2], rot6d[..., 1::2]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


# --- quaternions ---------------------------------------------------------------------------------------------


def quaternion_to_matrix(q: torch.Tensor, order: str) -> torch.Tensor:
    """[..., 4] quaternions in `order` ("xyzw" or "wxyz"; need not be unit) -> [..., 3, 3]."""
    _check_trailing("quaternion_to_matrix", q, (4,))
    _check_choice("order", order, ORDERS)
    if order == "xyzw":
        q = q.roll(1, dims=-1)
    w, x, y, z = q.unbind(-1)
    # 2/|q|^2 instead of normalising first: same result, and a non-unit q still gives a rotation.
    s = 2.0 / (q * q).sum(-1)
    entries = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(entries, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(matrix: torch.Tensor, order: str) -> torch.Tensor:
    """[..., 3, 3] rotation matrices -> [..., 4] unit quaternions in `order`, real part >= 0."""
    _check_trailing("matrix_to_quaternion", matrix, (3, 3))
    _check_choice("order", order, ORDERS)
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4w^2, 4x^2, 4y^2, 4z^2 (they sum to 4, so the largest is >= 1 and safe to divide by).
    squares = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    sym_xy, sym_xz, sym_yz = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    skew_x, skew_y, skew_z = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    # Row i is 4 * q_i * (w, x, y, z), with the diagonal 4 q_i^2 taken from `squares`.
    candidates = torch.stack(
        [
            torch.stack([squares[..., 0], skew_x, skew_y, skew_z], dim=-1),
            torch.stack([skew_x, squares[..., 1], sym_xy, sym_xz], dim=-1),
            torch.stack([skew_y, sym_xy, squares[..., 2], sym_yz], dim=-1),
            torch.stack([skew_z, sym_xz, sym_yz, squares[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    # Dividing by the largest q_i is the well-conditioned choice; gather keeps it branch-free.
    best = squares.argmax(dim=-1, keepdim=True)
    row = candidates.gather(-2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    q = row / (2 * squares.gather(-1, best).sqrt())
    q = _normalize(q)
    q = torch.where(q[..., :1] < 0, -q, q)
    return q.roll(-1, dims=-1) if order == "xyzw" else q


# --- axis-angle ----------------------------------------------------------------------------------------------


def _skew(v: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrix, skew(v) @ u == v x u."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """[..., 3] rotation vectors (axis * angle) -> [..., 3, 3], via Rodrigues' formula."""
    _check_trailing("axis_angle_to_matrix", v, (3,))
    angle = torch.linalg.vector_norm(v, dim=-1)[..., None, None]
    # sin(t)/t and (1 - cos t)/t^2 = sinc(t/2)^2 / 2 through torch.sinc: exact at t = 0, no cancellation near it.
    a = torch.sinc(angle / math.pi)
    b = 0.5 * torch.sinc(angle / (2 * math.pi)) ** 2
    k = _skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a * k + b * (k @ k)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 3] rotation vectors with angle in [0, pi].

    Goes through the quaternion, which stays well conditioned near pi where the matrix's skew part vanishes.
    """
    _check_trailing("matrix_to_axis_angle", matrix, (3, 3))
    q = matrix_to_quaternion(matrix, "wxyz")
    xyz = q[..., 1:]
    # w >= 0, so half the angle lies in [0, pi/2] and |xyz| = sin(half); angle / sin(half) = 2 / sinc(half/pi)
    # is bounded (between 2 and pi) and exact at 0.
    half = torch.atan2(torch.linalg.vector_norm(xyz, dim=-1, keepdim=True), q[..., :1])
    return xyz * (2 / torch.sinc(half / math.pi))


# --- Euler ---------------------------------------------------------------------------------------------------


def euler_to_matrix(angles: torch.Tensor, convention: str = "xyz") -> torch.Tensor:
    """[..., 3] extrinsic (x, y, z) angles in radians -> [..., 3, 3] = Rz @ Ry @ Rx (scipy's "xyz")."""
    _check_trailing("euler_to_matrix", angles, (3,))
    _check_euler(convention)
    cx, cy, cz = angles.cos().unbind(-1)
    sx, sy, sz = angles.sin().unbind(-1)
    entries = (
        cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz,
        cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz,
        -sy, sx * cy, cx * cy,
    )  # fmt: skip
    return torch.stack(entries, dim=-1).reshape(*angles.shape[:-1], 3, 3)


def matrix_to_euler(matrix: torch.Tensor, convention: str = "xyz") -> torch.Tensor:
    """[..., 3, 3] -> [..., 3] extrinsic (x, y, z) angles, y in [-pi/2, pi/2], x and z in [-pi, pi].

    At gimbal lock (y = +-pi/2) only x -+ z is defined; like scipy, z is set to 0.
    """
    _check_trailing("matrix_to_euler", matrix, (3, 3))
    _check_euler(convention)
    m = matrix
    cos_y = torch.hypot(m[..., 0, 0], m[..., 1, 0])
    y = torch.atan2(-m[..., 2, 0], cos_y)
    # Below sqrt(eps) the regular formula's error (eps / cos_y) outgrows the locked one's (cos_y).
    locked = cos_y < torch.finfo(m.dtype).eps ** 0.5
    x = torch.where(locked, torch.atan2(-m[..., 1, 2], m[..., 1, 1]), torch.atan2(m[..., 2, 1], m[..., 2, 2]))
    z = torch.where(locked, torch.zeros_like(y), torch.atan2(m[..., 1, 0], m[..., 0, 0]))
    return torch.stack([x, y, z], dim=-1)


def _check_euler(convention: str) -> None:
    if convention not in EULER_CONVENTIONS:
        raise ValueError(f"only the extrinsic 'xyz' Euler convention (scipy's 'xyz') is supported, got {convention!r}")


# --- compositions --------------------------------------------------------------------------------------------


def rot6d_to_axis_angle(rot6d: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 6] -> [..., 3]."""
    return matrix_to_axis_angle(rot6d_to_matrix(rot6d, layout))


def axis_angle_to_rot6d(v: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 3] -> [..., 6]."""
    return matrix_to_rot6d(axis_angle_to_matrix(v), layout)


def rot6d_to_quaternion(rot6d: torch.Tensor, layout: str, order: str) -> torch.Tensor:
    """[..., 6] -> [..., 4]."""
    return matrix_to_quaternion(rot6d_to_matrix(rot6d, layout), order)


def quaternion_to_rot6d(q: torch.Tensor, layout: str, order: str) -> torch.Tensor:
    """[..., 4] -> [..., 6]."""
    return matrix_to_rot6d(quaternion_to_matrix(q, order), layout)


def rot6d_to_euler(rot6d: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 6] -> [..., 3] extrinsic xyz angles."""
    return matrix_to_euler(rot6d_to_matrix(rot6d, layout))


def euler_to_rot6d(angles: torch.Tensor, layout: str) -> torch.Tensor:
    """[..., 3] extrinsic xyz angles -> [..., 6]."""
    return matrix_to_rot6d(euler_to_matrix(angles), layout)
