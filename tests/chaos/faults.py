"""A fake Gemini that misbehaves on a seeded schedule.

Replies are dealt from a shuffled deck holding each kind of answer as many times as its
weight, reshuffled when empty: the order is random (and the same for the same seed and the
same order of requests), yet every kind of fault is dealt at least once per deck, so a short
run cannot pass without having met each of them.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

from tests.fakes.gemini_server import FakeGemini, Reply

# name -> weight in the deck. "ok" and "slow" succeed; the others are faults.
DEFAULT_WEIGHTS: dict[str, int] = {
    "ok": 26,
    "rate_limited": 4,   # 429 with Retry-After
    "server_error": 2,   # 500
    "unavailable": 2,    # 503 with Retry-After
    "hang": 2,           # never answers: the activity's timeout must cut it, then retry
    "reset": 2,          # TCP reset, no answer
    "blocked": 1,        # 200, prompt blocked: fails for good, refunded
    "no_image": 2,       # 200, text only: this model fails for good, the next one is tried
    "garbage": 2,        # 200, not JSON
    "slow": 3,           # 200 after longer than the heartbeat timeout, shorter than the call's
}
FAULT_KINDS = tuple(name for name in DEFAULT_WEIGHTS if name != "ok")


class ChaosGemini(FakeGemini):
    def __init__(self, *, seed: int, api_key: str, weights: dict[str, int] | None = None,
                 slow_s: tuple[float, float] = (6.0, 12.0), ok_latency_s: tuple[float, float] = (0.2, 1.5)) -> None:
        super().__init__(api_key=api_key)
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown reply kinds {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.slow_s = slow_s
        self.ok_latency_s = ok_latency_s
        self.dealt: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._deck: list[str] = []
        self._deal_lock = threading.Lock()

    def _reply(self, name: str) -> Reply:
        rng = self._rng
        if name == "ok":
            return Reply.ok(delay_s=rng.uniform(*self.ok_latency_s))
        if name == "rate_limited":
            return Reply.status(429, retry_after=rng.choice([1, 2]), message="Resource has been exhausted")
        if name == "server_error":
            return Reply.status(500, message="An internal error has occurred")
        if name == "unavailable":
            return Reply.status(503, retry_after=1, message="The model is overloaded")
        if name == "hang":
            return Reply.hang()
        if name == "reset":
            return Reply.reset()
        if name == "blocked":
            return Reply.blocked("SAFETY")
        if name == "no_image":
            return Reply.no_image()
        if name == "garbage":
            return Reply.garbage()
        if name == "slow":
            return Reply.slow(rng.uniform(*self.slow_s))
        raise AssertionError(name)

    def _next_reply(self, model: str) -> Reply:
        with self._deal_lock:
            if not self._deck:
                self._deck = [name for name, weight in self.weights.items() for _ in range(weight)]
                self._rng.shuffle(self._deck)
            name = self._deck.pop()
            self.dealt[name] += 1
            return self._reply(name)

    def faults(self) -> dict[str, int]:
        with self._deal_lock:
            return {name: self.dealt.get(name, 0) for name in FAULT_KINDS}
