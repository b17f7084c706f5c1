"""Per-caller rate limits: a token bucket per user (per client address for callers without a key),
refilled at the user's `requests_per_minute` from the keys file, else the lb's `[lb] requests_per_minute`.
A call over the limit is refused with 429 and the seconds to wait. Buckets are shared by every deployment
of the lb, so a limit is the caller's, not a deployment's."""
from __future__ import annotations

import time

from clowderd.middleware.base import Call, Middleware, Refused

MAX_BUCKETS = 100_000  # idle full buckets are dropped past this many


class Buckets:
    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill)

    def take(self, caller: str, per_minute: int) -> float:
        """0 when the call may go, else the seconds until it could."""
        now = time.monotonic()
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(caller, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._drop_full(now)
        return 0.0

    def _drop_full(self, now: float) -> None:
        for caller, (tokens, last) in list(self._buckets.items()):
            if now - last > 60.0:
                del self._buckets[caller]


class RateLimit(Middleware):
    name = "rate-limit"

    def __init__(self, buckets: Buckets, default_per_minute: int | None):
        self.buckets = buckets
        self.default = default_per_minute

    async def on_request(self, call: Call) -> None:
        per_minute = call.state.get("requests_per_minute") or self.default
        if not per_minute:
            return
        caller = f"user:{call.principal}" if call.principal else f"client:{call.client}"
        wait = self.buckets.take(caller, per_minute)
        if wait:
            who = call.principal or call.client
            raise Refused(429, f"rate limit of {per_minute} requests per minute for {who!r} reached; retry in "
                               f"{wait:.1f} s", "rate_limited")


def create(config: dict, policy, shared) -> Middleware | None:
    if shared.keys is None and not policy.requests_per_minute:
        return None
    return RateLimit(shared.buckets, policy.requests_per_minute)
