"""Rotation conversions against scipy, the two 6D layouts against explicit index formulas, and input checks."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lerobot_xvla import rotations as rot

N = 300
DTYPES = [pytest.param(torch.float64, 1e-9, id="float64"), pytest.param(torch.float32, 1e-5, id="float32")]


@pytest.fixture(scope="module")
def scipy_rotations() -> Rotation:
    return Rotation.random(N, random_state=0)


def t(array, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=dtype)


def canonical_xyzw(q: np.ndarray) -> np.ndarray:
    """scipy's quaternions (xyzw) with the real part made non-negative, the convention under test."""
    return np.where(q[..., 3:] < 0, -q, q)


def wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def assert_close(actual: torch.Tensor, expected, tol: float) -> None:
    torch.testing.assert_close(actual.double(), t(expected), atol=tol, rtol=0)


def assert_rotation(matrix: torch.Tensor, tol: float) -> None:
    eye = torch.eye(3, dtype=matrix.dtype).expand_as(matrix)
    torch.testing.assert_close(matrix.transpose(-1, -2) @ matrix, eye, atol=tol, rtol=0)
    ones = torch.ones(matrix.shape[:-2], dtype=matrix.dtype)
    torch.testing.assert_close(torch.linalg.det(matrix), ones, atol=tol, rtol=0)


# --- quaternions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
def test_matrix_to_quaternion_matches_scipy(scipy_rotations, dtype, tol):
    matrix = t(scipy_rotations.as_matrix(), dtype)
    xyzw = canonical_xyzw(scipy_rotations.as_quat())
    out_xyzw = rot.matrix_to_quaternion(matrix, "xyzw")
    out_wxyz = rot.matrix_to_quaternion(matrix, "wxyz")
    assert out_xyzw.dtype == dtype
    assert_close(out_xyzw, xyzw, tol)
    assert_close(out_wxyz, np.roll(xyzw, 1, axis=-1), tol)
    assert (out_wxyz[:, 0] >= 0).all()


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
def test_quaternion_to_matrix_matches_scipy(scipy_rotations, dtype, tol):
    xyzw = scipy_rotations.as_quat()
    expected = scipy_rotations.as_matrix()
    assert_close(rot.quaternion_to_matrix(t(xyzw, dtype), "xyzw"), expected, tol)
    assert_close(rot.quaternion_to_matrix(t(np.roll(xyzw, 1, axis=-1), dtype), "wxyz"), expected, tol)
    # Neither sign nor scale of q changes the rotation.
    assert_close(rot.quaternion_to_matrix(t(-2.5 * xyzw, dtype), "xyzw"), expected, tol)


def test_matrix_to_quaternion_for_half_turns_about_each_axis():
    # trace = -1: the w candidate is 0 and a naive (1 + trace) formula divides by zero.
    rotvecs = math.pi * np.concatenate([np.eye(3), np.ones((1, 3)) / math.sqrt(3)])
    expected = Rotation.from_rotvec(rotvecs).as_quat()
    out = rot.matrix_to_quaternion(t(Rotation.from_rotvec(rotvecs).as_matrix()), "xyzw")
    assert torch.isfinite(out).all()
    assert_close(out.abs(), np.abs(expected), 1e-12)


# --- axis-angle ----------------------------------------------------------------------------------------------


def special_rotvecs() -> np.ndarray:
    axes = Rotation.random(8, random_state=1).as_rotvec()
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    angles = np.array([0.0, 1e-8, 1e-4, 1.0, math.pi - 1e-6, math.pi - 1e-3, 3.0, 2.5])
    return axes * angles[:, None]


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
def test_axis_angle_matches_scipy(scipy_rotations, dtype, tol):
    rotvecs = np.concatenate([scipy_rotations.as_rotvec(), special_rotvecs()])
    matrices = Rotation.from_rotvec(rotvecs).as_matrix()
    assert_close(rot.axis_angle_to_matrix(t(rotvecs, dtype)), matrices, tol)
    assert_close(rot.matrix_to_axis_angle(t(matrices, dtype)), rotvecs, tol)


