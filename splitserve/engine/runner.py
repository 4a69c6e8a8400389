"""Turns scheduled sequences into one forward pass and returns the logits of their last tokens."""

from __future__ import annotations

import itertools

import torch

from splitserve.engine.attention import AttentionBatch
from splitserve.engine.kv_cache import KVCache
from splitserve.engine.models.llama import LlamaModel
from splitserve.engine.request import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.layout.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], block_tables: list[list[int]]) -> torch.Tensor:
        """Run every token of each sequence not yet in the cache; logits ``[batch, vocab]``."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        for seq, table in zip(seqs, block_tables):
            start, end = seq.num_computed_tokens, seq.num_tokens
            input_ids += seq.all_token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(table, p) for p in range(start, end)]
            query_lens.append(end - start)
        batch = AttentionBatch(is_prefill=True, slot_mapping=self._tensor(slots), query_lens=query_lens)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), batch, self.cache)
        last = self._tensor([end - 1 for end in itertools.accumulate(query_lens)])
        return self.model.logits(hidden.index_select(0, last)).float().cpu()

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], block_tables: list[list[int]]) -> torch.Tensor:
        """Run the newest token of each sequence; logits ``[batch, vocab]``."""
        positions = [seq.num_tokens - 1 for seq in seqs]
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        batch = AttentionBatch(
            is_prefill=False,
            slot_mapping=self._tensor([self._slot(t, p) for t, p in zip(block_tables, positions)]),
            block_tables=self._tensor(padded).view(len(seqs), width),
            context_lens=self._tensor([p + 1 for p in positions]),
        )
        input_ids = self._tensor([seq.last_token_id for seq in seqs])
        hidden = self.model(input_ids, self._tensor(positions), batch, self.cache)
        return self.model.logits(hidden).float().cpu()
