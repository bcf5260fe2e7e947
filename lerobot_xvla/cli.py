"""`lerobot-xvla`: which X-VLA LeRobot uses, checkpoint conversion and serving.

    lerobot-xvla info                 versions, and what --policy.type=xvla resolves to in LeRobot's CLIs
    lerobot-xvla convert SRC DST      any X-VLA checkpoint (original 2toINF/X-VLA format included) ->
                                      a LeRobot checkpoint directory that --policy.path accepts
    lerobot-xvla serve CHECKPOINT     HTTP /act server for the original X-VLA clients (http_server.py)

`lerobot-xvla-policy-server` is LeRobot's async-inference policy server with `xvla` accepted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import sys
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


def convert(source: str, destination: Path, device: str) -> None:
    """Load with every layout check, then save in the LeRobot layout with processors."""
    from .modeling_xvla import XVLAPolicy, load_config
    from .processor_xvla import make_xvla_pre_post_processors

    config = load_config(Path(source)) if Path(source).is_dir() else None
    if config is not None:
        config.device = device
    policy = XVLAPolicy.from_pretrained(source, config=config)
    destination.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(destination)
    preprocessor, postprocessor = make_xvla_pre_post_processors(policy.config)
    preprocessor.save_pretrained(destination)
    postprocessor.save_pretrained(destination)
    print(f"wrote {destination} ({policy.config.action_mode}, chunk {policy.config.chunk_size}, cameras {policy.config.camera_order})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lerobot-xvla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and which implementation --policy.type=xvla resolves to")
    conv = commands.add_parser("convert", help="write any X-VLA checkpoint as a LeRobot checkpoint directory")
    conv.add_argument("source", help="checkpoint directory or Hub id (LeRobot 0.4.x, LeRobot >= 0.6 or original format)")
    conv.add_argument("destination", type=Path)
    conv.add_argument("--device", default="cpu")
    serve = commands.add_parser("serve", help="HTTP /act server compatible with the original X-VLA clients")
    serve.add_argument("checkpoint", help="checkpoint directory (LeRobot or original format)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; other machines can connect only if you change it")
    serve.add_argument("--port", type=int, default=8010)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-request-mb", type=float, default=32.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "convert":
        convert(args.source, args.destination, args.device)
    else:
        from .http_server import serve

        serve(args.checkpoint, args.host, args.port, args.device, args.max_request_mb)
    return 0


def policy_server() -> None:
    """LeRobot's async-inference policy server (same arguments), accepting `xvla` policies."""
    from lerobot.async_inference import constants
    from lerobot.async_inference.policy_server import serve

    if "xvla" not in constants.SUPPORTED_POLICIES:
        constants.SUPPORTED_POLICIES.append("xvla")  # the list the server checks against
    serve()


if __name__ == "__main__":
    sys.exit(main())
