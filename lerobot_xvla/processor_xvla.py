"""Pre- and post-processing pipelines of the X-VLA policy.

Preprocessor: rename -> add batch dim -> check the state -> default task -> tokenize the task -> images to
[0, 1] -> ImageNet normalisation -> domain id -> device -> state/action normalisation. Postprocessor: unnormalise -> CPU -> action
guard (values are clamped to the range of the training actions; non-finite actions are refused).
With `action_mode=so101_ee6d` the preprocessor turns joints into end-effector poses right after the state check
(`xvla_so101_joints_to_ee`) and the postprocessor turns poses into joints right before the action guard
(`xvla_so101_ee_to_joints`); see `robots/so101_steps.py`.

Every input is checked before the device step, so value checks run on the CPU and never stall an accelerator:
camera shapes, dtypes and ranges (`check_image`), the state's width and finiteness (`StateCheckStep`), and the
dataset statistics (`refuse_unusable_stats`).

The X-VLA steps are registered under the names LeRobot's built-in X-VLA uses (`xvla_image_to_float`,
`xvla_imagenet_normalize`, `xvla_add_domain_id`, see `registration.py`), with the same config keys, so
processor files saved by either implementation load in both. Our versions decide the image range from the
dtype instead of the pixel values (uint8 -> / 255, float must already be in [0, 1]) and check values only
while tensors are on the CPU, so they never stall an accelerator.

Resizing to the network's image size happens in the policy (`XVLAPolicy._images`), so processor files
saved by LeRobot's built-in X-VLA, which have no resize step, still feed the network 224 x 224 views.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import logging

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DataProcessorPipeline,
    DeviceProcessorStep,
    EnvTransition,
    NormalizerProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStep,
    RenameObservationsProcessorStep,
    TokenizerProcessorStep,
    TransitionKey,
    UnnormalizerProcessorStep,
)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_STATE, POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from .action_modes import get_action_mode_class
from .configuration_xvla import XVLAConfig
from .mixture.normalize import DomainNormalizerStep
from .processor_files import UntrustedCheckpointError, refuse_outside
from .robots.so101_steps import JOINTS_PER_ARM, EndEffectorToJointsStep, JointsToEndEffectorStep

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Robot states (metres, radians, degrees, encoder ticks) are far smaller; values near 1e19 overflow the model's
# float32 arithmetic (a LayerNorm squares them) and larger ones give actions that ignore the observation.
MAX_STATE_ABS = 1e6


def imagenet_stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet (mean, std) as [3, 1, 1] tensors of `like`'s dtype and device."""
    def as_tensor(values):
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)

    return as_tensor(IMAGENET_MEAN), as_tensor(IMAGENET_STD)


