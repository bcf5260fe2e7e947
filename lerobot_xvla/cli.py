"""The commands of `lerobot-xvla` (its arguments are parsed in `lerobot_xvla_cli.py`, outside this package, so
that `--help` answers without importing torch and LeRobot), and `lerobot-xvla-policy-server`."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


# What LeRobot's plugin discovery logs (`lerobot.utils.import_utils.register_third_party_plugins`).
PLUGIN_IMPORT_ERROR = "Could not import third-party plugin"
PLUGIN_IMPORTED = "Imported third-party plugin"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _DiscoveryLog(logging.Handler):
    """What LeRobot's plugin discovery logs: the plugins it imported, and the errors it swallows (after which
    LeRobot runs its built-in X-VLA under our name)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.imported: list[str] = []
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(PLUGIN_IMPORT_ERROR):
            error = record.exc_info[1] if record.exc_info else None
            self.failures.append(f"{message}: {error!r}")
        elif message.startswith(PLUGIN_IMPORTED):
            self.imported.append(message.removeprefix(PLUGIN_IMPORTED).strip(": "))


def _discover_plugins() -> _DiscoveryLog:
    """Run LeRobot's plugin discovery, as its command-line tools do, and return what it logged."""
    from lerobot.utils.import_utils import register_third_party_plugins

    log, root = _DiscoveryLog(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [log]  # only ours, at INFO, while discovery runs: nothing else is printed
    root.setLevel(logging.INFO)
    try:
        register_third_party_plugins()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return log


def info() -> int:
    """Print versions and what `--policy.type=xvla` resolves to; exit status 1 when a plugin failed to import."""
    # Resolve `xvla` exactly as LeRobot's command-line tools do: plugin discovery, then the factory.
    discovery = _discover_plugins()
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    from .compat import LEROBOT_VERSION, SUPPORTED_LEROBOT, supported
    from .registration import BUILTIN_SWITCH

    config_cls = PreTrainedConfig.get_choice_class("xvla")
    policy_cls = get_policy_class("xvla")
    owner = "lerobot_xvla" if config_cls.__module__.startswith("lerobot_xvla") else "LeRobot built-in"
    print(f"lerobot_xvla {_version('lerobot_policy_xvla')}")
    print(
        f"lerobot {_version('lerobot')}, transformers {_version('transformers')}, torch {_version('torch')}, "
        f"draccus {_version('draccus')}, python {platform.python_version()}"
    )
    print(f"--policy.type=xvla -> {owner}")
    print(f"  config:     {config_cls.__module__}.{config_cls.__name__}")
    print(f"  policy:     {policy_cls.__module__}.{policy_cls.__name__}")
    processors = config_cls.__module__.replace("configuration_", "processor_")
    print(f"  processors: {processors}.make_xvla_pre_post_processors")
    print(f"{BUILTIN_SWITCH}={os.environ.get(BUILTIN_SWITCH, '')!r} (set it to 1 for LeRobot's built-in X-VLA)")
    low, high = SUPPORTED_LEROBOT
    if not supported():
        print(f"WARNING: lerobot_xvla is tested with LeRobot >= {low}, < {high}; this is LeRobot {LEROBOT_VERSION}")
    print(f"plugins LeRobot's discovery imported: {', '.join(discovery.imported) or 'none'}")
    for message in discovery.failures:
        print(f"ERROR: {message}")
    if discovery.failures:
        print("LeRobot's command-line tools skip a plugin that fails to import (and run their built-in X-VLA)")
    return 1 if discovery.failures else 0


class ConvertRefused(ValueError):
    """`convert` or `export` would lose data: the destination is the source, lies inside it, holds it, or holds
    other files."""


def _check_destination(source: str, destination: Path, overwrite: bool, written: str) -> None:
    """Refuse every destination whose writing could destroy a checkpoint (symbolic links resolved); `written`
    names what would be written there, for the messages."""
    if os.path.isdir(source):  # a Hub id cannot overlap a local directory
        origin = Path(source).resolve()
        if destination == origin:
            raise ConvertRefused(f"the destination {destination} is the source checkpoint; write {written} to another directory")
        if origin in destination.parents:
            raise ConvertRefused(
                f"the destination {destination} is inside the source checkpoint {origin}; write {written} outside it"
            )
        if destination in origin.parents:
            raise ConvertRefused(
                f"the source checkpoint {origin} is inside the destination {destination}; "
                "replacing the destination would delete it"
            )
    if destination.exists() and not destination.is_dir():
        raise ConvertRefused(f"the destination {destination} is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ConvertRefused(f"the destination {destination} is not empty; pass --overwrite to replace it")


def _replace_directory(staging: Path, destination: Path) -> None:
    """Move the complete `staging` directory to `destination` by renames, so `destination` holds either its
    old files or all the new ones, never a mix; the old directory is deleted once the new one is in place."""
    if not destination.exists():
        staging.rename(destination)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
    destination.replace(previous)  # onto the empty directory mkdtemp reserved
    try:
        staging.rename(destination)
    except BaseException:
        previous.rename(destination)
        raise
    shutil.rmtree(previous)


def _write_directory(source: str, destination: Path, overwrite: bool, written: str, write: Callable[[Path], str]) -> tuple[Path, str]:
    """Write a directory derived from checkpoint `source` whole or not at all: refuse a destination that could
    lose data (`_check_destination`), let `write` fill a staging directory beside it, then swap that in
    (`_replace_directory`). A failure leaves the destination as it was. Returns the destination (resolved)
    and what `write` returned (a summary to print)."""
    destination = destination.resolve()
    _check_destination(source, destination, overwrite, written)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        summary = write(staging)
        _replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination, summary


def _graph_label(quantization: str) -> str:
    return "fp32" if quantization == "none" else quantization


def _describe(config) -> str:
    return f"{config.action_mode}, chunk {config.chunk_size}, cameras {config.camera_order}"


def convert(source: str, destination: Path, device: str = "cpu", overwrite: bool = False) -> None:
    """Write any X-VLA checkpoint (directory or Hub id) as a LeRobot checkpoint directory: the weights, and
    the source's processors with their statistics (fresh ones for original-format checkpoints, which have
    none). The destination is written whole or not at all (`_write_directory`)."""
    from .modeling_xvla import _checkpoint_directory, load_for_inference

    def write(staging: Path) -> str:
        policy, preprocessor, postprocessor = load_for_inference(_checkpoint_directory(source), device)
        policy.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        postprocessor.save_pretrained(staging)
        return _describe(policy.config)

    destination, summary = _write_directory(source, destination, overwrite, "the converted checkpoint", write)
    print(f"wrote {destination} ({summary})")


def export(source: str, destination: Path, int8: bool = False, overwrite: bool = False) -> None:
    """Write any X-VLA checkpoint as an ONNX export (`lerobot_xvla.edge`): the observation-encoding and
    denoising-step graphs in fp32 (and int8 with `int8`), config.json with inference_backend="onnxruntime",
    the processors and the tokenizer, so `--policy.path=<destination>` runs it on ONNX Runtime. Prints each
    graph set's largest action difference from torch fp32 (same inputs, same noise). Written whole or not at
    all, and refused where convert refuses (`_write_directory`)."""
    from .edge import export_graphs, max_action_difference, quantize_graphs
    from .modeling_xvla import _checkpoint_directory, load_for_inference

    quantizations = ["none", "int8"] if int8 else ["none"]

    def write(staging: Path) -> str:
        policy, preprocessor, postprocessor = load_for_inference(
            _checkpoint_directory(source), "cpu", dtype="float32", weights_dtype="float32", compile_model=False
        )
        export_graphs(policy.model, staging)
        if int8:
            quantize_graphs(staging)
        config = policy.config
        for quantization in quantizations:
            difference = max_action_difference(policy.model, staging, quantization)
            print(f"{_graph_label(quantization)} graphs: max |action - torch fp32 action| = {difference:.2e}")
        config.inference_backend, config.quantization = "onnxruntime", quantizations[-1]
        config._save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        postprocessor.save_pretrained(staging)
        return f"{_describe(config)}, ONNX graphs {', '.join(map(_graph_label, quantizations))}"

    destination, summary = _write_directory(source, destination, overwrite, "the export", write)
    print(f"wrote {destination} ({summary})")


def policy_server() -> None:
    """LeRobot's async-inference policy server (same arguments), accepting `xvla` policies."""
    from lerobot.async_inference import constants
    from lerobot.async_inference.policy_server import serve

    if "xvla" not in constants.SUPPORTED_POLICIES:
        constants.SUPPORTED_POLICIES.append("xvla")  # the list the server checks against
    serve()

