"""The commands of `lerobot-xvla` (its arguments are parsed in `lerobot_xvla_cli.py`, outside this package, so
that `--help` answers without importing torch and LeRobot), and `lerobot-xvla-policy-server`."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    """`convert` or `export` would lose data (the destination is the source, lies inside it, holds it or its
    files, or holds other files), or cannot write its destination (a full disk, no permission)."""


# A run writes into `.DST.<random>.partial/new` beside DST and holds an flock on `.lock` there until it is done,
# so a later run tells a killed run's directory (lock free) from a running one's. The random part is
# tempfile.mkdtemp's (letters, digits, "_"): no dot, so `.a.b.x.partial` of destination `a.b` never matches `a`.
WORK_SUFFIX = ".partial"
WORK_LOCK = ".lock"


def _hub_cache_entry(source: str) -> Path | None:
    """Where the Hugging Face cache keeps Hub id `source` (its snapshots and the blobs their files link to),
    whether or not it is there yet; None for a name that is no Hub id."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return Path(HF_HUB_CACHE) / repo_folder_name(repo_id=source, repo_type="model")


def _resolved_entries(directory: Path) -> Iterator[tuple[Path, Path]]:
    """Every entry under `directory` with its resolved path. Linked directories are not entered: loading
    refuses files that resolve outside the checkpoint, so only the link's own target matters."""
    for root, directories, files in os.walk(directory):
        for name in directories + files:
            entry = Path(root, name)
            try:
                yield entry, entry.resolve()
            except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13): nothing to read
                continue


def _check_destination(source: str, destination: Path, overwrite: bool, written: str) -> None:
    """Refuse every destination whose writing could destroy a checkpoint (symbolic links resolved, the source's
    own entries too: a Hub cache snapshot's files link into its blobs); `written` names what would be written
    there, for the messages."""
    local = Path(source) if os.path.isdir(source) else _hub_cache_entry(source)
    if local is not None:
        origin = local.resolve()
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
        for entry, resolved in _resolved_entries(local):
            if resolved == destination or destination in resolved.parents:
                raise ConvertRefused(
                    f"the source's {entry} resolves to {resolved}, inside the destination {destination}; "
                    "replacing the destination would destroy the source"
                )
    if destination.exists() and not destination.is_dir():
        raise ConvertRefused(f"the destination {destination} is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ConvertRefused(f"the destination {destination} is not empty; pass --overwrite to replace it")


def _check_parent(destination: Path) -> None:
    """Refuse a destination below a file (its parent directories cannot be made)."""
    existing = next(parent for parent in destination.parents if os.path.lexists(parent))
    if not existing.is_dir():
        raise ConvertRefused(f"the destination {destination} is below {existing}, which is a file, not a directory")


def _lock(work: Path) -> int | None:
    """An open descriptor of `work`'s lock file holding its flock, or None where another process holds it or
    `work` was removed meanwhile (a cleaning run may remove a directory between its creation and its lock)."""
    try:
        descriptor = os.open(work / WORK_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(descriptor), os.stat(work / WORK_LOCK)):  # not a file unlinked meanwhile
            return descriptor
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(descriptor)
    return None


def _clean_interrupted_runs(destination: Path) -> None:
    """Remove the work directories that killed runs left beside `destination` (their lock is free); where a run
    was killed between moving the old destination aside and renaming the new one in, put the old one back."""
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.[a-z0-9_]+{re.escape(WORK_SUFFIX)}")
    for work in destination.parent.iterdir():
        if not pattern.fullmatch(work.name) or work.is_symlink() or not work.is_dir():
            continue
        descriptor = None
        with contextlib.suppress(OSError):  # a directory this run cannot lock (read-only, ...) stays
            descriptor = _lock(work)
        if descriptor is None:  # a run in progress, or removed meanwhile
            continue
        try:
            if (work / "old").is_dir() and not os.path.lexists(destination):
                (work / "old").rename(destination)
                print(f"restored {destination}, which a run interrupted while replacing it had moved aside")
            shutil.rmtree(work)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _work_directory(destination: Path) -> Iterator[Path]:
    """A new work directory beside `destination`, locked while the run lasts and removed on exit."""
    descriptor = None
    while descriptor is None:  # a cleaning run removed the directory before it was locked: make another
        work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=WORK_SUFFIX, dir=destination.parent))
        descriptor = _lock(work)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(descriptor)


