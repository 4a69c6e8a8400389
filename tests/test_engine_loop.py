"""The engine thread of a worker: after a failed step nothing waits forever on it."""

import asyncio
import threading

import pytest

from splitserve.worker.engine_loop import EngineLoop


class BrokenEngine:
    """Has work; its step raises once `go` is set (calls queued before then are still pending)."""

    def __init__(self) -> None:
        self.go = threading.Event()

    @property
    def has_work(self) -> bool:
        return True

    def published_cache(self, now: bool = False) -> tuple[int, list[int]]:
        return 0, []

    def step(self):
        self.go.wait()
        raise ValueError("boom")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies with it
def test_calls_queued_before_and_made_after_a_failed_step_raise_instead_of_hanging():
    async def scenario():
        engine = BrokenEngine()
        loop = EngineLoop(engine, on_step=lambda result: None)
        loop.start()
        await asyncio.sleep(0.05)  # the thread is inside step()
        queued = asyncio.ensure_future(loop.call(lambda e: "never"))
        await asyncio.sleep(0.05)
        engine.go.set()
        with pytest.raises(ValueError):
            await asyncio.wait_for(loop.failed, 5)
        with pytest.raises(RuntimeError, match="engine failed"):
            await asyncio.wait_for(queued, 5)
        with pytest.raises(RuntimeError, match="engine failed"):
            await asyncio.wait_for(loop.call(lambda e: "never"), 5)
        await asyncio.wait_for(loop.stop(), 5)

    asyncio.run(scenario())
