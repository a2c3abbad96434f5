"""A host's upload budget: one token bucket per key, filled at the rate the key's shard advertises.

A device sends at most as many candidates as its key's bucket holds (the lowest-entropy ones; the
host cuts the upload) and keeps the rest back ("unsent"), so the cloud is offered what it can process.

The bucket holds at most ``max(burst_s, gap)`` seconds of the rate, where ``gap`` is a moving average
of the time between two uploads of the key from this host. At full speed uploads of a key come every
few milliseconds and ``burst_s`` bounds the bursts; when devices run at a camera's pace, a key's
uploads come seconds apart, each with a whole batch's candidates, and a bucket capped at ``burst_s``
would overflow between them: tokens the shard offered would be lost while the candidates that
arrive later are kept back. (Before the gap term, 256 devices at one batch per 360 s, three group
keys, two shards: a key's uploads came ~4 s apart with ~20 candidates each and its bucket held ~2 s
of rate. 40% of the candidates stayed unsent in that run, this and the shards' replay accounting
together; 5.8% with both fixed, README.)
"""
from __future__ import annotations

import time


class UploadBudget:
    def __init__(self, min_upload: int, burst_s: float, gap_momentum: float = 0.2):
        self.min_upload, self.burst_s, self.gap_momentum = min_upload, burst_s, gap_momentum
        self.rate: dict[str, float] = {}  # key -> samples/s this host may send (unknown: no budget yet)
        self.tokens: dict[str, float] = {}
        self.refilled: dict[str, float] = {}
        self.last_ask: dict[str, float] = {}
        self.gap: dict[str, float] = {}  # key -> moving average of seconds between two uploads

    def set_rate(self, key: str, rate: float, now: float | None = None) -> None:
        if key not in self.rate:  # the bucket fills from the moment a rate is known
            self.refilled[key] = time.monotonic() if now is None else now
        self.rate[key] = max(0.0, rate)

    def allow(self, key: str, n: int, now: float | None = None) -> int:
        """How many of ``n`` candidates of ``key`` to send now (the tokens are spent): all of them while
        no rate is known (the shard refuses what it cannot hold), else what the bucket holds, or 0 when
        that is fewer than ``min_upload`` (and fewer than ``n``): too few to be worth a message."""
        now = time.monotonic() if now is None else now
        if key in self.last_ask:
            gap = now - self.last_ask[key]
            self.gap[key] = gap if key not in self.gap else (1 - self.gap_momentum) * self.gap[key] + self.gap_momentum * gap
        self.last_ask[key] = now
        if key not in self.rate:
            return n
        rate = self.rate[key]
        cap = max(self.min_upload, rate * max(self.burst_s, self.gap.get(key, 0.0)))
        held = self.tokens.get(key, 0.0) + rate * (now - self.refilled.get(key, now))
        self.tokens[key], self.refilled[key] = min(cap, held), now
        send = min(n, int(self.tokens[key]))
        if send < min(n, self.min_upload):
            return 0
        self.tokens[key] -= send
        return send