def _apply_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes the user's umask gives new files (safetensors and ONNX
    Runtime write theirs 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, directories, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _replace_directory(staging: Path, destination: Path, previous: Path) -> None:
    """Move the complete `staging` directory to `destination` by renames, so `destination` holds either its
    old files or all the new ones, never a mix; the old directory goes to `previous` (in the work directory,
    so a run killed before the second rename leaves it where the next run puts it back)."""
    if not destination.exists():
        staging.rename(destination)
        return
    destination.rename(previous)
    try:
        staging.rename(destination)
    except BaseException:
        previous.rename(destination)
        raise


# The errors of a write that cannot be done (space, quota, file size limit, permissions, read-only file system).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _write_failure(error: Exception, destination: Path, written: str) -> ConvertRefused | None:
    """The one-line error for a write that cannot be done, or None for any other error. Such a failure comes as
    an OSError, as safetensors' error (an OSError raised through Rust, "os error N"), as numpy's "problem writing
    element" (no errno), or on a full disk as a protobuf DecodeError: ONNX's shape inference, which the int8
    quantizer runs, writes its file unchecked, and reading the truncated file back fails."""
    from google.protobuf.message import DecodeError
    from safetensors import SafetensorError

    if isinstance(error, DecodeError):
        reason, space = f"an ONNX file written there could not be read back ({error}), as on a full disk", True
    else:
        code = error.errno if isinstance(error, OSError) else None
        if isinstance(error, SafetensorError) and (found := re.search(r"os error (\d+)", str(error))):
            code = int(found[1])
        unchecked_write = isinstance(error, OSError) and str(error).startswith("problem writing element")
        if code not in WRITE_ERRNOS and not unchecked_write:
            return None
        reason, space = str(error), unchecked_write or code in SPACE_ERRNOS
    if space:  # measured once this run's files are gone: what it had to work with
        places = {}  # one place per file system: the destination's, and the temporary files' (the quantizer's)
        for place in (p for p in (destination.parent, Path(tempfile.gettempdir())) if p.is_dir()):
            places.setdefault(place.stat().st_dev, place)
        free = ", ".join(f"{shutil.disk_usage(p).free / 2**20:.1f} MiB in {p}" for p in places.values())
        reason += f" (free without this run's files: {free})"
    return ConvertRefused(f"cannot write {written} to {destination}: {reason}; the destination is as it was")


def _write_directory(source: str, destination: Path, overwrite: bool, written: str, write: Callable[[Path], str]) -> tuple[Path, str]:
    """Write a directory derived from checkpoint `source` whole or not at all: clean what interrupted runs left,
    refuse a destination that could lose data (`_check_destination`), let `write` fill a staging directory
    beside it, then swap that in (`_replace_directory`). A failure leaves the destination as it was; one to
    write (disk, permissions) is a ConvertRefused naming it. Returns the destination (resolved) and what
    `write` returned (a summary to print)."""
    destination = destination.resolve()
    _check_parent(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _clean_interrupted_runs(destination)
        _check_destination(source, destination, overwrite, written)
        with _work_directory(destination) as work:  # a sibling, so the final rename stays on one file system
            (work / "new").mkdir()
            summary = write(work / "new")
            _apply_umask(work / "new")
            _replace_directory(work / "new", destination, work / "old")
    except Exception as error:
        failure = _write_failure(error, destination, written)
        if failure is None:
            raise
        raise failure from None
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

