"""The simulated prefill, decode and colocated servers: services/*/server.py around a SimEngine.

Each keeps what the scheduler's registry knows of it (`assigned`, and for decode servers the stats
of the last heartbeat plus `pending_blocks`), so placement reads the same fields the real registry
does. Control messages take one `rpc_s` hop; tokens reach the client `reply_s` after their step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.engine.block_manager import blocks_for
from splitserve.planner.sim_engine import EngineSpec, SimEngine, StepOutputs

if TYPE_CHECKING:
    from splitserve.planner.simulator import Simulation


class Server:
    """What every simulated worker shares: its engine and the registry's view of it."""

    def __init__(self, sim: Simulation, name: str, spec: EngineSpec) -> None:
        self.sim, self.name, self.spec = sim, name, spec
        self.engine = SimEngine(sim.machine, spec, self._on_step)
        self.token_budget = spec.settings.token_budget
        self.assigned: dict[str, int] = {}  # the registry's WorkerEntry.assigned for this worker
        # The block hashes of requests routed here and not yet prefilled (KV-aware routing).
        self.routed: dict[str, tuple[bytes, ...]] = {}

    @property
    def outstanding_tokens(self) -> int:
        return sum(self.assigned.values())

    def cached_tokens(self, request) -> int:
        """The request's prompt tokens this worker holds, or will once the requests routed here ran."""
        held = self.engine.cached_tokens(request.block_hashes, request.input_len)
        lookup = request.block_hashes[:(request.input_len - 1) // self.engine.blocks.block_size]
        for hashes in self.routed.values():
            shared = next((i for i, (a, b) in enumerate(zip(lookup, hashes)) if a != b),
                          min(len(lookup), len(hashes)))
            held = max(held, shared * self.engine.blocks.block_size)
        return held

    def submit(self, rid: str) -> None:
        """Prefill.Submit: queue the request in the engine (at its next step boundary)."""
        request = self.sim.requests[rid]
        self.engine.call(lambda: self._add(rid, request.input_len, request.output_len, request.block_hashes))

    def _add(self, rid: str, prompt_len: int, output_len: int, block_hashes: tuple[bytes, ...] = ()) -> None:
        try:
            self.engine.add_request(rid, prompt_len, output_len, block_hashes)
        except ValueError as exc:  # Submit answers INVALID_ARGUMENT; the scheduler fails the request
            self.sim.loop.after(self.sim.overheads.rpc_s, self.sim.scheduler.fail, rid, str(exc))

    def _on_step(self, outputs: StepOutputs, end: float) -> None:
        raise NotImplementedError


class PrefillServer(Server):
    """services/prefill/server.py: first token out, KV held until the decode server releases it. The
    real server's lease never runs out here: the simulated scheduler always leads, and the leader
    extends the lease of every request whose pull it awaits."""

    def __init__(self, sim: Simulation, name: str, spec: EngineSpec) -> None:
        super().__init__(sim, name, spec)
        self.held: set[str] = set()

    def _on_step(self, outputs: StepOutputs, end: float) -> None:
        sim = self.sim
        for seq, finished in outputs:
            rid = seq.request_id
            sim.client.token(rid, end + sim.overheads.reply_s, last=finished)
            if not finished:
                self.held.add(rid)
            sim.loop.after(sim.overheads.rpc_s, sim.scheduler.prefill_done, rid, self, finished)

    def release(self, rid: str) -> None:
        """Prefill.Release: the pull was acknowledged, free the blocks."""
        if rid in self.held:
            self.held.discard(rid)
            self.engine.call(lambda: self.engine.abort(rid))


@dataclass
class DecodeStats:
    """WorkerStats as of the decode server's last heartbeat."""

    num_free_blocks: int
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class Pending:
    source: PrefillServer
    num_bytes: int


class DecodeServer(Server):
    """services/decode/server.py: FCFS admission by free blocks, KV pull, continuous batching."""

    def __init__(self, sim: Simulation, name: str, spec: EngineSpec) -> None:
        super().__init__(sim, name, spec)
        self.stats = DecodeStats(self.engine.blocks.num_free_blocks)
        self.pending_blocks = 0
        self.pulls: dict[str, Pending] = {}
        self.waiting: deque[str] = deque()
        self._room_set = False
        self._admitting = False

    def heartbeat(self) -> None:
        sched = self.engine.scheduler
        self.stats = DecodeStats(self.engine.blocks.num_free_blocks, len(sched.running) + len(sched.prefilling),
                                 len(sched.waiting) + len(self.waiting))
        self.pending_blocks = 0

    def submit_kv(self, rid: str, source: PrefillServer) -> None:
        """Decode.Submit: queue for admission."""
        block_size = self.spec.settings.block_size  # the prefill server's too: their layouts match
        num_blocks = blocks_for(self.sim.requests[rid].input_len, block_size)
        self.pulls[rid] = Pending(source, num_blocks * block_size * self.spec.kv_bytes_per_token)
        self.waiting.append(rid)
        self._room()

    # admit_forever: `await room.wait(); room.clear(); while waiting and await try_admit(head)`
    def _room(self) -> None:
        self._room_set = True
        if not self._admitting:
            self._round()

    def _round(self) -> None:
        self._room_set, self._admitting = False, True
        self._try_head()

    def _try_head(self) -> None:
        if not self.waiting:
            self._idle()
            return
        rid = self.waiting[0]
        request = self.sim.requests[rid]
        self.engine.call(lambda: self._reserve(rid, request.input_len, request.output_len),
                         then=lambda ok: self._reserved(rid, ok))

    def _reserve(self, rid: str, prompt_len: int, output_len: int) -> bool | ValueError:
        try:
            return self.engine.reserve(rid, prompt_len, output_len)
        except ValueError as exc:
            return exc

    def _reserved(self, rid: str, ok: bool | ValueError) -> None:
        if ok is False:
            self._idle()
            return
        self.waiting.popleft()
        if isinstance(ok, ValueError):
            self._fail(rid, str(ok))
        else:
            self._pull(rid)
        self._try_head()

    def _idle(self) -> None:
        self._admitting = False
        if self._room_set:
            self._round()

    def _pull(self, rid: str) -> None:
        pending = self.pulls[rid]
        pending.source.engine.charge(pending.num_bytes * self.sim.overheads.kv_send_cpu_per_byte)
        self.sim.loop.after(self.sim.profile.kv_transfer.seconds(pending.num_bytes), self._pulled, rid)

    def _pulled(self, rid: str) -> None:
        source = self.pulls.pop(rid).source

        def release(_) -> None:  # after the import, as the real server acknowledges the pull
            self.sim.loop.after(self.sim.overheads.rpc_s, source.release, rid)

        self.engine.call(lambda: self.engine.import_kv(rid), then=release)

    def _fail(self, rid: str, error: str) -> None:
        self.pulls.pop(rid, None)
        self.engine.call(lambda: self.engine.abort(rid))
        self._room()
        self.sim.client.fail(rid, error, self.sim.loop.now + self.sim.overheads.reply_s)
        self.sim.loop.after(self.sim.overheads.rpc_s, self.sim.scheduler.finish, rid)

    def _on_step(self, outputs: StepOutputs, end: float) -> None:
        sim = self.sim
        any_finished = False
        for seq, finished in outputs:
            sim.client.token(seq.request_id, end + sim.overheads.reply_s, last=finished)
            if finished:
                any_finished = True
                sim.loop.after(sim.overheads.rpc_s, sim.scheduler.finish, seq.request_id)
        if any_finished:
            self._room()


class ColocatedServer(Server):
    """services/colocated/server.py: one engine from prompt to last token; placed like a prefill server."""

    def __init__(self, sim: Simulation, name: str, spec: EngineSpec) -> None:
        super().__init__(sim, name, spec)
        self.num_emitted: dict[str, int] = {}

    def _on_step(self, outputs: StepOutputs, end: float) -> None:
        sim = self.sim
        for seq, finished in outputs:
            rid = seq.request_id
            sim.client.token(rid, end + sim.overheads.reply_s, last=finished)
            emitted = self.num_emitted.get(rid, 0) + 1
            self.num_emitted[rid] = emitted
            if finished:
                del self.num_emitted[rid]
            if emitted == 1:
                sim.loop.after(sim.overheads.rpc_s, sim.scheduler.prefill_done, rid, self, finished)
            elif finished:
                sim.loop.after(sim.overheads.rpc_s, sim.scheduler.finish, rid)
