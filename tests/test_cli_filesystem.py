"""`lerobot-xvla convert` / `export` and `libero-setup` on an unfriendly file system: a source whose files live in
the destination (the Hub cache's layout), killed runs, a full disk, no permission, a destination below a file,
the user's umask, and LIBERO config paths that are not what they should be. Each mistake is one line on stderr
with exit status 2, and nothing is lost."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from lerobot.processor import DataProcessorPipeline
from safetensors import SafetensorError

from lerobot_xvla import cli
from lerobot_xvla.demo import lerobot_command
from lerobot_xvla.libero_setup import LiberoPaths, LiberoSetupRefused, libero_config, write_config
from lerobot_xvla_cli import main as cli_main

from conftest import LEROBOT_ENV
from test_convert import files, loaded_action, save_checkpoint


@pytest.fixture
def source(tmp_path, tokenizer_dir) -> Path:
    return save_checkpoint(tmp_path / "source", Path(tokenizer_dir))


def refused(capsys, *argv: str) -> str:
    """The one line `lerobot-xvla` prints on stderr for `argv`, which must end with exit status 2."""
    assert cli_main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    return captured.err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------
# --overwrite never touches the source
# ---------------------------------------------------------------------------------------------------------
def hub_cache_layout(source: Path, entry: Path) -> Path:
    """`source` laid out as the Hugging Face cache keeps a download: real files in `entry/blobs`, and a snapshot
    of relative links to them (`snapshots/<rev>/<name> -> ../../blobs/<hash>`). Returns the snapshot."""
    snapshot = entry / "snapshots" / "0123abc"
    for number, path in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob, link = entry / "blobs" / f"blob{number:02d}", snapshot / path.relative_to(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, blob)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abc")
    return snapshot


def test_overwrite_refuses_a_destination_that_holds_the_sources_files(source, tmp_path, capsys):
    """The snapshot's files are links into blobs/: replacing blobs/ would leave every one of them dangling."""
    snapshot = hub_cache_layout(source, tmp_path / "models--org--tiny")
    blobs = tmp_path / "models--org--tiny" / "blobs"
    before = files(snapshot)
    error = refused(capsys, "convert", str(snapshot), str(blobs), "--overwrite")
    assert re.fullmatch(
        rf"lerobot-xvla convert: error: the source's {re.escape(str(snapshot))}/\S+ resolves to "
        rf"{re.escape(str(blobs))}/blob\d\d, inside the destination {re.escape(str(blobs))}; "
        "replacing the destination would destroy the source\n",
        error,
    )
    assert files(snapshot) == before


def test_a_hub_ids_cache_entry_is_never_the_destination(source, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = tmp_path / "hub" / "models--org--tiny"
    hub_cache_layout(source, entry)
    before = files(entry)
    assert refused(capsys, "export", "org/tiny", str(entry / "blobs"), "--overwrite") == (
        f"lerobot-xvla export: error: the destination {entry / 'blobs'} is inside the source checkpoint {entry}; "
        "write the export outside it\n"
    )
    assert refused(capsys, "convert", "org/tiny", str(tmp_path / "hub"), "--overwrite") == (
        f"lerobot-xvla convert: error: the source checkpoint {entry} is inside the destination {tmp_path / 'hub'}; "
        "replacing the destination would delete it\n"
    )
    assert files(entry) == before


# ---------------------------------------------------------------------------------------------------------
# Interrupted runs
# ---------------------------------------------------------------------------------------------------------
def test_a_killed_conversion_leaves_nothing_that_the_next_run_does_not_clean(source, tmp_path):
    destination = tmp_path / "converted"
    command = [lerobot_command("lerobot-xvla"), "convert", str(source), str(destination)]
    run = subprocess.Popen(command, env=LEROBOT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".converted.*.partial/new")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)  # no handler runs: what a power cut or the OOM killer leaves
    run.wait()
    assert len(leftovers(tmp_path)) == 1 and not destination.exists()
    assert cli_main(["convert", str(source), str(destination)]) == 0
    assert leftovers(tmp_path) == []
    assert loaded_action(destination).tolist() == loaded_action(source).tolist()


