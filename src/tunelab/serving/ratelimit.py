"""Per-deployment rate limits the way Azure OpenAI applies them (opt-in: ``TUNELAB_RATE_LIMITS``).

A deployment's ``sku.capacity`` is in units of 1000 tokens per minute, with 6 requests per minute
per unit. A request costs its prompt tokens plus its ``max_tokens`` (what Azure charges up front;
the prompt alone when ``max_tokens`` is unset). The windows are moving one-minute windows from
the ``limits`` library, kept in this process's memory: with several API processes, each counts
its own requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

TOKENS_PER_UNIT = 1000
REQUESTS_PER_UNIT = 6


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    remaining_tokens: int
    retry_after: float  # seconds until the limit that refused the request lets it through; 0 if allowed
    exceeded: str | None = None  # "requests" or "tokens"

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers; ``retry-after`` (which the SDK's retries honour) when refused."""
        out = {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
        }
        if not self.allowed:
            out["retry-after"] = str(math.ceil(self.retry_after))
            out["retry-after-ms"] = str(math.ceil(self.retry_after * 1000))
        return out


class RateLimitExceeded(Exception):
    """A request over its deployment's capacity; ``decision`` says which limit and when to retry."""

    def __init__(self, deployment: str, capacity: int, decision: Decision) -> None:
        assert decision.exceeded is not None
        super().__init__(f"deployment {deployment!r} is over its {decision.exceeded} rate limit")
        self.deployment, self.capacity, self.decision = deployment, capacity, decision
        self.limit: str = decision.exceeded


class RateLimiter:
    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def take(self, deployment: str, capacity: int, tokens: int) -> Decision:
        """Count one request of ``tokens`` tokens against ``deployment``, or refuse it (nothing counted)."""
        capacity = max(1, capacity)
        requests = RateLimitItemPerMinute(REQUESTS_PER_UNIT * capacity)
        budget = RateLimitItemPerMinute(TOKENS_PER_UNIT * capacity)
        cost = min(tokens, budget.amount)  # a request larger than the budget waits for an empty window
        exceeded = None
        if not self._limiter.test(requests, deployment, "requests"):
            exceeded = "requests"
        elif not self._limiter.test(budget, deployment, "tokens", cost=cost):
            exceeded = "tokens"
        else:
            self._limiter.hit(requests, deployment, "requests")
            self._limiter.hit(budget, deployment, "tokens", cost=cost)
        r = self._limiter.get_window_stats(requests, deployment, "requests")
        t = self._limiter.get_window_stats(budget, deployment, "tokens")
        wait = 0.0
        if exceeded is not None:
            wait = max(0.0, (r.reset_time if exceeded == "requests" else t.reset_time) - time.time())
        return Decision(exceeded is None, requests.amount, r.remaining, budget.amount, t.remaining, wait, exceeded)
