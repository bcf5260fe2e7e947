"""The statistics a mixture hands to LeRobot (kept apart from `mixture.dataset`, which imports the datasets stack)."""

from __future__ import annotations

from typing import Any


class MixtureStats(dict):
    """The `dataset.meta.stats` of a mixture: empty as a dict, so no code can normalise with pooled statistics by
    mistake; `by_domain` holds each domain's state and action statistics (sources that share a domain, one robot
    recorded twice, are aggregated)."""

    def __init__(self, by_domain: dict[int, dict[str, dict[str, Any]]]) -> None:
        super().__init__()
        self.by_domain = by_domain


def is_mixture_stats(stats: Any) -> bool:
    return isinstance(stats, MixtureStats)
