"""How lerobot_xvla takes over `--policy.type=xvla` from LeRobot's built-in X-VLA.

Every hook into LeRobot's internals lives here; what differs between LeRobot versions is named in `compat.py`.

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
* Cameras: `make_policy` also lets a dataset with fewer cameras than the checkpoint fill the rest of the view
  slots with declared empty ones, and LeRobot's camera-name check before the rename step is replaced for
  X-VLA by the policy's own check of every batch after it.
* The X-VLA processor-step names (`xvla_image_to_float`, ...) point at our steps, which take the same
  config keys, so processor files of either implementation load.
* Checkpoints are untrusted input, for every policy: LeRobot's processor loader (`DataProcessorPipeline._load_config`)
  checks each file before a step is imported or built (`processor_files`: registered steps and LeRobot's own step
  classes only, state files inside the checkpoint), also with LEROBOT_XVLA_BUILTIN=1; `PreTrainedConfig.from_pretrained`
  refuses a config.json linking outside its checkpoint, and a config of ours naming a tokenizer outside it unless
  the command line names one (`processor_xvla.refuse_recorded_tokenizer`).
* LeRobot's built-in X-VLA classes used directly (`from lerobot.policies.xvla.modeling_xvla import XVLAPolicy`) load
  and save their own config class: their config reading and saving, and the built-in's `from_pretrained`, run with
  `xvla` given back to the built-in (`builtin_xvla`), and the built-in config's `type` is `xvla`, so LeRobot's
  `make_pre_post_processors` finds the built-in's processors for it.
* `--policy.mixture` (cross-embodiment training, `mixture/`): LeRobot's dataset factories (`make_dataset`, and
  `make_train_eval_datasets` on 0.6) build the mixture dataset instead of one LeRobotDataset, and
  `make_pre_post_processors` builds per-domain normalisers for it.
* `lerobot-rollout --use_torch_compile` sets our `compile_model` (the observation encoding and one denoising
  step become two graphs when the model is built), then wraps `predict_action_chunk` in torch.compile as
  well. For our policies that wrap is skipped, and a `--torch_compile_mode` other than LeRobot's default
  becomes `compile_mode` before the policy is built. We import `lerobot.rollout.context` for this (about
  30 ms once `lerobot.policies` is loaded), so the hooks hold whichever of the two is imported first.

Set `LEROBOT_XVLA_BUILTIN=1` to leave LeRobot's built-in X-VLA in charge.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub.constants import CONFIG_NAME
import lerobot.datasets.factory as dataset_factory
import lerobot.envs.factory as env_factory
import lerobot.policies  # noqa: F401  (registers LeRobot's built-in `xvla` before we replace it)
import lerobot.policies.factory as factory
import lerobot.policies.utils as policy_utils
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinXVLAConfig
from lerobot.processor import DataProcessorPipeline, ProcessorStepRegistry
from lerobot.utils.constants import OBS_STATE

from . import config_errors
from .compat import HAS_LEROBOT_ROLLOUT
from .configuration_xvla import COMPILE_MODES, XVLAConfig
from .env_adapters import env_adapter
from .mixture.stats import is_mixture_stats
from .processor_files import load_checked_processor_file, refuse_outside
from .processor_xvla import (
    PROCESSOR_STEPS,
    checkpoint_tokenizer_overrides,
    make_xvla_pre_post_processors,
    reconcile_loaded_processors,
    refuse_recorded_tokenizer,
)

BUILTIN_SWITCH = "LEROBOT_XVLA_BUILTIN"
TYPE_NAME = "xvla"

logger = logging.getLogger("lerobot_xvla")


def plugin_active() -> bool:
    return PreTrainedConfig._choice_registry.get(TYPE_NAME) is XVLAConfig


def _wrapped(original, make_wrapper):
    """`make_wrapper(original)`, marked as ours; None where `original` is one of ours already (installed twice)."""
    if getattr(original, "_lerobot_xvla_original", None) is not None:
        return None
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._lerobot_xvla_original = original
    return wrapper


def _replace_everywhere(owner, name: str, make_wrapper) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, also in lerobot modules that imported it already."""
    original = getattr(owner, name)
    wrapper = _wrapped(original, make_wrapper)
    if wrapper is None:
        return
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("lerobot.") and getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def _wrap_method(owner: type, name: str, make_wrapper) -> None:
    """Replace method `name` of class `owner` (its own or inherited; a classmethod stays one) by
    `make_wrapper(original function)`, which for a classmethod takes `cls` first."""
    attribute = inspect.getattr_static(owner, name)
    is_classmethod = isinstance(attribute, classmethod)
    wrapper = _wrapped(attribute.__func__ if is_classmethod else attribute, make_wrapper)
    if wrapper is not None:
        setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def _resolve_type_name(ours):
    """Wrapper maker for factory functions that take the policy type name first."""

    def make_wrapper(original):
        def wrapper(policy_type: str, *args, **kwargs):
            if policy_type == TYPE_NAME and plugin_active():
                return ours(*args, **kwargs)
            return original(policy_type, *args, **kwargs)

        return wrapper

    return make_wrapper


