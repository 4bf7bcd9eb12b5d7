"""API keys known to be good, remembered for a short while: most requests then cost no
database round trip to authenticate. A revoked key stops working within KEY_CACHE_TTL_S.

A key not remembered is looked up once however many requests carry it at the same moment: a
burst from a client whose key the cache has forgotten (a restart, the TTL) would otherwise send
one lookup per request to the database, all before the first could be remembered."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

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
        self._looking_up: dict[str, asyncio.Task[str | None]] = {}

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

    async def resolve(self, key_hash: str, look_up: Callable[[], Awaitable[str | None]]) -> str | None:
        """The user id for `key_hash`: remembered, or from `look_up()`, which runs once for all
        the callers asking for the same key at the same time. A key found is remembered; an
        unknown one (None) is not. A caller that goes away (a client disconnecting) does not
        cancel the lookup the others wait for."""
        user_id = self.get(key_hash)
        if user_id is not None:
            return user_id
        task = self._looking_up.get(key_hash)
        if task is None:
            task = asyncio.ensure_future(self._look_up(key_hash, look_up))
            self._looking_up[key_hash] = task
            task.add_done_callback(lambda done: self._forget(key_hash, done))
        return await asyncio.shield(task)

    def _forget(self, key_hash: str, done: asyncio.Task) -> None:
        self._looking_up.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every caller may have gone before it failed

    async def _look_up(self, key_hash: str, look_up: Callable[[], Awaitable[str | None]]) -> str | None:
        user_id = await look_up()
        if user_id is not None:
            self.put(key_hash, user_id)
        return user_id
