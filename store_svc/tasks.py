"""Small asyncio helpers shared by the service's parts."""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has ended (a task is never left behind).

    Args:
        task: the task, or None (nothing to do). Its outcome is not re-raised.
    """
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
