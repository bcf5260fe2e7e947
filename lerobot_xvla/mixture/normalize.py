"""Normalisation per domain: each robot's state and actions with its own statistics, never pooled.

`DomainNormalizerStep` replaces LeRobot's normaliser in a mixture's preprocessor (`inverse=False`, the domain of
each sample read from the batch's domain ids, which `xvla_add_domain_id` puts there before this step) and its
unnormaliser in the postprocessor (`inverse=True`, one domain: the policy's `domain_id`). Each domain normalises the
first `widths[domain][key]` channels of its samples (the rest is the mixture's zero padding, left alone) with
LeRobot's own formulas: a LeRobot `NormalizerProcessorStep` per domain does the arithmetic. The statistics are the
step's state (saved beside the processor's JSON, as LeRobot saves its normaliser's), so a checkpoint carries the
whole per-domain table and `--policy.domain_id=N` selects one row of it at deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.processor import EnvTransition, NormalizerProcessorStep, ProcessorStep, TransitionKey
from lerobot.utils.constants import ACTION, OBS_STATE

FEATURE_TYPES = {OBS_STATE: FeatureType.STATE, ACTION: FeatureType.ACTION}


@dataclass
class DomainNormalizerStep(ProcessorStep):
    """State and action (un)normalisation with per-domain statistics. Registered as `xvla_domain_normalizer`.

    widths: domain id -> {feature key: channels of that domain}; stats: domain id -> LeRobot-style statistics
    ({key: {"mean": ..., "std": ..., "min": ..., "max": ...}}); norm_map: feature type -> normalisation mode.
    inverse: unnormalise actions of `domain_id` (postprocessor) instead of normalising every sample by its domain.
    """

    widths: dict[int, dict[str, int]] = field(default_factory=dict)
    norm_map: dict[Any, Any] = field(default_factory=dict)
    stats: dict[int, dict[str, dict[str, Any]]] | None = None
    inverse: bool = False
    domain_id: int | None = None

    def __post_init__(self) -> None:
        # JSON turns the integer keys and the enums into strings.
        self.widths = {int(d): {k: int(w) for k, w in widths.items()} for d, widths in self.widths.items()}
        self.norm_map = {FeatureType(k) if isinstance(k, str) else k: NormalizationMode(v) for k, v in self.norm_map.items()}
        self._domains: dict[int, NormalizerProcessorStep] = {}
        if self.stats is not None:
            self._build({int(d): s for d, s in self.stats.items()})

    def _build(self, stats: dict[int, dict[str, dict[str, Any]]]) -> None:
        missing = sorted(set(self.widths) - set(stats))
        if missing:
            raise ValueError(f"xvla_domain_normalizer has no statistics for domains {missing} (it has {sorted(stats)})")
        self._domains = {}
        for domain, widths in self.widths.items():
            features = {key: PolicyFeature(type=FEATURE_TYPES[key], shape=(width,)) for key, width in widths.items()}
            kept = {key: stats[domain][key] for key in widths if key in stats[domain]}
            absent = [key for key in widths if key not in kept and self._mode(key) is not NormalizationMode.IDENTITY]
            if absent:
                raise ValueError(f"xvla_domain_normalizer: domain {domain} has no statistics for {absent}")
            self._domains[domain] = NormalizerProcessorStep(features=features, norm_map=self.norm_map, stats=kept)

    def _mode(self, key: str) -> NormalizationMode:
        return self.norm_map.get(FEATURE_TYPES[key], NormalizationMode.IDENTITY)

    def _transform(self, domain: int, key: str, values: torch.Tensor) -> torch.Tensor:
        """`values` [..., C] with the domain's first channels (un)normalised."""
        width = self.widths[domain][key]
        if values.shape[-1] < width:
            raise ValueError(f"'{key}' has {values.shape[-1]} values but domain {domain} has {width}")
        step = self._domains[domain]
        head = step._apply_transform(values[..., :width], key, FEATURE_TYPES[key], inverse=self.inverse)
        return torch.cat([head.to(values.dtype), values[..., width:]], dim=-1)

    def _by_sample(self, key: str, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each sample of `values` [B, ...] transformed by its own domain; every domain is computed for the whole
        batch and selected per sample, so no id is read on the host (no accelerator sync). Domains wider than
        `values` are left out: a policy acting as one robot gets that robot's width, not the mixture's."""
        result = values
        for domain, widths in self.widths.items():
            if widths.get(key, 0) > values.shape[-1]:
                if ids.device.type == "cpu" and bool((ids == domain).any()):
                    raise ValueError(f"'{key}' has {values.shape[-1]} values but domain {domain} has {widths[key]}")
                continue
            chosen = (ids == domain).reshape(-1, *([1] * (values.ndim - 1)))
            result = torch.where(chosen, self._transform(domain, key, values), result)
        return result

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        if not self._domains:
            raise ValueError("xvla_domain_normalizer holds no statistics: build it with the mixture's per-domain stats")
        transition = transition.copy()
        if self.inverse:
            action = transition.get(TransitionKey.ACTION)
            if isinstance(action, torch.Tensor):
                transition[TransitionKey.ACTION] = self._transform(self._deployed_domain(), ACTION, action)
            return transition
        ids = (transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}).get("domain_id")
        if ids is None:
            raise ValueError("xvla_domain_normalizer needs the batch's domain ids: put xvla_add_domain_id before it")
        if ids.device.type == "cpu":
            unknown = sorted(set(ids.reshape(-1).tolist()) - set(self._domains))
            if unknown:
                raise ValueError(f"domain ids {unknown} are not in this mixture policy's domains {sorted(self._domains)}")
        observation = transition.get(TransitionKey.OBSERVATION)
        if observation and isinstance(observation.get(OBS_STATE), torch.Tensor):
            observation = dict(observation)
            observation[OBS_STATE] = self._by_sample(OBS_STATE, observation[OBS_STATE], ids)
            transition[TransitionKey.OBSERVATION] = observation
        action = transition.get(TransitionKey.ACTION)
        if isinstance(action, torch.Tensor):
            transition[TransitionKey.ACTION] = self._by_sample(ACTION, action, ids)
        return transition

    def _deployed_domain(self) -> int:
        if self.domain_id not in self._domains:
            raise ValueError(
                f"a mixture policy acts as one of its domains {sorted(self._domains)}: set --policy.domain_id "
                f"(got {self.domain_id})"
            )
        return self.domain_id

    def domain_stats(self, domain: int) -> dict[str, dict[str, torch.Tensor]]:
        """The statistics of one domain (tensors), e.g. for the action guard's bounds."""
        return self._domains[domain]._tensor_stats

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DomainNormalizerStep:
        for step in self._domains.values():
            step.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{domain}/{name}": t for domain, step in self._domains.items() for name, t in step.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        stats: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for flat, tensor in state.items():
            domain, name = flat.split("/", 1)
            key, stat = name.rsplit(".", 1)
            stats.setdefault(int(domain), {}).setdefault(key, {})[stat] = tensor
        self._build(stats)

    def get_config(self) -> dict[str, Any]:
        return {
            "widths": {str(d): w for d, w in self.widths.items()},
            "norm_map": {t.value: m.value for t, m in self.norm_map.items()},
            "inverse": self.inverse,
            "domain_id": self.domain_id,
        }

    def transform_features(self, features):
        return features
