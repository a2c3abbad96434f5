"""Per-sample normalization statistics for the cloud copy's distillation (a diagnostic beyond the paper).

With ``edge.stats_source="upload"`` every upload carries the device's TBR statistics, and the cloud
copy distils the whole step (new samples and replayed ones) under the *newest* upload's statistics.
On label-correlated streams those follow the current class burst, so replayed samples of other
classes are distilled under statistics they will never be normalized with on the device.
``cloud.sample_stats="own"`` distils every sample under the statistics of the upload it came in
with; ``"newest"`` uses the same per-sample normalization with the newest statistics for all (it
isolates the normalization's changed gradient path: fixed statistics, no gradient through the batch
statistics, unlike TBR). Not persisted in checkpoints: after a restore, replayed samples fall back to
the newest statistics.
"""
from __future__ import annotations

import torch


class StatsBank:
    """Upload statistics by id (``-1``: none known, use the fallback)."""

    def __init__(self):
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.next_id = 0

    def add(self, stats: dict[str, torch.Tensor]) -> int:
        self.stats[self.next_id] = stats
        self.next_id += 1
        return self.next_id - 1

    def prune(self, *live: torch.Tensor) -> None:
        """Forget statistics no sample refers to any more."""
        keep = set(torch.cat(live).unique().tolist()) if live else set()
        self.stats = {k: v for k, v in self.stats.items() if k in keep}

    def gather(self, ids: torch.Tensor, fallback: dict[str, torch.Tensor],
               layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (mean, var), each (N, C): sample i's upload's statistics (``fallback`` if unknown)."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        sources = [self.stats.get(int(u), fallback) for u in unique.tolist()]
        return {n: (torch.stack([s[f"{n}.running_mean"] for s in sources])[inverse],
                    torch.stack([s[f"{n}.running_var"] for s in sources])[inverse]) for n in layers}
