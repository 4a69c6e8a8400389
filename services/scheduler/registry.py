"""The worker registry and the two placement choices. Pure: no I/O, no clocks of its own.

- Prefill: first-come-first-served requests go to the prefill server with the fewest outstanding
  prompt tokens among those with room. "Room" means its outstanding tokens plus this prompt fit
  `queue_factor` token budgets (one batch running, one forming), or it has nothing outstanding, so a
  prompt longer than the budget still runs alone. Requests beyond that wait in the scheduler's
  queue, in order, for whichever server frees up first.
- Colocated workers (the baseline mode) are placed exactly like prefill servers; a request stays
  with its worker to the end.
- Decode: the decode server with the most free KV blocks after what was already sent its way since
  its last heartbeat, then the fewest running requests. It may have no room yet: it queues the
  request and admits it when blocks free up.
- A draining worker (shutting down) is placed nothing new; it finishes or hands back what it has.
- A worker that refused a request as overloaded (RESOURCE_EXHAUSTED: a decode server's waiting
  queue is full, or its gRPC server is at its concurrency limit) is placed nothing new until its
  next heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb


ROLES = ("prefill", "decode", "colocated")
# Each kind of worker's name: its metrics label, and under mutual TLS its certificate's role (what it
# registers and reports with, and what the scheduler checks its server's certificate for).
ROLE_NAMES = {spb.WORKER_ROLE_PREFILL: "prefill", spb.WORKER_ROLE_DECODE: "decode",
              spb.WORKER_ROLE_COLOCATED: "colocated"}


def placement_roles(placement: spb.Placement) -> list[tuple[str, int, int]]:
    """(role, number of workers, cores each) of a placement, in ROLES order."""
    return [(role, getattr(placement, f"num_{role}"), getattr(placement, f"{role}_cores")) for role in ROLES]


@dataclass
class WorkerEntry:
    info: spb.WorkerInfo
    stats: pb.WorkerStats
    last_seen: float
    pending_blocks: int = 0  # decode: blocks of requests sent since its last heartbeat
    draining: bool = False  # shutting down: assign it nothing more
    full: bool = False  # refused a request as overloaded (RESOURCE_EXHAUSTED) since its last heartbeat
    # Requests assigned to it and not yet done there, with their prompt lengths.
    assigned: dict[str, int] = field(default_factory=dict)
    # Reconciliation: what it held at its last heartbeat (or registration), how many it has sent, when
    # the last came (monotonic), and the requests whose Submit it answered, with the count then.
    held: set[str] = field(default_factory=set)
    beats: int = 0
    heard_at: float = 0.0
    confirmed: dict[str, int] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def role(self) -> int:
        return self.info.role

    @property
    def outstanding_tokens(self) -> int:
        """Prompt tokens assigned and not yet prefilled (prefill and colocated workers)."""
        return sum(self.assigned.values())


class Registry:
    def __init__(self, queue_factor: float = 2.0) -> None:
        self.queue_factor = queue_factor
        self.workers: dict[str, WorkerEntry] = {}

    def register(self, info: spb.WorkerInfo, stats: pb.WorkerStats, now: float) -> WorkerEntry:
        """Add a worker, or replace an entry with the same id (a restart): returns the new entry."""
        entry = WorkerEntry(info, stats, now)
        self.workers[info.instance_id] = entry
        return entry

    def heartbeat(self, instance_id: str, stats: pb.WorkerStats, now: float) -> bool:
        """Record a heartbeat; False when the worker is unknown (it must register again)."""
        entry = self.workers.get(instance_id)
        if entry is None:
            return False
        entry.stats, entry.last_seen, entry.pending_blocks, entry.full = stats, now, 0, False
        return True

    def remove(self, instance_id: str) -> WorkerEntry | None:
        return self.workers.pop(instance_id, None)

    def expired(self, now: float, timeout_s: float) -> list[str]:
        return [w.instance_id for w in self.workers.values() if now - w.last_seen > timeout_s]

    def takers(self, *roles: int) -> list[WorkerEntry]:
        """Workers of these roles that take new work (not draining)."""
        return [w for w in self.workers.values() if w.role in roles and not w.draining]

    def placement(self) -> spb.Placement:
        """The placement running now: the workers taking work, by role, with cores and limits."""
        prefill = self.takers(spb.WORKER_ROLE_PREFILL)
        decode = self.takers(spb.WORKER_ROLE_DECODE)
        colocated = self.takers(spb.WORKER_ROLE_COLOCATED)

        def most(workers: list[WorkerEntry], field: str) -> int:
            return max((getattr(w.info, field) for w in workers), default=0)

        return spb.Placement(
            num_prefill=len(prefill), prefill_cores=most(prefill, "num_cores"),
            num_decode=len(decode), decode_cores=most(decode, "num_cores"),
            num_colocated=len(colocated), colocated_cores=most(colocated, "num_cores"),
            token_budget=most(prefill + colocated, "token_budget"),
            max_num_seqs=most(decode + colocated, "max_num_seqs"))

    def pick_prefill(self, num_tokens: int) -> WorkerEntry | None:
        """The least-loaded prefill (or colocated) worker with room for num_tokens more, or None."""
        takers = self.takers(spb.WORKER_ROLE_PREFILL, spb.WORKER_ROLE_COLOCATED)
        fits = [w for w in takers if not w.full and self._has_room(w, num_tokens)]
        # Ties (colocated workers count a decoding request as 0 tokens) go to the fewer requests.
        return min(fits, key=lambda w: (w.outstanding_tokens, len(w.assigned)), default=None)

    def _has_room(self, worker: WorkerEntry, num_tokens: int) -> bool:
        capacity = self.queue_factor * worker.info.token_budget
        return worker.outstanding_tokens == 0 or worker.outstanding_tokens + num_tokens <= capacity

    def pick_decode(self, handle: pb.KvHandle) -> WorkerEntry | None:
        """The decode server with the most free blocks (then the least load) that can take handle."""
        able = [w for w in self.takers(spb.WORKER_ROLE_DECODE) if not w.full
                and w.info.kv_layout == handle.layout and w.info.kv_transport == handle.transport]
        return max(able, key=lambda w: (w.stats.num_free_blocks - w.pending_blocks,
                                        -(w.stats.num_running + w.stats.num_waiting)), default=None)
