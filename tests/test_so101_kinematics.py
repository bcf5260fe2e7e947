"""SO101 in X-VLA's end-effector space: forward kinematics against placo (LeRobot's RobotKinematics) and MuJoCo,
inverse kinematics round trips and limits, the processor steps, and a policy trained and deployed in EE space."""

from __future__ import annotations

import logging

import mujoco
import numpy as np
import pytest
import torch
from lerobot.model.kinematics import RobotKinematics
from lerobot.policies.factory import make_pre_post_processors
from lerobot.processor import TransitionKey

from lerobot_xvla import XVLAConfigError, XVLAPolicy
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors
from lerobot_xvla.robots import so101_kinematics
from lerobot_xvla.robots.so101_kinematics import (
    ARM_JOINTS,
    END_EFFECTOR_FRAME,
    JointCalibration,
    KinematicsUnavailableError,
    SO101ForwardKinematics,
    SO101InverseKinematics,
    mesh_free_urdf,
    packaged_urdf,
)
from lerobot_xvla.robots.so101_steps import EndEffectorToJointsStep, JointsToEndEffectorStep
from lerobot_xvla.rotations import matrix_to_rot6d

from conftest import tiny_config, train_losses

URDF = packaged_urdf()
MJCF = URDF.with_name("so101_new_calib.xml")


@pytest.fixture(scope="module")
def fk() -> SO101ForwardKinematics:
    return SO101ForwardKinematics(mesh_free_urdf(URDF))


def random_joints(fk: SO101ForwardKinematics, n: int, seed: int = 0, margin: float = 0.0) -> torch.Tensor:
    """[n, 5] URDF degrees drawn inside the joint limits (shrunk by `margin` degrees)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.tensor(fk.limits.lower_deg, dtype=torch.float64) + margin
    high = torch.tensor(fk.limits.upper_deg, dtype=torch.float64) - margin
    return low + (high - low) * torch.rand(n, 5, generator=generator, dtype=torch.float64)


def lerobot_joints(arms: int, n: int, seed: int = 0) -> torch.Tensor:
    """[n, 6 * arms] joints as a SO101 reports them (degrees, gripper 0-100), in a comfortable range."""
    generator = torch.Generator().manual_seed(seed)
    joints = (torch.rand(n, 6 * arms, generator=generator) - 0.5) * 80
    joints[:, 5::6] = torch.rand(n, arms, generator=generator) * 100
    return joints


def test_fk_equals_lerobots_placo_kinematics(fk):
    placo = RobotKinematics(str(mesh_free_urdf(URDF)), END_EFFECTOR_FRAME, list(ARM_JOINTS))
    joints = random_joints(fk, 200)
    ours = fk(joints).numpy()
    theirs = np.stack([placo.forward_kinematics(q.numpy()) for q in joints])
    assert np.abs(ours[:, :3, 3] - theirs[:, :3, 3]).max() < 1e-8  # metres: 0.00001 mm
    assert np.abs(ours[:, :3, :3] - theirs[:, :3, :3]).max() < 1e-8


def test_fk_equals_mujocos_pose_of_the_same_arm(fk):
    """MuJoCo's MJCF of the arm, its `gripperframe` site: positions within 0.01 mm; the site's axes differ from the
    URDF frame's by one constant rotation (a frame convention), the same for every configuration."""
    model = mujoco.MjModel.from_xml_path(str(MJCF))
    data = mujoco.MjData(model)
    site = model.site("gripperframe").id
    joints = random_joints(fk, 30, seed=1)
    ours = fk(joints).numpy()
    relative = []
    for q, pose in zip(joints, ours, strict=True):
        data.qpos[: len(ARM_JOINTS)] = np.deg2rad(q.numpy())
        mujoco.mj_kinematics(model, data)
        assert np.linalg.norm(data.site_xpos[site] - pose[:3, 3]) < 1e-5
        relative.append(pose[:3, :3].T @ data.site_xmat[site].reshape(3, 3))
    about_y = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # -90 degrees about the frame's y axis
    assert np.abs(np.stack(relative) - about_y).max() < 1e-4


def test_fk_is_batched_over_any_leading_dims_and_keeps_the_dtype(fk):
    joints = random_joints(fk, 24, seed=2).reshape(2, 3, 4, 5)
    batched = fk(joints.float())
    assert batched.shape == (2, 3, 4, 4, 4) and batched.dtype == torch.float32
    one = fk(joints[1, 2, 3])
    assert torch.allclose(batched[1, 2, 3].double(), one, atol=1e-6)


