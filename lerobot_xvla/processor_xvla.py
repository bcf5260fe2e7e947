"""Pre- and post-processing pipelines of the X-VLA policy.

Preprocessor: rename -> add batch dim -> tokenize the task -> images to [0, 1] -> ImageNet normalisation
-> domain id -> device -> state/action normalisation. Postprocessor: unnormalise -> CPU -> action guard
(non-finite actions are refused, values are clamped to the range of the training actions).

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
from dataclasses import dataclass
from typing import Any

import logging

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
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
from lerobot.utils.constants import ACTION, OBS_IMAGE, POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from .configuration_xvla import XVLAConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _check_unit_range(key: str, image: torch.Tensor, what: str) -> None:
    """Raise if a CPU image leaves [0, 1] (checking a GPU tensor would synchronise the host)."""
    if image.device.type != "cpu" or image.numel() == 0:
        return
    low, high = image.aminmax()
    if low < 0 or high > 1:
        raise ValueError(
            f"image '{key}' has values in [{float(low):.4g}, {float(high):.4g}]; {what} expects float images in "
            "[0, 1] or uint8 images in [0, 255]"
        )


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

    Registered as `xvla_image_to_float`; `validate_range` checks float images (on the CPU only).
    """

    image_keys: list[str] | None = None
    validate_range: bool = True

    def process(self, observation):
        for key in _image_keys(observation, self.image_keys):
            image = observation[key]
            if image.dtype == torch.uint8:
                observation[key] = image.float() / 255.0
                continue
            if self.validate_range:
                _check_unit_range(key, image, "xvla_image_to_float")
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
            _check_unit_range(key, image, "xvla_imagenet_normalize")
            mean, std = imagenet_stats(image)
            observation[key] = (image - mean) / std
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys}


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
            ids = torch.full((batch_size,), int(self.domain_id), dtype=torch.long)
        else:
            source = observation if self.feature_key in observation else complementary
            if self.feature_key not in source:
                raise ValueError(f"domain_feature_key '{self.feature_key}' is not in the batch")
            ids = torch.as_tensor(source[self.feature_key]).reshape(batch_size, -1)[:, 0].long()
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
    """The last step before a robot or an env: refuse non-finite actions, clamp the rest into [low, high].

    The bounds default to the minimum and maximum of the training actions, which a robot reached while
    being recorded, so they lie inside its calibrated ranges. Runs on the CPU (after the postprocessor's
    device step), so checking costs no accelerator synchronisation. Registered as `xvla_action_guard`.
    """

    low: list[float] | None = None
    high: list[float] | None = None

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        action = transition.get(TransitionKey.ACTION)
        if not isinstance(action, torch.Tensor):
            return transition
        if not bool(torch.isfinite(action).all()):
            raise ValueError("X-VLA predicted non-finite actions (NaN or inf); refusing to pass them to the robot")
        if self.low is None or self.high is None:
            return transition
        if len(self.low) != action.shape[-1] or len(self.high) != action.shape[-1]:
            raise ValueError(f"xvla_action_guard has bounds for {len(self.low)} values but the action has {action.shape[-1]}")
        # Clamping to a NaN bound gives NaN: such bounds (a dataset with a NaN action frame) must stop the robot.
        unbounded = [i for i, (low, high) in enumerate(zip(self.low, self.high, strict=True)) if not math.isfinite(low + high)]
        if unbounded:
            raise ValueError(
                f"xvla_action_guard bounds are not finite for action channels {unbounded}: the action statistics "
                "(min/max) of the training dataset hold NaN or inf; fix the dataset's frames or its stats"
            )
        low = torch.tensor(self.low, dtype=action.dtype, device=action.device)
        high = torch.tensor(self.high, dtype=action.dtype, device=action.device)
        clamped = torch.minimum(torch.maximum(action, low), high)
        if not torch.equal(clamped, action):
            logger.warning("X-VLA actions outside the range of the training actions were clamped into it")
        transition = transition.copy()
        transition[TransitionKey.ACTION] = clamped
        return transition

    def transform_features(self, features):
        return features

    def get_config(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_stats(cls, dataset_stats: dict[str, dict[str, Any]] | None) -> ActionGuardStep:
        stats = (dataset_stats or {}).get(ACTION, {})
        if "min" not in stats or "max" not in stats:
            return cls()
        return cls(low=torch.as_tensor(stats["min"]).flatten().tolist(), high=torch.as_tensor(stats["max"]).flatten().tolist())


def reconcile_loaded_processors(
    preprocessor: PolicyProcessorPipeline, postprocessor: PolicyProcessorPipeline, config: XVLAConfig
) -> None:
    """Make processors loaded from a checkpoint agree with the config, in place.

    * The domain step follows the config's domain settings; a config without `domain_id` adopts the
      checkpoint's (LeRobot's built-in X-VLA keeps the id only in its preprocessor).
    * The action guard takes its bounds from the unnormaliser's statistics when they have min/max, so
      fine-tuning on another dataset (lerobot-train overrides those statistics) moves the bounds with it; a
      postprocessor without `xvla_action_guard` (files of LeRobot's built-in X-VLA, `lerobot/xvla-*`) gets one.
    """
    domain_step = next((s for s in preprocessor.steps if isinstance(s, AddDomainIdStep)), None)
    if domain_step is not None:
        if config.domain_id is None:
            config.domain_id = domain_step.domain_id
        domain_step.domain_id = config.domain_id
        domain_step.feature_key = config.domain_feature_key
        domain_step.num_domains = config.num_domains
    unnormalizer = next((s for s in postprocessor.steps if isinstance(s, UnnormalizerProcessorStep)), None)
    stats = getattr(unnormalizer, "_tensor_stats", None) or getattr(unnormalizer, "stats", None)
    bounds = ActionGuardStep.from_stats(stats)
    guard = next((s for s in postprocessor.steps if isinstance(s, ActionGuardStep)), None)
    if guard is None:
        logger.warning(
            "the checkpoint's postprocessor has no xvla_action_guard; added one (non-finite actions raise%s)",
            "" if bounds.low is None else ", actions are clamped to the training range",
        )
        postprocessor.steps.append(bounds)
    elif bounds.low is not None:
        guard.low, guard.high = bounds.low, bounds.high


# Registry names; the first three are shared with LeRobot's built-in X-VLA (see `registration.install`).
PROCESSOR_STEPS: dict[str, type[ProcessorStep]] = {
    "xvla_image_to_float": ImageToFloatStep,
    "xvla_imagenet_normalize": ImageNetNormalizeStep,
    "xvla_add_domain_id": AddDomainIdStep,
    "xvla_action_guard": ActionGuardStep,
}


def _tokenizer_step(config: XVLAConfig) -> TokenizerProcessorStep:
    try:
        return TokenizerProcessorStep(
            tokenizer_name=config.tokenizer_name,
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
    features = {**config.input_features, **config.output_features}
    input_steps: list[ProcessorStep] = [
        RenameObservationsProcessorStep(rename_map={}),
        AddBatchDimensionProcessorStep(),
        _tokenizer_step(config),
        ImageToFloatStep(),
        ImageNetNormalizeStep(),
        AddDomainIdStep(config.default_domain_id, config.domain_feature_key, config.num_domains),
        DeviceProcessorStep(device=config.device),
        NormalizerProcessorStep(features=features, norm_map=config.normalization_mapping, stats=dataset_stats),
    ]
    output_steps: list[ProcessorStep] = [
        UnnormalizerProcessorStep(
            features=config.output_features, norm_map=config.normalization_mapping, stats=dataset_stats
        ),
        DeviceProcessorStep(device="cpu"),
        ActionGuardStep.from_stats(dataset_stats),
    ]
    return (
        PolicyProcessorPipeline[dict[str, Any], dict[str, Any]](steps=input_steps, name=POLICY_PREPROCESSOR_DEFAULT_NAME),
        PolicyProcessorPipeline[PolicyAction, PolicyAction](
            steps=output_steps,
            name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
            to_transition=policy_action_to_transition,
            to_output=transition_to_policy_action,
        ),
    )
