"""A request's deadline (`request_timeout_s`, the request's `timeout`) as the router awaits each
chunk within it: past it a 408 `request_timeout`, and a cancel (the client hung up) is never lost."""

from __future__ import annotations

import asyncio

import pytest

from neo_serve.serve.completions import Deadline
from neo_serve.serve.protocol import APIError


def test_a_cancel_that_lands_as_the_chunk_arrives_still_cancels():
    """Serve cancels a disconnected request's handler once. If that happens in the same loop turn
    as the awaited chunk arrives, Python 3.11's wait_for returned the chunk and dropped the cancel,
    so the handler went on and its sequences kept generating until they finished."""

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        chunk = loop.create_future()

        async def handler() -> str:
            try:
                got = await Deadline(30).run(chunk)
                await asyncio.sleep(0.05)  # the handler would go on to the next chunk
                return f"went on with {got!r}"
            except asyncio.CancelledError:
                return "cancelled"

        task = loop.create_task(handler())
        await asyncio.sleep(0.01)
        chunk.set_result("chunk")
        task.cancel()
        return await task

    assert asyncio.run(scenario()) == "cancelled"


def test_past_the_deadline_is_a_408_and_without_one_nothing_waits():
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    async def quick() -> str:
        return "chunk"

    with pytest.raises(APIError) as info:
        asyncio.run(Deadline(0.05).run(slow()))
    assert info.value.status == 408 and info.value.code == "request_timeout"
    assert asyncio.run(Deadline(None).run(quick())) == "chunk"
    assert asyncio.run(Deadline(10).run(quick())) == "chunk"