def _adapt_policy_to_inputs(original):
    """make_policy: an env with an X-VLA adapter hands the policy the features the adapter produces; a dataset
    with fewer cameras than the checkpoint turns the missing ones into declared empty view slots
    (`XVLAConfig.drop_cameras_missing_from`; the dataset's names are seen through `rename_map`), its state
    width replaces the checkpoint's (`XVLAConfig.adopt_dataset_state`), and its only task becomes the
    instruction for envs that send none (`XVLAConfig.adopt_dataset_task`)."""

    def wrapper(cfg, ds_meta=None, env_cfg=None, rename_map=None):
        if isinstance(cfg, XVLAConfig) and cfg.mixture:
            _adopt_mixture(cfg, ds_meta)
        if isinstance(cfg, XVLAConfig):
            adapter = env_adapter(env_cfg)
            if adapter is not None:
                env_cfg = adapter.policy_env_config(env_cfg)
            if ds_meta is not None and cfg.input_features:
                cfg.drop_cameras_missing_from({(rename_map or {}).get(k, k) for k in ds_meta.camera_keys})
                cfg.adopt_dataset_state(ds_meta.features.get(OBS_STATE, {}).get("shape"))
            if ds_meta is not None and getattr(ds_meta, "tasks", None) is not None:
                cfg.adopt_dataset_task(list(ds_meta.tasks.index))
        return original(cfg, ds_meta=ds_meta, env_cfg=env_cfg, rename_map=rename_map)

    return wrapper


def _adopt_mixture(cfg: XVLAConfig, ds_meta) -> None:
    """A mixture trains on the union of its sources' features (also when it starts from a checkpoint, whose
    features LeRobot would keep); deployed, it acts as one of its domains, which must be named."""
    from .mixture.dataset import MixtureMetadata, policy_input_features

    if isinstance(ds_meta, MixtureMetadata):
        cfg.input_features = policy_input_features(ds_meta)
    else:
        cfg.require_deployed_domain()


def _camera_check_by_name(original):
    """validate_visual_features_consistency: LeRobot compares the policy's cameras with the dataset's names
    before the preprocessor's rename step (and `lerobot-record` 0.4.x never passes it `--dataset.rename_map`),
    so an X-VLA deployed with renamed cameras would be refused. X-VLA checks instead every batch after the
    rename step and names a missing camera (`XVLAPolicy._images`)."""

    def wrapper(cfg, features):
        if not isinstance(cfg, XVLAConfig):
            original(cfg, features)

    return wrapper


def _reconciled_processors(original):
    """make_pre_post_processors: new X-VLA processors come straight from ours (LeRobot's fallback for plugin
    policies turns every error, a tokenizer that cannot be found included, into "not implemented");
    processors loaded from any X-VLA checkpoint load the tokenizer the checkpoint carries, agree with our config
    and end with the action guard (`processor_xvla.reconcile_loaded_processors`)."""

    def wrapper(policy_cfg, pretrained_path=None, **kwargs):
        if not isinstance(policy_cfg, XVLAConfig):
            return original(policy_cfg, pretrained_path, **kwargs)
        # A new mixture run (lerobot-train passes the mixture's statistics unless it resumes) gets new per-domain
        # processors, also when it starts from a checkpoint; a resumed or deployed mixture loads its own.
        if not pretrained_path or is_mixture_stats(kwargs.get("dataset_stats")):
            return make_xvla_pre_post_processors(policy_cfg, dataset_stats=kwargs.get("dataset_stats"))
        if policy_cfg.mixture:  # LeRobot's overrides address its (un)normaliser, which a mixture's files do not have
            for name, step in (("preprocessor_overrides", "normalizer_processor"), ("postprocessor_overrides", "unnormalizer_processor")):
                kwargs[name] = {k: v for k, v in (kwargs.get(name) or {}).items() if k != step}
        overrides = checkpoint_tokenizer_overrides(policy_cfg, pretrained_path, kwargs.get("preprocessor_overrides"))
        kwargs["preprocessor_overrides"] = overrides
        preprocessor, postprocessor = original(policy_cfg, pretrained_path, **kwargs)
        reconcile_loaded_processors(preprocessor, postprocessor, policy_cfg)
        return preprocessor, postprocessor

    return wrapper


