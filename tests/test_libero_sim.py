"""LIBERO for real: the offline setup (`lerobot-xvla libero-setup`) and X-VLA's LIBERO adapter in LeRobot's LIBERO
env, rendered headless (MUJOCO_GL=egl). The simulator tests need the `libero` extra (scripts/setup.sh installs
it) and skip without it; the setup's refusals are checked on temporary directories without it.

The arm tests drive LeRobot's env through the adapter's env processors, as lerobot-eval does, and read the end
effector where LeRobot reports it (robot0_eef_pos, the controller's orientation matrix)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import LiberoEnv
from scipy.spatial.transform import Rotation

from lerobot_xvla.demo import lerobot_command
from lerobot_xvla.env_adapters import LiberoAdapter
from lerobot_xvla.libero_setup import ASSET_DISTRIBUTIONS, LiberoSetupRefused, libero_config, link_assets, write_config
from lerobot_xvla.rotations import matrix_to_rot6d
from lerobot_xvla_cli import main as lerobot_xvla

from conftest import LEROBOT_ENV, lerobot, tiny_config
from so101_deploy import save_checkpoint


def libero_extra_installed() -> bool:
    try:
        for name in ASSET_DISTRIBUTIONS:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("libero") is not None


requires_libero = pytest.mark.skipif(
    not libero_extra_installed(),
    reason="the `libero` extra is not installed (pip install -e '.[libero]', which scripts/setup.sh does)",
)

LIBERO_CAMERAS = ("observation.images.image", "observation.images.image2")


# The setup, on temporary directories (no simulator needed).


def test_config_is_written_once_and_left_alone_when_compatible(tmp_path):
    config_file = tmp_path / "libero" / "config.yaml"
    config = libero_config(tmp_path / "site" / "libero" / "libero")
    assert write_config(config_file, config).startswith("wrote")
    assert yaml.safe_load(config_file.read_text()) == config
    assert config["init_states"].endswith("libero/libero/init_files")
    assert config["assets"].endswith("libero/libero/assets")
    assert write_config(config_file, config).startswith("unchanged")
    assert [p.name for p in config_file.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    users = {**config, "datasets": "/data/libero"}  # what LIBERO's prompt writes for a custom datasets folder
    config_file.write_text(yaml.safe_dump(users))
    assert write_config(config_file, config).startswith("unchanged")
    assert yaml.safe_load(config_file.read_text()) == users


def test_another_config_is_refused_then_kept_as_backup_on_overwrite(tmp_path):
    config_file = tmp_path / "config.yaml"
    users = "benchmark_root: /elsewhere\ndatasets: /data/libero\n"
    config_file.write_text(users)
    config = libero_config(tmp_path / "libero" / "libero")
    differing = r"\(bddl_files, init_states\)"
    with pytest.raises(LiberoSetupRefused, match=f"other paths .*{differing}.*--overwrite"):
        write_config(config_file, config)
    assert config_file.read_text() == users
    assert "now" in write_config(config_file, config, overwrite=True)
    assert yaml.safe_load(config_file.read_text()) == config
    assert (tmp_path / "config.yaml.bak").read_text() == users


def test_assets_are_linked_and_a_users_directory_is_never_lost(tmp_path):
    tree, other_tree = tmp_path / "registry" / "assets", tmp_path / "other"
    tree.mkdir(parents=True), other_tree.mkdir()
    link = tmp_path / "libero" / "libero" / "assets"
    link.parent.mkdir(parents=True)
    assert link_assets(link, tree).startswith("linked") and link.resolve() == tree
    assert link_assets(link, tree).startswith("unchanged")
    link_assets(link, other_tree, overwrite=True)  # a link is replaced: nothing of the user's to keep
    assert link.resolve() == other_tree and not link.with_name("assets.bak").exists()
    link.unlink()
    (link / "scenes").mkdir(parents=True)  # a user's own asset directory
    with pytest.raises(LiberoSetupRefused, match="is not a link to the registry's LIBERO assets .* --overwrite"):
        link_assets(link, tree)
    assert (link / "scenes").is_dir() and not link.is_symlink()
    link_assets(link, tree, overwrite=True)
    assert link.resolve() == tree and (link.with_name("assets.bak") / "scenes").is_dir()


@requires_libero
def test_command_refuses_a_users_config_with_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path))
    (tmp_path / "config.yaml").write_text("datasets: /my/datasets\n")
    assert lerobot_xvla(["libero-setup"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lerobot-xvla libero-setup: error: ")
    assert "--overwrite" in error and "LIBERO_CONFIG_PATH" in error
    assert (tmp_path / "config.yaml").read_text() == "datasets: /my/datasets\n"


# The real simulator.


@pytest.fixture(scope="module")
def libero_config_dir(tmp_path_factory):
    """`lerobot-xvla libero-setup` as a user runs it, LIBERO's config in a temporary $LIBERO_CONFIG_PATH that this
    module's env and lerobot-eval runs read. LIBERO is imported only after it (pytest's stdin raises on a read,
    so a prompt on import would fail the tests)."""
    config_dir = tmp_path_factory.mktemp("libero_config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIBERO_CONFIG_PATH", str(config_dir))
        patch.setitem(LEROBOT_ENV, "LIBERO_CONFIG_PATH", str(config_dir))
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert lerobot_xvla(["libero-setup"]) == 0
        assert (config_dir / "config.yaml").is_file(), printed.getvalue()
        yield config_dir


class LiberoArm:
    """LeRobot's LIBERO env (libero_spatial task 0, absolute control) stepped through the adapter's processors."""

    def __init__(self, env_cfg: LiberoEnv):
        from lerobot.envs.factory import make_env
        from lerobot.envs.utils import preprocess_observation

        self.env_cfg = env_cfg
        self.env = make_env(env_cfg, n_envs=1, use_async_envs=False)[env_cfg.task][0]
        self.preprocess_observation = preprocess_observation
        self.preprocessor, self.postprocessor = LiberoAdapter.processors()
        self.observation, _ = self.env.reset(seed=0)
        self.first_observation = self.observation
        self.home = self.state()[:, :10].clone()  # [1, 10]: the pose after reset, gripper open

    def freeze_cameras(self) -> None:
        """Render each camera no more (its last image stays in the observation): software rendering is 90% of a
        step on the CPU, and these tests read only the arm. Physics and controller are untouched."""
        robosuite_env = self.env.envs[0]._env.env
        for camera in self.env_cfg.camera_name.split(","):
            robosuite_env.modify_observable(camera, "sampling_rate", 1e-9)

    def state(self) -> torch.Tensor:
        """The 20-D proprio [1, 20] the adapter makes of the current observation."""
        return self.preprocessor(self.preprocess_observation(self.observation))["observation.state"]

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """End-effector position (3,) and orientation matrix (3, 3) as LeRobot's env reports them."""
        eef = self.observation["robot_state"]["eef"]
        return eef["pos"][0].copy(), eef["mat"][0].copy()

    def gripper_opening(self) -> float:
        """Distance between the two fingers' joint positions (m): 0.08 open, ~0 closed on nothing."""
        qpos = self.observation["robot_state"]["gripper"]["qpos"][0]
        return float(qpos[0] - qpos[1])

    def drive(self, action: torch.Tensor, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Send the 20-D (or first 10) ee6d action [1, D] for `steps` env steps; the pose after each."""
        padded = torch.cat([action, torch.zeros(1, 20 - action.shape[-1])], dim=-1)
        poses = []
        for _ in range(steps):
            libero_action = self.postprocessor({"action": padded})["action"]  # [1, 7]
            self.observation, *_ = self.env.step(libero_action.numpy())
            poses.append(self.pose())
        return poses


@pytest.fixture(scope="module")
def arm(libero_config_dir):
    arm = LiberoArm(LiberoEnv(task="libero_spatial", task_ids=[0], control_mode="absolute"))
    arm.freeze_cameras()
    yield arm
    arm.env.close()


def degrees_between(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(a.T @ b).magnitude()))


def command(pose: torch.Tensor, rotation: np.ndarray | None = None, gripper: float = 0.0) -> torch.Tensor:
    """`pose` [1, 10] with its orientation replaced by `rotation` (3, 3) and its gripper channel set."""
    action = pose.clone()
    if rotation is not None:
        action[:, 3:9] = matrix_to_rot6d(torch.as_tensor(rotation, dtype=torch.float32)[None], "contiguous")
    action[:, 9] = gripper
    return action


@requires_libero
def test_adapter_cameras_have_the_rendered_size(arm):
    """The features the policy is built with are the images' real size (360x360 on LeRobot 0.6, whose config
    hands its size to the env; 256x256 on LeRobot 0.4, whose config declares 360x360)."""
    adapted = LiberoAdapter.policy_env_config(arm.env_cfg)
    for raw_key, policy_key in adapted.features_map.items():
        if policy_key in LIBERO_CAMERAS:
            rendered = arm.first_observation["pixels"][policy_key.rsplit(".", 1)[-1]].shape[1:]
            assert adapted.features[raw_key].shape == rendered


@requires_libero
def test_commanding_the_adapters_own_state_holds_the_arm(arm):
    """The state fed back as the action: within 1 mm and 0.1 degree of where it started, at every one of 40 steps."""
    arm.drive(arm.home, 40)
    start_position, start_rotation = arm.pose()
    poses = arm.drive(arm.state()[:, :10], 40)
    position_error = max(np.linalg.norm(p - start_position) for p, _ in poses)
    rotation_error = max(degrees_between(start_rotation, r) for _, r in poses)
    print(f"hold over 40 steps: {position_error * 1000:.3f} mm, {rotation_error:.4f} deg")
    assert position_error < 1e-3 and rotation_error < 0.1


@requires_libero
@pytest.mark.parametrize(("axis", "degrees"), [("x", 25.0), ("y", -20.0), ("z", 30.0)])
def test_known_rotations_are_reached(arm, axis, degrees):
    """A target orientation turned about a world axis from the current one is reached within 0.2 degree,
    with the position held: the action's axis-angle is read in the frame of the state's 6D rotation."""
    arm.drive(arm.home, 40)
    start_position, start_rotation = arm.pose()
    target = Rotation.from_euler(axis, degrees, degrees=True).as_matrix() @ start_rotation
    position, rotation = arm.drive(command(arm.home, target), 60)[-1]
    moved = np.linalg.norm(position - start_position)
    print(f"{axis} {degrees:+.0f} deg: {degrees_between(rotation, target):.4f} deg off, moved {moved * 1000:.3f} mm")
    assert degrees_between(rotation, target) < 0.2
    assert degrees_between(rotation, start_rotation) > abs(degrees) - 0.2
    assert moved < 2e-3


@requires_libero
def test_gripper_plus_one_closes(arm):
    """X-VLA's gripper channel above 0.5 becomes LIBERO's +1, which closes the fingers; below it -1 opens them."""
    arm.drive(command(arm.home, gripper=0.0), 20)
    opened = arm.gripper_opening()
    arm.drive(command(arm.home, gripper=1.0), 20)
    closed = arm.gripper_opening()
    arm.drive(command(arm.home, gripper=0.0), 20)
    print(f"gripper opening: {opened * 1000:.1f} mm open, {closed * 1000:.1f} mm after +1")
    assert opened > 0.07 and closed < 0.01 and arm.gripper_opening() > 0.07


@pytest.fixture(scope="module")
def libero_checkpoint(tmp_path_factory, tokenizer_dir):
    """A freshly initialised tiny X-VLA with LIBERO's features (two cameras, 20-D proprio and ee6d actions) in
    X-VLA's LIBERO domain (3)."""
    cameras = {key: PolicyFeature(FeatureType.VISUAL, (3, 256, 256)) for key in LIBERO_CAMERAS}
    config = tiny_config(
        input_features={**cameras, "observation.state": PolicyFeature(FeatureType.STATE, (20,))},
        tokenizer_name=tokenizer_dir,
        domain_id=3,
        n_action_steps=4,
    )
    return save_checkpoint(config, tmp_path_factory.mktemp("libero") / "checkpoint")