def test_cleaning_spares_a_running_conversion_and_other_destinations(source, tmp_path):
    """A work directory whose lock is held belongs to a run in progress; `.converted.b.<x>.partial` is
    destination `converted.b`'s; `.converted.<x>.partial` with a free lock is a killed run's."""
    destination = tmp_path / "converted"
    stale = Path(tempfile.mkdtemp(prefix=".converted.", suffix=".partial", dir=tmp_path))
    (stale / "new").mkdir()
    (stale / "new" / "model.safetensors").write_bytes(b"half written")
    other = Path(tempfile.mkdtemp(prefix=".converted.b.", suffix=".partial", dir=tmp_path))
    with cli._work_directory(destination) as running:
        assert cli_main(["convert", str(source), str(destination)]) == 0
        assert leftovers(tmp_path) == sorted([running.name, other.name])
    assert leftovers(tmp_path) == [other.name]


def test_a_replacement_killed_between_its_renames_is_undone_by_the_next_run(source, tokenizer_dir, tmp_path,
                                                                           capsys):
    """Killed after moving the old destination aside and before renaming the new one in: the next run puts the
    old one back first, so it is not taken for an empty destination (here: refused without --overwrite)."""
    destination = tmp_path / "converted"
    save_checkpoint(destination, Path(tokenizer_dir), seed=2)
    before = files(destination)
    work = Path(tempfile.mkdtemp(prefix=".converted.", suffix=".partial", dir=tmp_path))
    destination.rename(work / "old")
    (work / "new").mkdir()
    assert cli_main(["convert", str(source), str(destination)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"restored {destination}, which a run interrupted while replacing it had moved aside\n"
    assert captured.err.endswith(f"the destination {destination} is not empty; pass --overwrite to replace it\n")
    assert files(destination) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Disk full, no permission, a destination below a file
# ---------------------------------------------------------------------------------------------------------
def no_space_in_processors(monkeypatch) -> str:
    def full(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "policy_preprocessor.json"))

    monkeypatch.setattr(DataProcessorPipeline, "save_pretrained", full)
    return r"\[Errno 28\] No space left on device: '\S+/new/policy_preprocessor\.json'"


def no_space_in_weights(monkeypatch) -> str:
    """safetensors raises its own error for an OSError of its Rust writer (the message it gives on a full tmpfs)."""

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("lerobot_xvla.modeling_xvla.save_file", full)
    return r"Error while serializing: I/O error: No space left on device \(os error 28\)"


@pytest.mark.parametrize("old_destination", [False, True], ids=["no_destination", "old_destination"])
@pytest.mark.parametrize("failure", [no_space_in_processors, no_space_in_weights])
def test_a_full_disk_is_one_line_and_leaves_the_destination_as_it_was(source, tokenizer_dir, tmp_path, capsys,
                                                                      monkeypatch, failure, old_destination):
    destination = tmp_path / "converted"
    if old_destination:
        save_checkpoint(destination, Path(tokenizer_dir), seed=2)
    before, siblings = files(destination), sorted(p.name for p in tmp_path.iterdir())
    reason = failure(monkeypatch)
    error = refused(capsys, "convert", str(source), str(destination), "--overwrite")
    assert re.fullmatch(
        f"lerobot-xvla convert: error: cannot write the converted checkpoint to {re.escape(str(destination))}: "
        rf"{reason} \(free without this run's files: [\d.]+ MiB in \S+(, [\d.]+ MiB in \S+)?\); "
        "the destination is as it was\n",
        error,
    )
    assert files(destination) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")],
    ids=["EACCES", "EROFS"],
)
def test_a_parent_that_cannot_be_written_is_one_line(source, tmp_path, capsys, monkeypatch, code, reason):
    """As root a mode of 0555 stops nothing, so the refusal of the kernel is what the test gives."""
    parent = tmp_path / "readonly"
    parent.mkdir()

    def refuse(prefix="", suffix="", dir=None):
        raise OSError(code, reason, os.path.join(dir, f"{prefix}x{suffix}"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert refused(capsys, "convert", str(source), str(parent / "converted")) == (
        f"lerobot-xvla convert: error: cannot write the converted checkpoint to {parent / 'converted'}: "
        f"[Errno {code}] {reason}: '{parent}/.converted.x.partial'; the destination is as it was\n"
    )
    assert list(parent.iterdir()) == []


def test_a_destination_below_a_file_is_one_line(source, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    destination = tmp_path / "notes.txt" / "runs" / "converted"
    assert refused(capsys, "convert", str(source), str(destination)) == (
        f"lerobot-xvla convert: error: the destination {destination} is below {tmp_path / 'notes.txt'}, "
        "which is a file, not a directory\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask_022", "umask_027"])
def test_outputs_get_the_users_umask(source, tmp_path, umask):
    """mkdtemp makes its directory 0700, safetensors writes 0600: the output has the modes of the user's files."""
    previous = os.umask(umask)
    try:
        assert cli_main(["convert", str(source), str(tmp_path / "converted")]) == 0
    finally:
        os.umask(previous)
    written = [tmp_path / "converted", *(tmp_path / "converted").rglob("*")]
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in written}
    assert {p for p, mode in modes.items() if mode != (0o777 if (tmp_path / p).is_dir() else 0o666) & ~umask} == set()
    assert Path("converted/model.safetensors") in modes


# ---------------------------------------------------------------------------------------------------------
# libero-setup: the config path is not what it should be
# ---------------------------------------------------------------------------------------------------------
CONFIG = libero_config(Path("/site-packages/libero/libero"))


def test_a_directory_named_config_yaml_is_refused_then_kept_on_overwrite(tmp_path):
    config_file = tmp_path / "config.yaml"
    (config_file / "notes").mkdir(parents=True)
    with pytest.raises(LiberoSetupRefused, match=rf"^{re.escape(str(config_file))} is a directory, not LIBERO's"):
        write_config(config_file, CONFIG)
    done = write_config(config_file, CONFIG, overwrite=True)
    assert done == f"wrote: {config_file} (the previous one is now {config_file}.bak)"
    assert yaml.safe_load(config_file.read_text()) == CONFIG and (tmp_path / "config.yaml.bak" / "notes").is_dir()


def test_a_dangling_config_link_is_refused_then_kept_on_overwrite(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.symlink_to(tmp_path / "gone.yaml")
    expected = f"{config_file} is a symbolic link to {tmp_path / 'gone.yaml'}, which does not exist; pass --overwrite"
    with pytest.raises(LiberoSetupRefused, match=f"^{re.escape(expected)}"):
        write_config(config_file, CONFIG)
    assert write_config(config_file, CONFIG, overwrite=True).endswith(f"(the previous one is now {config_file}.bak)")
    assert yaml.safe_load(config_file.read_text()) == CONFIG
    assert os.readlink(tmp_path / "config.yaml.bak") == str(tmp_path / "gone.yaml")


def test_a_config_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "libero_config").write_text("not a directory")
    expected = f"{tmp_path / 'libero_config'} is a file, not a directory: LIBERO reads config.yaml from the directory "
    with pytest.raises(LiberoSetupRefused, match=f"^{re.escape(expected)}" + r"\$LIBERO_CONFIG_PATH \(else ~/\.libero"):
        write_config(tmp_path / "libero_config" / "config.yaml", CONFIG)
    assert (tmp_path / "libero_config").read_text() == "not a directory"


def test_a_thousand_backups_do_not_stop_overwrite(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("datasets: /mine\n")
    for number in range(1000):
        (tmp_path / f"config.yaml.bak{number or ''}").write_text("older")
    done = write_config(config_file, CONFIG, overwrite=True)
    assert done.endswith(f"(the previous one is now {config_file}.bak1000)")
    assert (tmp_path / "config.yaml.bak1000").read_text() == "datasets: /mine\n"


def test_libero_setup_names_a_file_it_cannot_write_in_one_line(tmp_path, capsys, monkeypatch):
    """Through the command (LIBERO's own paths replaced by temporary ones): no permission in the config directory."""
    tree = tmp_path / "assets_tree"
    tree.mkdir()
    paths = LiberoPaths(tmp_path / "libero", tree, tmp_path / "config" / "config.yaml")
    paths.benchmark_root.mkdir()
    monkeypatch.setattr("lerobot_xvla.libero_setup.find_paths", lambda config_dir=None: paths)

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    assert cli_main(["libero-setup"]) == 2
    assert capsys.readouterr().err == (
        f"lerobot-xvla libero-setup: error: [Errno 13] Permission denied: '{tmp_path / 'config'}'\n"
    )