def _mixture_datasets(original, with_eval: bool):
    """make_dataset / make_train_eval_datasets: `--policy.mixture` builds the mixture (`mixture.dataset`); with_eval:
    the factory returns (train, held-out or None), as 0.6's make_train_eval_datasets does."""

    def wrapper(cfg, *args, **kwargs):
        policy = getattr(cfg, "policy", None)
        if not isinstance(policy, XVLAConfig) or not policy.mixture:
            return original(cfg, *args, **kwargs)
        from .mixture.dataset import make_mixture_datasets  # pandas and LeRobotDataset: only when a mixture trains
        from .mixture.sources import MixtureError

        try:
            train, held_out = make_mixture_datasets(cfg)
        except MixtureError as error:  # a mistake in the mixture, found before training starts: one line, exit 1
            raise SystemExit(f"error: {error}") from None
        return (train, held_out) if with_eval else train

    return wrapper


def _checked_processor_files(original):
    """DataProcessorPipeline._load_config: a processor file is checked before any step it names is imported or
    built (`processor_files.load_checked_processor_file`)."""

    def wrapper(cls, model_id, config_filename, hub_kwargs):
        return load_checked_processor_file(functools.partial(original, cls), model_id, config_filename, hub_kwargs)

    return wrapper


def _checkpoint_configs(original):
    """PreTrainedConfig.from_pretrained: the built-in X-VLA's config class reads its own class, not the registry's
    `xvla` (ours); a config.json linking outside its checkpoint is refused, and so is a config of ours whose
    tokenizer_name names files outside it, unless the command line names the tokenizer."""

    def wrapper(cls, pretrained_name_or_path, **kwargs):
        if issubclass(cls, BuiltinXVLAConfig):
            with builtin_xvla():
                return original(cls, pretrained_name_or_path, **kwargs)
        if Path(pretrained_name_or_path).is_dir():
            refuse_outside(Path(pretrained_name_or_path, CONFIG_NAME), pretrained_name_or_path, CONFIG_NAME)
        config = original(cls, pretrained_name_or_path, **kwargs)
        named = any(arg.split("=", 1)[0] == "--tokenizer_name" for arg in kwargs.get("cli_overrides") or [])
        if isinstance(config, XVLAConfig) and not named:
            refuse_recorded_tokenizer(config.tokenizer_name, f"the {CONFIG_NAME} of {pretrained_name_or_path}")
        return config

    return wrapper


def _as_builtin(original):
    """A method of LeRobot's built-in X-VLA classes, run with `xvla` given back to the built-in (`builtin_xvla`)."""

    def wrapper(*args, **kwargs):
        with builtin_xvla():
            return original(*args, **kwargs)

    return wrapper


def _env_processors(original):
    """make_env_pre_post_processors: the adapter's processors for lerobot_xvla policies in adapted envs."""

    def wrapper(env_cfg, policy_cfg):
        adapter = env_adapter(env_cfg) if isinstance(policy_cfg, XVLAConfig) else None
        return adapter.processors() if adapter is not None else original(env_cfg, policy_cfg)

    return wrapper


def _compile_mode_from_rollout(original):
    """build_rollout_context: `--torch_compile_mode` becomes our compile_mode before the policy is built (the
    model wraps its graphs with the mode when it is constructed). LeRobot's default mode, the class attribute,
    leaves the config's own, so `--policy.compile_mode` keeps working."""

    def wrapper(cfg, *args, **kwargs):
        mode = cfg.torch_compile_mode
        if cfg.use_torch_compile and isinstance(cfg.policy, XVLAConfig) and mode != type(cfg).torch_compile_mode:
            if mode in COMPILE_MODES:
                cfg.policy.compile_mode = mode
            else:
                logger.warning("--torch_compile_mode=%s is not one of lerobot_xvla's %s; compile_mode stays %s",
                               mode, COMPILE_MODES, cfg.policy.compile_mode)
        return original(cfg, *args, **kwargs)

    return wrapper


