"""`lerobot-xvla`: which X-VLA LeRobot uses, checkpoint conversion and serving.

    lerobot-xvla info                 versions, and what --policy.type=xvla resolves to in LeRobot's CLIs
    lerobot-xvla convert SRC DST      any X-VLA checkpoint (original 2toINF/X-VLA format included) ->
                                      a LeRobot checkpoint directory that --policy.path accepts
    lerobot-xvla serve CHECKPOINT     HTTP /act server for the original X-VLA clients (http_server.py)

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
    conv.add_argument("source", help="checkpoint directory or Hub id (LeRobot 0.4.x, LeRobot >= 0.6 or original format)")
    conv.add_argument(
        "destination", type=Path, help="directory to write; it must not exist or be empty, unless --overwrite"
    )
    conv.add_argument(
        "--device", default="cpu", help="device the checkpoint is loaded on, and that its preprocessor moves inputs to"
    )
    conv.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty destination; it is swapped in whole once the new checkpoint is complete",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lerobot_xvla import cli

    if args.command == "info":
        return cli.info()
    if args.command == "convert":
        try:
            cli.convert(args.source, args.destination, args.device, args.overwrite)
        except cli.ConvertRefused as error:
            print(f"lerobot-xvla convert: error: {error}", file=sys.stderr)
            return 2
    else:
        from lerobot_xvla.http_server import serve

        serve(args.checkpoint, args.host, args.port, args.device, args.max_request_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
