"""Fleet progress: device hosts post their running totals here; the driver only reads and reports.

(Outside the ``tdmr_ray.fleet`` package on purpose: that package imports torch, and the actor's
process would carry it, ~600 MB resident for a dict of totals; this module imports nothing.)

Hosts run their whole streams free (no barrier between them), so the driver cannot wait for rounds
to learn how far the fleet is; each host posts cumulative totals (samples seen, correct, candidates,
treatment and control arms, done) every ``progress_interval_s``, and the driver sums the newest post
of every host. Posts are cumulative, so one that is lost or repeated changes nothing; a host that
Ray restarts from its checkpoint posts smaller totals until it has redone its lost batches, and
those are ignored (the totals never go backwards).
"""
from __future__ import annotations


class FleetProgress:
    def __init__(self, n_hosts: int):
        self.latest: dict[int, dict] = {}
        self.n_hosts = n_hosts

    def post(self, host: int, totals: dict) -> None:
        # A host restarted from its checkpoint posts smaller totals until it catches up: keep the larger.
        if host not in self.latest or totals["seen"] >= self.latest[host]["seen"]:
            self.latest[host] = totals

    def totals(self) -> dict:
        """The fleet's totals from every host's newest post (hosts that have not posted count 0)."""
        out = {"seen": 0, "uploaded": 0, "correct": 0, "arms": {"treatment": [0, 0], "control": [0, 0]},
               "hosts_posted": len(self.latest),
               "done": len(self.latest) == self.n_hosts and all(t["done"] for t in self.latest.values())}
        for t in self.latest.values():
            for k in ("seen", "uploaded", "correct"):
                out[k] += t[k]
            for arm, (n, c) in t["arms"].items():
                out["arms"][arm][0] += n
                out["arms"][arm][1] += c
        return out
