"""The engine thread of a worker: after a failed step nothing waits forever on it."""

import asyncio
import threading
import time

import pytest

from splitserve.engine import EngineConfig, LLMEngine, SamplingParams
from splitserve.engine.config import EngineRole
from splitserve.worker.engine_loop import EngineLoop


class BrokenEngine:
    """Has work; its step raises once `go` is set (calls queued before then are still pending)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.stalled = False

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


def test_an_engine_whose_queued_prompt_cannot_get_blocks_waits_for_a_call_instead_of_spinning(model_fp32):
    """A prefill server whose KV cache is full of blocks held for pulls cannot start its next prompt
    until a Release or an Abort frees some: its engine thread must wait for that call, not run empty
    steps (each a wake-up of the event loop) as fast as it can."""
    engine = LLMEngine(EngineConfig(dtype="float32", role=EngineRole.PREFILL, kv_cache_bytes=4 << 20),
                       loaded=model_fp32)
    size, blocks = engine.blocks.block_size, engine.blocks.num_blocks
    assert blocks >= 4
    params = SamplingParams(max_new_tokens=4)

    async def scenario():
        steps: list = []
        stepped = asyncio.Event()

        def on_step(result) -> None:
            steps.append(result)
            stepped.set()

        async def produced(request_id: str) -> None:
            while not any(o.request_id == request_id for result in steps for o in result.outputs):
                stepped.clear()
                await stepped.wait()

        loop = EngineLoop(engine, on_step=on_step)
        loop.start()
        try:
            # Most of the cache stays held once prefilled (a prefill engine keeps a request's blocks).
            await loop.call(lambda e: e.add_request("held", [5] * ((blocks - 1) * size), params))
            await asyncio.wait_for(produced("held"), 30)
            await loop.call(lambda e: e.add_request("next", [7] * (2 * size), params))
            clock = time.pthread_getcpuclockid(loop._thread.ident)  # the engine thread's CPU time
            cpu = time.clock_gettime(clock)
            await asyncio.sleep(0.5)
            assert time.clock_gettime(clock) - cpu < 0.05, "the engine thread ran while nothing could run"
            assert sum(not result.outputs for result in steps) <= 2  # a step to find out, then none
            await loop.call(lambda e: e.abort("held"))  # the pull's Release frees the blocks
            await asyncio.wait_for(produced("next"), 30)
        finally:
            await asyncio.wait_for(loop.stop(), 5)

    asyncio.run(scenario())
