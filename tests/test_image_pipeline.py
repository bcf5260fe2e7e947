"""The image path before the network, against what the checkpoints were trained on.

The original feeds the network `Resize((224, 224), BICUBIC)` of the uint8 PIL image, then ToTensor and ImageNet
normalisation (`datasets/dataset.py:76-83`). Ours: the preprocessor's `xvla_image_to_float` and
`xvla_imagenet_normalize`, then the policy's resize (`XVLAPolicy._resize`). Measured against PIL on the scenes
below (uint8 steps): mean 0.27-0.31, 99.9th percentile <= 0.97, max <= 1.09 for every size, the rest being
PIL's rounding to uint8. The tolerance is set just above that; a bilinear, nearest or single-pass bicubic
resize misses it by 7 to 200 steps. The letterbox option equals LeRobot's built-in `resize_with_pad`.

Training augmentation: the original jitters brightness, contrast and saturation by 0.2 (no hue) in training
only. `configs/xvla_finetune.json` sets LeRobot's own `--dataset.image_transforms.*` to exactly that.
"""

from __future__ import annotations

import draccus
import lerobot.policies.xvla.modeling_xvla as builtin_modeling
import numpy as np
import pytest
import torch
from lerobot.configs.train import TrainPipelineConfig
from PIL import Image
from torchvision.transforms import v2

from lerobot_xvla import XVLAPolicy
from lerobot_xvla.compat import ImageTransforms
from lerobot_xvla.demo import DEMO_CONFIG
from lerobot_xvla.processor_xvla import IMAGENET_MEAN, IMAGENET_STD, make_xvla_pre_post_processors

from conftest import tiny_config

SIZES = [(480, 640), (256, 256), (96, 96), (720, 1280)]
MODEL_SIZE = (224, 224)
MAX_STEPS, MEAN_STEPS = 1.15, 0.35  # uint8 steps; see the module docstring
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def camera_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: smooth gradients, hard-edged patches of saturated and dark colours, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 90 * np.cos(5 * y - 3 * x), 128 + 80 * np.sin(4 * (x + y))], -1)
    for _ in range(12):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[top : top + rng.integers(height // 20 + 1, height // 4 + 2), left : left + rng.integers(width // 20 + 1, width // 4 + 2)] = rng.integers(0, 256, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def original_view(image: np.ndarray, resample=Image.BICUBIC) -> torch.Tensor:
    """The original's path: PIL resize of the uint8 image, ToTensor, ImageNet normalisation -> [3, 224, 224]."""
    resized = np.asarray(Image.fromarray(image).resize(MODEL_SIZE[::-1], resample), dtype=np.float32) / 255
    return (torch.from_numpy(resized).permute(2, 0, 1) - MEAN) / STD


def in_uint8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) * STD * 255).abs()


@pytest.fixture(scope="module")
def policy_and_preprocessor(tokenizer_dir):
    config = tiny_config(1, size=MODEL_SIZE, tokenizer_name=tokenizer_dir)
    return XVLAPolicy(config).eval(), make_xvla_pre_post_processors(config)[0]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_views_match_the_originals_pil_bicubic(policy_and_preprocessor, size, dtype):
    policy, preprocessor = policy_and_preprocessor
    scene = camera_scene(*size)
    camera = torch.from_numpy(scene).permute(2, 0, 1)
    camera = camera if dtype == torch.uint8 else camera.float() / 255
    batch = preprocessor({"observation.images.cam0": camera, "observation.state": torch.zeros(20), "task": "pick"})
    view = policy._images(batch)[0][0, 0]

    steps = in_uint8_steps(view, original_view(scene))
    assert steps.max() <= MAX_STEPS and steps.mean() <= MEAN_STEPS, (steps.max(), steps.mean())
    # The tolerance tells resizes apart on this scene: PIL's own bilinear or nearest is far outside it.
    for other in (Image.BILINEAR, Image.NEAREST):
        assert in_uint8_steps(original_view(scene, other), original_view(scene)).max() > 5 * MAX_STEPS


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (96, 200), (224, 224)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_letterbox_is_lerobots_resize_with_pad(size):
    """Same interpolation, same side (left/top) and value of the padding as LeRobot's built-in X-VLA."""
    policy = XVLAPolicy(tiny_config(1, size=MODEL_SIZE, resize_imgs_with_padding=MODEL_SIZE)).eval()
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = builtin_modeling.resize_with_pad(image, *MODEL_SIZE, pad_value=0.0)
    resized = policy._resize(image)
    assert torch.equal(resized, expected)
    ratio = max(size[0] / MODEL_SIZE[0], size[1] / MODEL_SIZE[1])
    rows, cols = MODEL_SIZE[0] - int(size[0] / ratio), MODEL_SIZE[1] - int(size[1] / ratio)
    assert (resized[..., :rows, :] == 0).all() and (resized[..., :, :cols] == 0).all()  # padded at the top / left
    assert (resized[..., rows:, cols:] != 0).all()


RECIPE = DEMO_CONFIG.parent / "xvla_finetune.json"


def parse_train_config(*args: str) -> TrainPipelineConfig:
    """What lerobot-train parses from the arguments a user types."""
    return draccus.parse(TrainPipelineConfig, args=["--policy.type=xvla", "--dataset.repo_id=local/x", *args])


def test_recipe_config_trains_with_the_originals_colour_jitter():
    """`lerobot-train --config_path=configs/xvla_finetune.json`: LeRobot's transforms are the original's
    ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2): all three on every frame, in a random order, and
    nothing else (no hue, sharpness or affine)."""
    config = draccus.parse(TrainPipelineConfig, config_path=str(RECIPE), args=["--policy.type=xvla", "--dataset.repo_id=local/x"])
    transforms = ImageTransforms(config.dataset.image_transforms)
    assert list(transforms.transforms) == ["brightness", "contrast", "saturation"]
    for name, jitter in transforms.transforms.items():
        assert isinstance(jitter, v2.ColorJitter) and getattr(jitter, name) == (0.8, 1.2) and jitter.hue is None
    assert transforms.tf.n_subset == 3 and transforms.tf.random_order

    gray = torch.full((3, 32, 32), 0.5)  # contrast and saturation leave gray alone: only brightness acts
    jittered = torch.stack([transforms(gray) for _ in range(200)])
    assert torch.all(jittered.amin(dim=(1, 2, 3)) == jittered.amax(dim=(1, 2, 3)))  # still flat
    levels = jittered[:, 0, 0, 0]
    assert levels.min() >= 0.4 - 1e-6 and levels.max() <= 0.6 + 1e-6  # 0.5 x [0.8, 1.2]
    assert levels.max() - levels.min() > 0.1  # the whole range is drawn


def test_images_are_untouched_without_the_recipe():
    """LeRobot's default: no transforms (evaluation and deployment read cameras and envs, never these)."""
    transforms = ImageTransforms(parse_train_config().dataset.image_transforms)
    image = torch.rand(3, 32, 32)
    assert not parse_train_config().dataset.image_transforms.enable and torch.equal(transforms(image), image)