def test_axis_angle_at_zero_and_tiny_angles_is_exact():
    v = t([[0.0, 0.0, 0.0], [1e-8, -2e-8, 3e-9]])
    matrix = rot.axis_angle_to_matrix(v)
    assert_close(matrix, Rotation.from_rotvec(v.numpy()).as_matrix(), 1e-15)
    assert_close(rot.matrix_to_axis_angle(matrix), v, 1e-15)


def test_axis_angle_at_exactly_pi_is_the_same_rotation():
    axes = Rotation.random(20, random_state=2).as_rotvec()
    rotvecs = math.pi * axes / np.linalg.norm(axes, axis=-1, keepdims=True)
    out = rot.matrix_to_axis_angle(t(Rotation.from_rotvec(rotvecs).as_matrix()))
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=-1), torch.full((20,), math.pi, dtype=torch.float64))
    # v and -v are the same half turn; either is correct.
    sign = torch.sign((out * t(rotvecs)).sum(-1, keepdim=True))
    assert_close(out * sign, rotvecs, 1e-9)


def test_axis_angle_gradients_are_finite_at_identity():
    v = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rot.axis_angle_to_matrix(v).sum().backward()
    assert torch.isfinite(v.grad).all()
    matrix = torch.eye(3, dtype=torch.float64, requires_grad=True)
    rot.matrix_to_axis_angle(matrix).sum().backward()
    assert torch.isfinite(matrix.grad).all()


# --- Euler ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
def test_euler_xyz_matches_scipy(scipy_rotations, dtype, tol):
    angles = scipy_rotations.as_euler("xyz")
    matrices = scipy_rotations.as_matrix()
    assert_close(rot.euler_to_matrix(t(angles, dtype)), matrices, tol)
    out = rot.matrix_to_euler(t(matrices, dtype)).double()
    # +-pi are the same angle; compare on the circle.
    assert_close(wrap(out - t(angles)), np.zeros_like(angles), tol * 10)


def test_euler_xyz_is_extrinsic_rz_ry_rx():
    x, y, z = 0.3, -0.7, 1.9
    expected = Rotation.from_euler("z", z) * Rotation.from_euler("y", y) * Rotation.from_euler("x", x)
    assert_close(rot.euler_to_matrix(t([x, y, z])), expected.as_matrix(), 1e-12)


@pytest.mark.parametrize("pitch", [math.pi / 2, -math.pi / 2])
def test_euler_at_gimbal_lock_follows_scipy(pitch):
    matrix = Rotation.from_euler("xyz", [0.3, pitch, 0.5]).as_matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = Rotation.from_matrix(matrix).as_euler("xyz")
    out = rot.matrix_to_euler(t(matrix))
    assert out[2] == 0
    assert_close(out, expected, 1e-9)
    assert_close(rot.euler_to_matrix(out), matrix, 1e-9)


# --- 6D ------------------------------------------------------------------------------------------------------


def test_rot6d_layouts_are_the_documented_index_formulas(scipy_rotations):
    matrix = t(scipy_rotations.as_matrix())
    contiguous = torch.cat([matrix[..., :, 0], matrix[..., :, 1]], dim=-1)
    interleaved = torch.stack([matrix[..., i, j] for i in range(3) for j in range(2)], dim=-1)
    assert torch.equal(rot.matrix_to_rot6d(matrix, "contiguous"), contiguous)
    assert torch.equal(rot.matrix_to_rot6d(matrix, "interleaved"), interleaved)
    assert torch.equal(interleaved, matrix[..., :, :2].reshape(N, 6))
    assert_close(rot.rot6d_to_matrix(contiguous, "contiguous"), matrix, 1e-12)
    assert_close(rot.rot6d_to_matrix(interleaved, "interleaved"), matrix, 1e-12)


def test_rot6d_identity_values():
    eye = torch.eye(3)
    assert rot.matrix_to_rot6d(eye, "contiguous").tolist() == [1, 0, 0, 0, 1, 0]
    assert rot.matrix_to_rot6d(eye, "interleaved").tolist() == [1, 0, 0, 1, 0, 0]
    assert torch.equal(rot.rot6d_to_matrix(torch.tensor([1.0, 0, 0, 0, 1, 0]), "contiguous"), eye)
    assert torch.equal(rot.rot6d_to_matrix(torch.tensor([1.0, 0, 0, 1, 0, 0]), "interleaved"), eye)