def normalized_pixel_range(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [3, 1, 1] bounds of ImageNet-normalised pixels: where 0 and 1 land after `xvla_imagenet_normalize`."""
    mean, std = imagenet_stats(like)
    return -mean / std, (1 - mean) / std


def _image_keys(observation: dict[str, Any], image_keys: list[str] | None) -> list[str]:
    # "observation.image" (single camera, e.g. pusht) and "observation.images.<name>"
    keys = image_keys if image_keys is not None else [k for k in observation if k.startswith(OBS_IMAGE)]
    return [k for k in keys if isinstance(observation.get(k), torch.Tensor)]


def check_image(key: str, image: torch.Tensor, step: str) -> None:
    """Refuse a camera image that is not a batch of RGB images [B, 3, H, W] (or [B, T, 3, H, W]) of uint8 or
    float values; float images must be finite and in [0, 1]. Values are checked only on the CPU (checking an
    accelerator tensor would synchronise the host): the preprocessor runs these steps before its device step."""
    shape = tuple(image.shape)
    if image.ndim not in (4, 5) or shape[-3] != 3 or min(shape[-2:]) < 1:
        hint = " (channel-last? permute to channel-first)" if image.ndim >= 3 and shape[-1] in (1, 3, 4) else ""
        raise ValueError(f"camera '{key}' has shape {shape}{hint}; {step} expects RGB images [B, 3, H, W] with H, W >= 1")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"camera '{key}' has dtype {image.dtype}; {step} expects uint8 in [0, 255] or float in [0, 1]")
    if image.dtype == torch.uint8 or image.device.type != "cpu":
        return
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"camera '{key}' holds NaN or inf pixels; {step} expects finite float images in [0, 1]")
    low, high = image.aminmax()
    if low < 0 or high > 1:
        raise ValueError(
            f"camera '{key}' has values in [{float(low):.4g}, {float(high):.4g}]; {step} expects float images in "
            "[0, 1] or uint8 images in [0, 255]"
        )


def refuse_unusable_stats(
    stats: dict[str, dict[str, Any]] | None, features: dict[str, PolicyFeature], source: str
) -> None:
    """Refuse statistics of the state and action features that no dataset gives, naming the feature, statistic and
    index: NaN or inf (a dataset with one NaN frame has them; normalising with them, or clamping actions to them,
    would send NaN to the robot), a min above its max or a negative std (such a file was edited, and would pin or
    flip actions), and magnitudes beyond MAX_STATE_ABS, the bound of the states themselves (a mean or std of 1e30
    maps every state to 0 and every action to 1e30).

    A std of 0 is what a channel that never moved has (a gripper kept open): LeRobot's normaliser divides by
    std + 1e-8, so it maps that constant to 0 and unnormalises to the mean, which is right. It is accepted where
    min == max shows the channel is constant, and refused elsewhere: there it would blow the channel's
    deviations up 1e8 times. `count` (frames) is not a value of the feature and has no magnitude bound."""

    def where(mask: torch.Tensor) -> list[int]:
        return mask.nonzero().flatten().tolist()

    found: dict[str, list[str]] = {"non-finite": [], "impossible": [], "too large": []}
    for key, feature in features.items():
        if feature.type is FeatureType.VISUAL:  # images are not normalised by these statistics
            continue
        given = (stats or {}).get(key, {})
        named = {name: torch.as_tensor(value, dtype=torch.float64).flatten() for name, value in given.items()}
        for name, values in named.items():
            finite = torch.isfinite(values)
            found["non-finite"] += [f"{key} {name}[{i}]={values[i].item()}" for i in where(~finite)]
            if name != "count":
                large = finite & (values.abs() > MAX_STATE_ABS)
                found["too large"] += [f"{key} {name}[{i}]={values[i].item():g}" for i in where(large)]
        low, high, std = (named.get(name) for name in ("min", "max", "std"))
        ranged = low is not None and high is not None and low.shape == high.shape
        if ranged:
            crossed = where(low > high)
            found["impossible"] += [f"{key} min[{i}]={low[i].item():g} > max[{i}]={high[i].item():g}" for i in crossed]
        if std is not None:
            found["impossible"] += [f"{key} std[{i}]={std[i].item():g} < 0" for i in where(std < 0)]
            ranged = ranged and low.shape == std.shape
            constant = low == high if ranged else torch.zeros_like(std, dtype=torch.bool)
            for i in where((std == 0) & ~constant):
                why = f"min[{i}]={low[i].item():g} < max[{i}]={high[i].item():g}" if ranged else "no min and max"
                found["impossible"].append(f"{key} std[{i}]=0 but {why} (only a constant channel has std 0)")
    recompute = "recompute the dataset's stats"
    reasons = {
        "non-finite": "hold non-finite values: {}. A frame with NaN or inf in the dataset produces them; fix or drop "
        f"those frames and {recompute}",
        "impossible": f"are impossible for any dataset: {{}}; {recompute}",
        "too large": f"hold magnitudes beyond +-{MAX_STATE_ABS:g}, the bound of robot states: {{}}; {recompute}",
    }
    for kind, problems in found.items():
        if problems:
            shown = ", ".join(problems[:12]) + (f", ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
            raise ValueError(f"the {source} statistics " + reasons[kind].format(shown))


class _ObservationStep(ProcessorStep):
    """A step that rewrites some observation tensors and leaves the features unchanged."""

    def process(self, observation: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        observation = transition.get(TransitionKey.OBSERVATION)
        if not observation:
            return transition
        transition = transition.copy()
        transition[TransitionKey.OBSERVATION] = self.process(dict(observation))
        return transition

    def transform_features(self, features):
        return features


@dataclass
class ImageToFloatStep(_ObservationStep):
    """Camera images to float32 in [0, 1]: uint8 is divided by 255, float must already be in [0, 1].

    Registered as `xvla_image_to_float`; `validate_range` checks shapes and dtypes, and float values on the CPU
    (`check_image`).
    """

    image_keys: list[str] | None = None
    validate_range: bool = True

    def process(self, observation):
        for key in _image_keys(observation, self.image_keys):
            image = observation[key]
            if self.validate_range:
                check_image(key, image, "xvla_image_to_float")
            if image.dtype == torch.uint8:
                observation[key] = image.float() / 255.0
                continue
            observation[key] = image.float()
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys, "validate_range": self.validate_range}


@dataclass
class ImageNetNormalizeStep(_ObservationStep):
    """(image - ImageNet mean) / std on every camera, as Florence-2 was trained. Registered as `xvla_imagenet_normalize`."""

    image_keys: list[str] | None = None

    def process(self, observation):
        for key in _image_keys(observation, self.image_keys):
            image = observation[key]
            check_image(key, image, "xvla_imagenet_normalize")
            mean, std = imagenet_stats(image)
            observation[key] = (image - mean) / std
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys}


@dataclass
class StateCheckStep(_ObservationStep):
    """Refuse a robot state that is not [B, state_dim] (or [B, T, state_dim]) of finite values, before the
    device step (so the value check never synchronises an accelerator). Registered as `xvla_check_state`.

    A narrower state would be zero-padded to max_state_dim and a NaN would reach every action of the chunk;
    both are errors here, named. state_dim None (no proprio) checks nothing.
    """

    state_dim: int | None = None

    def process(self, observation):
        if self.state_dim is None:
            return observation
        state = observation.get(OBS_STATE)
        if state is None:
            raise ValueError(f"the observation has no '{OBS_STATE}'; this policy expects {self.state_dim} state values")
        if not isinstance(state, torch.Tensor) or state.ndim not in (2, 3) or state.shape[-1] != self.state_dim:
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"'{OBS_STATE}' has shape {shape}; this policy expects [B, {self.state_dim}] state values")
        if not state.is_floating_point():
            raise ValueError(f"'{OBS_STATE}' has dtype {state.dtype}; expected floating point")
        if state.device.type == "cpu" and not bool(torch.isfinite(state).all()):
            bad = (~torch.isfinite(state)).nonzero()[:, -1].unique().tolist()
            raise ValueError(f"'{OBS_STATE}' holds NaN or inf at indices {bad}; refusing to act on it")
        if state.device.type == "cpu" and bool((state.abs() > MAX_STATE_ABS).any()):
            bad = (state.abs() > MAX_STATE_ABS).nonzero()[:, -1].unique().tolist()
            raise ValueError(f"'{OBS_STATE}' holds values beyond +-{MAX_STATE_ABS:g} at indices {bad}; robot states are far smaller, refusing to act on it")
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"state_dim": self.state_dim}


@dataclass
class DefaultTaskStep(ProcessorStep):
    """Give samples without task text (None or "") the instruction the policy was trained with, before the
    tokenizer: LeRobot's PushT and ALOHA envs send "", and a VLA conditioned on an empty instruction acts on
    something it never saw. Logs the substitution once; without a `task` it warns once and passes "" on.
    Registered as `xvla_default_task`."""

    task: str | None = None

    def __post_init__(self) -> None:
        self._logged = False

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        complementary = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        texts = complementary.get("task")
        single = texts is None or isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if all(text and text.strip() for text in texts):
            return transition
        if self.task is None:
            self._log_once(logging.WARNING, "X-VLA got an empty instruction and has no default_task: it acts on an empty instruction")
            return transition
        self._log_once(logging.INFO, f"X-VLA: no task text in the observation; using the instruction it was trained with, {self.task!r} (policy.default_task)")
        filled = [text if text and text.strip() else self.task for text in texts]
        complementary["task"] = filled[0] if single else filled
        transition = transition.copy()
        transition[TransitionKey.COMPLEMENTARY_DATA] = complementary
        return transition

    def _log_once(self, level: int, message: str) -> None:
        if not self._logged:
            logger.log(level, message)
            self._logged = True

    def transform_features(self, features):
        return features

    def get_config(self) -> dict[str, Any]:
        return {"task": self.task}


def whole_domain_ids(values: Any, name: str) -> torch.Tensor:
    """Domain ids as a long tensor; values that are not whole numbers are refused (2.7 would become domain 2)."""
    ids = torch.as_tensor(values)
    if ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"'{name}' holds domain ids of dtype {ids.dtype}; expected whole numbers")
    if ids.is_floating_point() and ids.device.type == "cpu" and not bool((torch.isfinite(ids) & (ids == ids.round())).all()):
        raise ValueError(f"'{name}' holds domain ids {ids.reshape(-1).tolist()} that are not whole numbers")
    return ids.long()


@dataclass
class AddDomainIdStep(ProcessorStep):
    """Put the embodiment's `domain_id` [B] (long) in the complementary data. Registered as `xvla_add_domain_id`.

    With `feature_key`, the ids come per sample from that batch entry (an `observation.*` dataset feature);
    otherwise every sample gets `domain_id`. Ids are checked against [0, num_domains) while on the CPU.
    """

    domain_id: int = 0
    feature_key: str | None = None
    num_domains: int | None = None

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        transition = transition.copy()
        observation = transition.get(TransitionKey.OBSERVATION) or {}
        complementary = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        batch_size = next((v.shape[0] for v in observation.values() if isinstance(v, torch.Tensor) and v.ndim), 1)
        if self.feature_key is None:
            ids = whole_domain_ids(self.domain_id, "domain_id").expand(batch_size).clone()
        else:
            source = observation if self.feature_key in observation else complementary
            if self.feature_key not in source:
                raise ValueError(f"domain_feature_key '{self.feature_key}' is not in the batch")
            ids = whole_domain_ids(source[self.feature_key], self.feature_key).reshape(batch_size, -1)[:, 0]
        if self.num_domains is not None and ids.device.type == "cpu":
            if bool(((ids < 0) | (ids >= self.num_domains)).any()):
                raise ValueError(f"domain ids {ids.tolist()} are outside [0, num_domains={self.num_domains})")
        complementary["domain_id"] = ids
        transition[TransitionKey.COMPLEMENTARY_DATA] = complementary
        return transition

    def transform_features(self, features):
        return features

    def get_config(self) -> dict[str, Any]:
        return {"domain_id": self.domain_id, "feature_key": self.feature_key, "num_domains": self.num_domains}


@dataclass
class ActionGuardStep(ProcessorStep):
    """The last step before a robot or an env: clamp actions into [low, high], then let through only finite
    actions of the expected width.

    The bounds default to the minimum and maximum of the training actions, which a robot reached while
    being recorded, so they lie inside its calibrated ranges. Non-finite actions and non-finite bounds (statistics
    of a dataset with a NaN action frame) are refused, so what leaves the guard is finite. Runs
    on the CPU (after the postprocessor's device step), so checking costs no accelerator synchronisation.
    Registered as `xvla_action_guard`; `action_dim` is the expected width (None: the bounds' width, if any).
    """

    low: list[float] | None = None
    high: list[float] | None = None
    action_dim: int | None = None

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise ValueError("xvla_action_guard needs both bounds, low and high, or neither")
        if self.low is not None:
            if len(self.low) != len(self.high):
                raise ValueError(f"xvla_action_guard has {len(self.low)} low bounds and {len(self.high)} high bounds")
            # (non-finite bounds are refused when an action comes, naming its channels)
            crossed = [i for i, (lo, hi) in enumerate(zip(self.low, self.high, strict=True)) if math.isfinite(lo) and math.isfinite(hi) and lo > hi]
            if crossed:
                i = crossed[0]
                raise ValueError(f"xvla_action_guard bounds need low <= high; index {i} has low={self.low[i]:g} > high={self.high[i]:g} (every action would be pinned to a bound)")

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        action = transition.get(TransitionKey.ACTION)
        if not isinstance(action, torch.Tensor):
            return transition
        width = self.action_dim if self.action_dim is not None else (None if self.low is None else len(self.low))
        if width is not None and (action.ndim == 0 or action.shape[-1] != width):
            raise ValueError(f"xvla_action_guard expects actions of {width} values, got shape {tuple(action.shape)}")
        if not bool(torch.isfinite(action).all()):  # an inf would otherwise be clamped onto a bound
            channels = (~torch.isfinite(action)).reshape(-1, action.shape[-1]).any(0).nonzero().flatten().tolist()
            raise ValueError(
                f"X-VLA predicted non-finite actions (NaN or inf) in channels {channels}; refusing to pass them to the robot"
            )
        guarded = action
        if self.low is not None and self.high is not None:
            if len(self.low) != action.shape[-1] or len(self.high) != action.shape[-1]:
                raise ValueError(f"xvla_action_guard has bounds for {len(self.low)} values but the action has {action.shape[-1]}")
            unbounded = [i for i, bounds in enumerate(zip(self.low, self.high, strict=True)) if not all(map(math.isfinite, bounds))]
            if unbounded:
                raise ValueError(
                    f"xvla_action_guard bounds are not finite for action channels {unbounded}: the action statistics "
                    "(min/max) of the training dataset hold NaN or inf; fix the dataset's frames or its stats"
                )
            low = torch.tensor(self.low, dtype=action.dtype, device=action.device)
            high = torch.tensor(self.high, dtype=action.dtype, device=action.device)
            guarded = torch.minimum(torch.maximum(action, low), high)
        if guarded is not action and not torch.equal(guarded, action):
            logger.warning("X-VLA actions outside the range of the training actions were clamped into it")
        transition = transition.copy()
        transition[TransitionKey.ACTION] = guarded
        return transition

    def transform_features(self, features):
        return features

    def get_config(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "action_dim": self.action_dim}

    @classmethod
    def from_stats(cls, dataset_stats: dict[str, dict[str, Any]] | None, action_dim: int | None = None) -> ActionGuardStep:
        stats = (dataset_stats or {}).get(ACTION, {})
        if "min" not in stats or "max" not in stats:
            return cls(action_dim=action_dim)
        low, high = (torch.as_tensor(stats[k]).flatten().tolist() for k in ("min", "max"))
        return cls(low=low, high=high, action_dim=action_dim)


def reconcile_loaded_processors(
    preprocessor: PolicyProcessorPipeline, postprocessor: PolicyProcessorPipeline, config: XVLAConfig
) -> None:
    """Make processors loaded from a checkpoint agree with the config, in place.

    * The domain step follows the config's domain settings; a config without `domain_id` adopts the
      checkpoint's (LeRobot's built-in X-VLA keeps the id only in its preprocessor).
    * The action guard takes its bounds from the unnormaliser's statistics when they have min/max, so
      fine-tuning on another dataset (lerobot-train overrides those statistics) moves the bounds with it; a
      postprocessor without `xvla_action_guard` (files of LeRobot's built-in X-VLA, `lerobot/xvla-*`) gets one,
      and a preprocessor without `xvla_check_state` or `xvla_default_task` gets them (before its device step,
      before its tokenizer); the default task is the config's.
    * Statistics of the state and action features that hold NaN or inf are refused, named.
    * The preprocessor becomes an `XVLAPreprocessor`: saved again (fine-tuning), it takes its tokenizer along.
    """
    if type(preprocessor) is DataProcessorPipeline:
        preprocessor.__class__ = XVLAPreprocessor
    domain_step = next((s for s in preprocessor.steps if isinstance(s, AddDomainIdStep)), None)
    if domain_step is not None:
        if config.domain_id is None and not config.mixture:  # a mixture's samples carry their own ids
            config.domain_id = domain_step.domain_id
            config._check_domains()  # an id from the file is checked like one from config.json, when it is loaded
        domain_step.domain_id = config.domain_id
        domain_step.feature_key = config.sample_domain_key
        domain_step.num_domains = config.num_domains
    for step in (*preprocessor.steps, *postprocessor.steps):
        if isinstance(step, DomainNormalizerStep) and step.inverse:
            step.domain_id = config.domain_id  # the robot a mixture policy acts as
    normalizer = next((s for s in preprocessor.steps if isinstance(s, (NormalizerProcessorStep, DomainNormalizerStep))), None)
    unnormalizer = next((s for s in postprocessor.steps if isinstance(s, (UnnormalizerProcessorStep, DomainNormalizerStep))), None)
    features = {**config.input_features, **config.output_features}
    refuse_unusable_stats(_stats_of(normalizer, config), features, "checkpoint's preprocessor")
    refuse_unusable_stats(_stats_of(unnormalizer, config), features, "checkpoint's postprocessor")
    # Processor files of LeRobot's built-in X-VLA, or saved before these steps existed, lack them.
    _ensure_step(preprocessor, StateCheckStep, before=DeviceProcessorStep).state_dim = _state_dim(config)
    _ensure_step(preprocessor, DefaultTaskStep, before=TokenizerProcessorStep).task = config.default_task
    _replace_kinematic_steps(preprocessor, postprocessor, config)
    bounds = ActionGuardStep.from_stats(_stats_of(unnormalizer, config), config.action_dim)
    guard = next((s for s in postprocessor.steps if isinstance(s, ActionGuardStep)), None)
    if guard is None:
        logger.warning(
            "the checkpoint's postprocessor has no xvla_action_guard; added one (non-finite actions raise%s)",
            "" if bounds.low is None else ", actions are clamped to the training range",
        )
        postprocessor.steps.append(bounds)
    else:
        guard.action_dim = bounds.action_dim
        if bounds.low is not None:
            guard.low, guard.high = bounds.low, bounds.high


def kinematic_steps(config: XVLAConfig) -> tuple[JointsToEndEffectorStep, EndEffectorToJointsStep] | None:
    """The forward- and inverse-kinematics steps of a joint-space robot mode (`so101_ee6d`), linked so the IK
    is seeded from the joints the preprocessor measured; None for the other modes."""
    if not get_action_mode_class(config.action_mode).joint_space_robot or config.action_dim is None:
        return None
    arm = {"arms": config.action_dim // JOINTS_PER_ARM, "urdf_path": config.urdf_path,
           "joint_offsets_deg": list(config.joint_offsets_deg), "joint_signs": list(config.joint_signs)}  # fmt: skip
    forward = JointsToEndEffectorStep(**arm)
    inverse = EndEffectorToJointsStep(
        **arm, orientation_weight=config.ik_orientation_weight, workspace_low=list(config.ee_workspace_low),
        workspace_high=list(config.ee_workspace_high), max_joint_step_deg=config.max_joint_step_deg,
    )  # fmt: skip
    inverse.joints_source = forward
    return forward, inverse


def _replace_kinematic_steps(preprocessor: PolicyProcessorPipeline, postprocessor: PolicyProcessorPipeline, config: XVLAConfig) -> None:
    """Put the config's kinematic steps right after the state check and right before the action guard, in new
    pipelines and in loaded ones, whose steps are built anew from the config (which `--policy.urdf_path` and the
    calibration fields override)."""
    for pipeline in (preprocessor, postprocessor):
        pipeline.steps[:] = [s for s in pipeline.steps if not isinstance(s, (JointsToEndEffectorStep, EndEffectorToJointsStep))]
    steps = kinematic_steps(config)
    if steps is None:
        return
    _insert_after(preprocessor, StateCheckStep, steps[0])
    guard = next((i for i, s in enumerate(postprocessor.steps) if isinstance(s, ActionGuardStep)), len(postprocessor.steps))
    postprocessor.steps.insert(guard, steps[1])


def _insert_after(pipeline: PolicyProcessorPipeline, step_type: type[ProcessorStep], step: ProcessorStep) -> None:
    index = next(i for i, s in enumerate(pipeline.steps) if isinstance(s, step_type))
    pipeline.steps.insert(index + 1, step)


def _ensure_step(pipeline: PolicyProcessorPipeline, step_type: type[ProcessorStep], before: type[ProcessorStep]) -> ProcessorStep:
    """The pipeline's `step_type` step; a fresh one is inserted before its `before` step (or at the end) if absent."""
    step = next((s for s in pipeline.steps if isinstance(s, step_type)), None)
    if step is None:
        step = step_type()
        index = next((i for i, s in enumerate(pipeline.steps) if isinstance(s, before)), len(pipeline.steps))
        pipeline.steps.insert(index, step)
    return step


def _stats_of(step: ProcessorStep | None, config: XVLAConfig) -> dict[str, dict[str, Any]] | None:
    """The statistics a (un)normaliser step holds (LeRobot keeps them as tensors once loaded); of a mixture's, those
    of the domain the policy acts as (None while it trains every domain)."""
    if isinstance(step, DomainNormalizerStep):
        return step.domain_stats(config.domain_id) if config.domain_id in step.widths else None
    return getattr(step, "_tensor_stats", None) or getattr(step, "stats", None)


def _state_dim(config: XVLAConfig) -> int | None:
    """Width of the robot state the policy conditions on; None without proprio. A mixture policy acting as one
    domain takes that domain's state (the mixture's is zero-padded to the widest source)."""
    state = config.robot_state_feature
    if not config.use_proprio or state is None:
        return None
    source = config.mixture_domains.get(config.domain_id) if config.mixture else None
    return source.state_dim if source is not None and source.state_dim is not None else state.shape[-1]


def _normalizers(config: XVLAConfig, dataset_stats: dict[str, dict[str, Any]] | None) -> tuple[ProcessorStep, ProcessorStep]:
    """LeRobot's normaliser and unnormaliser, or for a mixture the per-domain ones (`mixture.normalize`), built from
    each domain's statistics (`mixture.dataset.MixtureStats.by_domain`, what lerobot-train passes for a mixture)."""
    features = {**config.input_features, **config.output_features}
    if not config.mixture:
        refuse_unusable_stats(dataset_stats, features, "dataset")
        return (
            NormalizerProcessorStep(features=features, norm_map=config.normalization_mapping, stats=dataset_stats),
            UnnormalizerProcessorStep(features=config.output_features, norm_map=config.normalization_mapping, stats=dataset_stats),
        )
    by_domain = getattr(dataset_stats, "by_domain", None)
    if by_domain is None:
        raise ValueError("a mixture's processors need each domain's statistics: build them from the mixture dataset "
                         "(lerobot-train does), or load them from a mixture checkpoint")
    for domain, stats in by_domain.items():
        refuse_unusable_stats(stats, features, f"domain {domain}'s dataset")
    widths = {d: {k: w for k, w in ((OBS_STATE, s.state_dim if config.use_proprio else None), (ACTION, s.action_dim)) if w}
              for d, s in config.mixture_domains.items()}  # fmt: skip
    common = {"widths": widths, "norm_map": config.normalization_mapping, "stats": by_domain}
    return DomainNormalizerStep(**common), DomainNormalizerStep(**common, inverse=True, domain_id=config.domain_id)


# Registry names; the first three are shared with LeRobot's built-in X-VLA (see `registration.install`).
PROCESSOR_STEPS: dict[str, type[ProcessorStep]] = {
    "xvla_image_to_float": ImageToFloatStep,
    "xvla_imagenet_normalize": ImageNetNormalizeStep,
    "xvla_add_domain_id": AddDomainIdStep,
    "xvla_action_guard": ActionGuardStep,
    "xvla_check_state": StateCheckStep,
    "xvla_default_task": DefaultTaskStep,
    "xvla_so101_joints_to_ee": JointsToEndEffectorStep,
    "xvla_so101_ee_to_joints": EndEffectorToJointsStep,
    "xvla_domain_normalizer": DomainNormalizerStep,
}


# A checkpoint's own copy of its tokenizer: the directory its preprocessor writes, named relative to the checkpoint.
TOKENIZER_DIR = "tokenizer"


def saved_tokenizer_name(name: str) -> str:
    """The tokenizer name a checkpoint records: a local directory becomes the checkpoint's own copy
    (`TOKENIZER_DIR`), so no path of the saving machine is written; a Hub id stays as it is."""
    return TOKENIZER_DIR if os.path.isdir(name) else name


def save_config_tokenizer(config: XVLAConfig, save_directory: str | Path) -> str:
    """The tokenizer name `config`'s config.json records in `save_directory` (`saved_tokenizer_name`). A tokenizer
    the config loads from a directory is copied into the checkpoint's `TOKENIZER_DIR`, as the preprocessor's save
    does, so a policy saved without its preprocessor loads again once that directory is gone."""
    location = resolve_tokenizer_name(config.tokenizer_name, config.pretrained_path)
    if os.path.isdir(location):
        from transformers import AutoTokenizer  # what LeRobot's tokenizer step loads with

        AutoTokenizer.from_pretrained(location).save_pretrained(Path(save_directory) / TOKENIZER_DIR)
    return saved_tokenizer_name(config.tokenizer_name)


def checkpoint_tokenizer(checkpoint: str | Path | None) -> Path | None:
    """The tokenizer directory a local checkpoint carries, or None. It is refused where it, or a file in it, links
    outside the checkpoint (`processor_files.refuse_outside`; the Hub cache's links into its blobs are inside)."""
    directory = Path(checkpoint) / TOKENIZER_DIR if checkpoint else None
    if directory is None or not directory.is_dir():
        return None
    refuse_outside(directory, checkpoint, "the tokenizer directory")
    return directory


def refuse_recorded_tokenizer(name: str, source: str) -> None:
    """Refuse a tokenizer name that a checkpoint's file `source` records and that names files outside the
    checkpoint: an absolute path, or a relative one that is a directory of the current directory (the checkpoint's
    own copy, `TOKENIZER_DIR`, is found in the checkpoint by `resolve_tokenizer_name`). A user names any tokenizer
    with --policy.tokenizer_name, which the command line carries past this check."""
    if os.path.isabs(name) or (name != TOKENIZER_DIR and os.path.isdir(name)):
        where = "an absolute path" if os.path.isabs(name) else "a directory of the current directory"
        raise UntrustedCheckpointError(
            f"{source} records tokenizer_name={name!r}, {where}, outside the checkpoint; a checkpoint names its own "
            f"copy ({TOKENIZER_DIR!r}) or a Hub id. Copy that tokenizer into the checkpoint's {TOKENIZER_DIR}/, or "
            "name it yourself (--policy.tokenizer_name=...)"
        )


def resolve_tokenizer_name(name: str, checkpoint: str | Path | None) -> str:
    """Where to load the tokenizer `name` of a policy loaded from `checkpoint` (None: a new policy, `name` as given).

    `TOKENIZER_DIR` is the checkpoint's own copy, an error naming the directory where the checkpoint lacks it (never
    the current directory's); a Hub id loads the checkpoint's copy too when it has one, so a copied checkpoint loads
    on any machine, offline. A directory named by path (absolute, or relative and existing) is the user's and kept:
    checkpoints that record one are refused when their config is read (`refuse_recorded_tokenizer`)."""
    if checkpoint is None or os.path.isabs(name):
        return name
    if name == TOKENIZER_DIR:
        directory = _checkpoint_directory(checkpoint)
        own = checkpoint_tokenizer(directory)
        if own is None:
            from .modeling_xvla import CheckpointNotFoundError  # modeling_xvla imports this module

            raise CheckpointNotFoundError(
                f"the checkpoint {checkpoint} names its own tokenizer copy {TOKENIZER_DIR!r}, but "
                f"{directory / TOKENIZER_DIR} does not exist (copied without it?); copy that directory along, or name "
                "a tokenizer with --policy.tokenizer_name"
            )
        return str(own)
    if os.path.isdir(name):
        return name
    # A Hub id names a tokenizer the Hub cache can give; a Hub checkpoint's snapshot is not looked up for it, as
    # `checkpoint` may be a pretrained_path a config.json recorded, which this machine never fetched.
    own = checkpoint_tokenizer(checkpoint) if Path(checkpoint).is_dir() else None
    return str(own) if own is not None else name


def _checkpoint_directory(checkpoint: str | Path) -> Path:
    """The local directory of a checkpoint directory or Hub id: its snapshot in the Hugging Face cache, where
    loading the policy put it (nothing is downloaded here: `pretrained_path` may be one a config.json records)."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from .modeling_xvla import _checkpoint_directory as hub_snapshot  # modeling_xvla imports this module

    return hub_snapshot(checkpoint, local_files_only=True)


def checkpoint_tokenizer_overrides(
    config: XVLAConfig, pretrained_path: str | Path | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """Preprocessor overrides for loading a checkpoint's processor files with LeRobot: the tokenizer step loads the
    config's tokenizer as `resolve_tokenizer_name` finds it (the checkpoint's own copy, or one the user named), never
    the name the processor file holds, which the step alone would look up in the current directory. The caller's
    overrides of that step win."""
    overrides = dict(overrides or {})
    key = TokenizerProcessorStep._registry_name
    tokenizer_name = resolve_tokenizer_name(config.tokenizer_name, pretrained_path)
    overrides[key] = {"tokenizer_name": tokenizer_name, **overrides.get(key, {})}
    return overrides


class XVLAPreprocessor(DataProcessorPipeline):
    """The X-VLA preprocessor. Saving it also writes the tokenizer it uses into `TOKENIZER_DIR` beside its
    JSON, which names that copy, so the checkpoint needs neither the original tokenizer files nor the Hub."""

    def _save_pretrained(self, save_directory: Path, **kwargs: Any) -> None:
        step = next((s for s in self.steps if isinstance(s, TokenizerProcessorStep)), None)
        if step is None or step.tokenizer_name is None:  # no step, or a tokenizer object LeRobot does not save
            super()._save_pretrained(save_directory, **kwargs)
            return
        step.input_tokenizer.save_pretrained(Path(save_directory) / TOKENIZER_DIR)
        loaded_from, step.tokenizer_name = step.tokenizer_name, saved_tokenizer_name(step.tokenizer_name)
        try:
            super()._save_pretrained(save_directory, **kwargs)
        finally:
            step.tokenizer_name = loaded_from


def _tokenizer_step(config: XVLAConfig) -> TokenizerProcessorStep:
    tokenizer_name = resolve_tokenizer_name(config.tokenizer_name, config.pretrained_path)
    try:
        return TokenizerProcessorStep(
            tokenizer_name=tokenizer_name,
            max_length=config.tokenizer_max_length,
            padding=config.pad_language_to,
            padding_side=config.tokenizer_padding_side,
        )
    except (OSError, ValueError) as error:  # not found, not reachable offline, or not a valid Hub id
        raise ValueError(
            f"policy.tokenizer_name={config.tokenizer_name!r} could not be loaded: give a local tokenizer directory "
            f"or a Hub id that is reachable or cached ({error})"
        ) from error


def make_xvla_pre_post_processors(
    config: XVLAConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """Build the X-VLA preprocessor and postprocessor for `config` (LeRobot's plugin contract)."""
    normalizer, unnormalizer = _normalizers(config, dataset_stats)
    input_steps: list[ProcessorStep] = [
        RenameObservationsProcessorStep(rename_map={}),
        AddBatchDimensionProcessorStep(),
        StateCheckStep(_state_dim(config)),
        DefaultTaskStep(config.default_task),
        _tokenizer_step(config),
        ImageToFloatStep(),
        ImageNetNormalizeStep(),
        AddDomainIdStep(config.default_domain_id, config.sample_domain_key, config.num_domains),
        DeviceProcessorStep(device=config.device),
        normalizer,
    ]
    output_steps: list[ProcessorStep] = [
        unnormalizer,
        DeviceProcessorStep(device="cpu"),
        ActionGuardStep.from_stats(_stats_of(unnormalizer, config), config.action_dim),
    ]
    preprocessor = XVLAPreprocessor(steps=input_steps, name=POLICY_PREPROCESSOR_DEFAULT_NAME)
    postprocessor = PolicyProcessorPipeline[PolicyAction, PolicyAction](
        steps=output_steps,
        name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    _replace_kinematic_steps(preprocessor, postprocessor, config)
    return preprocessor, postprocessor
