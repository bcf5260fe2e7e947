"""How lerobot_xvla takes over `--policy.type=xvla` from LeRobot's built-in X-VLA.

All code that depends on LeRobot's internals or version lives here.

* draccus refuses a second class under a taken choice name, and LeRobot registers its own `xvla` whenever
  `lerobot.policies` is imported. So we import `lerobot.policies` first (import order never matters to
  LeRobot), then point the registry entry at our `XVLAConfig`. draccus resolves `--policy.type`,
  `config.json` "type" fields and `.type` through that entry.
* LeRobot 0.4.x hard-codes `xvla` in `policies.factory.get_policy_class` and `make_policy_config`; we wrap
  both (the wrappers defer to the registry, so they are harmless on LeRobot >= 0.6, which resolves by
  naming convention) and rebind modules that imported the originals already.
* `make_pre_post_processors` is wrapped: new processors of our config come from
  `make_xvla_pre_post_processors` (LeRobot's naming convention would find it too, but its fallback hides
  the real error of any failure), and processors loaded from a checkpoint of either X-VLA follow our
  config's domain id and end with our action guard.
* LeRobot gives X-VLA its LIBERO env processors by an `isinstance` on its own config class; we wrap
  `make_env_pre_post_processors` and `make_policy` so envs with an adapter (`env_adapters.py`) get ours.
* The X-VLA processor-step names (`xvla_image_to_float`, ...) point at our steps, which take the same
  config keys, so processor files of either implementation load.

Set `LEROBOT_XVLA_BUILTIN=1` to leave LeRobot's built-in X-VLA in charge.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator

import lerobot.envs.factory as env_factory
import lerobot.policies  # noqa: F401  (registers LeRobot's built-in `xvla` before we replace it)
import lerobot.policies.factory as factory
from lerobot.configs.policies import PreTrainedConfig
from lerobot.processor import ProcessorStepRegistry

from .configuration_xvla import XVLAConfig
from .env_adapters import env_adapter
from .processor_xvla import PROCESSOR_STEPS, make_xvla_pre_post_processors, reconcile_loaded_processors

BUILTIN_SWITCH = "LEROBOT_XVLA_BUILTIN"
TYPE_NAME = "xvla"

logger = logging.getLogger("lerobot_xvla")


def plugin_active() -> bool:
    return PreTrainedConfig._choice_registry.get(TYPE_NAME) is XVLAConfig


def _replace_everywhere(owner, name: str, make_wrapper) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, also in lerobot modules that imported it already."""
    original = getattr(owner, name)
    if getattr(original, "_lerobot_xvla_original", None) is not None:
        return  # already wrapped
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._lerobot_xvla_original = original
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("lerobot.") and getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def _resolve_type_name(ours):
    """Wrapper maker for factory functions that take the policy type name first."""

    def make_wrapper(original):
        def wrapper(policy_type: str, *args, **kwargs):
            if policy_type == TYPE_NAME and plugin_active():
                return ours(*args, **kwargs)
            return original(policy_type, *args, **kwargs)

        return wrapper

    return make_wrapper


def _adapt_policy_to_env(original):
    """make_policy: an env with an X-VLA adapter hands the policy the features the adapter produces."""

    def wrapper(cfg, ds_meta=None, env_cfg=None, rename_map=None):
        adapter = env_adapter(env_cfg) if isinstance(cfg, XVLAConfig) else None
        if adapter is not None:
            env_cfg = adapter.policy_env_config(env_cfg)
        return original(cfg, ds_meta=ds_meta, env_cfg=env_cfg, rename_map=rename_map)

    return wrapper


def _reconciled_processors(original):
    """make_pre_post_processors: new X-VLA processors come straight from ours (LeRobot's fallback for plugin
    policies turns every error, a tokenizer that cannot be found included, into "not implemented");
    processors loaded from any X-VLA checkpoint agree with our config and end with the action guard
    (`processor_xvla.reconcile_loaded_processors`)."""

    def wrapper(policy_cfg, pretrained_path=None, **kwargs):
        if not isinstance(policy_cfg, XVLAConfig):
            return original(policy_cfg, pretrained_path, **kwargs)
        if not pretrained_path:
            return make_xvla_pre_post_processors(policy_cfg, dataset_stats=kwargs.get("dataset_stats"))
        preprocessor, postprocessor = original(policy_cfg, pretrained_path, **kwargs)
        reconcile_loaded_processors(preprocessor, postprocessor, policy_cfg)
        return preprocessor, postprocessor

    return wrapper


def _env_processors(original):
    """make_env_pre_post_processors: the adapter's processors for lerobot_xvla policies in adapted envs."""

    def wrapper(env_cfg, policy_cfg):
        adapter = env_adapter(env_cfg) if isinstance(policy_cfg, XVLAConfig) else None
        return adapter.processors() if adapter is not None else original(env_cfg, policy_cfg)

    return wrapper


def _register_steps(steps: dict[str, type]) -> dict[str, type | None]:
    """Point processor-step registry names at `steps`; returns what they pointed at before."""
    previous = {}
    for name, step in steps.items():
        previous[name] = ProcessorStepRegistry._registry.get(name)
        ProcessorStepRegistry.unregister(name)
        if step is not None:
            ProcessorStepRegistry.register(name)(step)
    return previous


_builtin_steps: dict[str, type | None] = {}


def _policy_class():
    from .modeling_xvla import XVLAPolicy

    return XVLAPolicy


def install() -> None:
    """Make `xvla` resolve to lerobot_xvla, unless LEROBOT_XVLA_BUILTIN=1."""
    if os.environ.get(BUILTIN_SWITCH, "").lower() in ("1", "true", "yes"):
        logger.info("%s is set: --policy.type=xvla stays LeRobot's built-in X-VLA", BUILTIN_SWITCH)
        return
    PreTrainedConfig._choice_registry[TYPE_NAME] = XVLAConfig
    if not _builtin_steps:
        _builtin_steps.update(_register_steps(PROCESSOR_STEPS))
    _replace_everywhere(factory, "get_policy_class", _resolve_type_name(_policy_class))
    _replace_everywhere(factory, "make_policy_config", _resolve_type_name(XVLAConfig))
    _replace_everywhere(factory, "make_policy", _adapt_policy_to_env)
    _replace_everywhere(factory, "make_pre_post_processors", _reconciled_processors)
    _replace_everywhere(env_factory, "make_env_pre_post_processors", _env_processors)
    logger.info("--policy.type=xvla resolves to lerobot_xvla (set %s=1 for LeRobot's built-in)", BUILTIN_SWITCH)


@contextlib.contextmanager
def builtin_xvla() -> Iterator[type[PreTrainedConfig]]:
    """Temporarily give `xvla` back to LeRobot's built-in X-VLA (for side-by-side comparisons and tests)."""
    from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinXVLAConfig

    previous = PreTrainedConfig._choice_registry.get(TYPE_NAME)
    PreTrainedConfig._choice_registry[TYPE_NAME] = BuiltinXVLAConfig
    ours = _register_steps(_builtin_steps) if _builtin_steps else {}
    try:
        yield BuiltinXVLAConfig
    finally:
        PreTrainedConfig._choice_registry[TYPE_NAME] = previous
        _register_steps(ours)
