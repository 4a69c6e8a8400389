"""One simulated engine: LLMEngine's step rules on the engine's own pure Scheduler and BlockManager,
with step times from the latency model instead of a forward pass.

It mirrors splitserve/engine/engine.py (which needs torch) where it matters: a step is a prefill
batch if one can be formed (FCFS within the token budget), else a decode step over every running
sequence, or with chunked prefill a mixed step; preemption by recompute when blocks run out; the
PREFILL role parks prefilled requests (KV_READY) holding their blocks; the DECODE role reserves
blocks, imports the KV and decodes. Given its prompt's block hashes (a workload that shares
prefixes), a request reuses the prefix cache's blocks as in the engine, and a prefill with a cached
prefix is priced as the chunk path the engine runs it on. It also mirrors the EngineLoop thread: a
call from a server runs between two steps (at once when the engine is idle), and a step's results
reach the server just after the next step has started. The machine (sim_machine.py) prices each step beside the others.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.engine.block_manager import BlockManager, blocks_for
from splitserve.engine.request import RequestState, SamplingParams, Sequence
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.planner.latency import DegreeProfile, MixedModel
from splitserve.planner.sim_machine import Machine

# (sequence, finished) for every sequence that got a token in a step.
StepOutputs = list[tuple[Sequence, bool]]
# A step about to run: its seconds alone, its kind (prefill: it prefills; decode), and what it does.
StepPlan = tuple[float, str, Callable[[], StepOutputs]]


class Role(enum.Enum):
    """engine.config.EngineRole, without importing torch."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class EngineSettings:
    """The engine flags that shape scheduling; defaults are EngineConfig's (a test keeps them equal)."""

    token_budget: int = 2048
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    chunk_size: int | None = None
    prefill_slice_ms: float | None = None
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class EngineSpec:
    role: Role
    degree: DegreeProfile
    settings: EngineSettings
    kv_bytes_per_token: int
    max_model_len: int
    num_layers: int | None = None  # the profile's model's: a layered prefill's slices are parts of layers


@dataclass
class _LayeredPrefill:
    """LLMEngine._LayeredPrefill: a prompt batch part-way through its layers, in seconds."""

    batch: list[Sequence]
    remaining_s: float  # of the pass, alone
    part_s: float  # one layer part's share, half a layer's (0: the profile does not say how many layers)
    decodes_next: bool = False


