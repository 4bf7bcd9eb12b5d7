"""A heartbeat on a timer while an activity awaits slow work: a dead worker is noticed in
seconds, a slow call is not mistaken for one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from temporalio import activity


@contextlib.asynccontextmanager
async def heartbeating(every_s: float, beat: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Call `beat` (by default a bare `activity.heartbeat()`) every `every_s` seconds, from
    the first moment, while the body runs; the timer stops when the body ends."""

    async def beat_on_timer() -> None:
        while True:
            if beat is None:
                activity.heartbeat()
            else:
                beat()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat_on_timer())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
