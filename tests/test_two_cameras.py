"""A three-view X-VLA fine-tuned on a two-camera robot (lerobot#4245, 2toinf/X-VLA#95), through LeRobot's own
`lerobot-train --policy.path=... --rename_map=... --policy.empty_cameras=1` (the `two_camera_checkpoint`
fixture in conftest.py).

The robot's two cameras are mapped onto two of the checkpoint's views; its third view becomes an empty slot
(a zero image with a false mask), not an input feature, so the fine-tuned checkpoint keeps the checkpoint's
three view slots, expects exactly the robot's two cameras, and returns actions of the robot's width.
Deploying it on the simulated robot: test_rollout_so101.py (LeRobot 0.6) and test_record_so101.py (0.4).
"""

from __future__ import annotations

import json

import pytest
import torch

from lerobot_xvla.modeling_xvla import load_for_inference

from conftest import lerobot
from so101_deploy import HEIGHT, RENAME_TO_THREE_VIEWS, ROBOT_CAMERAS, TASK, THREE_VIEWS, WIDTH, write_two_camera_dataset


def test_fine_tuned_checkpoint_keeps_three_slots_for_two_cameras(two_camera_checkpoint):
    config = json.loads((two_camera_checkpoint / "config.json").read_text())
    images = sorted(k for k, v in config["input_features"].items() if v["type"] == "VISUAL")
    assert images == THREE_VIEWS[:2]  # the robot's cameras (renamed); no empty_camera_* feature
    assert config["empty_cameras"] == 1 and config["num_image_views"] == 3
    assert config["output_features"]["action"]["shape"] == [12]

    policy, preprocessor, postprocessor = load_for_inference(two_camera_checkpoint)
    assert policy.config.num_image_views == 3 and policy.config.camera_order == THREE_VIEWS[:2]
    observation = {key: torch.rand(1, 3, HEIGHT, WIDTH) for key in ROBOT_CAMERAS}  # the robot's names
    observation.update({"observation.state": torch.zeros(1, 12), "task": [TASK]})
    batch = preprocessor(observation)  # the rename step saved with the checkpoint maps them
    images, mask = policy._images(batch)
    assert images.shape[1] == 3 and mask.tolist() == [[True, True, False]]
    action = postprocessor(policy.select_action(batch))
    assert action.shape == (1, 12) and torch.isfinite(action).all()


def test_too_few_declared_slots_name_the_missing_camera(three_view_checkpoint, tmp_path):
    """Without --policy.empty_cameras the checkpoint's third view has no camera: the error says what to do."""
    dataset = write_two_camera_dataset(tmp_path / "dataset", episodes=1, frames=4)
    with pytest.raises(AssertionError, match="camera 'observation.images.image2' is missing from the batch.*empty_cameras"):
        lerobot(
            "lerobot-train", f"--policy.path={three_view_checkpoint}", "--policy.action_mode=so101_bimanual",
            f"--rename_map={json.dumps(RENAME_TO_THREE_VIEWS)}", f"--dataset.repo_id={dataset.repo_id}",
            f"--dataset.root={dataset.root}", "--steps=1", "--batch_size=2", "--num_workers=0",
            f"--output_dir={tmp_path / 'train'}",
        )  # fmt: skip
