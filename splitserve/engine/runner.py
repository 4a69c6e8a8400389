"""Turns scheduled sequences into one forward pass and returns the logits of their last tokens (and,
for a request that asks, its prompt tokens' log probabilities).

Logits come back on the CPU in the model's dtype: the greedy argmax reads them as they are, and the
sampler widens to float32 only the rows it samples (widening is exact). Widening every row cost
0.3-0.5 ms of a 32-48-row bfloat16 decode step on one core, for nothing when every row is greedy."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from splitserve.engine.attention import AttentionBatch, PromptChunk
from splitserve.engine.kv_cache import KVCache
from splitserve.engine.models.llama import LayerState, LlamaModel
from splitserve.engine.request import Sequence
from splitserve.engine.sampler import rows_logprobs

# Prompt rows projected to logits at once for prompt_logprobs: 256 x a 150k vocabulary is 150 MB.
PROMPT_LOGITS_ROWS = 256


@dataclass
class PassInputs:
    """One forward pass's tensors, and which hidden rows become logits and prompt scores."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    last_rows: list[int]  # rows whose logits are sampled: each prompt's last token, then each decode
    scored: list[tuple[Sequence, int, int, int]]  # (sequence, first row, first position, rows)


class LayeredPass:
    """A prefill's forward pass that runs a few layer parts per call (layered prefill): between
    calls the engine runs decode steps, which touch none of this pass's KV blocks."""

    def __init__(self, runner: ModelRunner, inputs: PassInputs, state: LayerState) -> None:
        self.runner, self.inputs, self.state = runner, inputs, state
        self._part_s = [0.0, 0.0]  # the latest attention part's and MLP part's seconds

    @torch.inference_mode()
    def advance(self, until: float) -> bool:
        """Run layer parts (a layer's attention, or its MLP) while the next one is expected to end
        by time.perf_counter() until (one part at least); True once all have run."""
        model, state = self.runner.model, self.state
        while True:
            started = time.perf_counter()
            done = model.run_parts(state, 1, self.inputs.batch, self.runner.cache)
            now = time.perf_counter()
            self._part_s[(state.next_part - 1) % 2] = now - started
            if done or now + self._part_s[state.next_part % 2] > until:
                return done

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """After the last part: the logits of each prompt's last token (and prompt scores)."""
        return self.runner._mixed_outputs(self.inputs, self.state.normed)


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.layout.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax (-1 for a row holding a NaN), as the engine's step chooses greedy tokens."""
        return self.model.ops.argmax_rows(logits)

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], block_tables: list[list[int]]) -> torch.Tensor:
        """Run every token of each sequence not yet in the cache; logits ``[batch, vocab]``."""
        if any(seq.num_computed_tokens for seq in seqs):  # a cached prefix: attend over it as a chunk does
            chunks = [(seq, seq.num_tokens - seq.num_computed_tokens) for seq in seqs]
            return self.mixed(chunks, [], block_tables, [])
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
        ends = list(itertools.accumulate(query_lens))
        last = self._tensor([end - 1 for end in ends])
        logits = self.model.logits(hidden.index_select(0, last)).cpu()
        for seq, end, n in zip(seqs, ends, query_lens):
            self._score_prompt(seq, hidden, end - n, seq.num_computed_tokens, n)
        return logits

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
        return self.model.logits(hidden).cpu()

    @torch.inference_mode()
    def mixed(self, chunks: list[tuple[Sequence, int]], decodes: list[Sequence],
              chunk_tables: list[list[int]], decode_tables: list[list[int]]) -> torch.Tensor:
        """One pass over prompt chunks (the next n uncached tokens of each) and one token per decode.

        Returns logits ``[rows, vocab]`` for each chunk that ends its prompt, then for each decode.
        """
        inputs = self._mixed_inputs(chunks, decodes, chunk_tables, decode_tables)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.batch, self.cache)
        return self._mixed_outputs(inputs, hidden)

    def layered(self, seqs: list[Sequence], block_tables: list[list[int]]) -> LayeredPass:
        """A prefill of seqs (every uncached prompt token, as prefill() runs them) to run a few
        layers at a time: the same arithmetic as prefill(), so the same logits."""
        chunks = [(seq, seq.num_tokens - seq.num_computed_tokens) for seq in seqs]
        inputs = self._mixed_inputs(chunks, [], block_tables, [])
        with torch.inference_mode():
            state = self.model.embed(inputs.input_ids, inputs.positions)
        return LayeredPass(self, inputs, state)

    def _mixed_inputs(self, chunks: list[tuple[Sequence, int]], decodes: list[Sequence],
                      chunk_tables: list[list[int]], decode_tables: list[list[int]]) -> PassInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prompt_chunks: list[PromptChunk] = []
        last_rows: list[int] = []
        scored: list[tuple[Sequence, int, int, int]] = []  # (sequence, first row, first position, rows)
        for (seq, n), table in zip(chunks, chunk_tables):
            start = seq.num_computed_tokens
            scored.append((seq, len(input_ids), start, n))
            input_ids += seq.all_token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [self._slot(table, p) for p in range(start, start + n)]
            prompt_chunks.append(PromptChunk(n, start, self._tensor(table)))
            if start + n == seq.num_tokens:
                last_rows.append(len(input_ids) - 1)
        batch = AttentionBatch(is_prefill=False, slot_mapping=self._tensor([]), chunks=prompt_chunks)
        if decodes:
            decode_positions = [seq.num_tokens - 1 for seq in decodes]
            width = max(len(t) for t in decode_tables)
            batch.block_tables = self._tensor([t + [0] * (width - len(t)) for t in decode_tables]).view(
                len(decodes), width)
            batch.context_lens = self._tensor([p + 1 for p in decode_positions])
            last_rows += range(len(input_ids), len(input_ids) + len(decodes))
            input_ids += [seq.last_token_id for seq in decodes]
            slots += [self._slot(t, p) for t, p in zip(decode_tables, decode_positions)]
            positions += decode_positions
        batch.slot_mapping = self._tensor(slots)
        return PassInputs(self._tensor(input_ids), self._tensor(positions), batch, last_rows, scored)

    def _mixed_outputs(self, inputs: PassInputs, hidden: torch.Tensor) -> torch.Tensor:
        # Only a middle chunk ran: nothing to sample.
        logits = torch.empty(0, self.model.spec.vocab_size, dtype=self.model.lm_head.weight.dtype)
        if inputs.last_rows:
            logits = self.model.logits(hidden.index_select(0, self._tensor(inputs.last_rows))).cpu()
        for seq, row, start, n in inputs.scored:
            self._score_prompt(seq, hidden, row, start, n)
        return logits

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, row: int, start: int, n: int) -> None:
        """With params.prompt_logprobs, before its first token: the log probabilities of the prompt
        tokens that rows row.. (positions start.. start+n-1) predict, into seq.prompt_logprobs.
        In slices, so a long prompt's logits never sit in memory at once."""
        if seq.params.prompt_logprobs is None or seq.output_token_ids:
            return
        end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt row predicts no prompt token
        for first in range(start, end, PROMPT_LOGITS_ROWS):
            last = min(first + PROMPT_LOGITS_ROWS, end)
            rows = hidden[row + first - start:row + last - start]
            targets = seq.prompt_token_ids[first + 1:last + 1]
            scores = rows_logprobs(self.model.logits(rows).float().cpu(), targets, seq.params.prompt_logprobs)
            seq.prompt_logprobs.update(zip(range(first + 1, last + 1), scores))