def _compile_graphs_only(original):
    """rollout's _wrap_predict_action_chunk_with_torch_compile: our compile_model already compiles the
    observation encoding and one denoising step with static shapes; a torch.compile around
    predict_action_chunk would trace the batch preparation, the guidance and the Python sampling loop around
    them once more, recompiling whenever a Python argument such as inference_delay changes. Our policies
    report compile_model as the outcome instead; other policies get LeRobot's wrapper."""

    def wrapper(policy, *, backend, mode):
        config = getattr(policy, "config", None)
        if not isinstance(config, XVLAConfig):
            return original(policy, backend=backend, mode=mode)
        logger.info("--use_torch_compile: lerobot_xvla compiles its observation encoding and denoising step "
                    "(compile_model=%s, compile_mode=%s), not predict_action_chunk", config.compile_model,
                    config.compile_mode)
        if backend != "inductor":
            logger.warning("--torch_compile_backend=%s is not used: lerobot_xvla compiles with inductor", backend)
        return config.compile_model

    return wrapper


def _rollout_context():
    """`lerobot.rollout.context`, or None where lerobot-rollout cannot run: LeRobot 0.4 has no such module, and
    a missing optional dependency of LeRobot's stops it from importing (and lerobot-rollout with it). A failure
    here must never fail the plugin's import: LeRobot would then run its built-in X-VLA."""
    if not HAS_LEROBOT_ROLLOUT:
        return None
    try:
        import lerobot.rollout.context as rollout_context
    except ImportError as error:
        logger.debug("lerobot-rollout hooks not installed: %s", error)
        return None
    return rollout_context


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
    """Make `xvla` resolve to lerobot_xvla, unless LEROBOT_XVLA_BUILTIN=1; check every checkpoint's processor files."""
    from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinXVLAPolicy  # transformers' Florence-2 on 0.4

    _wrap_method(DataProcessorPipeline, "_load_config", _checked_processor_files)
    if os.environ.get(BUILTIN_SWITCH, "").lower() in ("1", "true", "yes"):
        logger.info("%s is set: --policy.type=xvla stays LeRobot's built-in X-VLA", BUILTIN_SWITCH)
        return
    PreTrainedConfig._choice_registry[TYPE_NAME] = XVLAConfig
    config_errors.install()
    if not _builtin_steps:
        _builtin_steps.update(_register_steps(PROCESSOR_STEPS))
    _replace_everywhere(factory, "get_policy_class", _resolve_type_name(_policy_class))
    _replace_everywhere(factory, "make_policy_config", _resolve_type_name(XVLAConfig))
    _replace_everywhere(factory, "make_policy", _adapt_policy_to_inputs)
    _replace_everywhere(policy_utils, "validate_visual_features_consistency", _camera_check_by_name)
    _replace_everywhere(factory, "make_pre_post_processors", _reconciled_processors)
    _replace_everywhere(env_factory, "make_env_pre_post_processors", _env_processors)
    _wrap_method(PreTrainedConfig, "from_pretrained", _checkpoint_configs)
    _wrap_method(BuiltinXVLAPolicy, "from_pretrained", _as_builtin)
    _wrap_method(BuiltinXVLAConfig, "_save_pretrained", _as_builtin)
    BuiltinXVLAConfig.type = property(lambda self: TYPE_NAME)  # LeRobot looks the name up in the registry, now ours
    _replace_everywhere(dataset_factory, "make_dataset", functools.partial(_mixture_datasets, with_eval=False))
    if hasattr(dataset_factory, "make_train_eval_datasets"):  # LeRobot >= 0.6
        _replace_everywhere(dataset_factory, "make_train_eval_datasets", functools.partial(_mixture_datasets, with_eval=True))
    rollout_context = _rollout_context()
    if rollout_context is not None:
        _replace_everywhere(rollout_context, "build_rollout_context", _compile_mode_from_rollout)
        _replace_everywhere(rollout_context, "_wrap_predict_action_chunk_with_torch_compile", _compile_graphs_only)
    logger.info("--policy.type=xvla resolves to lerobot_xvla (set %s=1 for LeRobot's built-in)", BUILTIN_SWITCH)


@contextlib.contextmanager
def builtin_xvla() -> Iterator[type[PreTrainedConfig]]:
    """Temporarily give `xvla` back to LeRobot's built-in X-VLA (for side-by-side comparisons and tests)."""
    previous = PreTrainedConfig._choice_registry.get(TYPE_NAME)
    PreTrainedConfig._choice_registry[TYPE_NAME] = BuiltinXVLAConfig
    ours = _register_steps(_builtin_steps) if _builtin_steps else {}
    try:
        yield BuiltinXVLAConfig
    finally:
        PreTrainedConfig._choice_registry[TYPE_NAME] = previous
        _register_steps(ours)
