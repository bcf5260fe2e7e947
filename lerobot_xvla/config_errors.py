"""A bad X-VLA config on LeRobot's command line is refused in one line that leads with the field and the reason.

LeRobot's `policy` field is `PreTrainedConfig | None`, which draccus decodes as a union: any failure becomes
"`policy`: Could not decode the value into any of the given types:" with the reason on a later line. For a
value of an X-VLA type that union has one candidate, so the reason is all there is to say: it is raised as
`XVLAConfigDecodingError` keyed by the field it names (`policy.chunk_size`), with the type of the original
error. Unions of other policies' values keep draccus's message.

LeRobot 0.6 prints a `DecodingError` as `error: <message>`; LeRobot 0.4 lets it reach the interpreter, so an
excepthook prints ours the same way instead of a traceback. It does the same for an `XVLAConfigError` that reaches
the interpreter from a command's body (a checkpoint that cannot act as configured).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Sequence
from typing import Any

from draccus.parsers import decoding
from draccus.utils import DecodingError
from lerobot.configs.policies import PreTrainedConfig

from .configuration_xvla import XVLAConfig, XVLAConfigError

_FIELDS = frozenset(field.name for field in dataclasses.fields(XVLAConfig))


class XVLAConfigDecodingError(DecodingError):
    """A value XVLAConfig refuses; the key path ends at the field the reason names."""


def _is_xvla(value: Any) -> bool:
    return isinstance(value, dict) and PreTrainedConfig._choice_registry.get(value.get("type")) is XVLAConfig


def _leading_reason(path: Sequence[str], reason: Exception) -> XVLAConfigDecodingError:
    if isinstance(reason, DecodingError):  # draccus's own (a value of the wrong type, an unknown field)
        return XVLAConfigDecodingError(reason.key_path, reason.message)
    named = re.match(r"[A-Za-z_]\w*", str(reason))  # XVLAConfigError's messages start with the field
    field = (named.group(),) if named and named.group() in _FIELDS else ()
    return XVLAConfigDecodingError((*path, *field), f"{reason} ({type(reason).__name__})")


def _decode_union(original):
    @functools.wraps(original)
    def decode_union(*types):
        decode = original(*types)
        candidates = [kind for kind in types if kind is not type(None)]
        config = candidates[0] if len(candidates) == 1 else None
        if not (isinstance(config, type) and issubclass(config, PreTrainedConfig)):
            return decode

        def decode_config(value: Any, path: Sequence[str] = ()):
            try:
                return decode(value, path)
            except DecodingError as error:
                if not _is_xvla(value) or error.__cause__ is None:
                    raise
                raise _leading_reason(path, error.__cause__) from error.__cause__

        return decode_config

    decode_union._lerobot_xvla_original = original
    return decode_union


def _print_in_one_line(previous):
    """The excepthook: our config errors (on 0.4 at parsing; on both when a command such as lerobot-eval or
    lerobot-rollout meets a config it cannot deploy, e.g. a mixture without its domain id) in one line."""

    def excepthook(kind, error, traceback):
        if isinstance(error, (XVLAConfigDecodingError, XVLAConfigError)):
            print(f"error: {error}", file=sys.stderr)  # the interpreter still exits with status 1
        else:
            previous(kind, error, traceback)

    excepthook._lerobot_xvla_original = previous
    return excepthook


def install() -> None:
    """Route draccus's decoding of `PreTrainedConfig | None` through `_leading_reason` for X-VLA values."""
    if getattr(decoding.decode_union, "_lerobot_xvla_original", None) is None:
        decoding.decode_union = _decode_union(decoding.decode_union)
        decoding.get_decoding_fn.cache_clear()  # decoders built before this point hold the original union
    if getattr(sys.excepthook, "_lerobot_xvla_original", None) is None:
        sys.excepthook = _print_in_one_line(sys.excepthook)