def test_rot6d_layouts_are_not_interchangeable(scipy_rotations):
    rot6d = rot.matrix_to_rot6d(t(scipy_rotations.as_matrix()), "interleaved")
    misread = rot.rot6d_to_matrix(rot6d, "contiguous")
    assert (misread - t(scipy_rotations.as_matrix())).abs().amax() > 0.5


@pytest.mark.parametrize("layout", rot.LAYOUTS)
@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
def test_rot6d_round_trip(scipy_rotations, layout, dtype, tol):
    rot6d = rot.matrix_to_rot6d(t(scipy_rotations.as_matrix(), dtype), layout)
    back = rot.matrix_to_rot6d(rot.rot6d_to_matrix(rot6d, layout), layout)
    assert back.dtype == dtype
    assert_close(back, rot6d.double(), tol)


@pytest.mark.parametrize("layout", rot.LAYOUTS)
def test_gram_schmidt_makes_noisy_network_outputs_rotations(layout):
    generator = torch.Generator().manual_seed(0)
    clean = rot.matrix_to_rot6d(t(Rotation.random(N, random_state=3).as_matrix()), layout)
    noisy = 3.0 * clean + 0.2 * torch.randn(N, 6, generator=generator, dtype=torch.float64)
    matrix = rot.rot6d_to_matrix(noisy, layout)
    assert_rotation(matrix, 1e-12)
    # The first column keeps the direction of the first input vector; scale does not matter.
    first = noisy[..., :3] if layout == "contiguous" else noisy[..., 0::2]
    assert_close(matrix[..., :, 0], first / first.norm(dim=-1, keepdim=True), 1e-12)
    assert_close(rot.rot6d_to_matrix(0.01 * noisy, layout), matrix, 1e-12)


@pytest.mark.parametrize("layout", rot.LAYOUTS)
def test_zero_rot6d_gives_finite_values_and_gradients(layout):
    rot6d = torch.zeros(2, 6, requires_grad=True)
    matrix = rot.rot6d_to_matrix(rot6d, layout)
    matrix.sum().backward()
    assert torch.isfinite(matrix).all()
    assert torch.isfinite(rot6d.grad).all()
    assert torch.isfinite(rot.rot6d_to_axis_angle(rot6d.detach(), layout)).all()


def test_rot6d_to_matrix_gradcheck():
    rot6d = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for layout in rot.LAYOUTS:
        assert torch.autograd.gradcheck(lambda x, layout=layout: rot.rot6d_to_matrix(x, layout), (rot6d,))


# --- compositions, batch shapes, no host sync ----------------------------------------------------------------


@pytest.mark.parametrize("layout", rot.LAYOUTS)
def test_compositions_match_scipy(scipy_rotations, layout):
    rot6d = rot.matrix_to_rot6d(t(scipy_rotations.as_matrix()), layout)
    xyzw = canonical_xyzw(scipy_rotations.as_quat())
    assert_close(rot.rot6d_to_axis_angle(rot6d, layout), scipy_rotations.as_rotvec(), 1e-9)
    assert_close(rot.axis_angle_to_rot6d(t(scipy_rotations.as_rotvec()), layout), rot6d, 1e-9)
    assert_close(rot.rot6d_to_quaternion(rot6d, layout, "xyzw"), xyzw, 1e-9)
    assert_close(rot.quaternion_to_rot6d(t(xyzw), layout, "xyzw"), rot6d, 1e-9)
    assert_close(wrap(rot.rot6d_to_euler(rot6d, layout) - t(scipy_rotations.as_euler("xyz"))), np.zeros((N, 3)), 1e-9)
    assert_close(rot.euler_to_rot6d(t(scipy_rotations.as_euler("xyz")), layout), rot6d, 1e-9)


CONVERSIONS = [
    (lambda x: rot.rot6d_to_matrix(x, "interleaved"), 6),
    (lambda x: rot.rot6d_to_matrix(x, "contiguous"), 6),
    (lambda x: rot.matrix_to_rot6d(x, "interleaved"), (3, 3)),
    (lambda x: rot.quaternion_to_matrix(x, "wxyz"), 4),
    (lambda x: rot.matrix_to_quaternion(x, "xyzw"), (3, 3)),
    (rot.axis_angle_to_matrix, 3),
    (rot.matrix_to_axis_angle, (3, 3)),
    (rot.euler_to_matrix, 3),
    (rot.matrix_to_euler, (3, 3)),
]


