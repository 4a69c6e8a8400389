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


class Scheduler:
    """FCFS prefill batching by token budget, and continuous-batching decode with preemption.

    When a decode step runs out of KV blocks, the newest running sequence is preempted: its blocks
    are freed and it goes back to the front of the queue to be recomputed (vLLM's recompute policy).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule_prefill(self) -> list[Sequence]:
        """Take queued sequences FCFS while their tokens fit the budget and the KV cache."""
        batch: list[Sequence] = []
        num_tokens = 0
        while self.waiting and self._admits(batch, num_tokens, self.waiting[0]):
            seq = self.waiting.popleft()
            self.blocks.allocate(seq.request_id, seq.num_tokens)
            seq.transition(RequestState.PREFILLING)
            batch.append(seq)
            num_tokens += seq.num_tokens
        return batch

    def _admits(self, batch: list[Sequence], num_tokens: int, seq: Sequence) -> bool:
        if batch and num_tokens + seq.num_tokens > self.config.token_budget:
            return False
        if len(self.running) + len(batch) >= self.config.max_num_seqs:
            return False
        return self.blocks.can_allocate(seq.num_tokens)

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
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.request_id)
