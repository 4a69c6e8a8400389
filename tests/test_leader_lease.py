"""The leader lease against a real (private) redis-server: one holder at a time, a new epoch at each
change of holder, renewal by the holder only, a clean release, nothing known while Redis is down, and
a scheduler process that cannot take over after taking the lease exits and frees it."""

import asyncio
import json
import subprocess
import sys
import time

import pytest
import redis as redis_client

from splitserve.common.net import free_port
from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import REQUEST_STREAM, connect
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


@pytest.mark.timeout(60)
def test_a_scheduler_whose_take_over_fails_exits_and_frees_the_lease(tmp_path):
    """Before, the take-over was a task nobody watched: its error was logged, and the scheduler kept
    renewing a lease it never led under, so no standby could lead and nothing was placed again."""
    with LocalRedis() as redis:
        client = redis_client.Redis.from_url(redis.url)
        client.set(REQUEST_STREAM, "not a stream")  # the take-over's XGROUP CREATE answers WRONGTYPE
        log = tmp_path / "scheduler.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "scheduler", "--redis-url", redis.url,
                                     "--port", str(free_port()), "--leader-lease", "1", "--drain-timeout", "1"],
                                    stdout=out, stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=40)
            finally:
                proc.kill()
        lease_left = client.exists(LEADER_KEY)
        client.close()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    fatal = [e for e in events if e["event"] == "fatal: a background task ended"]
    assert code == 1 and fatal and "WRONGTYPE" in fatal[0]["error"], log.read_text()[-2000:]
    assert fatal[0]["task"] == "SchedulerServer.lead_forever"
    assert not lease_left  # released on the way out: a standby leads at once
