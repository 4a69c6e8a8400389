"""The in-process engine: schedule -> run -> postprocess, with no sockets.

Services wrap it: a prefill server runs it in the PREFILL role (prefill, then hold KV blocks for
export), a decode server in the DECODE role (import KV blocks, then decode), and a colocated worker
does both.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from splitserve.engine.block_manager import (MAX_CACHE_SALT_CHARS, BlockManager, OutOfBlocks, PrefixCacheStats,
                                            block_hashes, blocks_for)
from splitserve.engine.config import EngineConfig, EngineRole
from splitserve.engine.isolation import Forward, among, isolate
from splitserve.engine.kv_cache import KVCache, KVLayout
from splitserve.engine.loader import LoadedModel
from splitserve.engine.ops import CpuKernelOps
from splitserve.engine.request import (
    FinishReason,
    RequestIdBusy,
    RequestState,
    SamplingParams,
    Sequence,
    StepOutput,
    TokenLogprobs,
)
from splitserve.engine.runner import LayeredPass, ModelRunner
from splitserve.engine.sampler import plain_greedy_tokens, sample_one, token_logprobs
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.structured import GrammarBackend

log = structlog.get_logger(__name__)
# The request id of the probe that tells a broken engine from a request that breaks it: not
# printable, so no request can have it.
PROBE_ID = "\x00probe"
PUBLISH_INTERVAL_S = 0.25  # the cached blocks' keys are listed at most this often (heartbeats: 1 s)


class EngineBroken(RuntimeError):
    """A forward pass failed for every sequence of its batch, and a one-token probe failed too: the
    engine itself (its device) is broken, not a request. The worker must exit; its requests, the
    failed batch's included, run elsewhere."""


class _ForwardFailed(Exception):
    """A forward pass failed for every sequence of its batch, alone too: the step fails them all."""

    def __init__(self, failed: list[tuple[Sequence, Exception]]) -> None:
        super().__init__(f"the forward pass over {len(failed)} sequences failed")
        self.failed = failed


@dataclass(frozen=True)
class StepShape:
    """What one step ran: its kind (prefill, decode or mixed), its sequences and the tokens it computed."""

    kind: str
    num_seqs: int
    num_tokens: int


@dataclass
class _LayeredPrefill:
    """A prompt batch whose forward pass runs a few layer parts per step (config.prefill_slice_ms)."""

    batch: list[Sequence]
    run: LayeredPass
    aborted: list[Sequence] = field(default_factory=list)  # their blocks are freed when the pass ends
    decodes_next: bool = False  # a slice ran last: the running sequences step next


