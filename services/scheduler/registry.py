"""The worker registry and the two placement choices. Pure: no I/O, no clocks of its own.

- Prefill: first-come-first-served requests go to the prefill server with the fewest outstanding
  prompt tokens among those with room. "Room" means its outstanding tokens plus this prompt fit
  `queue_factor` token budgets (one batch running, one forming), or it has nothing outstanding, so a
  prompt longer than the budget still runs alone. Requests beyond that wait in the scheduler's
  queue, in order, for whichever server frees up first.
- Prefill with KV-aware routing (the default, `--routing kv`): among the servers with room, the
  one that minimizes the expected time to the request's first token, counted in prompt tokens:

      cost(w) = queued(w) + (P - cached(w)) + request_tokens * n(w)

  queued(w) is the prompt tokens still to compute of the requests assigned to w, P - cached(w) the
  prompt tokens w would compute for this one (cached(w): its longest prefix of full blocks that w
  holds, by the block keys w publishes with its heartbeats, plus those of requests just sent there),
  and the load term charges each of w's n(w) assigned requests `request_tokens` more (each costs a
  step's overhead, and its cached prefix is still read), so one hot prefix does not pile onto one
  server: once the queue there outweighs the prefix, the next request goes elsewhere and caches it
  there too. Ties go to the fewer requests. Room counts the tokens still to compute.
- Colocated workers (the baseline mode) are placed exactly like prefill servers; a request stays
  with its worker to the end.
- Decode: with KV-aware routing, the decode server holding the longest cached prefix of the prompt
  (a conversation's earlier turns, kept when they finished) among those with room for the rest: it
  pulls only the blocks it lacks. Then, and with least-loaded routing, the most free KV blocks after
  what was already sent its way since its last heartbeat, then the fewest running requests. It may
  have no room yet: it queues the request and admits it when blocks free up.
- A draining worker (shutting down) is placed nothing new; it finishes or hands back what it has.
- A worker that refused a request as overloaded (RESOURCE_EXHAUSTED: a decode server's waiting
  queue is full, or its gRPC server is at its concurrency limit) is placed nothing new until its
  next heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.engine.block_manager import blocks_for
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
    # KV-aware routing: the keys of the blocks in its prefix cache (as of its latest heartbeat that
    # listed them), and those of the requests routed here whose blocks it may not have listed yet.
    # A request's keys are kept while it is assigned here and for one heartbeat after.
    cached_keys: set[int] = field(default_factory=set)
    routed: dict[str, list[int]] = field(default_factory=dict)
    routed_left: set[str] = field(default_factory=set)

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

    @property
    def namespace(self) -> str:
        """What its prefix cache's block hashes start from; empty when it caches nothing."""
        return self.info.prefix_cache_namespace

    def cached_blocks(self, keys: list[int]) -> int:
        """How many of keys, from the first, it holds (or will: a request routed here has them)."""
        routed = set().union(*self.routed.values()) if self.routed else set()
        for i, key in enumerate(keys):
            if key not in self.cached_keys and key not in routed:
                return i
        return len(keys)

    def saw_heartbeat(self, cached_keys: list[int] | None) -> None:
        """A heartbeat: its cache as listed (None: unchanged since the last list); the keys of requests
        that had left it at the previous heartbeat are forgotten (the cache lists them by now)."""
        if cached_keys is not None:
            self.cached_keys = set(cached_keys)
        for rid in self.routed_left:
            self.routed.pop(rid, None)
        self.routed_left = {rid for rid in self.routed if rid not in self.assigned}


class Registry:
    def __init__(self, queue_factor: float = 2.0, request_tokens: int = 32) -> None:
        self.queue_factor = queue_factor
        self.request_tokens = request_tokens  # KV-aware routing's load term, per assigned request
        self.workers: dict[str, WorkerEntry] = {}

    def register(self, info: spb.WorkerInfo, stats: pb.WorkerStats, now: float) -> WorkerEntry:
        """Add a worker, or replace an entry with the same id (a restart): returns the new entry."""
        entry = WorkerEntry(info, stats, now)
        self.workers[info.instance_id] = entry
        return entry

    def heartbeat(self, instance_id: str, stats: pb.WorkerStats, now: float,
                  cached_keys: list[int] | None = None) -> bool:
        """Record a heartbeat (with the worker's cached block keys when it listed them); False when the
        worker is unknown (it must register again)."""
        entry = self.workers.get(instance_id)
        if entry is None:
            return False
        entry.stats, entry.last_seen, entry.pending_blocks, entry.full = stats, now, 0, False
        entry.saw_heartbeat(cached_keys)
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

    def route_prefill(self, num_tokens: int,
                      prefix_keys: Callable[[WorkerEntry], list[int]]) -> tuple[WorkerEntry, int] | None:
        """KV-aware: the prefill (or colocated) worker with room of least cost (the module's
        docstring), and the prompt tokens found in its cache; None when none has room.

        prefix_keys(worker) are the keys of the prompt's full blocks, before the one holding its last
        token (always computed), hashed as that worker hashes them.
        """
        best = None
        for worker in self.takers(spb.WORKER_ROLE_PREFILL, spb.WORKER_ROLE_COLOCATED):
            if worker.full:
                continue
            keys = prefix_keys(worker)
            cached = worker.cached_blocks(keys) * worker.info.kv_layout.block_size if keys else 0
            if not self._has_room(worker, num_tokens - cached):
                continue
            load = self.request_tokens * len(worker.assigned)
            cost = (worker.outstanding_tokens + num_tokens - cached + load, len(worker.assigned))
            if best is None or cost < best[0]:
                best = (cost, worker, cached)
        return None if best is None else (best[1], best[2])

    def _has_room(self, worker: WorkerEntry, num_tokens: int) -> bool:
        capacity = self.queue_factor * worker.info.token_budget
        return worker.outstanding_tokens == 0 or worker.outstanding_tokens + num_tokens <= capacity

    def pick_decode(self, handle: pb.KvHandle) -> WorkerEntry | None:
        """The decode server with the most free blocks (then the least load) that can take handle."""
        route = self.route_decode(handle)
        return None if route is None else route[0]

    def decode_takers_for(self, handle: pb.KvHandle) -> list[WorkerEntry]:
        """Decode servers taking work that can pull handle: its KV layout and transport are theirs."""
        return [w for w in self.takers(spb.WORKER_ROLE_DECODE)
                if w.info.kv_layout == handle.layout and w.info.kv_transport == handle.transport]

    def route_decode(self, handle: pb.KvHandle, prefix_keys: Callable[[WorkerEntry], list[int]] | None = None
                     ) -> tuple[WorkerEntry, int] | None:
        """The decode server for handle, and how many of its blocks that server has cached.

        With prefix_keys (KV-aware routing), among the servers with room for the blocks they lack,
        the one holding the longest prefix of the prompt (a conversation's earlier turns): it pulls
        only the rest. Then, and otherwise, the most free blocks, then the least load.
        """
        able = [w for w in self.decode_takers_for(handle) if not w.full]
        needed = blocks_for(handle.num_tokens + 1, handle.layout.block_size)
        best = None
        for worker in able:
            cached = worker.cached_blocks(prefix_keys(worker)) if prefix_keys else 0
            free = worker.stats.num_free_blocks - worker.pending_blocks
            if free + cached < needed:
                cached = 0  # no room for the rest now: its prefix does not count
            key = (cached, free, -(worker.stats.num_running + worker.stats.num_waiting))
            if best is None or key > best[0]:
                best = (key, worker, cached)
        return None if best is None else (best[1], best[2])
