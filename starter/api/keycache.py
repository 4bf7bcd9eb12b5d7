"""API keys known to be good, remembered for a short while: most requests then cost no
database round trip to authenticate. A revoked key stops working within KEY_CACHE_TTL_S."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

KEY_CACHE_TTL_S = 30.0
KEY_CACHE_ENTRIES = 10_000


class KeyCache:
    """key hash -> user id, for keys known to be good; bounded in size and age."""

    def __init__(self, *, ttl_s: float = KEY_CACHE_TTL_S, max_entries: int = KEY_CACHE_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        user_id, expires = entry
        if expires < self.clock():
            del self._entries[key_hash]
            return None
        return user_id

    def put(self, key_hash: str, user_id: str) -> None:
        self._entries[key_hash] = (user_id, self.clock() + self.ttl_s)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