@requires_libero
def test_lerobot_eval_runs_libero_spatial_and_object(libero_config_dir, libero_checkpoint, tmp_path):
    """The user's command, offline and without a prompt, on the first task of both suites."""
    lerobot(
        "lerobot-eval",
        f"--policy.path={libero_checkpoint}",
        "--env.type=libero",
        "--env.task=libero_spatial,libero_object",
        "--env.task_ids=[0]",
        "--env.control_mode=absolute",
        "--env.episode_length=4",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--policy.device=cpu",
        f"--output_dir={tmp_path}",
    )
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert sorted(task["task_group"] for task in info["per_task"]) == ["libero_object", "libero_spatial"]
    assert info["overall"]["n_episodes"] == 2
    assert len(list(tmp_path.glob("videos/**/*.mp4"))) == 2


@requires_libero
def test_lerobot_eval_refuses_relative_control(libero_config_dir, libero_checkpoint, tmp_path):
    """Without --env.control_mode=absolute (LeRobot's default is relative) lerobot-eval stops, naming the flag."""
    result = subprocess.run(
        [
            lerobot_command("lerobot-eval"),
            f"--policy.path={libero_checkpoint}",
            "--env.type=libero",
            "--env.task=libero_spatial",
            "--env.task_ids=[0]",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            "--policy.device=cpu",
            f"--output_dir={tmp_path}",
        ],
        capture_output=True, text=True, env=LEROBOT_ENV, timeout=900,
    )
    assert result.returncode != 0
    assert "X-VLA in LIBERO needs --env.control_mode=absolute, got --env.control_mode=relative" in result.stderr
    assert not (tmp_path / "eval_info.json").exists()