def test_fk_refuses_a_urdf_whose_chain_has_other_joints(tmp_path):
    text = mesh_free_urdf(URDF).read_text().replace('name="elbow_flex"', 'name="elbow"')
    (tmp_path / "arm.urdf").write_text(text)
    with pytest.raises(ValueError, match=r"joints from its root to 'gripper_frame_link' are .*'elbow'.*expected"):
        SO101ForwardKinematics(tmp_path / "arm.urdf")


def test_mesh_free_urdf_strips_meshes_only(tmp_path):
    stripped = mesh_free_urdf(URDF).read_text()
    assert "<visual" not in stripped and "<collision" not in stripped and "<mesh" not in stripped
    assert stripped.count("<joint ") == URDF.read_text().count("<joint ")
    with pytest.raises(FileNotFoundError, match="urdf_path '.*missing.urdf' is not a file"):
        mesh_free_urdf(tmp_path / "missing.urdf")


def test_missing_kinematics_extra_is_named(monkeypatch):
    monkeypatch.setattr(so101_kinematics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KinematicsUnavailableError, match=r"pip install 'lerobot_policy_xvla\[kinematics\]'"):
        packaged_urdf()


def test_ik_converges_from_seeds_ten_degrees_away(fk):
    """One placo call leaves millimetres; iterating until the joints stop moving reaches the pose exactly."""
    solver = SO101InverseKinematics(URDF)
    joints = random_joints(fk, 40, seed=3, margin=15)
    offsets = (torch.rand(40, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 0.5) * 20
    for q, offset in zip(joints, offsets, strict=True):
        result = solver.solve(fk(q).numpy(), (q + offset).numpy())
        assert result.position_error_m < 1e-5 and result.orientation_error_deg < 0.01
        assert 1 < result.iterations < solver.max_iterations


def test_joint_calibration_maps_both_ways():
    calibration = JointCalibration(offsets_deg=(3.0, -2.0, 0.0, 10.0, -5.0), signs=(1.0, -1.0, 1.0, -1.0, 1.0))
    joints = torch.tensor([[10.0, 20.0, -30.0, 40.0, 50.0]])
    urdf = calibration.to_urdf(joints)
    assert torch.equal(urdf, torch.tensor([[13.0, -22.0, -30.0, -30.0, 45.0]]))
    assert torch.allclose(calibration.to_lerobot(urdf), joints)
    with pytest.raises(ValueError, match="signs must each be 1 or -1"):
        JointCalibration(signs=(1.0, 2.0, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("arms", [1, 2])
def test_forward_step_converts_state_and_every_chunk_target(fk, arms):
    step = JointsToEndEffectorStep(arms=arms)
    state, chunk = lerobot_joints(arms, 3, seed=5), lerobot_joints(arms, 3 * 7, seed=6).reshape(3, 7, -1)
    out = step({TransitionKey.OBSERVATION: {"observation.state": state}, TransitionKey.ACTION: chunk})
    ee_state, ee_chunk = out[TransitionKey.OBSERVATION]["observation.state"], out[TransitionKey.ACTION]
    assert ee_state.shape == (3, 20) and ee_chunk.shape == (3, 7, 20)
    for arm in range(arms):
        joints = chunk[..., 6 * arm : 6 * arm + 5]
        pose = fk(joints)
        expected = torch.cat([pose[..., :3, 3], matrix_to_rot6d(pose[..., :3, :3], "interleaved"), 1 - chunk[..., 6 * arm + 5 : 6 * arm + 6] / 100], -1)
        assert torch.allclose(ee_chunk[..., 10 * arm : 10 * arm + 10], expected, atol=1e-6)
    if arms == 1:
        assert not ee_state[:, 10:].any() and not ee_chunk[..., 10:].any()
    assert torch.equal(step.measured_joints, state.double())


def ik_step(arms: int = 1, **kwargs) -> tuple[JointsToEndEffectorStep, EndEffectorToJointsStep]:
    forward = JointsToEndEffectorStep(arms=arms, **{k: v for k, v in kwargs.items() if k.startswith("joint_")})
    inverse = EndEffectorToJointsStep(arms=arms, **kwargs)
    inverse.joints_source = forward
    return forward, inverse


def observe(forward: JointsToEndEffectorStep, state: torch.Tensor) -> None:
    forward({TransitionKey.OBSERVATION: {"observation.state": state}})


@pytest.mark.parametrize("arms", [1, 2])
def test_ik_step_recovers_a_joint_trajectory_through_its_poses(arms):
    """Joints -> poses (preprocessor) -> joints (postprocessor), a smooth 30-step chunk per arm, with calibration
    offsets: the measured joints seed the first step, each solution the next."""
    offsets = [4.0, -3.0, 2.0, 0.0, 1.0]
    forward, inverse = ik_step(
        arms, joint_offsets_deg=offsets, joint_signs=[1, -1, 1, 1, -1], workspace_low=[-1, -1, -1], workspace_high=[1, 1, 1]
    )  # a box that holds the whole trajectory (it dips below the default box's floor)
    start = lerobot_joints(arms, 2, seed=7)
    steps = torch.linspace(0, 1, 30)[None, :, None]
    trajectory = start[:, None] + steps * torch.tensor([15.0, -10, 12, 8, 20, 30] * arms)  # [2, 30, 6a]
    trajectory[..., 5::6] = trajectory[..., 5::6].clamp(0, 100)
    observe(forward, start)
    poses = forward({TransitionKey.ACTION: trajectory})[TransitionKey.ACTION]
    joints = inverse({TransitionKey.ACTION: poses})[TransitionKey.ACTION]
    assert joints.shape == trajectory.shape
    assert (joints - trajectory).abs().max() < 0.05  # degrees (grippers: 0-100)
    assert inverse.unreachable == 0


def test_ik_step_holds_limits_and_warns_counted_on_unreachable_poses(caplog):
    forward, inverse = ik_step(max_joint_step_deg=5.0)
    start = lerobot_joints(1, 1, seed=8)
    observe(forward, start)
    pose = forward({TransitionKey.OBSERVATION: {"observation.state": start}})[TransitionKey.OBSERVATION]["observation.state"]
    far = pose.clone()[:, None].repeat(1, 4, 1)
    far[..., :3] = torch.tensor([0.9, -0.9, 1.2])  # outside the box and far out of reach
    with caplog.at_level(logging.WARNING):
        joints = inverse({TransitionKey.ACTION: far})[TransitionKey.ACTION][0]
    assert torch.isfinite(joints).all()
    limits = inverse.kinematics.forward_kinematics.limits
    assert (joints[:, :5] >= torch.tensor(limits.lower_deg, dtype=joints.dtype) - 1e-6).all()
    assert (joints[:, :5] <= torch.tensor(limits.upper_deg, dtype=joints.dtype) + 1e-6).all()
    steps = torch.diff(torch.cat([start[:, :5], joints[:, :5]]), dim=0).abs()
    assert steps.max() <= 5.0 + 1e-6
    assert inverse.unreachable == 4
    assert "cannot reach the predicted position" in caplog.text and "(1 unreachable poses so far)" in caplog.text


def test_ik_step_clips_targets_into_the_workspace_box(fk):
    forward, inverse = ik_step(workspace_low=[-0.5, -0.5, 0.05], workspace_high=[0.5, 0.5, 0.6], max_joint_step_deg=180)
    start = lerobot_joints(1, 1, seed=9)
    observe(forward, start)
    vector = forward({TransitionKey.OBSERVATION: {"observation.state": start}})[TransitionKey.OBSERVATION]["observation.state"]
    target = vector.clone()
    target[0, :3] = torch.tensor([0.25, 0.0, -0.2])  # below the floor of the box
    joints = inverse({TransitionKey.ACTION: target})[TransitionKey.ACTION]
    reached = fk(joints[0, :5].double())[:3, 3]
    assert reached[2] > 0.045


def test_ik_step_refuses_what_it_cannot_act_on():
    forward, inverse = ik_step()
    with pytest.raises(ValueError, match="needs the measured joints of the same batch"):
        inverse({TransitionKey.ACTION: torch.zeros(1, 20)})
    observe(forward, lerobot_joints(1, 2))
    with pytest.raises(ValueError, match="after an observation of batch 2"):
        inverse({TransitionKey.ACTION: torch.zeros(1, 20)})
    with pytest.raises(ValueError, match="non-finite end-effector actions"):
        inverse({TransitionKey.ACTION: torch.full((2, 20), float("nan"))})
    with pytest.raises(ValueError, match=r"'observation.state' has 12 values; action_mode so101_ee6d with 1 arm\(s\) expects 6"):
        observe(forward, torch.zeros(1, 12))


def ee_config(arms: int = 1, tokenizer: str | None = None, **overrides):
    kwargs = {"tokenizer_name": tokenizer} if tokenizer else {}
    return tiny_config(views=1, state=6 * arms, action=6 * arms, action_mode="so101_ee6d", **kwargs, **overrides)


def test_config_refuses_what_the_mode_cannot_use():
    from lerobot.configs.types import NormalizationMode

    with pytest.raises(XVLAConfigError, match="needs IDENTITY STATE and ACTION normalization"):
        ee_config(normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.MEAN_STD, "ACTION": NormalizationMode.IDENTITY})
    with pytest.raises(XVLAConfigError, match="observation.state has 12 values but the actions 6"):
        tiny_config(views=1, state=12, action=6, action_mode="so101_ee6d").validate_features()
    with pytest.raises(XVLAConfigError, match="ee_workspace_low must be below ee_workspace_high"):
        ee_config(ee_workspace_low=[0, 0, 0.7]).validate_features()
    with pytest.raises(XVLAConfigError, match="max_joint_step_deg must be a number > 0"):
        ee_config(max_joint_step_deg=0)
    with pytest.raises(ValueError, match=r"action dimension 7 does not fit: action_mode 'so101_ee6d' expects actions of width 6 or 12"):
        tiny_config(views=1, state=7, action=7, action_mode="so101_ee6d").validate_features()


STATS = {
    key: {"min": torch.tensor([-60.0] * 5 + [0.0]), "max": torch.tensor([60.0] * 5 + [100.0]), "mean": torch.zeros(6), "std": torch.ones(6) * 30}
    for key in ("observation.state", "action")
}


def test_policy_trains_in_ee_space_and_deploys_joints_through_lerobots_loader(tmp_path, tokenizer_dir):
    """Training: joint batches become EE targets and the loss falls. Deployment: the saved checkpoint, loaded by
    LeRobot's make_pre_post_processors, turns observations into joint targets inside the training range."""
    torch.manual_seed(0)
    config = ee_config(tokenizer=tokenizer_dir)
    preprocessor, postprocessor = make_xvla_pre_post_processors(config, STATS)
    policy = XVLAPolicy(config)
    observation = {"observation.images.cam0": torch.rand(4, 3, 64, 64), "observation.state": lerobot_joints(1, 4, seed=10), "task": ["pick"] * 4}
    batch = preprocessor({**observation, "action": lerobot_joints(1, 4 * 30, seed=11).reshape(4, 30, 6)})
    losses = train_losses(policy, batch)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    with pytest.raises(ValueError, match="trains on 20-D end-effector targets.*got targets of width 6"):
        policy.forward({**batch, "action": lerobot_joints(1, 4 * 30).reshape(4, 30, 6)})  # joints, not preprocessed

    policy.save_pretrained(tmp_path)
    preprocessor.save_pretrained(tmp_path)
    postprocessor.save_pretrained(tmp_path)
    loaded = XVLAPolicy.from_pretrained(tmp_path)
    pre, post = make_pre_post_processors(loaded.config, pretrained_path=str(tmp_path))
    assert [type(s).__name__ for s in post.steps][-2:] == ["EndEffectorToJointsStep", "ActionGuardStep"]
    assert post.steps[-2].joints_source is next(s for s in pre.steps if isinstance(s, JointsToEndEffectorStep))
    for _ in range(3):
        joints = post(loaded.select_action(pre(observation)))
        assert joints.shape == (4, 6) and torch.isfinite(joints).all()
        assert (joints >= STATS["action"]["min"]).all() and (joints <= STATS["action"]["max"]).all()


def test_mujoco_arm_tracks_commanded_end_effector_poses():
    """The MJCF arm under gravity, driven at 30 Hz through the FK/IK steps as a deployed policy drives it: a
    reachable 3 s sweep is tracked within a few millimetres; a straight line held at one orientation, which five
    joints cannot keep, keeps position first."""
    from lerobot_xvla.robots.so101_mujoco import load_model, track_end_effector

    start = torch.tensor([0.0, -20, 20, 60, 0, 50])
    forward = JointsToEndEffectorStep(arms=1)
    phase = torch.sin(2 * torch.pi * torch.linspace(0, 1, 90))[:, None]
    sweep = start + phase * torch.tensor([25.0, 15, -15, 10, 30, 0])
    targets = forward({TransitionKey.ACTION: sweep[None]})[TransitionKey.ACTION][0]
    tracked = track_end_effector(targets, start)
    assert np.median(tracked.position_error_mm) < 3 and tracked.position_error_mm.max() < 6
    assert tracked.orientation_error_deg.max() < 1.0
    ctrl = load_model().actuator_ctrlrange[:5]
    assert np.isfinite(tracked.commanded_joints).all()
    assert (np.deg2rad(tracked.commanded_joints[:, :5]) >= ctrl[:, 0]).all() and (np.deg2rad(tracked.commanded_joints[:, :5]) <= ctrl[:, 1]).all()

    line = targets[0].repeat(90, 1)
    line[:, 1] += torch.linspace(0, 0.08, 90)
    line[:, 2] += torch.linspace(0, 0.05, 90)
    held = track_end_effector(line, start)
    assert np.median(held.position_error_mm) < 4 and held.position_error_mm.max() < 8
    assert held.orientation_error_deg.max() > 1.0  # the orientation it could not keep, traded for position


def test_lerobot_train_fine_tunes_a_pretrained_checkpoint_in_ee_space_on_a_joint_dataset(tmp_path, three_view_checkpoint):
    """The user's command: a pretrained (ee6d, three-view) X-VLA fine-tuned with lerobot-train on an ordinary
    bimanual SO101 joint dataset, `--policy.action_mode=so101_ee6d`, a new domain initialised from a pretrained
    one. The checkpoint it writes deploys: its processors, loaded by LeRobot, turn observations into 12 joint
    targets by IK."""
    import json

    from conftest import lerobot
    from so101_deploy import RENAME_TO_THREE_VIEWS, write_two_camera_dataset

    dataset = write_two_camera_dataset(tmp_path / "dataset")
    lerobot(
        "lerobot-train", f"--policy.path={three_view_checkpoint}", "--policy.action_mode=so101_ee6d",
        "--policy.domain_id=7", "--policy.init_domain_from=6", "--policy.empty_cameras=1",
        f"--rename_map={json.dumps(RENAME_TO_THREE_VIEWS)}", f"--dataset.repo_id={dataset.repo_id}",
        f"--dataset.root={dataset.root}", "--steps=2", "--batch_size=2", "--num_workers=0", "--save_freq=2",
        "--log_freq=1", f"--output_dir={tmp_path / 'train'}",
    )  # fmt: skip
    trained = tmp_path / "train" / "checkpoints" / "last" / "pretrained_model"
    policy = XVLAPolicy.from_pretrained(trained)
    assert policy.config.action_mode == "so101_ee6d" and policy.config.domain_id == 7
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(trained))
    assert any(isinstance(s, JointsToEndEffectorStep) for s in pre.steps)
    frame = dataset[0]
    observation = {key: frame[key][None] for key in ("observation.state", *RENAME_TO_THREE_VIEWS)}
    observation = {RENAME_TO_THREE_VIEWS.get(k, k): v for k, v in observation.items()}
    joints = post(policy.select_action(pre({**observation, "task": [frame["task"]]})))
    assert joints.shape == (1, 12) and torch.isfinite(joints).all()


def test_plugin_imports_without_placo_and_the_ik_names_the_extra():
    """Without the kinematics extra the plugin still imports (else LeRobot would run its built-in X-VLA), and the
    first IK solve says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['placo'] = None\n"
        "import lerobot_xvla, torch\n"
        "from lerobot_xvla.robots.so101_steps import EndEffectorToJointsStep, JointsToEndEffectorStep\n"
        "from lerobot.processor import TransitionKey\n"
        "fk, ik = JointsToEndEffectorStep(), EndEffectorToJointsStep(); ik.joints_source = fk\n"
        "pose = fk({TransitionKey.OBSERVATION: {'observation.state': torch.zeros(1, 6)}})[TransitionKey.OBSERVATION]['observation.state']\n"
        "try:\n    ik({TransitionKey.ACTION: pose})\nexcept ImportError as error:\n    print('ERROR', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR SO101 inverse kinematics needs placo: pip install 'lerobot_policy_xvla[kinematics]'" in result.stdout