class LLMEngine:
    """Continuous-batching engine over a paged KV cache."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or LoadedModel.load(config)
        if (self.loaded.dtype, self.loaded.device) != (config.torch_dtype, config.torch_device):
            raise ValueError(
                f"the loaded model is {self.loaded.dtype} on {self.loaded.device}, but this engine is "
                f"configured for {config.torch_dtype} on {config.torch_device}"
            )
        spec = self.loaded.spec
        self.layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim,
                               config.block_size, config.torch_dtype)
        num_blocks = config.kv_cache_bytes // self.layout.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes {config.kv_cache_bytes} holds no {self.layout.bytes_per_block}-byte block")
        ops = self.loaded.model.ops
        tiled = ops.tiles_kv(config.block_size)
        if isinstance(ops, CpuKernelOps) and not tiled:
            log.warning("blocks of a size that is not a multiple of 16 tokens: the decode and chunk "
                        "attention run on torch ops, not the compiled kernels", block_size=config.block_size)
        self.cache = KVCache(self.layout, num_blocks, config.torch_device, retile=ops.retile_kv if tiled else None)
        self.blocks = BlockManager(num_blocks, config.block_size)
        # Block hashes start from it: KV blocks are equal only for an equal model, dtype and block size.
        self.cache_namespace = (f"{self.loaded.source.name}|{config.dtype}|{config.block_size}"
                                if config.enable_prefix_caching else "")
        self._published: tuple[int, list[int]] = (-1, [])
        self._published_at = -PUBLISH_INTERVAL_S
        self.scheduler = Scheduler(SchedulerConfig(config.token_budget, config.max_num_seqs,
                                                         config.chunk_size), self.blocks)
        self.runner = ModelRunner(self.loaded.model, self.cache, config.torch_device)
        self.grammars = GrammarBackend(self.loaded.tokenizer, spec.vocab_size, self.loaded.eos_token_ids)
        self.max_model_len = min(config.max_model_len or spec.max_context, spec.max_context)
        if spec.max_context < spec.max_position_embeddings:
            log.info("context capped at the sliding window", max_context=spec.max_context)
        self.sequences: dict[str, Sequence] = {}
        self._generator = torch.Generator()
        self._generate_ids = itertools.count()
        self.last_step: StepShape | None = None  # what the latest step ran; None when it ran nothing
        # The latest step ran nothing and changed nothing: the next can only run after a call from
        # outside (a prompt queued whose blocks are held for pulls; a Release or an Abort frees them).
        self.stalled = False
        self._layered: _LayeredPrefill | None = None  # the prompt batch part-way through its layers

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None, matcher: Any = None) -> Sequence:
        """Queue a request for prefill. Raises ValueError for input the engine cannot serve.

        With prefix caching, its prompt reuses cached blocks of an equal prefix with an equal
        cache_salt (none: the unsalted ones), so tenants given distinct salts share no blocks.
        """
        if self.config.role is EngineRole.DECODE:
            raise ValueError("a decode engine takes requests through reserve() and import_kv()")
        if cache_salt is not None and len(cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")
        self._validate(request_id, prompt_token_ids, [], params)
        seq = self._new_sequence(request_id, prompt_token_ids, [], params, matcher)
        seq.cache_salt = cache_salt
        seq.block_hashes = self._hashes(seq.prompt_token_ids, cache_salt)
        self.scheduler.add(seq)
        return seq

    def _hashes(self, tokens: list[int], cache_salt: str | None) -> list[bytes]:
        """The chained hashes of tokens' full blocks; none when the engine caches no prefixes."""
        if not self.config.enable_prefix_caching:
            return []
        return block_hashes(tokens, self.blocks.block_size, cache_salt, self.cache_namespace)

    def _new_sequence(self, request_id: str, prompt: list[int], output: list[int],
                      params: SamplingParams, matcher: Any = None) -> Sequence:
        """A request _validate() passed. matcher: params.grammar's, built by the caller off the engine
        thread (a large grammar takes long to build) and fed output; None: built here."""
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(request_id, list(prompt), params, output_token_ids=list(output), seed=seed)
        if params.grammar is not None:  # a decode server's matcher consumes what prefill sampled
            seq.matcher = matcher or self.grammars.matcher(params.grammar, list(output))
        if output and self._finish_reason(seq, output[-1]) is not None:
            raise ValueError(f"request {request_id!r} has already finished: nothing left to decode")
        self.sequences[request_id] = seq
        return seq

    def _validate(self, request_id: str, prompt: list[int], output: list[int],
                  params: SamplingParams) -> None:
        if request_id in self.sequences:
            if self._layered is not None and self.sequences[request_id] in self._layered.aborted:
                raise RequestIdBusy(f"request id {request_id!r} was aborted part way through a layered pass, "
                                    "which frees it when it ends; try again")
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt) + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens"
            )
        vocab = self.loaded.spec.vocab_size
        if any(not 0 <= t < vocab for t in [*prompt, *output, *params.stop_token_ids]):
            raise ValueError("prompt, output or stop_token_ids contain a token id outside the vocabulary")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise ValueError("logit_bias names a token id outside the vocabulary")
        held = len(prompt) if self.config.role is EngineRole.PREFILL else len(prompt) + params.max_new_tokens
        needed = blocks_for(held, self.blocks.block_size)
        if needed > self.blocks.num_blocks:
            raise ValueError(
                f"the request needs {needed} KV blocks but the whole cache holds "
                f"{self.blocks.num_blocks}; give the engine more KV cache memory"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free everything it holds."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return
        if self._layered is not None and seq in self._layered.batch:
            # Its pass still writes into its blocks: they are freed when the pass ends.
            if seq not in self._layered.aborted:
                self._layered.aborted.append(seq)
            return
        self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ABORT
        self._retire(seq, RequestState.ABORTED)

    def _fail(self, seq: Sequence, exc: Exception) -> StepOutput:
        """End a request whose step raised: out of every queue, blocks freed, never run again.

        The KV slots its failed step may have written lie in its own blocks, never in a cached one
        (blocks are cached only after the step that computed them returned), so they are freed
        uncached here, and a later owner overwrites every slot before reading it: nothing of the
        failed step survives.
        """
        self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ERROR
        self._retire(seq, RequestState.FAILED)
        error = f"the engine step failed for this request: {type(exc).__name__}: {exc}"
        return StepOutput(seq.request_id, None, FinishReason.ERROR, error)

    def _retire(self, seq: Sequence, state: RequestState) -> None:
        # Every exit path frees the request's blocks here, so nothing leaks on finish, abort or failure.
        self.blocks.free(seq.request_id)
        seq.transition(state)
        self.sequences.pop(seq.request_id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work  # a layered prefill's batch is in scheduler.prefilling

    # -- the loop -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One forward pass: a prefill batch if any request waits (vLLM's order), else a decode step.

        In the DECODE role the queue holds only preempted requests, recomputed here from their tokens.
        With chunked prefill, every step is a mixed step instead. With layered prefill
        (prefill_slice_ms), a prompt batch that arrives while sequences decode runs a slice of its
        layer parts per step, the slices alternating with decode steps.

        A request's failure is its own: when a forward pass over several sequences raises, each is
        run again alone and only those that raise alone too fail (FinishReason.ERROR, blocks freed);
        a sampling error fails only its row's request. The others are sampled and advanced as in any
        step, and the engine goes on serving. When every sequence of a batch fails, a one-token
        probe tells the culprits (the probe runs: they fail) from a broken engine (the probe fails
        too: EngineBroken raises from here, and none of them is failed).
        """
        self.last_step, self.stalled = None, False
        before = self._queues()
        try:
            outputs = self._schedule_and_run()
        except _ForwardFailed as failed:
            return self._fail_batch(failed.failed, failed.__cause__)
        self.stalled = not outputs and self.last_step is None and self._queues() == before
        return outputs

    def _queues(self) -> tuple[int, int, int, int, _LayeredPrefill | None]:
        """What a step that runs nothing may still change (a preemption, a layered pass ended)."""
        s = self.scheduler
        return len(s.waiting), len(s.running), len(s.prefilling), self.blocks.num_free_blocks, self._layered

    def _schedule_and_run(self) -> list[StepOutput]:
        if self.config.chunk_size is not None:
            return self._mixed_step()
        if self._layered is not None:
            if self._layered.decodes_next and self.scheduler.running:
                self._layered.decodes_next = False
                return self._decode_step()
            return self._prefill_slice(self._layered)
        batch = self.scheduler.schedule_prefill()
        if batch and self.config.prefill_slice_ms is not None and self.scheduler.running:
            return self._start_layered(batch)
        if batch:
            return self._run_prefill(batch)
        return self._decode_step()

    def _start_layered(self, batch: list[Sequence]) -> list[StepOutput]:
        """Layered prefill: the batch's pass runs a slice of its layers now and the rest in later
        steps, each after a decode step of the running sequences."""
        try:
            run = self.runner.layered(batch, self._tables(batch))
        except Exception:  # building the inputs failed: the whole pass isolates the culprit
            return self._run_prefill(batch)
        self._layered = _LayeredPrefill(batch, run)
        self.scheduler.prefilling.extend(batch)
        return self._prefill_slice(self._layered)

    def _prefill_slice(self, layered: _LayeredPrefill) -> list[StepOutput]:
        """The pass's next layer parts, those that fit prefill_slice_ms (all that are left once
        nothing decodes).

        Aborted sequences of the batch keep their blocks until the pass has ended. When a slice
        raises, the batch's live sequences run again as one whole prefill, whose failures are
        isolated to their culprits as in any step (the KV slots written so far are rewritten)."""
        live = [s for s in layered.batch if s not in layered.aborted]
        if not live:  # every request of the pass was aborted: nothing to finish it for
            self._end_layered(layered)
            return []
        tokens = sum(s.num_tokens - s.num_computed_tokens for s in live)
        slice_s = self.config.prefill_slice_ms / 1000 if self.scheduler.running else float("inf")
        try:
            done = layered.run.advance(time.perf_counter() + slice_s)
            logits = layered.run.logits() if done else None
        except Exception as exc:
            log.warning("a layered prefill slice failed; its batch runs again whole", error=repr(exc))
            self._end_layered(layered)
            return self._run_prefill(live)
        self.last_step = StepShape("prefill_slice", len(live), tokens if done else 0)
        if not done:
            layered.decodes_next = True
            return []
        self._end_layered(layered)
        if layered.aborted:
            logits = logits[[i for i, s in enumerate(layered.batch) if s not in layered.aborted]]
        return self._prefilled(live, logits, [])

    def _end_layered(self, layered: _LayeredPrefill) -> None:
        self._layered = None
        for seq in layered.batch:
            self.scheduler.prefilling.remove(seq)
        for seq in layered.aborted:
            seq.finish_reason = FinishReason.ABORT
            self._retire(seq, RequestState.ABORTED)

    def _forward(self, seqs: list[Sequence],
                 run: Forward) -> tuple[list[Sequence], torch.Tensor, list[StepOutput]]:
        """run(seqs), the model over seqs: (the sequences that ran, their logits, the failed ones' outputs).

        No sequence's state has moved on yet (the steps update it only after this returns), so a
        failed batch attempt leaves nothing half-done to undo before its sequences run alone.
        Raises _ForwardFailed when no sequence ran.
        """
        failed: list[StepOutput] = []
        try:
            logits = run(seqs)
        except Exception as exc:
            isolated = isolate(seqs, run, exc)
            if not isolated.kept:
                raise _ForwardFailed(isolated.failed) from exc
            log.error("forward pass failed; its sequences ran alone and only the culprits fail",
                      failed_ids=[s.request_id for s, _ in isolated.failed], error=repr(exc), exc_info=exc)
            seqs, logits = isolated.kept, isolated.logits
            failed = [self._fail(seq, solo_exc) for seq, solo_exc in isolated.failed]
        return seqs, logits, failed

    def _fail_batch(self, failed: list[tuple[Sequence, Exception]], exc: Exception) -> list[StepOutput]:
        """Every sequence of a batch failed, alone too: fail them, unless the engine itself is broken."""
        if (probe_exc := self._probe(failed[0][0])) is not None:
            raise EngineBroken(f"a forward pass failed for all {len(failed)} sequences of its batch "
                               f"({exc!r}) and a one-token probe failed too ({probe_exc!r})") from probe_exc
        log.error("forward pass failed for every sequence of its batch, and a probe ran: they fail",
                  request_ids=[s.request_id for s, _ in failed], error=repr(exc), exc_info=exc)
        return [self._fail(seq, solo_exc) for seq, solo_exc in failed]

    def _probe(self, borrower: Sequence) -> Exception | None:
        """Run a one-token prompt through the model: None if it runs, else its error.

        It writes one KV slot, in the last block of borrower, a sequence of the failed batch: that
        sequence is failed (its blocks freed) if the probe runs, and runs elsewhere if it does not,
        so nothing reads the slot. The last block holds the borrower's newest position, not yet
        computed, so it is never a cached block (only computed full blocks are) another request reads.
        """
        probe = Sequence(PROBE_ID, [0], SamplingParams(max_new_tokens=1))
        try:
            self.runner.prefill([probe], [self.blocks.block_table(borrower.request_id)[-1:]])
        except Exception as probe_exc:
            return probe_exc
        return None

    def _tables(self, seqs: list[Sequence]) -> list[list[int]]:
        return [self.blocks.block_table(s.request_id) for s in seqs]

    def _decode_step(self) -> list[StepOutput]:
        batch, preempted = self.scheduler.schedule_decode()
        for seq in preempted:
            log.info("preempted", request_id=seq.request_id, free_blocks=self.blocks.num_free_blocks)
        if not batch:
            return []
        self.last_step = StepShape("decode", len(batch), len(batch))
        batch, logits, failed = self._forward(
            batch, lambda seqs: self.runner.decode(seqs, self._tables(seqs)))
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
        return failed + self._postprocess(batch, logits)

    def _mixed_step(self) -> list[StepOutput]:
        decodes, chunks, preempted = self.scheduler.schedule_mixed()
        for seq in preempted:
            log.info("preempted", request_id=seq.request_id, free_blocks=self.blocks.num_free_blocks)
        if not decodes and not chunks:
            return []
        self.last_step = StepShape("mixed" if chunks else "decode", len(chunks) + len(decodes),
                                   sum(n for _, n in chunks) + len(decodes))
        # Chunks first, then decodes: the order of the runner's logits rows.
        ran, logits, failed = self._forward([s for s, _ in chunks] + decodes,
                                            lambda seqs: self._run_mixed(*among(seqs, chunks, decodes)))
        ran_chunks, ran_decodes = among(ran, chunks, decodes)
        completed = self._advance_chunks(ran_chunks)
        for seq in ran_decodes:
            seq.num_computed_tokens = seq.num_tokens
        if not completed and not ran_decodes:
            return failed
        outputs = self._postprocess(completed + ran_decodes, logits)
        for seq in completed:
            if not seq.is_finished:
                seq.transition(RequestState.DECODING)
                self.scheduler.running.append(seq)
        return failed + outputs

    def _run_mixed(self, chunks: list[tuple[Sequence, int]], decodes: list[Sequence]) -> torch.Tensor:
        chunk_tables = self._tables([s for s, _ in chunks])
        return self.runner.mixed(chunks, decodes, chunk_tables, self._tables(decodes))

    def _advance_chunks(self, chunks: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Count each chunk's tokens as cached; returns the sequences whose prompt is now complete."""
        completed = []
        for seq, n in chunks:
            seq.num_computed_tokens += n
            self._cache_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                self.scheduler.prefilling.remove(seq)
                completed.append(seq)
        return completed

    def _run_prefill(self, batch: list[Sequence]) -> list[StepOutput]:
        self.last_step = StepShape("prefill", len(batch),
                                   sum(s.num_tokens - s.num_computed_tokens for s in batch))
        batch, logits, failed = self._forward(
            batch, lambda seqs: self.runner.prefill(seqs, self._tables(seqs)))
        return self._prefilled(batch, logits, failed)

    def _prefilled(self, batch: list[Sequence], logits: torch.Tensor,
                   failed: list[StepOutput]) -> list[StepOutput]:
        """After a prefill pass over batch: its blocks cached, its first tokens sampled."""
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
            self._cache_computed(seq)
        outputs = self._postprocess(batch, logits)
        for seq in batch:
            if seq.is_finished:
                continue
            if self.config.role is EngineRole.PREFILL:
                seq.transition(RequestState.KV_READY)  # parked until export + release
            else:
                seq.transition(RequestState.DECODING)
                self.scheduler.running.append(seq)
        return failed + outputs

    def _cache_computed(self, seq: Sequence) -> None:
        """Offer the prompt's full blocks computed so far to the prefix cache."""
        num_full = seq.num_computed_tokens // self.blocks.block_size
        self.blocks.cache(seq.request_id, seq.block_hashes[:num_full])

    def _cache_finished(self, seq: Sequence) -> None:
        """Offer a finished request's full blocks, its output's too, to the prefix cache: the next
        turn of a conversation repeats them (a decode or colocated engine; a prefill engine's
        outputs never had their KV computed here)."""
        if self.config.role is EngineRole.PREFILL or not self.config.enable_prefix_caching:
            return
        written = seq.prompt_token_ids + seq.output_token_ids[:-1]  # the last token's KV is never computed
        self.blocks.cache(seq.request_id, self._hashes(written, seq.cache_salt))

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.blocks.stats

    def published_cache(self, now: bool = False) -> tuple[int, list[int]]:
        """(version, the routing keys of every cached block): what the worker publishes to its
        schedulers with its heartbeats. The keys are listed again when the cache changed, at most
        every PUBLISH_INTERVAL_S unless `now` (a large cache takes milliseconds to list; the engine
        loop lists them when it goes idle). Call on the engine thread."""
        clock = time.monotonic()
        due = now or clock - self._published_at >= PUBLISH_INTERVAL_S
        if self._published[0] != self.blocks.version and due:
            self._published, self._published_at = (self.blocks.version, self.blocks.cached_keys()), clock
        return self._published

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (running requests keep their blocks); returns how many blocks."""
        return self.blocks.reset_cache()

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        greedy = plain_greedy_tokens(logits, batch, self.loaded.eos_token_ids, self.runner.greedy)
        return [self._advance(seq, logits[row], greedy[row]) for row, seq in enumerate(batch)]

    def _advance(self, seq: Sequence, logits: torch.Tensor, token: int | None) -> StepOutput:
        """Sample seq's next token from its row of logits (unless the batched greedy pass chose it),
        append it, and retire seq if it ended."""
        try:
            if token is None:
                token = sample_one(logits, seq, self.loaded.eos_token_ids, self._generator)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                raise ValueError(f"the grammar refused the sampled token {token} (min_tokens against a "
                                 f"finished grammar?): {seq.matcher.get_error()[:300]}")
            logprobs = token_logprobs(logits, token, seq.params.top_logprobs) if seq.params.logprobs else None
            prompt_logprobs = self._take_prompt_logprobs(seq)
        except Exception as exc:  # sampling is per request: its neighbours still get their tokens
            log.error("sampling failed; the request fails", request_id=seq.request_id, error=repr(exc),
                      exc_info=exc)
            return self._fail(seq, exc)
        seq.output_token_ids.append(token)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            seq.finish_reason = reason
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
            self._cache_finished(seq)
            self._retire(seq, RequestState.FINISHED)
        return StepOutput(seq.request_id, token, reason, num_cached_tokens=seq.num_cached_tokens,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> tuple[TokenLogprobs, ...] | None:
        """With the first token of a request that asked: its prompt's log probabilities, in order.
        (KeyError, which fails the request alone, should a position be missing.)"""
        if seq.params.prompt_logprobs is None or seq.num_output_tokens != 0:
            return None
        scores = tuple(seq.prompt_logprobs[p] for p in range(1, seq.num_prompt_tokens))
        seq.prompt_logprobs.clear()
        return scores

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if seq.matcher is not None and seq.matcher.is_stopped():
            return FinishReason.STOP  # the grammar is complete: it allows nothing more
        if seq.num_output_tokens >= params.min_new_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.loaded.eos_token_ids):
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- disaggregation -------------------------------------------------------------------------

    def export_kv(self, request_id: str, first_block: int = 0) -> torch.Tensor:
        """The KV blocks of a prefilled (KV_READY) request from its first_block-th on (the puller has
        the earlier ones cached), as one contiguous tensor."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.state is not RequestState.KV_READY:
            state = seq.state.value if seq else "unknown, released, or finished at its first token"
            raise ValueError(f"request {request_id!r} holds no KV blocks to export ({state})")
        table = self.blocks.block_table(request_id)
        if not 0 <= first_block < len(table):
            raise ValueError(f"request {request_id!r} holds {len(table)} blocks; a pull from block "
                             f"{first_block} takes none")
        return self.cache.export(table[first_block:])

    def release(self, request_id: str) -> None:
        """Free a KV_READY request once its blocks have been pulled (or its lease ran out).

        Releasing an unknown or already released request does nothing, so a retry is harmless.
        """
        seq = self.sequences.get(request_id)
        if seq is None:
            return
        if seq.state is not RequestState.KV_READY:
            raise ValueError(f"request {request_id!r} is {seq.state.value}; only kv_ready requests are released")
        self._retire(seq, RequestState.FINISHED)

    def reserve(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                params: SamplingParams, cache_salt: str | None = None, matcher: Any = None) -> list[int]:
        """Reserve destination blocks for a request whose prompt was prefilled elsewhere.

        output_token_ids holds what was sampled there (at least the first token). Raises OutOfBlocks
        when there is no room now (the caller retries later), ValueError when there never will be.
        With prefix caching the table starts with the cached blocks of the prompt's longest cached
        prefix (under cache_salt; never the block of its last token): those need no pull, and
        seq.num_cached_tokens says how many tokens they hold.
        """
        if not output_token_ids:
            raise ValueError("reserve() needs the token(s) sampled at prefill")
        if cache_salt is not None and len(cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")
        # First: a request that can never fit is a ValueError (it fails), not OutOfBlocks (retried).
        self._validate(request_id, prompt_token_ids, output_token_ids, params)
        if len(self.scheduler.running) + self._num_transferring >= self.config.max_num_seqs:
            raise OutOfBlocks(f"the decode batch is full ({self.config.max_num_seqs} sequences)")
        num_prompt = len(prompt_token_ids)
        hashes = self._hashes(prompt_token_ids, cache_salt)
        lookup = hashes[:(num_prompt - 1) // self.blocks.block_size]
        if not self.blocks.can_allocate(num_prompt + 1, lookup):  # + the slot the first decode step writes
            raise OutOfBlocks(f"{num_prompt} tokens do not fit {self.blocks.num_free_blocks} free blocks")
        seq = self._new_sequence(request_id, prompt_token_ids, output_token_ids, params, matcher)
        seq.cache_salt, seq.block_hashes = cache_salt, hashes
        seq.num_cached_tokens = len(self.blocks.cached_prefix(lookup)) * self.blocks.block_size
        seq.transition(RequestState.TRANSFERRING)
        return self.blocks.allocate(request_id, num_prompt, lookup)

    @property
    def _num_transferring(self) -> int:
        return sum(s.state is RequestState.TRANSFERRING for s in self.sequences.values())

    def import_kv(self, request_id: str, blocks: torch.Tensor, in_memory_layout: bool = False) -> None:
        """Write the pulled blocks into the reserved ones after those the prefix cache supplied, and
        start decoding the request; in_memory_layout: converted by cache.to_memory_layout already."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.state is not RequestState.TRANSFERRING:
            raise ValueError(f"request {request_id!r} has no reserved blocks awaiting KV")
        first = seq.num_cached_tokens // self.blocks.block_size
        self.cache.import_(self.blocks.block_table(request_id)[first:], blocks, in_memory_layout)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.transition(RequestState.DECODING)
        self.scheduler.running.append(seq)

    # -- convenience ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion together; returns each one's output token ids (a request whose
        step failed returns the tokens it had: its Sequence's state is FAILED)."""
        seqs = [self.add_request(f"generate-{next(self._generate_ids)}", p, params) for p in prompts]
        while self.has_work:
            self.step()
        return [s.output_token_ids for s in seqs]
