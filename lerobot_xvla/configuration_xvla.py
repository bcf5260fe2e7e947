"""`XVLAConfig`: every knob of the X-VLA policy, with defaults that match the released checkpoints.

The config accepts every field of LeRobot's built-in X-VLA config, so `config.json` files written by it
(the `lerobot/xvla-*` checkpoints) parse. Fields that only this plugin has are marked `plugin_only`; they
are left out of a saved `config.json` while they hold their default, which keeps our checkpoints loadable
by LeRobot's built-in X-VLA whenever the config allows it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub.constants import CONFIG_NAME
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE
from transformers.utils import PaddingStrategy

from .action_modes import ACTION_MODES, build_action_mode, check_action_dim, get_action_mode_class
from .mixture.sources import MIXTURE_DOMAIN_KEY, MixtureError, MixtureSource, as_source, check_sources
from .florence import (
    FLORENCE2_LARGE,
    check_image_size,
    complete_florence_config,
    encoder_parameter_count,
    image_tokens_per_view,
    native_florence_config,
)
from .training import TwoStageSchedulerConfig

logger = logging.getLogger(__name__)

EMPTY_CAMERA_PREFIX = f"{OBS_IMAGES}.empty_camera_"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class XVLAConfigError(Exception):
    """An XVLAConfig field holds a value X-VLA cannot build or run with; the message names the field and what
    it takes.

    Not a ValueError on purpose: draccus (LeRobot's config parser) replaces a ValueError or TypeError raised
    while a config is built by "Couldn't instantiate class XVLAConfig", without the reason; the message of any
    other exception reaches the command line (`lerobot-train --policy.chunk_size=0 ...`).
    """


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise XVLAConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Integer fields and the least value each takes.
_INT_MINIMUM = {
    "n_obs_steps": 1, "chunk_size": 1, "tokenizer_max_length": 1, "hidden_size": 1, "depth": 1, "num_heads": 1,
    "num_domains": 1, "len_soft_prompts": 0, "dim_time": 1, "max_len_seq": 1, "num_denoising_steps": 1,
    "max_state_dim": 1, "max_action_dim": 1, "empty_cameras": 0, "chunk_blend_steps": 0, "log_loss_terms_every": 0,
    "freeze_steps": 0, "scheduler_warmup_steps": 0, "scheduler_decay_steps": 0,
}  # fmt: skip
# Upper bounds of the fields that size the network or a request's work, far above every published checkpoint
# (depth 24, hidden 1024, 30 domains, chunk 30, 10 steps): a config.json from elsewhere cannot ask for a
# terabyte model or a billion denoising steps.
_INT_MAXIMUM = {
    "n_obs_steps": 64, "chunk_size": 4096, "tokenizer_max_length": 4096, "hidden_size": 16384, "depth": 256,
    "num_heads": 256, "num_domains": 4096, "len_soft_prompts": 1024, "dim_time": 4096, "max_len_seq": 65536,
    "num_denoising_steps": 1000, "max_state_dim": 1024, "max_action_dim": 1024, "empty_cameras": 16,
    "chunk_blend_steps": 4096,
}  # fmt: skip
# The other sizes: view slots (3 in every checkpoint), pixels per image side (224), frames the time anchors span
# (the original's 1-5 s), the MLP width as a multiple of hidden_size (4).
_MAX_VIEWS, _MAX_IMAGE_SIDE, MAX_ANCHOR_FRAMES, _MAX_MLP_RATIO = 32, 4096, 4096, 64
# The network is built in float32 on the CPU whatever its dtypes (bf16 weights are cast after loading).
_BUILD_BYTES_PER_PARAMETER = 4
# Real-valued fields: True when they must be > 0, False when >= 0 does (rates, scales, norms).
_NUMBER_SIGN = {
    "mlp_ratio": True, "optimizer_lr": True, "optimizer_eps": False, "optimizer_weight_decay": False,
    "optimizer_grad_clip_norm": False, "learning_coef": False, "optimizer_soft_prompt_lr_scale": False,
    "optimizer_soft_prompt_warmup_lr_scale": False, "scheduler_decay_lr": False, "ik_orientation_weight": False,
    "max_joint_step_deg": True,
}  # fmt: skip
_OPTIONAL_NUMBERS = ("optimizer_soft_prompt_warmup_lr_scale",)
_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "weights_dtype": ("float32", "bfloat16"),
    "compile_mode": COMPILE_MODES,
    "inference_backend": ("torch", "onnxruntime"),
    "quantization": ("none", "int8"),
    "lr_decay": ("constant", "cosine"),
    "tokenizer_padding_side": ("right", "left"),
    "pad_language_to": tuple(strategy.value for strategy in PaddingStrategy),
}

# Where the released checkpoints put each embodiment (the original's DATA_DOMAIN_ID and evaluation clients).
PRETRAINED_DOMAIN_IDS: dict[str, int] = {
    "Bridge / WidowX": 0,
    "RT-1 / Google Robot": 1,
    "CALVIN": 2,
    "LIBERO": 3,
    "widowx-air": 4,
    "AIR-AGILEX-HQ (SoftFold)": 5,
    "RoboTwin 2.0": 6,
    "robocasa-human": 7,
    "VLABench": 8,
    "AGIBOT-challenge": 9,
    "AIR-AGILEX": 10,
    "RoboMind Franka (pretraining)": 11,
    "RoboMind UR (pretraining)": 12,
    "DROID left (pretraining)": 13,
    "DROID right (pretraining)": 14,
    "AGIBOT (pretraining)": 15,
    "RoboMind Agilex (pretraining)": 16,
    "RoboMind dual Franka (pretraining)": 17,
    "AIRBOT": 18,
}


def plugin_only(default: Any = None, default_factory: Any = None):
    """A field that LeRobot's built-in config does not have (see the module docstring)."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"plugin_only": True})
    return field(default=default, metadata={"plugin_only": True})


@dataclass
class XVLAConfig(PreTrainedConfig):
    """Configuration of the X-VLA policy. A value X-VLA cannot build or run with raises `XVLAConfigError`,
    naming the field and what it takes.

    The fields you most likely change are the ones that describe your robot: `action_mode`, `domain_id`,
    `primary_camera`, `empty_cameras`, `image_size`. The architecture fields must match the
    checkpoint you load; the defaults build X-VLA-0.9B (Florence-2-large + a 24 x 1024 transformer).

    Fields come in groups, in this order: input/output, the vision-language backbone, the architecture of the
    soft-prompted transformer (must match the checkpoint), actions and proprioception, cameras, inference and
    execution (`execution.py`), time anchors (the original's action "anchors"), training. Each field is
    documented by the comment above it, which is also its help in `lerobot-train --policy.type=xvla --help`.
    """

    # Observation frames per sample; X-VLA uses the last one only.
    n_obs_steps: int = 1
    # Actions predicted per inference (the original `num_actions`, 30 for every checkpoint). Changing it
    # shifts the positional embeddings of every later token away from the pretrained ones.
    chunk_size: int = 30
    # Actions executed from each chunk before predicting the next one (<= chunk_size).
    n_action_steps: int = 30
    # Compute precision, "float32" or "bfloat16". With "bfloat16" the forward passes run under bf16 autocast
    # while the weights (and AdamW's state) stay fp32 master copies.
    dtype: str = "float32"
    # "float32" or "bfloat16" weights; bf16 weights halve memory for inference only (training them is
    # refused: use dtype="bfloat16" instead).
    weights_dtype: str = plugin_only("float32")
    # LeRobot normalisation per feature type; None picks the action mode's default (IDENTITY for ee6d,
    # agibot_ee6d and joint, trained on raw values; MEAN_STD for franka_joint7, auto and so101_bimanual).
    normalization_mapping: dict[str, NormalizationMode] | None = None

    # Florence-2 architecture, in the remote-code format of X-VLA `config.json` files. Defaults to
    # Florence-2-large. Fields it leaves out take the defaults of Microsoft's Florence-2 classes, as LeRobot
    # 0.4.x and the original read them (transformers' for a config in their format); saved checkpoints write
    # every field (`florence.complete_florence_config`).
    florence_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(FLORENCE2_LARGE))
    # Hub id or local directory of a BART tokenizer (the checkpoints' own, or facebook/bart-large, whose ids
    # are the same for plain text). Saved checkpoints carry a copy in their `tokenizer/` directory and record
    # a local directory as "tokenizer" (relative to the checkpoint).
    tokenizer_name: str = "facebook/bart-large"
    # Text tokens per sample (50 for every checkpoint).
    tokenizer_max_length: int = 50
    # Side the text is padded on; pad tokens are attended, as in the original.
    tokenizer_padding_side: str = "right"
    # Padding strategy of the text ("max_length": every sample has tokenizer_max_length tokens).
    pad_language_to: str = "max_length"
    # Instruction of observations that carry no task text (LeRobot's PushT and ALOHA envs send ""), so the
    # policy hears what it was trained with; lerobot-train sets it to the dataset's task when the dataset has
    # exactly one. None: an empty instruction is passed on, with a warning.
    default_task: str | None = plugin_only(None)

    # Width of the transformer (1024 in X-VLA-0.9B).
    hidden_size: int = 1024
    # Transformer blocks (24 in X-VLA-0.9B).
    depth: int = 24
    # Attention heads per block; divides hidden_size.
    num_heads: int = 16
    # Width of the blocks' MLP as a multiple of hidden_size.
    mlp_ratio: float = 4.0
    # Rows of the per-domain tables (soft prompts and action heads): the embodiments the model knows.
    num_domains: int = 30
    # Soft-prompt tokens per domain.
    len_soft_prompts: int = 32
    # Width of the sinusoidal flow-time embedding.
    dim_time: int = 32
    # Length of the learned positional table (actions + image/text tokens, not the prompts).
    max_len_seq: int = 512
    # Per-domain projections of the image/text features.
    use_hetero_proj: bool = False

    # Entry of the action-mode registry (`lerobot_xvla.action_modes`): how the model's actions map onto the
    # robot's, and their loss. One of: ee6d (20-D end-effector poses, the checkpoints'), agibot_ee6d, joint,
    # franka_joint7, so101_bimanual (12 SO101 joints), so101_ee6d (SO101 joints in end-effector space), auto
    # (any width up to 20, MSE).
    action_mode: str = "ee6d"
    # Steps of the re-noising sampler at inference.
    num_denoising_steps: int = 10
    # Condition on `observation.state`.
    use_proprio: bool = True
    # Width the state is zero-padded to (20 for every checkpoint); a wider state is an error.
    max_state_dim: int = 20
    # Model action width of the `auto` mode.
    max_action_dim: int = 20
    # SO101 end-effector mode (`action_mode=so101_ee6d`, docs/so101.md). The arm's URDF; None: TheRobotStudio's
    # SO101 model from the `kinematics` extra. Its end-effector frame is `gripper_frame_link`.
    urdf_path: str | None = plugin_only(None)
    # Per arm joint (5 values for every arm, or 10: left arm then right), the offset in degrees of the URDF's
    # angle from LeRobot's: urdf = sign * lerobot + offset (docs/so101.md measures it). Empty: zero.
    joint_offsets_deg: list[float] = plugin_only(default_factory=list)
    # Per arm joint (5 or 10 values, as joint_offsets_deg), 1 or -1: -1 where the URDF's joint turns the other
    # way than the servo's reading. Empty: all 1.
    joint_signs: list[float] = plugin_only(default_factory=list)
    # Weight of orientation against position in the inverse kinematics (0: position only). Five joints reach a
    # position with only some orientations; LeRobot's 0.01 keeps position first.
    ik_orientation_weight: float = plugin_only(0.01)
    # Lower corner [x, y, z] (metres, the arm's base frame) of the box IK target positions are clipped into.
    ee_workspace_low: list[float] = plugin_only(default_factory=lambda: [-0.5, -0.5, -0.05])
    # Upper corner [x, y, z] of that box.
    ee_workspace_high: list[float] = plugin_only(default_factory=lambda: [0.5, 0.5, 0.6])
    # Largest change of an arm joint per control step (degrees) from the measured joints, and between the
    # steps of a chunk.
    max_joint_step_deg: float = plugin_only(10.0)
    # Key of a per-sample domain id in the batch (an `observation.*` dataset feature, so it survives
    # LeRobot's preprocessing); overrides domain_id.
    domain_feature_key: str | None = None
    # The embodiment's domain id (table in docs/reference.md, "Domain ids"). None: the id stored in a loaded
    # checkpoint's preprocessor (where LeRobot's built-in X-VLA keeps it), else 0.
    domain_id: int | None = plugin_only(None)
    # Robot type or dataset repo id -> domain id; when set, domain_id comes from it for the dataset trained
    # on or recorded (robot type first). A robot missing from it is an error.
    domain_map: dict[str, int] = plugin_only(default_factory=dict)
    # Cross-embodiment training (docs/mixtures.md): several datasets and robots, each
    # {repo_id, domain_id, weight, action_mode, rename_map, root, revision, episodes}; lerobot-train samples them
    # by weight and normalises each domain with its own statistics. The checkpoint keeps each domain's widths and
    # cameras; deploy one robot of it with --policy.domain_id.
    mixture: list[MixtureSource] = plugin_only(default_factory=list)
    # Ablation: every sample uses domain 0's soft prompts and action heads, whatever its domain id (statistics,
    # widths, cameras and losses stay per domain): the domain-blind control of a mixture (docs/mixtures.md).
    domain_blind: bool = plugin_only(False)

    # The image feature that goes through the language encoder with the text (the original `image0`, a fixed
    # third-person view). Default: the first image feature.
    primary_camera: str | None = plugin_only(None)
    # (height, width) every camera is stretched to, in the policy (`XVLAPolicy._images`); (224, 224) as trained.
    image_size: tuple[int, int] = plugin_only((224, 224))
    # LeRobot built-in field: letterbox to this (height, width) instead of stretching.
    resize_imgs_with_padding: tuple[int, int] | None = None
    # Number of view slots; slots without a camera are zero images with a false mask.
    num_image_views: int | None = None
    # View slots that no camera feeds (the robot has fewer cameras than the checkpoint has views), after the
    # cameras, as zero views with a false mask. `observation.images.empty_camera_<i>` features in a config of
    # LeRobot's built-in X-VLA are read as such slots.
    empty_cameras: int = 0

    # torch.compile the sampler as two graphs: the observation encoding and one denoising step.
    compile_model: bool = plugin_only(False)
    # torch.compile mode; on a GPU "reduce-overhead" and "max-autotune" also capture CUDA graphs.
    compile_mode: str = plugin_only("default")
    # Steer each new chunk towards the previous chunk's actions that were predicted for the same steps and
    # not executed yet (real-time chunking adapted to clean-action prediction).
    rtc_guidance: bool = plugin_only(False)
    # Where the network runs: "torch", or "onnxruntime" for a directory written by `lerobot-xvla export` (its
    # two ONNX graphs, observation encoding and one denoising step, run by ONNX Runtime on the CPU with the
    # same sampler; no torch weights are loaded). Needs the `edge` extra.
    inference_backend: str = plugin_only("torch")
    # "none", or "int8" (needs inference_backend="onnxruntime"): the export's int8 graphs (`export --int8`),
    # whose matmul weights are int8 per output channel and activations quantized on the fly; norms,
    # convolutions, embeddings, soft prompts, the time embedding and the per-domain action heads stay fp32.
    quantization: str = plugin_only("none")
    # Cross-fade this many first actions of a new chunk with the previous chunk's.
    chunk_blend_steps: int = plugin_only(0)
    # After the first chunk, feed the last commanded action as proprio instead of the measured state (the
    # original LIBERO client); needs IDENTITY state/action normalisation.
    use_predicted_proprio: bool = plugin_only(False)

    # When set, targets are chunk_size points evenly spaced over this many seconds, interpolated from the
    # dataset's frames (the original trained 30 anchors over 1-5 s), and the proprio is the trajectory's first
    # point; None trains on consecutive frames.
    anchor_horizon_s: float | None = plugin_only(None)
    # Frame rate of the dataset the anchors are interpolated from (required with anchor_horizon_s).
    anchor_fps: float | None = plugin_only(None)

    # Freeze the DaViT vision tower.
    freeze_vision_encoder: bool = False
    # Freeze the BART language encoder.
    freeze_language_encoder: bool = False
    # Train the soft-prompted transformer.
    train_policy_transformer: bool = True
    # Train the soft prompts.
    train_soft_prompts: bool = True
    # Recompute transformer and encoder layers in the backward pass to save memory.
    gradient_checkpointing: bool = plugin_only(False)
    # When loading a pretrained checkpoint, copy this domain's soft prompts and action heads into domain_id
    # (a fresh id for a new robot, started from a similar pretrained one). Applied once: the saved config no
    # longer carries it.
    init_domain_from: int | None = plugin_only(None)
    # Parameter-name prefixes (under `model.`) that may differ from the loaded checkpoint; they keep their
    # fresh initialisation, and tables that only grew in the domain dimension keep the pretrained rows.
    # Example: ["transformer.action_encoder", "transformer.action_decoder"].
    checkpoint_reinit: list[str] = plugin_only(default_factory=list)
    # Log the mean of every loss term over this many training steps (0: never); lerobot-train's own log line
    # shows the total loss only.
    log_loss_terms_every: int = plugin_only(200)
    # AdamW learning rate of the action heads and the core.
    optimizer_lr: float = 1e-4
    # AdamW betas (the original recipe's).
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon.
    optimizer_eps: float = 1e-8
    # AdamW weight decay.
    optimizer_weight_decay: float = 0.0
    # Gradient-norm clipping (the original recipe's).
    optimizer_grad_clip_norm: float = 1.0
    # Learning-rate factor of the VLM and the soft prompts.
    learning_coef: float = plugin_only(0.1)
    # Further learning-rate factor on the soft prompts (LeRobot built-in field).
    optimizer_soft_prompt_lr_scale: float = 1.0
    # LeRobot built-in field, accepted so its configs parse; unused.
    optimizer_soft_prompt_warmup_lr_scale: float | None = None
    # First steps in which only the soft prompts and the action heads train (prompt warm-up).
    freeze_steps: int = plugin_only(1000)
    # Linear warm-up of the VLM and the core after the freeze phase.
    scheduler_warmup_steps: int = 2000
    # "constant" (the original's default) or "cosine" from each group's rate to scheduler_decay_lr /
    # optimizer_lr of it over scheduler_decay_steps.
    lr_decay: str = plugin_only("constant")
    # Steps of the cosine decay.
    scheduler_decay_steps: int = 30_000
    # Learning rate the cosine decay ends at (as a fraction: scheduler_decay_lr / optimizer_lr of each group's).
    scheduler_decay_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()
        if self.optimizer_soft_prompt_warmup_lr_scale is not None:
            logger.warning(
                "optimizer_soft_prompt_warmup_lr_scale is a LeRobot built-in field that lerobot_xvla ignores; "
                "the soft prompts train at optimizer_lr * learning_coef * optimizer_soft_prompt_lr_scale"
            )

    # ----------------------------------------------------------------------------------------------------
    # Validation: every message names the field and what it takes (XVLAConfigError, see there why)
    # ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field (what building the config does; run it again after setting fields by hand).
        An unset normalization_mapping becomes the action mode's default."""
        self._check_numbers()
        self._check_choices()
        self._check_architecture()
        self._check_domains()
        self._check_mixture()
        self._check_execution()
        if self.normalization_mapping is None:
            mode = get_action_mode_class(self.action_mode)
            self.normalization_mapping = {
                "VISUAL": NormalizationMode.IDENTITY,
                "STATE": mode.default_normalization,
                "ACTION": mode.default_normalization,
            }
        self._check_normalization()

    def _check_numbers(self) -> None:
        for name, low in _INT_MINIMUM.items():
            value = getattr(self, name)
            _require(_is_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")
            high = _INT_MAXIMUM.get(name, value)
            _require(value <= high, f"{name} must be at most {high} (far above any published X-VLA), got {value!r}")
        _require(
            all(isinstance(part, str) and part.strip() for part in self.checkpoint_reinit),
            f"checkpoint_reinit lists parts of the model by name (e.g. transformer.action_decoder); got {self.checkpoint_reinit!r}",
        )
        for name, positive in _NUMBER_SIGN.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_NUMBERS:
                continue
            valid = _is_number(value) and (value > 0 if positive else value >= 0)
            _require(valid, f"{name} must be a number {'>' if positive else '>='} 0, got {value!r}")
        _require(
            self.mlp_ratio <= _MAX_MLP_RATIO,
            f"mlp_ratio must be at most {_MAX_MLP_RATIO} (far above any published X-VLA), got {self.mlp_ratio!r}",
        )
        betas = self.optimizer_betas
        _require(
            isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
            f"optimizer_betas must be two numbers in [0, 1), got {betas!r}",
        )

    def _check_choices(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            _require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")
        _require(
            isinstance(self.action_mode, str) and self.action_mode.lower() in ACTION_MODES,
            f"action_mode must be one of the registered modes {sorted(ACTION_MODES)}, got {self.action_mode!r}",
        )
        _require(
            bool(self.tokenizer_name),
            f"tokenizer_name must name a tokenizer (Hub id or directory), got {self.tokenizer_name!r}",
        )
        _require(
            self.quantization == "none" or self.inference_backend == "onnxruntime",
            f"quantization={self.quantization!r} runs on ONNX Runtime: write the int8 graphs with `lerobot-xvla export "
            "<checkpoint> <dir> --int8` and load <dir> (its config sets inference_backend='onnxruntime')",
        )
        _require(
            self.default_task is None or (isinstance(self.default_task, str) and self.default_task.strip() != ""),
            f"default_task must be an instruction or None, got {self.default_task!r}",
        )

    def _check_architecture(self) -> None:
        _require(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}",
        )
        for name in ("image_size", "resize_imgs_with_padding"):
            size = getattr(self, name)
            if size is None and name == "resize_imgs_with_padding":
                continue
            _require(
                isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size),
                f"{name} must be (height, width), two integers >= 1, got {size!r}",
            )
            _require(
                max(size) <= _MAX_IMAGE_SIDE,
                f"{name} must be at most {_MAX_IMAGE_SIDE} x {_MAX_IMAGE_SIDE} pixels (the checkpoints see "
                f"224 x 224), got {size!r}",
            )
        try:
            native_florence_config(self.florence_config)
            check_image_size(self.florence_config, *self.model_image_size)
        except (TypeError, ValueError) as error:
            raise XVLAConfigError(str(error)) from error
        views = self.num_image_views
        _require(
            views is None or (_is_int(views) and views >= 1),
            f"num_image_views must be an integer >= 1 when set, got {views!r}",
        )
        self._check_sequence_length(views or 1)  # at least one view; validate_features counts the cameras
        if self.inference_backend == "torch":  # an ONNX export holds no torch network
            self._check_memory()

    def _check_memory(self) -> None:
        """Refuse, before any tensor exists, a network whose weights alone would not fit in this machine's memory."""
        parameters, memory = estimate_parameters(self), machine_memory()
        needed = parameters * _BUILD_BYTES_PER_PARAMETER
        _require(
            memory is None or needed <= memory,
            f"this config has about {parameters:.2g} parameters ({_decimal_bytes(needed)} in float32), more than this "
            f"machine's {(memory or 0) / 2**30:.1f} GiB of memory; check hidden_size, depth, num_domains, "
            "len_soft_prompts, max_len_seq and florence_config's widths and depths",
        )

    def _check_sequence_length(self, views: int) -> None:
        """The learned positional table must cover the actions, the text and every view's image tokens."""
        _require(
            views <= _MAX_VIEWS,
            f"num_image_views must be at most {_MAX_VIEWS} (far above any published X-VLA's 3), got {views} "
            "(the cameras and empty_cameras count as views)",
        )
        height, width = self.model_image_size
        image_tokens = views * image_tokens_per_view(self.florence_config, height, width)
        seq_len = self.chunk_size + self.tokenizer_max_length + image_tokens
        _require(
            seq_len <= self.max_len_seq,
            f"{views} view(s) at {height}x{width}, {self.tokenizer_max_length} text tokens and {self.chunk_size} "
            f"actions make {seq_len} tokens > max_len_seq={self.max_len_seq}",
        )

    def _check_domains(self) -> None:
        ids = {"domain_id": self.domain_id, "init_domain_from": self.init_domain_from}
        ids.update({f"domain_map[{k!r}]": v for k, v in self.domain_map.items()})
        for name, value in ids.items():
            _require(
                value is None or (_is_int(value) and 0 <= value < self.num_domains),
                f"{name} must be in [0, num_domains={self.num_domains}), got {value}",
            )
        _require(
            self.init_domain_from is None or self.domain_id not in (None, self.init_domain_from),
            f"init_domain_from={self.init_domain_from} needs domain_id set to the new robot's (another) id",
        )

    def _check_mixture(self) -> None:
        if not self.mixture:
            return
        try:
            self.mixture = [as_source(entry, index) for index, entry in enumerate(self.mixture)]
            check_sources(self.mixture, self.num_domains, self.action_mode)
        except MixtureError as error:
            raise XVLAConfigError(str(error)) from None
        per_source_domain = "each source sets its domain_id"
        per_source_anchors = "time anchors are set per source (anchor_horizon_s in each entry; the fps is its dataset's)"
        exclusive = {
            "domain_map": per_source_domain,
            "domain_feature_key": per_source_domain,
            "anchor_horizon_s": per_source_anchors,
            "anchor_fps": per_source_anchors,
            "resize_imgs_with_padding": "letterboxing is not supported in mixtures yet",
        }
        for name, reason in exclusive.items():
            _require(not getattr(self, name), f"{name} cannot be combined with mixture: {reason}")
        _require(not get_action_mode_class(self.action_mode).joint_space_robot,
                 f"action_mode={self.action_mode} converts joints by kinematics, which a mixture does not support yet")
        domains = sorted(self.mixture_domains)
        _require(self.domain_id is None or self.domain_id in domains,
                 f"domain_id={self.domain_id} is not one of the mixture's domains {domains}")
        if self.domain_id is not None and self.default_task is None:  # envs that send no instruction get the domain's
            self.default_task = self.mixture_domains[self.domain_id].task

    def _check_execution(self) -> None:
        _require(
            (self.anchor_horizon_s is None) == (self.anchor_fps is None),
            "anchor_horizon_s and anchor_fps go together: set both (time anchors) or neither",
        )
        horizon, fps = self.anchor_horizon_s, self.anchor_fps
        _require(
            horizon is None or (_is_number(horizon) and _is_number(fps) and min(horizon, fps) > 0),
            f"anchor_horizon_s and anchor_fps must be > 0, got {horizon}, {fps}",
        )
        frames = self.anchor_horizon_frames or 0
        _require(
            frames <= MAX_ANCHOR_FRAMES,
            f"anchor_horizon_s * anchor_fps must be at most {MAX_ANCHOR_FRAMES} frames (a sample loads every frame "
            f"of the horizon), got {horizon} s * {fps} fps = {frames:g}",
        )
        _require(
            _is_int(self.n_action_steps) and 0 < self.n_action_steps <= self.executable_steps,
            f"n_action_steps must be in 1..{self.executable_steps}, got {self.n_action_steps}",
        )

    def _check_normalization(self) -> None:
        mapping = self.normalization_mapping
        types, modes = [t.name for t in FeatureType], list(NormalizationMode)
        _require(
            isinstance(mapping, dict) and all(k in types and v in modes for k, v in mapping.items()),
            f"normalization_mapping must map feature types {types} to normalization modes "
            f"{[m.value for m in modes]}, got {mapping!r}",
        )
        _require(
            not self.use_predicted_proprio
            or {mapping.get(k) for k in ("STATE", "ACTION")} == {NormalizationMode.IDENTITY},
            "use_predicted_proprio feeds actions back as proprio: it needs IDENTITY STATE and ACTION normalization",
        )
        _require(
            not get_action_mode_class(self.action_mode).joint_space_robot
            or {mapping.get(k) for k in ("STATE", "ACTION")} == {NormalizationMode.IDENTITY},
            f"action_mode={self.action_mode} turns joints into end-effector poses before normalisation, and the "
            "dataset's statistics are of the joints: it needs IDENTITY STATE and ACTION normalization",
        )

    def _check_joint_space_robot(self) -> None:
        """The kinematic modes read the joints from the state: it must hold what the actions command."""
        state, width = self.robot_state_feature, self.action_dim
        _require(self.use_proprio and state is not None, f"action_mode={self.action_mode} needs 'observation.state' (the measured joints) and use_proprio=true")
        _require(
            width is None or state.shape[-1] == width,
            f"action_mode={self.action_mode}: observation.state has {state.shape[-1]} values but the actions {width}; "
            "both must be the arm joints and grippers in LeRobot degrees (6 per arm)",
        )
        _require(self.max_state_dim >= 20, f"action_mode={self.action_mode} conditions on 20-D end-effector states: max_state_dim must be >= 20, got {self.max_state_dim}")
        for name in ("ee_workspace_low", "ee_workspace_high"):
            value = getattr(self, name)
            _require(isinstance(value, list) and len(value) == 3 and all(map(_is_number, value)), f"{name} must be 3 finite numbers [x, y, z] in metres, got {value!r}")
        _require(
            all(lo < hi for lo, hi in zip(self.ee_workspace_low, self.ee_workspace_high)),
            f"ee_workspace_low must be below ee_workspace_high in x, y and z, got {self.ee_workspace_low} and {self.ee_workspace_high}",
        )

    # ----------------------------------------------------------------------------------------------------
    # Derived views of the config
    # ----------------------------------------------------------------------------------------------------
    @property
    def time_anchors(self) -> tuple[float, float] | None:
        """(horizon in seconds, frame rate) of the time anchors the policy acts with; None without. A mixture policy
        acting as one domain has that domain's (its source's anchor_horizon_s at its dataset's fps); while a
        mixture trains, each sample has its domain's (`mixture_anchor_frames`)."""
        if self.mixture:
            source = self.mixture_domains.get(self.domain_id)
            return None if source is None or source.anchor_horizon_s is None else (source.anchor_horizon_s, source.fps)
        return None if self.anchor_horizon_s is None else (self.anchor_horizon_s, self.anchor_fps)

    @property
    def anchor_horizon_frames(self) -> float | None:
        """The time anchors' horizon in dataset frames (control steps); None without time anchors."""
        return None if self.time_anchors is None else self.time_anchors[0] * self.time_anchors[1]

    @property
    def mixture_anchor_frames(self) -> dict[int, float] | None:
        """Domain id -> its time anchors' horizon in its dataset's frames, for a mixture trained with time anchors
        (every source has them or none does); None otherwise."""
        domains = self.mixture_domains
        if not domains or any(s.anchor_horizon_s is None or s.fps is None for s in domains.values()):
            return None
        return {domain: source.anchor_horizon_s * source.fps for domain, source in domains.items()}

    @property
    def executable_steps(self) -> int:
        """Actions a chunk yields at the control rate: chunk_size, or the anchors' horizon in control steps."""
        if self.anchor_horizon_frames is None:
            return self.chunk_size
        return round(self.anchor_horizon_frames)

    @property
    def mixture_domains(self) -> dict[int, MixtureSource]:
        """Domain id -> the (first) mixture source of that domain; sources of one domain share its action space."""
        domains: dict[int, MixtureSource] = {}
        for source in self.mixture:
            domains.setdefault(source.domain_id, source)
        return domains

    @property
    def sample_domain_key(self) -> str | None:
        """Batch key of per-sample domain ids: domain_feature_key, or while a mixture trains (no domain_id chosen)
        the mixture's; None: every sample is domain_id."""
        if self.mixture and self.domain_id is None:
            return MIXTURE_DOMAIN_KEY
        return self.domain_feature_key

    @property
    def default_domain_id(self) -> int:
        """The domain id of samples that carry none: `domain_id`, or 0 while it is unset."""
        return 0 if self.domain_id is None else self.domain_id

    @property
    def model_image_size(self) -> tuple[int, int]:
        """(H, W) of the images the network receives."""
        return tuple(self.resize_imgs_with_padding or self.image_size)

    @property
    def camera_order(self) -> list[str]:
        """Image feature keys in view order: the primary camera first, then the others as declared."""
        keys = list(self.image_features)
        primary = self.primary_camera or (keys[0] if keys else None)
        return [primary] + [k for k in keys if k != primary] if primary else keys

    def drop_cameras_missing_from(self, provided: set[str]) -> list[str]:
        """Fine-tuning on a robot with fewer cameras: the image features that `provided` (the dataset's camera
        keys, after any rename_map) lacks become empty view slots, when `empty_cameras` declares at least as
        many. Returns the dropped keys; drops nothing when the dataset shares no camera with the config or
        when the declared slots do not cover the missing cameras (the policy then names the missing camera
        at the first batch)."""
        declared = [k for k in self.image_features if not k.startswith(EMPTY_CAMERA_PREFIX)]
        missing = [k for k in declared if k not in provided]
        primary = self.camera_order[0] if declared else None
        if not missing or len(missing) == len(declared) or len(missing) > self.empty_cameras or primary in missing:
            return []
        for key in missing:
            del self.input_features[key]
        logger.info("X-VLA cameras %s are not in the dataset: they become %d empty view slot(s)", missing, self.empty_cameras)
        return missing

    def adopt_dataset_state(self, shape: tuple[int, ...] | None) -> None:
        """Fine-tuning from a checkpoint: LeRobot keeps the checkpoint's input features, but the robot state the
        policy will see is the dataset's (zero-padded to max_state_dim in the network), so the state feature
        takes the dataset's shape and the preprocessor checks states against it."""
        state = self.robot_state_feature
        if shape is None or state is None or tuple(shape) == tuple(state.shape):
            return
        self.input_features[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=tuple(shape))
        logger.info("X-VLA state feature %s -> %s (the dataset's)", tuple(state.shape), tuple(shape))

    def adopt_dataset_task(self, tasks: list[str]) -> None:
        """Training on a dataset of one task: that task becomes `default_task` (unless set), kept in the
        checkpoint for envs that send no instruction."""
        if self.default_task is None and len(tasks) == 1:
            self.default_task = tasks[0]
            logger.info("X-VLA default_task %r (the dataset's only task)", self.default_task)

    def resolve_domain(self, robot_type: str | None, repo_id: str | None) -> None:
        """Take `domain_id` from `domain_map` for the dataset at hand (its robot type first, then its repo id)."""
        if not self.domain_map:
            return
        for key in (robot_type, repo_id):
            if key in self.domain_map:
                self.domain_id = self.domain_map[key]
                logger.info("X-VLA domain id %d for %r (domain_map)", self.domain_id, key)
                return
        raise ValueError(
            f"domain_map has no entry for robot type {robot_type!r} or dataset {repo_id!r}; it maps {sorted(self.domain_map)}"
        )

    @property
    def action_dim(self) -> int | None:
        """Width of the dataset's actions, None before features are known."""
        return self.action_feature.shape[-1] if self.action_feature is not None else None

    def validate_features(self) -> None:
        """Check the dataset's features against the config; add the declared empty cameras."""
        empty_features = [k for k in self.input_features if k.startswith(EMPTY_CAMERA_PREFIX)]
        for key in empty_features:  # LeRobot's built-in lists its empty slots as features
            del self.input_features[key]
        self.empty_cameras = max(self.empty_cameras, len(empty_features))
        images = self.image_features
        if not images:
            raise ValueError(
                "X-VLA needs at least one camera: no VISUAL feature among input_features "
                f"{sorted(self.input_features or {})}"
            )
        for key, feature in images.items():
            if len(feature.shape) != 3 or feature.shape[0] != 3:
                raise ValueError(f"image feature '{key}' has shape {tuple(feature.shape)}; expected [3, H, W] (RGB)")
        if self.primary_camera is not None and self.primary_camera not in images:
            raise ValueError(f"primary_camera '{self.primary_camera}' is not an image feature; choose one of {list(images)}")
        if self.use_proprio:
            state = self.robot_state_feature
            if state is None:
                raise ValueError("use_proprio=True needs an 'observation.state' feature; set use_proprio=false otherwise")
            if state.shape[-1] > self.max_state_dim:
                raise ValueError(
                    f"observation.state has {state.shape[-1]} values but max_state_dim={self.max_state_dim}; "
                    "raise max_state_dim (the pretrained checkpoints use 20) or select fewer state values"
                )
        if self.mixture:
            self._check_deployed_domain()
        elif self.action_dim is not None:
            check_action_dim(self.action_mode, self.action_dim, self.max_action_dim)
        if get_action_mode_class(self.action_mode).joint_space_robot:
            self._check_joint_space_robot()
        views = len(images) + self.empty_cameras
        self.num_image_views = max(self.num_image_views or views, views)
        self._check_sequence_length(self.num_image_views)

    def _check_deployed_domain(self) -> None:
        """A mixture policy acting as one domain gets that domain's action width (the sources' widths were checked
        against their datasets when the mixture was built)."""
        source = self.mixture_domains.get(self.domain_id)
        if source is None or self.action_dim is None or source.action_dim is None:
            return
        if self.action_dim != source.action_dim:
            raise XVLAConfigError(
                f"domain {self.domain_id} of this mixture policy was trained on {source.action_dim}-D actions "
                f"({source.repo_id}), but the robot or env here has {self.action_dim}"
            )

    def require_deployed_domain(self) -> None:
        """A mixture checkpoint acts as one of its robots, which the user names: refuse to deploy it without."""
        if self.mixture and self.domain_id is None:
            domains = self.mixture_domains
            raise XVLAConfigError(
                f"this X-VLA was trained on a mixture of robots: choose the one it acts as with --policy.domain_id "
                f"(one of {sorted(domains)}: {', '.join(f'{d} = {s.repo_id}' for d, s in domains.items())}; "
                "lerobot-xvla serve: --domain-id)"
            )

    def act_as_domain(self) -> None:
        """A mixture checkpoint loaded to act as its `domain_id` with no robot or env to say the width (LeRobot's
        commands take the action feature from theirs): the action feature takes that domain's width."""
        source = self.mixture_domains.get(self.domain_id) if self.mixture else None
        if source is not None and source.action_dim is not None and self.action_feature is not None:
            self.output_features[ACTION] = PolicyFeature(type=FeatureType.ACTION, shape=(source.action_dim,))

    @property
    def action_mode_of_domain(self) -> str:
        """The action mode the network decodes with: the deployed mixture domain's, else action_mode."""
        source = self.mixture_domains.get(self.domain_id) if self.mixture else None
        return (source.action_mode if source is not None else None) or self.action_mode

    # ----------------------------------------------------------------------------------------------------
    # LeRobot contract
    # ----------------------------------------------------------------------------------------------------
    def get_optimizer_preset(self) -> AdamWConfig:
        """AdamW of the original recipe; the per-group learning rates come from `XVLAPolicy.get_optim_params`
        (`training.parameter_groups`)."""
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> TwoStageSchedulerConfig:
        return TwoStageSchedulerConfig(
            num_warmup_steps=self.scheduler_warmup_steps,
            freeze_steps=self.freeze_steps,
            decay=self.lr_decay,
            num_decay_steps=self.scheduler_decay_steps,
            min_lr_ratio=self.scheduler_decay_lr / self.optimizer_lr,
        )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return action_frames(self.chunk_size, self.anchor_horizon_frames)

    @property
    def reward_delta_indices(self) -> None:
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write config.json as the installed LeRobot does ("type" included), without the plugin-only fields
        that hold their defaults (see module docstring). A tokenizer directory is copied into the checkpoint and
        recorded as that copy, so the policy loads again even when saved without its preprocessor
        (`processor_xvla.save_config_tokenizer`)."""
        from .processor_xvla import save_config_tokenizer  # processor_xvla imports this module

        super()._save_pretrained(save_directory)
        path = Path(save_directory) / CONFIG_NAME
        encoded = json.loads(path.read_text())
        encoded["tokenizer_name"] = save_config_tokenizer(self, save_directory)
        # Every architecture field written out: LeRobot's built-ins fill the ones left out with other defaults.
        encoded["florence_config"] = complete_florence_config(self.florence_config)
        for f in fields(self):
            if f.metadata.get("plugin_only") and getattr(self, f.name) == _field_default(f):
                encoded.pop(f.name, None)
        path.write_text(json.dumps(encoded, indent=4))


def action_frames(chunk_size: int, anchor_horizon_frames: float | None) -> list[int]:
    """Frames of a training sample's actions: chunk_size consecutive ones, or with time anchors every frame of the
    horizon (the current one included), from which the anchors are interpolated."""
    if anchor_horizon_frames is None:
        return list(range(chunk_size))
    return list(range(math.ceil(anchor_horizon_frames) + 1))


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def estimate_parameters(config: XVLAConfig) -> int:
    """The parameters of the network `config` builds (`XVLAModel`), by arithmetic on the config alone: no tensor is
    allocated. Exact for the layers of `soft_transformer.py` and `florence.build_florence_encoder`."""
    hidden, domains = config.hidden_size, config.num_domains
    mlp = int(hidden * config.mlp_ratio)
    # Two norms, the qkv and output projections, the MLP.
    block = 4 * hidden + 4 * hidden * (hidden + 1) + 2 * hidden * mlp + mlp + hidden
    florence = native_florence_config(config.florence_config)
    context = 2 * (florence.vision_config.projection_dim + 1) * hidden  # vlm_proj and aux_visual_proj
    dim_action = build_action_mode(config.action_mode, None, config.max_action_dim).dim_action
    action_in = dim_action + config.dim_time + (config.max_state_dim if config.use_proprio else 0)
    # The per-domain action encoder and decoder.
    heads = domains * ((action_in + 1) * hidden + (hidden + 1) * dim_action)
    transformer = (
        config.depth * block
        + context * (domains if config.use_hetero_proj else 1)
        + config.max_len_seq * hidden  # positional table
        + 2 * hidden  # final norm
        + heads
        + domains * config.len_soft_prompts * hidden
    )
    return transformer + encoder_parameter_count(florence)


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its container's limit (cgroup v2) when lower; None
    where the platform does not tell (no `os.sysconf`, as on Windows)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total  # "max": no limit


def _decimal_bytes(count: int) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9)):
        if count >= scale:
            return f"{count / scale:.2g} {unit}"
    return f"{count / 1e6:.2g} MB"