class SimEngine:
    def __init__(self, machine: Machine, spec: EngineSpec, on_step: Callable[[StepOutputs, float], None]) -> None:
        s = spec.settings
        self.machine, self.loop, self.spec, self.on_step = machine, machine.loop, spec, on_step
        num_blocks = s.kv_cache_bytes // (spec.kv_bytes_per_token * s.block_size)
        if num_blocks < 1:
            raise ValueError(f"a {s.kv_cache_bytes}-byte KV cache holds no block")
        self.blocks = BlockManager(num_blocks, s.block_size)
        self.scheduler = Scheduler(SchedulerConfig(s.token_budget, s.max_num_seqs, s.chunk_size), self.blocks)
        self.sequences: dict[str, Sequence] = {}
        self._layered: _LayeredPrefill | None = None
        self._stepping = False
        self._calls: list[tuple[Callable, Callable | None]] = []
        self.num_steps = 0
        self.busy_s = 0.0  # the steps' total time
        self._step_ends_at = 0.0  # when the running step ends
        self._work_until = 0.0  # the server work queued on this worker's cores runs until then

    # -- requests (LLMEngine's methods of the same names) ---------------------------------------

    def add_request(self, rid: str, prompt_len: int, max_new_tokens: int,
                    block_hashes: tuple[bytes, ...] = ()) -> None:
        """With the prompt's block hashes (workloads that share prefixes), the engine's prefix cache
        applies: cached blocks are not computed again."""
        seq = self._new_sequence(rid, prompt_len, max_new_tokens, [])
        if self.spec.settings.enable_prefix_caching:
            seq.block_hashes = list(block_hashes)
        self.scheduler.add(seq)

    def cached_tokens(self, block_hashes: tuple[bytes, ...], prompt_len: int) -> int:
        """Prompt tokens this engine's cache holds (the longest run of full blocks before the one
        holding the prompt's last token), as KV-aware routing sees it."""
        if not self.spec.settings.enable_prefix_caching:
            return 0
        lookup = block_hashes[:(prompt_len - 1) // self.blocks.block_size]
        return len(self.blocks.cached_prefix(lookup)) * self.blocks.block_size

    def reserve(self, rid: str, prompt_len: int, max_new_tokens: int) -> bool:
        """Decode role: reserve blocks for a request prefilled elsewhere; False when no room yet."""
        num_transferring = sum(q.state is RequestState.TRANSFERRING for q in self.sequences.values())
        if len(self.scheduler.running) + num_transferring >= self.spec.settings.max_num_seqs:
            return False
        if not self.blocks.can_allocate(prompt_len + 1):  # + the slot the first decode step writes
            return False
        seq = self._new_sequence(rid, prompt_len, max_new_tokens, [0])
        seq.transition(RequestState.TRANSFERRING)
        self.blocks.allocate(rid, prompt_len)
        return True

    def import_kv(self, rid: str) -> None:
        seq = self.sequences.get(rid)
        if seq is None or seq.state is not RequestState.TRANSFERRING:
            return
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.transition(RequestState.DECODING)
        self.scheduler.running.append(seq)

    def abort(self, rid: str) -> None:
        seq = self.sequences.get(rid)
        if seq is not None:
            if self._layered is not None and seq in self._layered.batch:
                self._layered.batch.remove(seq)  # its pass goes on for the others (it writes no KV here)
            self.scheduler.remove(seq)
            self._retire(seq)

    def _new_sequence(self, rid: str, prompt_len: int, max_new_tokens: int, output: list[int]) -> Sequence:
        if prompt_len + max_new_tokens > self.spec.max_model_len:
            raise ValueError(f"prompt + output exceed the model's {self.spec.max_model_len} tokens")
        held = prompt_len if self.spec.role is Role.PREFILL else prompt_len + max_new_tokens
        if blocks_for(held, self.blocks.block_size) > self.blocks.num_blocks:
            raise ValueError("the request needs more KV blocks than the whole cache holds")
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
        seq = Sequence(rid, [0] * prompt_len, params, output_token_ids=output)
        self.sequences[rid] = seq
        return seq

    def _retire(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        self.sequences.pop(seq.request_id, None)

    def charge(self, cpu_s: float) -> None:
        """Work the server does on this worker's cores besides the engine (a KV send): it runs at once
        if the engine is idle, or when the running step ends, and delays the steps that start before
        it is done."""
        starts = self._step_ends_at if self._stepping else self.loop.now
        self._work_until = max(starts, self._work_until) + cpu_s

    # -- the engine thread (EngineLoop) ---------------------------------------------------------

    def call(self, fn: Callable[[], object], then: Callable[[object], None] | None = None) -> None:
        """Run fn between two steps (now if idle); then(result) follows as a separate event."""
        if self._stepping:
            self._calls.append((fn, then))
            return
        self._run_call(fn, then)
        self._maybe_step()

    def _run_call(self, fn: Callable, then: Callable | None) -> None:
        result = fn()
        if then is not None:
            self.loop.after(0.0, then, result)

    def _maybe_step(self) -> None:
        if self._stepping or not self.scheduler.has_work:
            return
        plan = self._plan()
        if plan is None:
            return  # waiting for blocks: the real loop waits for a call too (LLMEngine.stalled)
        seconds, kind, finish = plan
        seconds += max(0.0, self._work_until - self.loop.now)
        self._work_until = 0.0
        self._stepping = True
        self.num_steps += 1
        seconds = self.machine.start(self, kind, seconds)
        self.busy_s += seconds
        self._step_ends_at = self.loop.now + seconds
        self.loop.after(seconds, self._end_step, finish)

    def _end_step(self, finish: Callable[[], StepOutputs]) -> None:
        outputs = finish()
        self.machine.end(self, len(outputs))
        self._stepping = False
        calls, self._calls = self._calls, []
        for fn, then in calls:
            self._run_call(fn, then)
        self._maybe_step()
        if outputs:
            self.loop.after(0.0, self.on_step, outputs, self.loop.now)

    # -- one step: engine.step() ----------------------------------------------------------------

    def _plan(self) -> StepPlan | None:
        if self.spec.settings.chunk_size is not None:
            return self._plan_mixed()
        if self._layered is not None:
            if self._layered.decodes_next and self.scheduler.running:
                self._layered.decodes_next = False
                return self._plan_decode()
            return self._plan_slice(self._layered)
        plan = self._plan_prefill() or self._plan_decode()
        if plan is None and self.scheduler.waiting:  # a decode step preempted everyone: recompute
            plan = self._plan_prefill()
        return plan

    def _plan_prefill(self) -> StepPlan | None:
        batch = self.scheduler.schedule_prefill()
        if not batch:
            return None
        seconds = self._prefill_seconds(batch)
        if self.spec.settings.prefill_slice_ms is not None and self.scheduler.running:
            num_layers = self.spec.num_layers
            self._layered = _LayeredPrefill(batch, seconds, seconds / (2 * num_layers) if num_layers else 0.0)
            self.scheduler.prefilling.extend(batch)
            return self._plan_slice(self._layered)
        return seconds, "prefill", lambda: self._finish_prefill(batch)

    def _plan_slice(self, layered: _LayeredPrefill) -> StepPlan:
        """LLMEngine._prefill_slice: the layer parts that fit prefill_slice_ms (one at least; the
        parts taken as equal halves of a layer), or the rest of the pass once nothing decodes."""
        seconds = layered.remaining_s
        if self.scheduler.running:
            target = self.spec.settings.prefill_slice_ms / 1000
            if layered.part_s > 0:
                target = max(1, math.floor(target / layered.part_s + 1e-9)) * layered.part_s
            seconds = min(seconds, target)
        layered.remaining_s -= seconds
        if layered.remaining_s > 1e-9:
            layered.decodes_next = True
            return seconds, "prefill", list

        def finish() -> StepOutputs:
            self._layered = None
            for seq in layered.batch:
                self.scheduler.prefilling.remove(seq)
            return self._finish_prefill(layered.batch)
        return seconds, "prefill", finish

    def _prefill_seconds(self, batch: list[Sequence]) -> float:
        """A prefill pass over batch, the cluster's overheads included."""
        if any(s.num_computed_tokens for s in batch):
            # A cached prefix: the engine runs the rest through its chunk path, attending over it.
            seconds = self._mixed_seconds([(s.num_computed_tokens, s.num_tokens - s.num_computed_tokens)
                                           for s in batch], [])
        else:
            seconds = self.spec.degree.prefill.seconds([s.num_tokens for s in batch])
        cluster = self.spec.degree.cluster
        return seconds * cluster.prefill_factor + cluster.prefill_s

    def _finish_prefill(self, batch: list[Sequence]) -> StepOutputs:
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
            self._cache_computed(seq)
        outputs = self._postprocess(batch)
        for seq, finished in outputs:
            if finished:
                continue
            if self.spec.role is Role.PREFILL:
                seq.transition(RequestState.KV_READY)  # parked until pulled and released
            else:
                seq.transition(RequestState.DECODING)
                self.scheduler.running.append(seq)
        return outputs

    def _plan_decode(self) -> StepPlan | None:
        batch, _ = self.scheduler.schedule_decode()
        if not batch:
            return None
        seconds = self.spec.degree.decode.seconds(sum(s.num_tokens for s in batch), len(batch))
        return seconds + self.spec.degree.cluster.decode_s, "decode", lambda: self._finish_decode(batch)

    def _finish_decode(self, batch: list[Sequence]) -> StepOutputs:
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
        return self._postprocess(batch)

    def _plan_mixed(self) -> StepPlan | None:
        decodes, chunks, _ = self.scheduler.schedule_mixed()
        if not decodes and not chunks:
            return None
        shape = [(seq.num_computed_tokens, n) for seq, n in chunks]
        seconds = self._mixed_seconds(shape, [s.num_tokens for s in decodes])
        cluster = self.spec.degree.cluster
        if chunks:
            seconds = seconds * cluster.prefill_factor + cluster.prefill_s
        kind = "prefill" if chunks else "decode"
        return seconds + cluster.decode_s, kind, lambda: self._finish_mixed(decodes, chunks)

    def _mixed_seconds(self, chunks: list[tuple[int, int]], contexts: list[int]) -> float:
        degree = self.spec.degree
        if not chunks:
            # Decodes alone: the decode model, fitted over batches 1-64. The mixed fit has one such
            # sample (16 decodes) and its near-zero fixed cost would price a batch-1 step below the
            # weights' read (3.6 ms against 14.6 measured, on the 2-core profile).
            return degree.decode.seconds(sum(contexts), len(contexts))
        if degree.mixed is not None:
            return degree.mixed.seconds(*MixedModel.features(chunks, contexts)[1:])
        # No mixed fit: a prefill of the chunks (attention over their prefixes) plus a decode step,
        # one fixed cost between them.
        _, tokens, units, _ = MixedModel.features(chunks, [])
        prefill = degree.prefill
        seconds = prefill.a + prefill.b * tokens + prefill.c * units
        if contexts:
            seconds += degree.decode.seconds(sum(contexts), len(contexts)) - degree.decode.a
        return seconds

    def _finish_mixed(self, decodes: list[Sequence], chunks: list[tuple[Sequence, int]]) -> StepOutputs:
        completed = []
        for seq, n in chunks:
            seq.num_computed_tokens += n
            self._cache_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                self.scheduler.prefilling.remove(seq)
                completed.append(seq)
        for seq in decodes:
            seq.num_computed_tokens = seq.num_tokens
        outputs = self._postprocess(completed + decodes)
        for seq, finished in outputs[:len(completed)]:
            if not finished:
                seq.transition(RequestState.DECODING)
                self.scheduler.running.append(seq)
        return outputs

    def _cache_computed(self, seq: Sequence) -> None:
        """LLMEngine._cache_computed: the prompt's full blocks computed so far join the prefix cache."""
        if seq.block_hashes:
            num_full = seq.num_computed_tokens // self.blocks.block_size
            self.blocks.cache(seq.request_id, seq.block_hashes[:num_full])

    def _postprocess(self, batch: list[Sequence]) -> StepOutputs:
        outputs = []
        for seq in batch:
            seq.output_token_ids.append(0)
            finished = (seq.num_output_tokens >= seq.params.max_new_tokens
                        or seq.num_tokens >= self.spec.max_model_len)
            if finished:
                if seq in self.scheduler.running:
                    self.scheduler.running.remove(seq)
                self._retire(seq)
            outputs.append((seq, finished))
        return outputs
