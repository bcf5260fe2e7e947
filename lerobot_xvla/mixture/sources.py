"""One entry of a cross-embodiment mixture (`XVLAConfig.mixture`): where a dataset is, how often it is drawn, and
the embodiment ("domain") it trains.

A source names its dataset like `--dataset.*` does (repo id, root, revision, episodes) and adds what differs between
robots: the domain id (its soft prompts and action heads), the action mode and width, the names its cameras take
in the policy (`rename_map`) and its time-anchor horizon. The fields the dataset decides (`action_dim`, `state_dim`,
`cameras`, `fps`) are filled in when the mixture is built (`mixture.dataset`) and saved with the checkpoint: they
are the per-domain table that `--policy.domain_id=N` selects at deployment. A width given by the user is checked against the dataset.

This module only checks what the config alone tells (`check_sources`); what needs the datasets is checked in
`mixture.dataset` before training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# Batch key of each sample's domain id in a mixture (an `observation.*` key, so LeRobot's processors carry it).
MIXTURE_DOMAIN_KEY = "observation.domain_id"


class MixtureError(Exception):
    """A mixture source that cannot be trained as given; the message names the source and the field.

    Not a ValueError, for the reason `XVLAConfigError` is not: draccus would replace the message.
    """


@dataclass
class MixtureSource:
    """One dataset of a mixture and the embodiment it trains."""

    # Dataset repo id (a local dataset is found under $HF_LEROBOT_HOME/repo_id, or under root).
    repo_id: str = ""
    # Directory of the dataset (None: LeRobot's default place for repo_id).
    root: str | None = None
    # Dataset revision (Hub branch, tag or commit).
    revision: str | None = None
    # Episodes to use (None: all).
    episodes: list[int] | None = None
    # Relative sampling frequency: frames are drawn from the sources in the ratio of their weights.
    weight: float = 1.0
    # The embodiment's domain id: its soft prompts and action heads (table in docs/reference.md).
    domain_id: int | None = None
    # Action mode of this source (None: the policy's action_mode).
    action_mode: str | None = None
    # Width of the dataset's actions; None: read from the dataset (a value given here must match it).
    action_dim: int | None = None
    # Dataset camera key -> policy camera key, so sources share view slots (e.g. every main camera ->
    # observation.images.front). Cameras not renamed keep their names.
    rename_map: dict[str, str] = field(default_factory=dict)
    # Time anchors of this source: targets are chunk_size points spread over this many seconds of its dataset,
    # read at the dataset's own fps (None: chunk_size consecutive frames). Every source sets it or none does.
    anchor_horizon_s: float | None = None
    # Filled from the dataset when the mixture is built: the state width,
    state_dim: int | None = None
    # the policy camera keys this source feeds (after rename_map),
    cameras: list[str] = field(default_factory=list)
    # its frame rate,
    fps: float | None = None
    # and its instruction when the dataset has one task (the domain's default_task at deployment).
    task: str | None = None

    def label(self, index: int) -> str:
        return f"mixture[{index}] ({self.repo_id or 'no repo_id'})"


def as_source(entry: MixtureSource | dict, index: int) -> MixtureSource:
    """A mixture entry as a MixtureSource (Python callers may pass dicts; draccus builds the dataclass itself)."""
    if isinstance(entry, MixtureSource):
        return entry
    if not isinstance(entry, dict):
        raise MixtureError(f"mixture[{index}] must be a source ({{repo_id: ..., domain_id: ...}}), got {entry!r}")
    unknown = sorted(set(entry) - {f.name for f in fields(MixtureSource)})
    if unknown:
        raise MixtureError(f"mixture[{index}] has unknown keys {unknown}; a source takes {[f.name for f in fields(MixtureSource)]}")
    return MixtureSource(**entry)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_sources(sources: list[MixtureSource], num_domains: int, default_mode: str) -> None:
    """Refuse mixtures the config alone shows to be wrong: each source needs a repo id, a positive finite weight and
    a domain id in range; two sources on one domain must share the action space (mode, width and time anchors);
    time anchors on every source or none (they change what the network reads as proprio); the kinematic modes
    (so101_ee6d) convert joints in the processors and cannot be mixed yet."""
    from ..action_modes import get_action_mode_class  # action_modes imports nothing of ours; kept local to stay light

    if not isinstance(sources, list) or not all(isinstance(s, MixtureSource) for s in sources):
        raise MixtureError(f"mixture must be a list of sources ({{repo_id: ..., domain_id: ...}}), got {sources!r}")
    spaces: dict[int, tuple[int, dict]] = {}  # domain id -> (its first source, that source's action space)
    for index, source in enumerate(sources):
        name = source.label(index)
        if not isinstance(source.repo_id, str) or not source.repo_id.strip():
            raise MixtureError(f"mixture[{index}] needs a repo_id (the dataset of this source)")
        if not _is_positive(source.weight):
            raise MixtureError(f"{name}: weight must be a finite number > 0, got {source.weight!r}")
        if source.anchor_horizon_s is not None and not _is_positive(source.anchor_horizon_s):
            raise MixtureError(
                f"{name}: anchor_horizon_s must be a finite number of seconds > 0 when set, got {source.anchor_horizon_s!r}"
            )
        if not _is_int(source.domain_id) or not 0 <= source.domain_id < num_domains:
            raise MixtureError(f"{name}: domain_id must be a whole number in [0, num_domains={num_domains}), got {source.domain_id!r}")
        mode = source.action_mode or default_mode
        mode_class = get_action_mode_class(mode)
        if mode_class.joint_space_robot:
            raise MixtureError(f"{name}: action_mode={mode} converts joints by kinematics in the processors, which a mixture does not support yet")
        if source.action_dim is not None and (not _is_int(source.action_dim) or source.action_dim < 1):
            raise MixtureError(f"{name}: action_dim must be a whole number >= 1 when set, got {source.action_dim!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in source.rename_map.items()):
            raise MixtureError(f"{name}: rename_map must map dataset keys to policy keys (strings), got {source.rename_map!r}")
        space = {"action_mode": mode.lower(), "action_dim": source.action_dim, "anchor_horizon_s": source.anchor_horizon_s}
        first, other = spaces.setdefault(source.domain_id, (index, space))
        unknown_width = None in (other["action_dim"], space["action_dim"])  # read from the datasets later
        differ = [key for key in space if other[key] != space[key] and not (key == "action_dim" and unknown_width)]
        if differ:
            raise MixtureError(
                f"{name} and {sources[first].label(first)} share domain_id {source.domain_id} but not their action space ("
                + ", ".join(f"{key} {space[key]} vs {other[key]}" for key in differ)
                + "): give each robot its own domain id"
            )
    anchored = [s.anchor_horizon_s is not None for s in sources]
    if any(anchored) and not all(anchored):
        without, with_ = anchored.index(False), anchored.index(True)
        raise MixtureError(
            f"{sources[without].label(without)} has no anchor_horizon_s while {sources[with_].label(with_)} has one: time "
            "anchors make the trajectory's first point the proprio, so every source sets anchor_horizon_s or none does"
        )
