"""Which scheduler leads: a lease in Redis, and the fencing epoch that comes with it.

The lease is one key, ``splitserve:scheduler:leader``, holding "<holder> <epoch>" with an expiry.
A scheduler that finds it absent takes it and a new epoch (``INCR splitserve:scheduler:epoch``);
the holder renews it every third of the lease. Every call the leader makes to a worker carries its
epoch, and a worker refuses an epoch older than the newest it has seen, so a leader that lost the
lease without noticing (paused, cut off from Redis) can no longer place or abort anything.
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from splitserve.common.logging import describe
from splitserve.queue.reconnect import RETRYABLE

log = structlog.get_logger(__name__)

LEADER_KEY = "splitserve:scheduler:leader"
EPOCH_KEY = "splitserve:scheduler:epoch"

# KEYS: leader, epoch; ARGV: holder, lease in ms. Returns the holder's epoch (taken or renewed), or 0
# when another holder has the lease.
_TAKE_OR_RENEW = """
local current = redis.call('GET', KEYS[1])
if not current then
  local epoch = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
  return epoch
end
local space = string.find(current, ' ', 1, true)
if space and string.sub(current, 1, space - 1) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(string.sub(current, space + 1))
end
return 0
"""

# KEYS: leader; ARGV: holder. Gives the lease up if this holder has it.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """This process's claim on the leader lease. `holder` is unique per process: a scheduler restarted
    under the same name waits for its predecessor's lease to run out like anyone else."""

    def __init__(self, redis, name: str, lease_s: float) -> None:
        self.redis, self.lease_s = redis, lease_s
        self.holder = f"{name}/{uuid.uuid4().hex[:12]}"
        self._take_or_renew = redis.register_script(_TAKE_OR_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def try_lead(self) -> int | None:
        """Take or renew the lease: this holder's epoch, 0 when another holder leads, None when Redis
        did not answer within a third of the lease (nothing is known)."""
        try:
            epoch = await asyncio.wait_for(
                self._take_or_renew(keys=[LEADER_KEY, EPOCH_KEY], args=[self.holder, int(self.lease_s * 1000)]),
                self.lease_s / 3)
            return int(epoch)
        except (*RETRYABLE, TimeoutError) as exc:
            log.warning("leader lease not renewed: redis unreachable", error=describe(exc))
            return None

    async def release(self) -> None:
        """Give the lease up (a clean exit), so a standby takes over at once."""
        try:
            await asyncio.wait_for(self._release(keys=[LEADER_KEY], args=[self.holder]), 2.0)
        except (*RETRYABLE, TimeoutError) as exc:
            log.warning("leader lease not released; it runs out by itself", error=describe(exc))
