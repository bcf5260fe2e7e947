"""A checkpoint's processor files are data: loading them imports nothing they name and reads nothing outside it.

LeRobot's processor loader (`DataProcessorPipeline.from_pretrained`, behind `make_pre_post_processors(pretrained_path=
...)`, `--policy.path` in every LeRobot command, `load_for_inference` and `lerobot-xvla serve/convert/export`) builds
each step of a file from its entry: a `"registry_name"` is looked up in LeRobot's `ProcessorStepRegistry`, but a
`"class"` is imported and called with the entry's `"config"`, whatever it names (`{"class": "os.system", "config":
{"command": ...}}` runs a shell command), and a `"state_file"` is joined to the checkpoint directory as written (`../x`
or an absolute path reads any file). `registration.install` has the loader check every file it reads
(`load_checked_processor_file`) before any step is imported or built:

* a `"registry_name"` must be registered: by LeRobot or an installed plugin, code the user installed;
* a `"class"` must be a processor-step class of the installed LeRobot: the module it names must be a file inside
  LeRobot's package directory (checked before it is imported), and the name a `ProcessorStep` subclass defined
  there. LeRobot itself writes such entries for the steps it does not register (SARM's `SARMEncodingProcessorStep`,
  the built-in X-VLA's `LiberoProcessorStep`), so its files keep loading; any other module (`os`, `subprocess`, one
  shipped beside the checkpoint) is refused;
* a `"state_file"` must be a relative path without `..` whose file lies, links resolved, inside the checkpoint;
  so must the processor file itself.

"Inside the checkpoint" (`refuse_outside`) means inside its directory or, for a snapshot of the Hugging Face cache
(`models--<org>--<name>/snapshots/<revision>/`, whose files are links into `../../blobs/`), inside that cache entry.

This holds for every policy's files, not only X-VLA's: every checkpoint's processors load through this one loader, a
checkpoint of another policy is no more trusted than one of ours, and what LeRobot writes passes (registered steps,
and its own classes for the unregistered ones). A plugin whose files name its steps by `"class"` must register them
(`@ProcessorStepRegistry.register(name=...)`) to load: refusing code from files cannot tell its module from an
attacker's.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import lerobot
from lerobot.processor import ProcessorStep, ProcessorStepRegistry

HUB_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")
LEROBOT_PACKAGE = Path(lerobot.__file__).resolve().parent


class UntrustedCheckpointError(ValueError):
    """A checkpoint file asks for code to run, or for a file outside the checkpoint."""


def checkpoint_roots(directory: str | Path) -> tuple[Path, ...]:
    """Where the files of checkpoint `directory` may lie, links resolved: the directory, and the Hugging Face
    cache entry of a snapshot (`models--*/snapshots/<revision>`), whose files link into the entry's blobs."""
    resolved = Path(directory).resolve()
    snapshots = resolved.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(HUB_CACHE_PREFIXES):
        return resolved, snapshots.parent
    return (resolved,)


def refuse_outside(path: str | Path, directory: str | Path, what: str) -> None:
    """Refuse `path`, a file or directory of checkpoint `directory` (`what` names it), and for a directory every
    entry under it, where one resolves (links followed) outside the checkpoint (`checkpoint_roots`)."""
    roots = checkpoint_roots(directory)

    def check(entry: Path) -> None:
        resolved = entry.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise UntrustedCheckpointError(
                f"{what} {entry} resolves to {resolved}, outside the checkpoint {directory}: a checkpoint may only "
                "hold its own files"
            )

    check(Path(path))
    if Path(path).is_dir():
        for parent, names, files in os.walk(path):  # links below `path` are checked, never followed
            for name in (*names, *files):
                check(Path(parent, name))


def load_checked_processor_file(
    load: Callable[[str, str, dict[str, Any]], tuple[dict[str, Any], Path]],
    model_id: str,
    config_filename: str,
    hub_download_kwargs: dict[str, Any],
) -> tuple[dict[str, Any], Path]:
    """LeRobot's `DataProcessorPipeline._load_config` (`load`: model_id, config_filename, hub kwargs -> the file's
    JSON and the directory its state files are in), refusing a file that names code to run or a file outside the
    checkpoint (see the module docstring). A local processor file is checked before it is read."""
    local = Path(model_id)
    if local.is_dir():
        source = local / config_filename
        if source.exists():
            refuse_outside(source, local, "the processor file")
    else:
        source = local if local.is_file() else f"{config_filename} of {model_id}"
    loaded, base_path = load(model_id, config_filename, hub_download_kwargs)
    steps = loaded.get("steps") if isinstance(loaded, dict) else None
    for index, entry in enumerate(steps if isinstance(steps, list) else []):
        if isinstance(entry, dict):  # LeRobot's own validation names entries of another form
            _check_step(entry, f"{source}: step {index}", base_path)
    return loaded, base_path


def _check_step(entry: dict[str, Any], where: str, base_path: Path) -> None:
    if "registry_name" in entry:
        name = entry["registry_name"]
        if not isinstance(name, str) or name not in ProcessorStepRegistry.list():
            raise UntrustedCheckpointError(
                f"{where} names \"registry_name\": {name!r}, which no installed package registers in LeRobot's "
                "ProcessorStepRegistry; install the plugin that provides it"
            )
    elif "class" in entry:
        _refuse_foreign_class(entry["class"], where)
    state_file = entry.get("state_file")
    if state_file is None:
        return
    relative = PurePosixPath(state_file) if isinstance(state_file, str) else None
    if relative is None or relative.is_absolute() or ".." in relative.parts or "\\" in state_file or not relative.parts:
        raise UntrustedCheckpointError(
            f"{where} names \"state_file\": {state_file!r}; a state file is a file name inside the checkpoint "
            "(a relative path without '..')"
        )
    if (base_path / relative).exists():
        refuse_outside(base_path / relative, base_path, f"{where}'s state file")


def _refuse_foreign_class(path: Any, where: str) -> None:
    """Refuse a step `"class"` that is not a processor-step class of the installed LeRobot; the module is imported
    only once it is known to be a file of LeRobot's package."""
    parts = path.split(".") if isinstance(path, str) else []
    module = ".".join(parts[:-1])
    refusal = (
        f"{where} names \"class\": {path!r}, which is not a processor step of the installed LeRobot (it would import "
        f"{module or path!r} and call it); a checkpoint's processor files may name only steps registered in LeRobot's "
        "ProcessorStepRegistry (\"registry_name\") and LeRobot's own step classes"
    )
    if len(parts) < 3 or parts[0] != lerobot.__name__ or not all(p.isidentifier() for p in parts):
        raise UntrustedCheckpointError(refusal)
    inside = LEROBOT_PACKAGE.joinpath(*parts[1:-1])
    candidates = (inside.with_suffix(".py"), inside / "__init__.py")
    if not any(c.is_file() and c.resolve().is_relative_to(LEROBOT_PACKAGE) for c in candidates):
        raise UntrustedCheckpointError(refusal)
    named = getattr(importlib.import_module(module), parts[-1], None)
    if not (isinstance(named, type) and issubclass(named, ProcessorStep) and named.__module__ == module):
        raise UntrustedCheckpointError(refusal)