def sample_input(trailing, batch: tuple[int, ...]) -> torch.Tensor:
    if trailing == (3, 3):
        count = int(np.prod(batch))
        return t(Rotation.random(count, random_state=4).as_matrix()).reshape(*batch, 3, 3)
    return torch.randn(*batch, trailing, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize(("fn", "trailing"), CONVERSIONS)
def test_arbitrary_batch_shapes_match_flat_batch(fn, trailing, batch):
    x = sample_input(trailing, batch)
    out = fn(x)
    flat = fn(x.reshape(-1, *x.shape[len(batch) :]))
    assert out.shape[: len(batch)] == batch
    torch.testing.assert_close(out, flat.reshape(out.shape), atol=0, rtol=0)


@pytest.mark.parametrize(("fn", "trailing"), CONVERSIONS)
def test_conversions_run_under_vmap(fn, trailing):
    # vmap refuses .item() and data-dependent shapes, so this catches host synchronisation.
    x = sample_input(trailing, (2, 3))
    torch.testing.assert_close(torch.vmap(fn)(x), fn(x))


# --- input checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rot.rot6d_to_matrix(torch.zeros(4, 7), "interleaved"), "rot6d_to_matrix expects [..., 6], got (4, 7)"),
        (
            lambda: rot.matrix_to_rot6d(torch.zeros(3, 2), "contiguous"),
            "matrix_to_rot6d expects [..., 3, 3], got (3, 2)",
        ),
        (lambda: rot.matrix_to_rot6d(torch.zeros(3), "contiguous"), "matrix_to_rot6d expects [..., 3, 3], got (3,)"),
        (lambda: rot.quaternion_to_matrix(torch.zeros(3), "xyzw"), "quaternion_to_matrix expects [..., 4], got (3,)"),
        (
            lambda: rot.matrix_to_quaternion(torch.zeros(4, 4), "xyzw"),
            "matrix_to_quaternion expects [..., 3, 3], got (4, 4)",
        ),
        (lambda: rot.axis_angle_to_matrix(torch.zeros(())), "axis_angle_to_matrix expects [..., 3], got ()"),
        (lambda: rot.matrix_to_axis_angle(torch.zeros(2, 9)), "matrix_to_axis_angle expects [..., 3, 3], got (2, 9)"),
        (lambda: rot.euler_to_matrix(torch.zeros(2, 4)), "euler_to_matrix expects [..., 3], got (2, 4)"),
        (lambda: rot.matrix_to_euler(torch.zeros(3, 4)), "matrix_to_euler expects [..., 3, 3], got (3, 4)"),
        (lambda: rot.rot6d_to_euler(torch.zeros(3), "interleaved"), "rot6d_to_matrix expects [..., 6], got (3,)"),
        (
            lambda: rot.rot6d_to_matrix(torch.zeros(6), "column"),
            "layout must be one of ('contiguous', 'interleaved'), got 'column'",
        ),
        (
            lambda: rot.matrix_to_rot6d(torch.eye(3), "row_major"),
            "layout must be one of ('contiguous', 'interleaved'), got 'row_major'",
        ),
        (lambda: rot.quaternion_to_matrix(torch.zeros(4), "wxzy"), "order must be one of ('xyzw', 'wxyz'), got 'wxzy'"),
        (lambda: rot.matrix_to_quaternion(torch.eye(3), "XYZW"), "order must be one of ('xyzw', 'wxyz'), got 'XYZW'"),
        (
            lambda: rot.euler_to_matrix(torch.zeros(3), "zyx"),
            "only the extrinsic 'xyz' Euler convention (scipy's 'xyz') is supported, got 'zyx'",
        ),
        (
            lambda: rot.matrix_to_euler(torch.eye(3), "XYZ"),
            "only the extrinsic 'xyz' Euler convention (scipy's 'xyz') is supported, got 'XYZ'",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
