"""Which requests run in the next step. Pure policy: no torch, no I/O; decisions are returned."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from splitserve.engine.block_manager import BlockManager, OutOfBlocks
from splitserve.engine.request import RequestState, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int  # most prompt tokens in one prefill batch (a longer lone prompt still runs)
    max_num_seqs: int  # most sequences decoding at once
    # Chunked prefill (Sarathi-Serve): most tokens in one mixed step, decodes included. None: off.
    chunk_size: int | None = None


class Scheduler:
    """FCFS prefill batching by token budget, and continuous-batching decode with preemption.

    When a decode step runs out of KV blocks, the newest running sequence is preempted: its blocks
    are freed and it goes back to the front of the queue to be recomputed (vLLM's recompute policy).

    With chunked prefill, a step instead carries every running decode plus as many prompt tokens
    as fill the chunk size: first the prompts already part-way through, then new ones FCFS.

    A sequence's prompt blocks found in the prefix cache (by seq.block_hashes) are in its table
    already computed: only the rest of the prompt runs, and counts against the budget. A sequence
    whose next uncached block another sequence is computing (an identical prompt in the same
    batch, n > 1 samples of one prompt, a system prompt's first uses) waits for it instead of
    computing it again: it stops the batch there (FCFS) and finds the block cached a step later.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # chunked prefill: prompts part-way through, in order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule_prefill(self) -> list[Sequence]:
        """Take queued sequences FCFS while the tokens they compute fit the budget and the KV cache."""
        batch: list[Sequence] = []
        num_tokens = 0
        while (self.waiting and not self._waits_for_prefix(self.waiting[0], batch)
               and self._admits(batch, num_tokens, self.waiting[0])):
            seq = self.waiting.popleft()
            self._allocate(seq)
            batch.append(seq)
            num_tokens += seq.num_tokens - seq.num_computed_tokens
        return batch

    def _admits(self, batch: list[Sequence], num_tokens: int, seq: Sequence) -> bool:
        if len(self.running) + len(batch) >= self.config.max_num_seqs:
            return False
        hashes = self._lookup_hashes(seq)
        if batch:
            to_compute = seq.num_tokens - len(self.blocks.cached_prefix(hashes)) * self.blocks.block_size
            if num_tokens + to_compute > self.config.token_budget:
                return False
        return self.blocks.can_allocate(seq.num_tokens, hashes)

    def _waits_for_prefix(self, seq: Sequence, computing: list[Sequence]) -> bool:
        """Whether seq's first uncached prompt block is one that a sequence of `computing` (being
        prefilled) computes and will cache."""
        hashes = self._lookup_hashes(seq)
        if not hashes or not computing:
            return False
        num_cached = len(self.blocks.cached_prefix(hashes))
        if num_cached == len(hashes):
            return False
        size = self.blocks.block_size
        return any(hashes[num_cached] in other.block_hashes[other.num_computed_tokens // size:
                                                             other.num_prompt_tokens // size]
                   for other in computing)

    def _lookup_hashes(self, seq: Sequence) -> list[bytes]:
        """The prompt blocks worth looking up: every full one but a block holding the last token,
        which is computed anyway for its logits; none for a prompt whose every position's logits
        are asked for (prompt_logprobs)."""
        if seq.params.prompt_logprobs is not None:
            return []
        return seq.block_hashes[:(seq.num_tokens - 1) // self.blocks.block_size]

    def _allocate(self, seq: Sequence) -> None:
        """Give a queued sequence its blocks, the cached prefix first; those tokens count as computed."""
        hashes = self._lookup_hashes(seq)
        num_cached = len(self.blocks.cached_prefix(hashes)) * self.blocks.block_size
        self.blocks.allocate(seq.request_id, seq.num_tokens, hashes)
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached
        seq.transition(RequestState.PREFILLING)

    def schedule_mixed(self) -> tuple[list[Sequence], list[tuple[Sequence, int]], list[Sequence]]:
        """A chunked-prefill step: (decodes, prompt chunks as (sequence, tokens), preempted).

        Decodes go first, one token each; prompt chunks fill what is left of the chunk size. A
        prompt's blocks are all allocated when its first chunk is scheduled.
        """
        assert self.config.chunk_size is not None
        decodes, preempted = self.schedule_decode()
        room = self.config.chunk_size - len(decodes)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.prefilling:
            if room <= 0:
                break
            n = min(room, seq.num_tokens - seq.num_computed_tokens)
            chunks.append((seq, n))
            room -= n
        while (room > 0 and self.waiting and not self._waits_for_prefix(self.waiting[0], self.prefilling)
               and self._admits_chunked(self.waiting[0])):
            seq = self.waiting.popleft()
            self._allocate(seq)
            self.prefilling.append(seq)
            n = min(room, seq.num_tokens - seq.num_computed_tokens)
            chunks.append((seq, n))
            room -= n
        return decodes, chunks, preempted

    def _admits_chunked(self, seq: Sequence) -> bool:
        if len(self.running) + len(self.prefilling) >= self.config.max_num_seqs:
            return False
        return self.blocks.can_allocate(seq.num_tokens, self._lookup_hashes(seq))

    def schedule_decode(self) -> tuple[list[Sequence], list[Sequence]]:
        """Give every running sequence a slot for its next token; returns (batch, preempted)."""
        preempted: list[Sequence] = []
        batch: list[Sequence] = []
        while self.running:
            seq = self.running.pop(0)
            if self._make_room(seq, preempted):
                batch.append(seq)
        self.running = batch
        return list(batch), preempted  # a copy: finishing a sequence edits self.running

    def _make_room(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        while True:
            try:
                self.blocks.grow(seq.request_id, seq.num_tokens)
                return True
            except OutOfBlocks:
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.transition(RequestState.QUEUED)
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from whichever queue holds it and free its blocks."""
        for queue in (self.running, self.waiting, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        self.blocks.free(seq.request_id)
