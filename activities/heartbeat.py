"""A heartbeat on a timer while an activity awaits slow work: a dead worker is noticed in
seconds, a slow call is not mistaken for one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from temporalio import activity

# Heartbeats of an activity scheduled without a heartbeat timeout: none is required, a beat
# only carries progress and hears a cancel.
UNTIMED_BEAT_S = 10.0


def beat_every(timeout: timedelta | None) -> float:
    """How often a waiting activity calls heartbeat() for its heartbeat timeout T: every 0.4 T.

    The SDK sends the first heartbeat at once, then holds each later one until 0.8 T after the
    last send, and sends the newest held (or, if none is held then, the next one at once). Two
    beats per 0.8 T window keep one always held when a window ends, so the server hears one every
    0.8 T (a cancel is heard as soon), and the worker does no more Python work than that takes:
    beating more often (this was every T/3, at most 10 s) sends nothing more. Measured in
    docs/benchmarks.md, "Waiting costs (goal 2)"."""
    if not timeout:
        return UNTIMED_BEAT_S
    return max(0.2, 0.4 * timeout.total_seconds())


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
