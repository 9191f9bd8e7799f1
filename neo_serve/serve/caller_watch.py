"""Ends a pipeline replica's streams whose caller died.

Ray does not cancel a streaming actor call when the process that made it is gone: when a router
(or the playground) replica is killed, or lost with its node, mid-stream, its sequences ran on to
max_tokens, holding KV blocks and batch slots (16 demo streams ran 400 more steps). A caller
sends its own actor handle with each call; the replica asks each distinct caller every
`period_s` whether it is alive, and cancels the calls of one that died, as if it had cancelled
them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from ray.exceptions import ActorDiedError

logger = logging.getLogger("ray.serve")

CALLER_CHECK_PERIOD_S = 2.0
# A caller that does not answer in time is busy, not dead: only Ray's "actor died" cancels.
CALLER_ANSWER_TIMEOUT_S = 30.0


class CallerWatch:
    """Which tasks (streaming calls) each caller has in this replica, and a loop that pings the
    callers while any call is watched. Owned by one PipelineServer, used on its event loop."""

    def __init__(self, period_s: float = CALLER_CHECK_PERIOD_S) -> None:
        self.period_s = period_s
        self._calls: dict[str, tuple[Any, set[asyncio.Task[Any]]]] = {}  # caller's actor id -> handle, tasks
        self._loop_task: asyncio.Task[None] | None = None
        self.num_cancelled = 0  # calls cancelled because their caller died

    @contextlib.contextmanager
    def watching(self, caller: Any | None) -> Iterator[None]:
        """Watch `caller` (an actor handle, or None: not watched) for the current task's call."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield
            return
        key = caller._actor_id.hex()
        _, tasks = self._calls.setdefault(key, (caller, set()))
        tasks.add(task)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            tasks.discard(task)
            if not tasks and self._calls.get(key, (None, None))[1] is tasks:
                del self._calls[key]

    async def _watch(self) -> None:
        while self._calls:
            await asyncio.sleep(self.period_s)
            try:
                callers = {key: caller for key, (caller, _) in self._calls.items()}
                # Together: one slow caller must not delay the others' answers.
                deaths = await asyncio.gather(*(_died(caller) for caller in callers.values()))
                for key, died in zip(callers, deaths):
                    # The entry as it is now: its calls may have ended, and new ones from the
                    # same (dead) caller started, while the callers were asked.
                    entry = self._calls.pop(key, None) if died else None
                    if entry is not None:
                        tasks = list(entry[1])
                        logger.warning("neo-serve pipeline: the caller of %d stream(s) died; stopping them",
                                       len(tasks))
                        for task in tasks:
                            task.cancel()
                        self.num_cancelled += len(tasks)
            except Exception:  # noqa: BLE001 - the watch must outlive a surprise; the next round retries
                logger.exception("neo-serve pipeline: watching the callers of its streams failed")

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()


async def _died(caller: Any) -> bool:
    try:
        await asyncio.wait_for(caller.__ray_ready__.remote(), CALLER_ANSWER_TIMEOUT_S)
    except ActorDiedError:
        return True
    except Exception:  # noqa: BLE001 - busy, restarting, unreachable for now: not known dead
        return False
    return False
