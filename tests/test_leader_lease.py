"""The leader lease against a real (private) redis-server: one holder at a time, a new epoch at each
change of holder, renewal by the holder only, a clean release, and nothing known while Redis is down."""

import asyncio
import time

from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import connect
from splitserve.services.scheduler.leader import LEADER_KEY, Lease


def test_one_holder_at_a_time_and_a_new_epoch_at_each_change():
    async def scenario(url: str):
        client = connect(url)
        first, second = Lease(client, "scheduler-0", 0.3), Lease(client, "scheduler-0", 0.3)  # same name
        taken = await first.try_lead(), await second.try_lead()
        renewed = await first.try_lead()
        await asyncio.sleep(0.4)  # the lease runs out: its holder stopped renewing
        after_expiry = await second.try_lead(), await first.try_lead()
        await second.release()
        after_release = await first.try_lead()
        await first.release()
        gone = await client.exists(LEADER_KEY)
        await client.aclose()
        return taken, renewed, after_expiry, after_release, gone

    with LocalRedis() as redis:
        taken, renewed, after_expiry, after_release, gone = asyncio.run(scenario(redis.url))
    assert taken == (1, 0) and renewed == 1  # a second process under the same name does not lead
    assert after_expiry == (2, 0)
    assert after_release == 3 and not gone


def test_with_redis_down_the_lease_is_unknown_within_a_third_of_it():
    async def scenario(url: str):
        client = connect(url)
        started = time.monotonic()
        epoch = await Lease(client, "scheduler-0", 1.5).try_lead()
        await client.aclose()
        return epoch, time.monotonic() - started

    redis = LocalRedis().start()
    redis.stop()
    epoch, elapsed = asyncio.run(scenario(redis.url))
    assert epoch is None and elapsed < 1.5
